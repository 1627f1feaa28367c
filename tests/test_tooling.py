"""Repository-wide rules: small modules, and the lint, format and type checks of scripts/lint.sh."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def test_no_source_file_is_over_600_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / "src").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (one job per module, at most {MAX_LINES} lines): {long}"


@pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None or importlib.util.find_spec("mypy") is None,
    reason="ruff or mypy is not installed (pip install -c constraints.txt -e '.[test]')",
)
def test_lint_format_and_types_pass():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "lint.sh")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
