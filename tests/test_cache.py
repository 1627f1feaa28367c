"""pg.FixedPointCache: returns what was stored, per sample, across shuffled epochs, ranks and resume."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import phantomgrad as pg
from phantomgrad.data.batch import BatchCollate, Indexed
from phantomgrad.data.images import TensorImageDataset
from phantomgrad.models.toy import TanhMap

N, D = 23, 5


def _states(indices: torch.Tensor, epoch: int) -> torch.Tensor:
    """A state that names its sample and epoch (exact in float16: small integers and halves)."""
    return indices[:, None].float() + 0.5 * epoch + torch.arange(D).float()[None] / 4


def test_returns_what_was_stored_per_sample_across_shuffled_epochs():
    cache = pg.FixedPointCache(N, dtype=torch.float32)
    data = Indexed(TensorImageDataset(torch.randn(N, 1, 2, 2), torch.arange(N)))
    gen = torch.Generator().manual_seed(0)
    for epoch in range(3):
        for batch in DataLoader(data, batch_size=4, shuffle=True, generator=gen, collate_fn=BatchCollate()):
            assert torch.equal(batch.targets, batch.indices)  # the index is the sample's own
            default = torch.full((len(batch), D), -1.0)
            start = cache.fill(batch.indices, default)
            expected = _states(batch.indices, epoch - 1) if epoch else default
            assert torch.equal(start, expected)
            cache.store(batch.indices, _states(batch.indices, epoch))
        assert len(cache) == N


def test_unseen_samples_keep_the_default_and_float16_rounds():
    cache = pg.FixedPointCache(N)  # float16
    z = torch.randn(3, D)
    cache.store(torch.tensor([4, 7, 9]), z)
    assert cache.found(torch.tensor([4, 5, 9])).tolist() == [True, False, True]
    default = torch.zeros(3, D, dtype=torch.float64)
    start = cache.fill(torch.tensor([9, 5, 4]), default)
    assert start.dtype == torch.float64
    assert torch.equal(start[0], z[2].half().double()) and torch.equal(start[2], z[0].half().double())
    assert torch.equal(start[1], default[1])
    assert torch.equal(default, torch.zeros(3, D, dtype=torch.float64))  # the default is not written into


def test_a_non_finite_state_is_not_stored():
    cache = pg.FixedPointCache(N, dtype=torch.float32)
    cache.store(torch.tensor([1, 2]), torch.ones(2, D))
    bad = torch.full((2, D), 2.0)
    bad[0, 3] = float("nan")
    cache.store(torch.tensor([1, 2]), bad)
    out = cache.fill(torch.tensor([1, 2]), torch.zeros(2, D))
    assert torch.equal(out[0], torch.ones(D)) and torch.equal(out[1], torch.full((D,), 2.0))


def test_tuple_states_keep_their_structure():
    cache = pg.FixedPointCache(N, dtype=torch.float32)
    a, b = torch.randn(2, 3, 2, 2), torch.randn(2, 4)
    cache.store(torch.tensor([1, 2]), (a, b))
    out = cache.fill(torch.tensor([2, 0]), (torch.zeros(2, 3, 2, 2), torch.zeros(2, 4)))
    assert isinstance(out, tuple) and out[0].shape == (2, 3, 2, 2)
    assert torch.equal(out[0][0], a[1]) and torch.equal(out[1][0], b[1])
    assert torch.equal(out[0][1], torch.zeros(3, 2, 2)) and torch.equal(out[1][1], torch.zeros(4))


def test_resume_from_state_dict_returns_the_same_states(tmp_path):
    cache = pg.FixedPointCache(N)
    idx = torch.tensor([0, 5, 22])
    cache.store(idx, _states(idx, 1))
    path = tmp_path / "ckpt.pt"
    torch.save(cache.state_dict(), path)
    again = pg.FixedPointCache(N)
    again.load_state_dict(torch.load(path, weights_only=True))
    assert len(again) == 3
    default = torch.zeros(3, D)
    assert torch.equal(again.fill(idx, default), cache.fill(idx, default))
    with pytest.raises(ValueError, match="another dataset"):
        pg.FixedPointCache(N + 1).load_state_dict(cache.state_dict())


def test_each_rank_caches_its_own_samples():
    data = Indexed(TensorImageDataset(torch.randn(N, 1, 2, 2), torch.arange(N)))
    caches = [pg.FixedPointCache(N, dtype=torch.float32) for _ in range(2)]
    seen: list[set[int]] = [set(), set()]
    for epoch in range(2):
        for rank, cache in enumerate(caches):
            sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            for batch in DataLoader(data, batch_size=4, sampler=sampler, collate_fn=BatchCollate()):
                found = cache.found(batch.indices)
                assert found.tolist() == [int(i) in seen[rank] for i in batch.indices]
                start = cache.fill(batch.indices, torch.zeros(len(batch), D))
                assert torch.equal(start[found], _states(batch.indices[found], epoch - 1))
                cache.store(batch.indices, _states(batch.indices, epoch))
                seen[rank].update(batch.indices.tolist())


def test_memory_cap_and_memory_mapped_file(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="phantomgrad.cache"):
        capped = pg.FixedPointCache(N, dtype=torch.float32, max_bytes=10 * D * 4)
        idx = torch.tensor([3, 15])
        capped.store(idx, _states(idx, 0))
    assert "caching the first 10 samples" in caplog.text
    assert capped.nbytes == 10 * D * 4
    assert capped.found(idx).tolist() == [True, False]
    mapped = pg.FixedPointCache(N, dtype=torch.float32, max_bytes=1, path=tmp_path / "z.bin")
    mapped.store(idx, _states(idx, 0))
    assert (tmp_path / "z.bin").stat().st_size == N * D * 4
    again = pg.FixedPointCache(N, dtype=torch.float32, path=tmp_path / "z.bin")
    again.load_state_dict(mapped.state_dict())
    assert torch.equal(again.fill(idx, torch.zeros(2, D)), _states(idx, 0))


def test_a_file_backed_cache_keeps_its_own_file_on_resume(tmp_path, caplog):
    # under torchrun rank 0's checkpoint names rank 0's file: another rank (or a moved run directory)
    # keeps the file it was made with; a file that is gone starts every sample cold, with a warning
    idx = torch.tensor([3, 15])
    rank0 = pg.FixedPointCache(N, dtype=torch.float32, path=tmp_path / "rank0.bin")
    rank0.store(idx, _states(idx, 0))
    rank1 = pg.FixedPointCache(N, dtype=torch.float32, path=tmp_path / "rank1.bin")
    rank1.store(idx, _states(idx, 1))
    rank1.load_state_dict(rank0.state_dict())
    assert rank1.path == tmp_path / "rank1.bin"
    assert torch.equal(rank1.fill(idx, torch.zeros(2, D)), _states(idx, 1))
    gone = pg.FixedPointCache(N, dtype=torch.float32, path=tmp_path / "gone.bin")
    with caplog.at_level(logging.WARNING, logger="phantomgrad.cache"):
        gone.load_state_dict(rank0.state_dict())
    assert "is gone; every sample starts cold" in caplog.text
    assert len(gone) == 0 and gone.rows is None


def test_bad_input():
    cache = pg.FixedPointCache(N)
    with pytest.raises(IndexError, match=r"in \[0, 23\)"):
        cache.store(torch.tensor([23]), torch.zeros(1, D))
    cache.store(torch.tensor([0]), torch.zeros(1, D))
    with pytest.raises(ValueError, match="one cache serves one model"):
        cache.store(torch.tensor([1]), torch.zeros(1, D + 1))
    with pytest.raises(TypeError, match="1-D integer tensor"):
        cache.fill(torch.tensor([0.0]), torch.zeros(1, D))
    with pytest.raises(ValueError, match="dtype must be one of"):
        pg.FixedPointCache(N, dtype=torch.int8)
    with pytest.raises(ValueError, match="needs a default state"):
        cache.start(torch.tensor([0]))(None)


def test_a_revisited_sample_restarts_at_its_fixed_point():
    f = TanhMap(dim=D, in_dim=3, lipschitz=0.7, generator=torch.Generator().manual_seed(0))
    deq = pg.DEQ(f, solver=pg.Anderson(max_iter=50, tol=1e-5))
    x = torch.randn(N, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cache = pg.FixedPointCache(N, dtype=torch.float32)
    idx = torch.arange(N)
    with torch.no_grad():
        _, first = deq(x, cache.fill(idx, torch.zeros(N, D, dtype=torch.float64)))
        cache.store(idx, first.fixed_point)
        _, second = deq(x, cache.fill(idx, torch.zeros(N, D, dtype=torch.float64)))
    assert float(first.nstep.float().mean()) > 5
    assert second.nstep.max() == 1 and bool(second.converged.all())


def test_indices_survive_a_dataloader_over_a_subset():
    """torch's Subset has __getitems__, which a DataLoader prefers: Indexed must not forward it."""
    from torch.utils.data import Subset

    data = Indexed(Subset(TensorImageDataset(torch.randn(N, 1, 2, 2), torch.arange(N)), list(range(5, 15))))
    batch = next(iter(DataLoader(data, batch_size=4, collate_fn=BatchCollate())))
    assert batch.indices.tolist() == [0, 1, 2, 3] and batch.targets.tolist() == [5, 6, 7, 8]
    assert batch.inputs.shape == (4, 1, 2, 2)


def test_a_start_provider_keeps_the_states_held_when_it_was_made():
    cache = pg.FixedPointCache(N, dtype=torch.float32)
    idx = torch.tensor([2, 3])
    cache.store(idx, torch.ones(2, D))
    provider = cache.start(idx)
    cache.store(idx, torch.full((2, D), 5.0))  # a later store (the step's own h*) does not move the start
    assert torch.equal(provider(torch.zeros(2, D)), torch.ones(2, D))
    assert torch.equal(cache.start(idx)(torch.zeros(2, D)), torch.full((2, D), 5.0))
