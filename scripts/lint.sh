#!/usr/bin/env bash
# Lint, format and type checks (configured in pyproject.toml): exits non-zero on the first failing check.
#   bash scripts/lint.sh            # the whole repository
#   bash scripts/lint.sh src/x.py   # ruff on the given paths only (mypy always checks the package)
# Needs the `test` extra: pip install -c constraints.txt -e ".[test]"
set -euo pipefail
cd "$(dirname "$0")/.."
paths=("${@:-.}")
echo "ruff check ${paths[*]}"
python -m ruff check "${paths[@]}"
echo "ruff format --check ${paths[*]}"
python -m ruff format --check "${paths[@]}"
echo "mypy (src/phantomgrad)"
python -m mypy
