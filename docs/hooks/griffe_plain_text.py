"""Griffe extension: show the package's docstrings, written as plain text with reST roles, right
in Markdown.

* ``:class:`~phantomgrad.deq.DEQInfo``` (also ``:meth:``, ``:func:``, ``:data:``, ``:attr:``,
  ``:mod:``) becomes the code span ``DEQInfo`` (the full path without ``~``).
* The ``*`` of a one-letter fixed point (h*, z*, Z*) is escaped, so Markdown does not read the
  maths as emphasis; code spans, fenced and indented blocks (formulas set apart) are left as
  written. The documentation pages go through the same function (the MkDocs hook).
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|meth|func|data|attr|mod|obj|exc):`(~?)([^`]+)`")
STAR = re.compile(r"(?<![\w*])([A-Za-z])\*(?!\*)")
CODE_SPAN = re.compile(r"(``?[^`]+``?)")


def _role(m: re.Match) -> str:
    return f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`"


def plain_to_markdown(text: str) -> str:
    out, in_block, in_fence, previous_blank = [], False, False, True
    for line in text.splitlines():
        blank = not line.strip()
        indented = line.startswith("    ")
        in_block = (in_block and (indented or blank)) or (indented and previous_blank)
        fence = line.lstrip().startswith(("```", "~~~"))
        in_fence = in_fence != fence  # a fence line opens or closes; both are left alone
        if not (in_block or in_fence or fence):
            line = ROLE.sub(_role, line)
            parts = CODE_SPAN.split(line)
            line = "".join(p if p.startswith("`") else STAR.sub(r"\1\\*", p) for p in parts)
        out.append(line)
        previous_blank = blank
    return "\n".join(out)


class PlainTextDocstrings(griffe.Extension):
    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain_to_markdown(obj.docstring.value)
