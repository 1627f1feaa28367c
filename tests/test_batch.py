"""The data path knows its samples: every task's datasets yield the index, the step receives one Batch,
and the trainer's warm start (warm_start=learned|reuse|learned+reuse) plugs in there."""

from __future__ import annotations

import csv

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import TRAIN_TINY, train_killed_in_epoch
from phantomgrad.data.batch import Batch, as_batch
from phantomgrad.train.builders import build_task
from phantomgrad.train.checkpoint import load_checkpoint
from phantomgrad.train.config import ConfigError, TrainConfig
from phantomgrad.train.trainer import train

TINY = [*TRAIN_TINY, "data_options={train_subset: 384, test_subset: 128}", "radius_every=0"]


def _cfg(tmp_path, *extra):
    return TrainConfig.from_sources(None, TINY + [f"out_dir={tmp_path}", *extra])


def test_the_image_task_yields_indices_and_its_step_takes_a_batch(tmp_path):
    task = build_task(_cfg(tmp_path))
    warm = [cb for cb in task.callbacks if type(cb).__name__ == "WarmStart"]
    assert len(warm) == 1 and warm[0].cache is not None  # warm_start=auto is reuse on the image task
    assert not any(type(cb).__name__ == "WarmStart" for cb in build_task(_cfg(tmp_path, "warm_start=none")).callbacks)
    image, label, index = task.train_set[5]
    assert index == 5 and image.shape == (1, 8, 8)
    batch = next(iter(DataLoader(task.train_set, batch_size=4, shuffle=True, collate_fn=task.collate)))
    assert isinstance(batch, Batch) and batch.indices.dtype == torch.int64
    assert all(torch.equal(batch.inputs[j], task.train_set[int(i)][0]) for j, i in enumerate(batch.indices))
    model = task.model.eval()
    with torch.no_grad():
        a = task.step(model, batch, torch.device("cpu"), None)
        b = task.step(model, (batch.inputs, batch.targets), torch.device("cpu"), None)  # a plain pair still works
    assert torch.equal(a.loss, b.loss)
    with pytest.raises(TypeError, match="takes a Batch"):
        as_batch(batch.inputs)


def test_the_lm_and_graph_tasks_yield_indices(tmp_path):
    chains = build_task(TrainConfig.from_sources(None, ["task=graph", "dataset=chains", f"out_dir={tmp_path}"]))
    batch = next(iter(DataLoader(chains.train_set, batch_size=1, collate_fn=chains.collate)))
    assert batch.inputs == "train" and batch.indices.tolist() == [0]
    mutag = TrainConfig.from_sources(None, ["task=graph", "dataset=mutag", f"out_dir={tmp_path}"])
    try:
        graphs = build_task(mutag)
    except ConfigError as err:  # MUTAG ships inside grakel
        pytest.skip(str(err))
    batch = next(iter(DataLoader(graphs.train_set, batch_size=3, collate_fn=graphs.collate)))
    assert batch.indices.tolist() == [0, 1, 2] and len(batch.inputs) == 3 and len(batch.targets) == 3
    assert not graphs.callbacks  # warm_start=auto is none on graph classification
    with pytest.raises(ConfigError, match="no per-sample state to reuse"):
        build_task(TrainConfig.from_sources(None, ["task=graph", "dataset=mutag", "warm_start=reuse"]))
    with pytest.raises(ConfigError, match="has no init head"):
        build_task(TrainConfig.from_sources(None, ["task=graph", "dataset=chains", "warm_start=learned"]))


def _rows(path):
    return list(csv.DictReader((path / "metrics.csv").open()))


@pytest.mark.slow
def test_reuse_starts_revisited_samples_from_the_cache(tmp_path, monkeypatch):
    starts = []
    from phantomgrad.cache import FixedPointCache

    original = FixedPointCache.start

    def spy(self, indices):
        starts.append((indices.clone(), self.found(indices).clone()))
        return original(self, indices)

    monkeypatch.setattr(FixedPointCache, "start", spy)
    summary = train(_cfg(tmp_path, "epochs=2", "warm_start=reuse"))
    rows = _rows(tmp_path)
    assert float(rows[0]["train_reused"]) == 0 and float(rows[1]["train_reused"]) == 1
    assert len(starts) == 6  # 3 training batches per epoch; evaluation never reads the cache
    assert not any(found.any() for _, found in starts[:3]) and all(found.all() for _, found in starts[3:])
    assert summary["test_accuracy"] is not None


@pytest.mark.slow
def test_learned_adds_the_init_loss_and_trains_the_head(tmp_path):
    train(_cfg(tmp_path, "epochs=2", "warm_start=learned", "warm_start_weight=1.0"))
    rows = _rows(tmp_path)
    assert float(rows[1]["train_init_loss"]) < float(rows[0]["train_init_loss"])
    state = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    assert any(k.startswith("deq.init.") for k in state)


@pytest.mark.slow
def test_resume_with_the_cache_is_bit_exact(tmp_path):
    extra = ("epochs=2", "warm_start=learned+reuse")
    straight = train(_cfg(tmp_path / "a", *extra))
    train_killed_in_epoch(_cfg(tmp_path / "b", *extra), epoch=1)
    resumed = train(_cfg(tmp_path / "b", *extra), resume=True)
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    cache_a, cache_b = (next(v for k, v in c["callbacks"].items() if k.startswith("WarmStart")) for c in (a, b))
    assert torch.equal(cache_a["cache"]["rows"], cache_b["cache"]["rows"])
    timing = lambda metrics: {k: v for k, v in metrics.items() if "seconds" not in k}  # noqa: E731
    assert timing(resumed["final_metrics"]) == timing(straight["final_metrics"])


@pytest.mark.slow
def test_reuse_cache_in_a_memory_mapped_file_trains_and_resumes_as_in_memory(tmp_path):
    # warm_start_cache_mb=0: the rows live in <out_dir>/fixed_points.bin (float16, as in memory), so the
    # run is the same to the last digit; killed after epoch 0 and resumed, it reads the file back
    extra = ("epochs=2", "warm_start=reuse")
    memory = train(_cfg(tmp_path / "memory", *extra))
    train_killed_in_epoch(_cfg(tmp_path / "file", *extra, "warm_start_cache_mb=0"), epoch=1)
    resumed = train(_cfg(tmp_path / "file", *extra, "warm_start_cache_mb=0"), resume=True)
    timing = lambda metrics: {k: v for k, v in metrics.items() if "seconds" not in k}  # noqa: E731
    assert timing(resumed["final_metrics"]) == timing(memory["final_metrics"])
    assert float(_rows(tmp_path / "file")[1]["train_reused"]) == 1
    saved = load_checkpoint(tmp_path / "file" / "checkpoint.pt")["callbacks"]
    cache = next(v for k, v in saved.items() if k.startswith("WarmStart"))["cache"]
    assert cache["rows"] == str(tmp_path / "file" / "fixed_points.bin")  # the path, not a copy of the rows
    size = (tmp_path / "file" / "fixed_points.bin").stat().st_size
    assert size > 0 and size % (384 * 2) == 0 and bool(cache["filled"].all())  # 384 samples x width x float16


def test_cache_size_keys_are_refused_where_they_act_on_nothing(tmp_path):
    with pytest.raises(ConfigError, match="warm_start_cache_mb=64 sizes the reuse cache") as err:
        build_task(_cfg(tmp_path, "warm_start=none", "warm_start_cache_mb=64"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="pass out_dir"):
        build_task(TrainConfig.from_sources(None, [*TINY, "warm_start=reuse", "warm_start_cache_mb=0"]))
    cache = next(cb for cb in build_task(_cfg(tmp_path, "warm_start_cache_mb=2")).callbacks if hasattr(cb, "cache"))
    assert cache.cache.max_bytes == 2 << 20 and cache.cache.path is None
