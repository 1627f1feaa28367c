"""The package as a user gets it: ``python -m build`` makes an sdist and a wheel from it, and
the wheel, installed into a fresh virtual environment with no repository on the path, runs
``phantomgrad --version``, the README's ten-line example and a tiny ``phantomgrad train``.

The environment reuses the torch of the interpreter running the tests: a ``.pth`` file in the new
environment lists that interpreter's site-packages directories. ``venv --system-site-packages`` is
not enough: started from a virtualenv (or a conda environment), it exposes the *base* interpreter's
packages, which need not hold torch. The test checks that ``phantomgrad`` is imported from the
environment, not from the repository. It runs in the default suite (under a minute).
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def run(args, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def running_site_packages() -> list[str]:
    """The site-packages directories of the interpreter running the tests (system, virtualenv or conda)."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def share_site_packages(python: Path, env: dict[str, str], cwd: Path) -> None:
    """Let the environment of ``python`` import what the running interpreter has installed (torch and the
    other dependencies), after its own packages: plain path lines in a ``.pth`` file. Plain lines do not run
    the ``.pth`` files of those directories, so the repository's editable install stays invisible there."""
    own = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=cwd, env=env)
    target = Path(own.stdout.strip())
    target.mkdir(parents=True, exist_ok=True)
    (target / "_running_interpreter.pth").write_text("\n".join(running_site_packages()) + "\n")


@pytest.mark.slow
def test_wheel_installs_and_runs(tmp_path):
    pytest.importorskip("build", reason="the test extra is not installed: pip install -c constraints.txt -e '.[test]'")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"

    # sdist, then the wheel built from the unpacked sdist (so the sdist is complete); the build
    # backend is the installed setuptools (no download)
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], cwd=tmp_path, env=env)
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    assert wheels[0].name == f"phantomgrad-{version}-py3-none-any.whl"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path, env=env)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    share_site_packages(python, env, tmp_path)
    run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheels[0]],
        cwd=tmp_path,
        env=env,
    )

    where = run(
        [
            python,
            "-c",
            "import phantomgrad, pathlib; p = pathlib.Path(phantomgrad.__file__).parent; "
            "print(p); print(phantomgrad.__version__); print((p / 'py.typed').exists())",
        ],
        cwd=tmp_path,
        env=env,
    ).stdout.split()
    assert Path(where[0]).resolve().is_relative_to(venv.resolve()), f"imported from {where[0]}, not the environment"
    assert where[1:] == [version, "True"]

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Ten lines\n\n```python\n(.*?)```", readme, re.S).group(1)
    check = "\nassert z.shape == (8, 32) and all(p.grad is not None for p in deq.parameters())\n"
    (tmp_path / "ten_lines.py").write_text(code + check)
    run([python, "ten_lines.py"], cwd=tmp_path, env=env)

    # the CLI needs no file of the repository (its defaults live in TrainConfig): a tiny training run
    run(
        [
            bindir / "phantomgrad",
            "train",
            "epochs=1",
            "threads=1",
            "progress=false",
            "out_dir=run",
            "data_options={train_subset: 64, test_subset: 64}",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert (tmp_path / "run" / "summary.json").exists()

    out = run([bindir / "phantomgrad", "--version"], cwd=tmp_path, env=env).stdout
    assert version in out
