"""MkDocs hook: the pages that are generated from the code at build time, so they cannot drift.

* ``<!-- phantomgrad:api MODULE [MODULE ...] -->`` expands to one mkdocstrings entry
  (``::: phantomgrad.NAME``) for every name of ``phantomgrad.__all__`` (and of
  ``phantomgrad.models.__all__`` for ``phantomgrad.models``) defined in one of the modules.
  After the build, a public name that no API page documents fails the build.
* ``<!-- phantomgrad:config-keys -->`` expands to the table of ``phantomgrad train``'s config
  keys, read from the fields of ``TrainConfig`` (type, default, meaning: the field's
  ``metadata["help"]`` or else the comment after it in the source; the values allowed, from
  ``metadata["choices"]`` / ``metadata["within"]`` where the fields carry them).
* ``benchmarks.md`` is generated from the repository's BENCHMARKS.md (links into docs/ rewritten).
* Every page goes through ``plain_to_markdown`` (the fixed points h*, z* are not emphasis).
* Links of the results pages to a folder point to its README.md, or to a generated ``index.md``
  that lists the folder's files (plots shown); a link to the repository's BENCHMARKS.md points to
  ``benchmarks.md``. The results pages themselves stay as the experiments wrote them.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import posixpath
import re
import sys
import tokenize
import typing
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, InclusionLevel

sys.path.insert(0, str(Path(__file__).parent))
from griffe_plain_text import plain_to_markdown  # noqa: E402  (the docstrings' treatment, for pages too)

ROOT = Path(__file__).resolve().parents[2]
API_MARK = re.compile(r"<!-- phantomgrad:api ([\w. ]+) -->")
CONFIG_MARK = "<!-- phantomgrad:config-keys -->"
LINK = re.compile(r"(\]\()([^)#\s]+)((?:#[^)\s]*)?\))")
PAGE_NAMES = ("README.md", "index.md")
_documented: set[str] = set()


# ---- API reference --------------------------------------------------------------------
def public_objects() -> dict[str, object]:
    """Qualified public name -> object, for every name exported by the package and its models."""
    out = {}
    for package in ("phantomgrad", "phantomgrad.models"):
        mod = importlib.import_module(package)
        for name in mod.__all__:
            out[f"{package}.{name}"] = getattr(mod, name)
    return out


def _home(obj: object) -> str:
    """The module that defines ``obj``: its ``__module__``, or for data (a registry dict) the
    first phantomgrad submodule that holds the same object."""
    home = getattr(obj, "__module__", None)
    if isinstance(home, str) and not isinstance(obj, (dict, list, tuple)):
        return home
    for name, mod in sorted(sys.modules.items()):
        if name.startswith("phantomgrad.") and any(v is obj for v in vars(mod).values()):
            return name
    return "phantomgrad"


def _defined_in(obj: object, modules: list[str]) -> bool:
    home = _home(obj)
    return any(home == m or home.startswith(m + ".") for m in modules)


def api_entries(modules: list[str]) -> str:
    names = [q for q, obj in public_objects().items() if _defined_in(obj, modules)]
    if not names:
        raise PluginError(f"no public object of phantomgrad is defined in {modules}; fix the API page's marker")
    _documented.update(names)
    return "\n\n".join(f"::: {q}" for q in names)


# ---- config keys ----------------------------------------------------------------------
def _field_comments(cls: type) -> dict[str, str]:
    """The comment that ends each ``name: type = default  # comment`` line of a dataclass."""
    comments: dict[str, str] = {}
    source = inspect.getsource(cls)
    for line in source.splitlines():
        match = re.match(r"\s+(\w+)\s*:[^=]+=.*", line)
        if not match:
            continue
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
        except tokenize.TokenError:  # a definition over several lines: no trailing comment to read
            continue
        text = [t.string for t in tokens if t.type == tokenize.COMMENT]
        if text:
            comments[match.group(1)] = text[-1].lstrip("#").strip()
    return comments


def _type_name(hint: object) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default).replace("'", "")
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "(required)"


def _allowed(f: dataclasses.Field, tasks: tuple[str, ...]) -> str:
    """The values a key allows, from its metadata: choices (per task where they depend on it) or
    an interval."""
    meta = f.metadata
    if meta.get("choices"):
        if meta.get("per_task"):
            return "; ".join(f"{task}: {', '.join(meta['choices'](task))}" for task in tasks)
        return ", ".join(meta["choices"](tasks[0]))
    return str(meta["within"]) if meta.get("within") is not None else ""


def config_table() -> str:
    from phantomgrad.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    comments = _field_comments(TrainConfig)
    fields = dataclasses.fields(TrainConfig)
    task = next(f for f in fields if f.name == "task")
    tasks = tuple(task.metadata["choices"]("")) if task.metadata.get("choices") else (task.default,)
    with_allowed = any(f.metadata.get("choices") or f.metadata.get("within") for f in fields)
    rows = [
        "| key | type | default | meaning |" + (" allowed |" if with_allowed else ""),
        "|---|---|---|---|" + ("---|" if with_allowed else ""),
    ]
    for f in fields:
        meaning = f.metadata.get("help") or comments.get(f.name, "")
        cells = [f"`{f.name}`", _type_name(hints[f.name]), f"`{_default(f)}`", meaning]
        if with_allowed:
            cells.append(_allowed(f, tasks))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


# ---- links to folders and to the repository root ---------------------------------------
def _local(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:|^/", target)


def _resolve(page_src: str, target: str) -> str:
    """``target`` relative to the docs folder (may start with ``..`` when it leaves it)."""
    return posixpath.normpath(posixpath.join(posixpath.dirname(page_src), target))


def _folder_page(docs_dir: Path, path: str) -> str | None:
    """The page a link to folder ``path`` (relative to docs_dir) should open, if it is a folder."""
    folder = docs_dir / path
    if path.startswith("..") or not folder.is_dir():
        return None
    name = next((n for n in PAGE_NAMES if (folder / n).exists()), "index.md")
    return posixpath.join(path, name)


def _folder_index(docs_dir: Path, path: str) -> str:
    """A page listing a results folder's files, with its plots shown."""
    folder = docs_dir / path
    lines = [f"# {path}", "", "The files of this results folder, as the experiment wrote them.", ""]
    for item in sorted(folder.iterdir()):
        if item.is_dir():
            sub = _folder_page(docs_dir, posixpath.join(path, item.name))
            lines.append(f"- [{item.name}/]({posixpath.relpath(sub, path)})")
        elif item.suffix == ".png":
            lines += [f"- {item.name}", "", f"    ![{item.name}]({item.name})", ""]
        else:
            lines.append(f"- [{item.name}]({item.name})")
    return "\n".join(lines) + "\n"


def _rewrite_links(markdown: str, page_src: str, docs_dir: Path) -> str:
    def fix(m: re.Match) -> str:
        target = m.group(2)
        if not _local(target):
            return m.group(0)
        path = _resolve(page_src, target)
        if path == "../BENCHMARKS.md":
            new = "benchmarks.md"
        else:
            new = _folder_page(docs_dir, path)
            if new is None:
                return m.group(0)
        return m.group(1) + posixpath.relpath(new, posixpath.dirname(page_src) or ".") + m.group(3)

    return LINK.sub(fix, markdown)


# ---- mkdocs events --------------------------------------------------------------------
def on_pre_build(config):
    _documented.clear()


def on_files(files, config):
    docs_dir = Path(config["docs_dir"])
    text = (ROOT / "BENCHMARKS.md").read_text()
    text = re.sub(r"\]\(docs/", "](", text)
    files.append(File.generated(config, "benchmarks.md", content=text))
    # every folder that a page links to and that has no page of its own gets a generated index
    needed: set[str] = set()
    for page in files.documentation_pages():
        for m in LINK.finditer(page.content_string):
            if _local(m.group(2)):
                new = _folder_page(docs_dir, _resolve(page.src_uri, m.group(2)))
                while new is not None and files.get_file_from_path(new) is None and new not in needed:
                    needed.add(new)  # a generated index links to its sub-folders' pages too
                    subs = [p for p in (docs_dir / posixpath.dirname(new)).iterdir() if p.is_dir()]
                    needed.update(_folder_page(docs_dir, posixpath.relpath(s, docs_dir)) for s in subs)
                    new = None
    for page_path in sorted(needed):
        if files.get_file_from_path(page_path) is None:
            content = _folder_index(docs_dir, posixpath.dirname(page_path))
            files.append(File.generated(config, page_path, content=content, inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown, page, config, files):
    markdown = _rewrite_links(markdown, page.file.src_uri, Path(config["docs_dir"]))
    markdown = plain_to_markdown(markdown)
    markdown = API_MARK.sub(lambda m: api_entries(m.group(1).split()), markdown)
    if CONFIG_MARK in markdown:
        markdown = markdown.replace(CONFIG_MARK, config_table())
    return markdown


def on_post_build(config):
    missing = sorted(set(public_objects()) - _documented)
    if missing:
        raise PluginError(
            f"public objects missing from the API reference: {', '.join(missing)}; "
            "add their module to a `<!-- phantomgrad:api ... -->` marker under docs/api/"
        )
