"""Every key of TrainConfig, on every task: a non-default value changes the run or is refused.

Issue 23 found keys that were accepted and did nothing (jac_reg_* on the image task, pretrain_* on
the graph task, ...). This test goes through ``dataclasses.fields(TrainConfig)`` (so a key added
later is covered without editing it) and, for each task, trains a tiny run (two steps, one thread,
in-process) with one key moved away from its default. The key passes when

* the config or the run refuses it with a :class:`ConfigError` (exit 2 in the CLI), or
* some output differs from the baseline run's: the summary, the metrics of metrics.csv (wall-clock
  columns left out) or the trained parameters.

A key that legitimately changes nothing numeric on a healthy run (where files go, how often the
host reads, logging) is listed in ``NO_NUMERIC_EFFECT`` with the reason. A key that acts only
together with another (momentum with SGD) gets its companion keys in ``PROBES``; the baseline
then has the companions too. A new key is probed automatically from its type and default; if
that probe is accepted and changes nothing, the test fails and names the key.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from phantomgrad.train import registry
from phantomgrad.train.config import ConfigError, TrainConfig

pytestmark = pytest.mark.slow

TASK_BASE: dict[str, list[str]] = {
    "image": [
        "arch.channels=[8,8]",
        "arch.head_channels=[4,8]",
        "arch.final_channels=16",
        "batch_size=8",
        "data_options.train_subset=16",
        "data_options.test_subset=8",
    ],
    "graph": [
        "task=graph",
        "dataset=chains",
        "data_options={chains_per_class: 2, chain_len: 3, feature_dim: 4, split: [4, 2, 4]}",
        "arch.hidden=4",
    ],
    "lm": [
        "task=lm",
        "dataset=bible",
        "data_dir=TEXT_DIR",
        "model=deq-transformer-tiny",
        "data_options.seq_len=8",
        "data_options.train_tokens=129",
        "data_options.eval_tokens=65",
        "batch_size=8",
    ],
}
COMMON = ["epochs=1", "solver_max_iter=3", "backward_max_iter=2", "progress=false", "threads=1"]

# Keys that change nothing numeric on a healthy tiny run, and why.
NO_NUMERIC_EFFECT: dict[str, str] = {
    "task": "the axis of this test: each task has its own baseline",
    "dataset": "chooses the data (the data tests read every dataset; most need files this test does not make)",
    "data_dir": "where the dataset's files are read from: the same data gives the same run",
    "model": "chooses a preset network (test_config builds every registered preset)",
    "out_dir": "where the run's files go",
    "progress": "the progress bar only",
    "threads": "CPU threads: the same numbers (up to reduction order) in another time",
    "device": "auto is the CPU here, and no GPU is visible",
    "tensorboard": "also writes TensorBoard files (needs the tensorboard package); the numbers are the same",
    "log_every": "how often the host reads the metrics; the numbers are the same",
    "warn_not_converged": "logging only (tests/test_frictions.py checks that it silences the warning)",
    "max_bad_steps": "acts only after non-finite steps (tests/test_train.py drives the divergence guard)",
    "fallback_solver": "acts only on a non-finite solve (tests/test_deq.py tests the fallback)",
    "solver_fused": "the same numbers up to the rounding of the norms (tests/test_fused.py); compiling is slow here",
    "resume": "continues a run from its checkpoint (the resume tests); a fresh run is the same run",
    "warm_start_cache_mb": (
        "where the reuse cache's rows live (memory under a cap, or a file) and the cap, which a tiny state never "
        "reaches: the same rows (tests/test_batch.py: file-backed equals in memory; refused without reuse)"
    ),
    "dist_timeout": "the process group's timeout under torchrun; a single process has none",
}

# Probes: overrides that move the key (first) and the companion keys it needs to act (also in the baseline).
PROBES: dict[str, dict[str, list[str]] | list[str]] = {
    "data_options": {
        "image": ["data_options.train_subset=24"],
        "graph": ["data_options={chains_per_class: 3, chain_len: 3, feature_dim: 4, split: [4, 2, 4]}"],
        "lm": ["data_options.train_tokens=193"],
    },
    "arch": {"image": ["arch.final_channels=24"], "graph": ["arch.hidden=6"], "lm": ["arch.d_ff=32"]},
    "dropout": ["dropout=0.5"],
    "solver": ["solver=broyden"],
    "solver_max_iter": ["solver_max_iter=2"],
    "solver_tol": ["solver_tol=0.9"],
    "solver_stop": ["solver_stop=abs", "solver_tol=0.5"],
    "backward": ["backward=jfb"],
    "k": ["k=2"],
    "damping": ["damping=0.9"],
    "backward_options": ["backward_options={low: 0.9999, high: 0.99999, k_step: 3}", "backward=adaptive"],
    "backward_solver": ["backward_solver=fixed_point", "backward=implicit", "backward_max_iter=4"],
    "backward_max_iter": ["backward_max_iter=1", "backward=implicit"],
    "backward_tol": ["backward_tol=0.9", "backward=implicit"],
    "trajectory_states": ["trajectory_states=[1]"],
    "trajectory_weight": {  # acts with trajectory_states, the image task's; refused alone elsewhere
        "image": ["trajectory_weight=3.0", "trajectory_states=[1]"],
        "lm": ["trajectory_weight=3.0"],
        "graph": ["trajectory_weight=3.0"],
    },
    "pretrain_steps": ["pretrain_steps=1"],
    "pretrain_depth": {
        "image": ["pretrain_depth=2", "pretrain_steps=1"],
        "lm": ["pretrain_depth=2", "pretrain_steps=1"],
        "graph": ["pretrain_depth=2"],
    },
    "jac_reg_weight": ["jac_reg_weight=5.0", "jac_reg_freq=1.0"],
    "jac_reg_freq": ["jac_reg_freq=1.0", "jac_reg_weight=5.0"],
    "epochs": ["epochs=2"],
    "batch_size": ["batch_size=4"],
    "optimizer": ["optimizer=sgd"],
    "lr": ["lr=0.05"],
    "momentum": ["momentum=0.5", "optimizer=sgd"],
    "weight_decay": ["weight_decay=0.5"],
    "schedule": ["schedule=constant", "epochs=2"],  # chains takes one step per epoch, at the peak lr
    "grad_clip": ["grad_clip=0.001"],
    "precision": ["precision=bf16"],
    "monitor_every": ["monitor_every=1"],
    "monitor_rescale": ["monitor_rescale=true", "monitor_every=1"],
    "seed": ["seed=1"],
    "eval_every": ["eval_every=2", "epochs=2"],
    "radius_every": ["radius_every=0"],
    "bn_recalibrate": ["bn_recalibrate=2"],
    "warm_start_weight": {  # acts with a learned start; the IGNN has no init head
        "image": ["warm_start_weight=0.5", "warm_start=learned"],
        "lm": ["warm_start_weight=0.5", "warm_start=learned"],
        "graph": ["warm_start_weight=0.5"],
    },
}

TIME_COLUMNS = ("seconds", "time", "share")  # wall-clock columns of metrics.csv and the summary


def _auto_probe(key: str) -> list[str]:
    """A non-default value from the key's default: a new key is probed without editing this file."""
    f = TrainConfig.__dataclass_fields__[key]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    if isinstance(default, bool):
        return [f"{key}={str(not default).lower()}"]
    if isinstance(default, int):
        return [f"{key}={default + 1}"]
    if isinstance(default, float):
        return [f"{key}={default * 0.5 if default else 0.5}"]
    choices = f.metadata.get("choices")
    if isinstance(default, str) and choices is not None:
        other = [c for c in choices(TrainConfig.task) if c != default]
        if other:
            return [f"{key}={other[0]}"]
    pytest.fail(f"config key {key!r} has no probe: add it to PROBES or NO_NUMERIC_EFFECT in {Path(__file__).name}")


def _probe(key: str, task: str) -> list[str]:
    probe = PROBES.get(key)
    if isinstance(probe, dict):
        return probe[task]
    return probe if probe is not None else _auto_probe(key)


def _numbers(value: Any) -> Any:
    """Outputs without the wall-clock fields and the run directory."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items() if not any(t in k for t in TIME_COLUMNS) and k != "out_dir"}
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def _fingerprint(out_dir: Path) -> dict[str, Any]:
    summary = json.loads((out_dir / "summary.json").read_text())
    with open(out_dir / "metrics.csv") as f:
        rows = [_numbers(row) for row in csv.DictReader(f)]
    state = torch.load(out_dir / "checkpoint.pt", weights_only=False)["model"]
    params = {name: (float(t.double().sum()), float(t.double().pow(2).sum())) for name, t in state.items()}
    return {"summary": _numbers(summary), "metrics": rows, "params": params}


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    line = "in the beginning god created the heaven and the earth . and the lord said unto moses .\n"
    (d / "bible-kjv.txt").write_text(line * 200)
    return d


@pytest.fixture(scope="module")
def runner(tmp_path_factory, text_dir):
    """run(task, overrides) -> fingerprint, or the ConfigError's text; the report's plots are skipped."""
    import phantomgrad.train.trainer as trainer_module

    root = tmp_path_factory.mktemp("keys")
    cache: dict[tuple[str, ...], Any] = {}
    patch = pytest.MonkeyPatch()
    patch.setattr(trainer_module, "write_report", lambda *args, **kwargs: None)

    def run(task: str, overrides: list[str]) -> dict[str, Any] | str:
        base = [o.replace("TEXT_DIR", str(text_dir)) for o in TASK_BASE[task]] + COMMON
        key = (task, *overrides)
        if key not in cache:
            out_dir = root / f"run{len(cache)}"
            try:
                cfg = TrainConfig.from_sources(None, [*base, *overrides, f"out_dir={out_dir}"])
                trainer_module.train(cfg)
                cache[key] = _fingerprint(out_dir)
            except ConfigError as err:
                cache[key] = str(err)
        return cache[key]

    yield run
    patch.undo()


KEYS = [f.name for f in dataclasses.fields(TrainConfig)]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("task", list(registry.TASKS))
def test_every_key_acts_on_the_task_or_is_refused(runner, task, key):
    if key in NO_NUMERIC_EFFECT:
        assert key in KEYS  # listed with its reason; nothing to run
        return
    moved, *companions = _probe(key, task)
    baseline = runner(task, companions)
    assert not isinstance(baseline, str), f"the baseline of {key} on task={task} was refused: {baseline}"
    probed = runner(task, [*companions, moved])
    if isinstance(probed, str):  # refused: one line that names the key
        assert "\n" not in probed and moved.split("=")[0].split(".")[0] in probed, probed
        return
    assert probed != baseline, (
        f"{moved} on task={task} was accepted and changed nothing (summary, metrics.csv, parameters): "
        "make it act on this task, refuse it (the task's `refuses` in train/registry.py), or list it in "
        "NO_NUMERIC_EFFECT with the reason"
    )


def test_the_exemptions_name_real_keys():
    """An exemption of a key that no longer exists is stale (PROBES may name a key that is landing)."""
    assert set(NO_NUMERIC_EFFECT) - set(KEYS) == set(), "a listed key no longer exists"
