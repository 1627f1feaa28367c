"""The memory worker: ``python -m phantomgrad.experiments.bench --memory-worker SPEC`` (see .memory)."""

import sys

from .memory import worker

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        raise SystemExit(worker(sys.argv[2]))
    raise SystemExit("use `phantomgrad bench`; this entry point only runs memory workers")
