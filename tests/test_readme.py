"""The README's example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## Ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["z"].shape == (8, 32)
    assert scope["info"].converged.all()
    assert all(p.grad is not None for p in scope["deq"].parameters())
