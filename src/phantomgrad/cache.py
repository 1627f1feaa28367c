"""Fixed-point reuse: a sample's next visit starts from the state it was solved to last time.

    cache = pg.FixedPointCache(num_samples=len(train_set))
    z, info = deq(x, cache.fill(indices, zeros))   # cached samples start from their last z*, others from zeros
    cache.store(indices, info.fixed_point)         # the solver's h*, whatever the mode returned

With a learned initial state (``pg.DEQ(f, init=g)``), ``deq(x, cache.start(indices))`` starts the
samples not yet cached from g(x) instead.

Over an epoch the weights move little, so the fixed point a sample had at its last visit is
much closer to today's than zeros are (Bai et al. keep such states between the segments of a
language model; the same idea per sample is the "warm start" of DEQ training recipes). The cache
is keyed by the sample's index in the dataset (see :class:`phantomgrad.data.batch.Indexed`), so
it is right under any sampling order.

Storage: one row of D numbers per sample (D = the flattened state's size), on the CPU, in
``dtype``. The default is float16 and not bfloat16: bfloat16 keeps 8 bits of mantissa, a
relative rounding of up to 2^-9 = 2e-3, above the common relative tolerance 1e-3, so a sample
stored exactly at its fixed point would restart above the tolerance (measured on the trained
digits MDEQ: 3.2 Anderson steps to re-converge from a bfloat16 z*, 1.1 from float16, 1.0 from
float32). float16 holds values up to 65504, ample for normalised states; pass
``dtype=torch.bfloat16`` for states that are not normalised, or float32 to store exactly.

Memory: at most ``max_bytes`` in memory; samples whose rows do not fit (index >= the rows that
fit) are not cached, with one warning naming the fix. With ``path`` the rows live in a
memory-mapped file of ``num_samples * D`` entries instead (no cap), for datasets that do not fit.

Host syncs: :meth:`store` copies z* to the CPU (a device-to-host copy, which waits for the solve
on a GPU); :meth:`start` copies the found rows to the state's device (host-to-device).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ._checks import positive_int

log = logging.getLogger(__name__)

State = Tensor | tuple[Tensor, ...]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _flat(z: State) -> Tensor:
    parts = tuple(z) if isinstance(z, (tuple, list)) else (z,)
    batch = parts[0].shape[0]
    return torch.cat([p.detach().reshape(batch, -1) for p in parts], dim=1)


def _like(flat: Tensor, z: State) -> State:
    """``flat`` (B, D) cut and shaped like ``z`` (a tensor or a tuple), in z's dtype and device."""
    if not isinstance(z, (tuple, list)):
        return flat.to(device=z.device, dtype=z.dtype).reshape(z.shape)
    out, at = [], 0
    for p in z:
        n = int(torch.Size(p.shape[1:]).numel())
        out.append(flat[:, at : at + n].to(device=p.device, dtype=p.dtype).reshape(p.shape))
        at += n
    return tuple(out)


def _put(default: State, found: Tensor, rows: Tensor) -> State:
    """``default`` with its rows where ``found`` (a (B,) bool mask on the CPU) replaced by ``rows``."""
    flat = _flat(default)
    if flat.shape[1] != rows.shape[1]:
        raise ValueError(
            f"the cache holds states of {rows.shape[1]} numbers per sample, but this batch's state has "
            f"{flat.shape[1]}; one cache serves one model and one dataset (make a new FixedPointCache)"
        )
    flat = flat.clone()
    where = found.nonzero().squeeze(1).to(flat.device)
    flat[where] = rows.to(device=flat.device, dtype=flat.dtype)  # host-to-device copy
    return _like(flat, default)


class FixedPointCache:
    """Per-sample fixed points, kept on the CPU between visits (see the module docstring).

    Args:
        num_samples: samples in the dataset; indices are in ``range(num_samples)``.
        dtype: storage dtype (default float16; see the module docstring for why not bfloat16).
        max_bytes: memory cap of the in-memory storage (default 1 GiB).
        path: a file to memory-map the rows into instead (created, or reused when its size
            fits); then ``max_bytes`` does not apply.

    Under torchrun each process keeps its own cache of the samples its sampler gave it; the
    ``DistributedSampler`` reshuffles which process sees a sample every epoch, so a process finds
    a sample only if it saw it before (about 1 - (1 - 1/world_size)^epochs of them).
    """

    def __init__(
        self,
        num_samples: int,
        dtype: torch.dtype = torch.float16,
        max_bytes: int = 1 << 30,
        path: str | Path | None = None,
    ):
        self.num_samples = positive_int("num_samples", num_samples)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {[str(d) for d in _DTYPES]}, got {dtype}")
        self.dtype = dtype
        self.max_bytes = positive_int("max_bytes", max_bytes)
        self.path = Path(path) if path is not None else None
        self.rows: Tensor | None = None  # (rows, D), allocated at the first store
        self.filled = torch.zeros(self.num_samples, dtype=torch.bool)
        self._warned = False

    # ---- reading --------------------------------------------------------------------------
    def __len__(self) -> int:
        """Samples held."""
        return int(self.filled.sum())

    @property
    def nbytes(self) -> int:
        """Bytes of the storage (0 before the first store)."""
        return 0 if self.rows is None else self.rows.numel() * self.rows.element_size()

    def _check(self, indices: Tensor) -> Tensor:
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 1:
            raise TypeError(f"indices must be a 1-D integer tensor of sample indices, got {indices!r}")
        indices = indices.cpu().long()
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.num_samples):
            raise IndexError(
                f"sample indices must be in [0, {self.num_samples}) (num_samples of this cache), "
                f"got {int(indices.min())}..{int(indices.max())}"
            )
        return indices

    def found(self, indices: Tensor) -> Tensor:
        """(B,) bool: which of these samples have a stored state."""
        return self.filled[self._check(indices)]

    def fill(self, indices: Tensor, default: State) -> State:
        """``default`` (a state of the batch ``indices``) with the rows of the samples found in
        the cache replaced by their stored states, in default's structure, dtype and device."""
        indices = self._check(indices)
        found = self.filled[indices]
        if self.rows is None or not bool(found.any()):
            return default
        return _put(default, found, self.rows[indices[found]])

    def start(self, indices: Tensor) -> Callable[[State | None], State]:
        """A start provider for ``pg.DEQ`` and the models' ``z0``: ``start(default)`` is
        :meth:`fill` of these indices (default: zeros, or the layer's learned initial state) with
        the states held when ``start`` was called: a later :meth:`store` does not change it, so a
        batch solved again (a callback recomputing its loss) starts where it started the first time."""
        indices = self._check(indices)
        found = self.filled[indices].clone()
        held = self.rows[indices[found]].clone() if self.rows is not None and bool(found.any()) else None

        def provider(default: State | None) -> State:
            if default is None:
                raise ValueError(
                    "FixedPointCache.start needs a default state for the samples it has not seen: use it with a "
                    "layer built with init=g, or pass z0=cache.fill(indices, zeros) instead"
                )
            return default if held is None else _put(default, found, held)

        return provider

    # ---- writing --------------------------------------------------------------------------
    def store(self, indices: Tensor, z: State) -> None:
        """Keep the states ``z`` (batch ``indices``; detached, cast to ``dtype``) of these samples. A
        sample whose state is not finite (a diverged solve) keeps what it had: a NaN start would
        only fail the next solve."""
        indices = self._check(indices)
        flat = _flat(z)
        if flat.shape[0] != len(indices):
            raise ValueError(f"{len(indices)} indices but a state of batch size {flat.shape[0]}")
        if self.rows is None:
            self.rows = self._allocate(flat.shape[1])
        elif flat.shape[1] != self.rows.shape[1]:
            raise ValueError(
                f"the cache holds states of {self.rows.shape[1]} numbers per sample, got {flat.shape[1]}; "
                "one cache serves one model and one dataset"
            )
        keep = indices < self.rows.shape[0]
        if not bool(keep.all()):
            self._warn_full()
            flat, indices = flat[keep.to(flat.device)], indices[keep]
        rows = flat.to(device="cpu", dtype=self.dtype)  # device-to-host copy: a sync on a GPU
        finite = torch.isfinite(rows).all(1)
        if not bool(finite.all()):
            rows, indices = rows[finite], indices[finite]
        self.rows[indices] = rows
        self.filled[indices] = True

    def _allocate(self, width: int) -> Tensor:
        size = torch.empty((), dtype=self.dtype).element_size()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            nbytes = self.num_samples * width * size
            if not self.path.exists() or self.path.stat().st_size != nbytes:
                with open(self.path, "wb") as fh:
                    fh.truncate(nbytes)
            flat = torch.from_file(str(self.path), shared=True, size=self.num_samples * width, dtype=self.dtype)
            return flat.view(self.num_samples, width)
        rows = min(self.num_samples, self.max_bytes // (width * size))
        if rows < self.num_samples:
            self._warn_full(rows, width, size)
        return torch.zeros(rows, width, dtype=self.dtype)

    def _warn_full(self, rows: int | None = None, width: int = 0, size: int = 0) -> None:
        if self._warned:
            return
        self._warned = True
        if rows is None:
            return
        log.warning(
            "FixedPointCache: %d samples x %d numbers x %d bytes exceed max_bytes=%d; caching the first %d samples "
            "only. Raise max_bytes, store in a smaller dtype, or pass path= to memory-map a file",
            self.num_samples,
            width,
            size,
            self.max_bytes,
            rows,
        )

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the stored rows (a copy) and which samples are filled. With
        ``path``, the rows stay in the file and only the path is saved: that file is written on
        every store, so a run resumed after a hard kill finds the states of the steps after the
        checkpoint too (a warm start that is not bit-exact; in memory it is)."""
        rows: Tensor | str | None = self.rows.clone() if self.rows is not None and self.path is None else None
        if self.path is not None and self.rows is not None:
            rows = str(self.path)
        return {"filled": self.filled.clone(), "rows": rows, "dtype": str(self.dtype)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        filled = state["filled"]
        if filled.shape != self.filled.shape:
            raise ValueError(
                f"the saved cache holds {filled.shape[0]} samples, this one {self.num_samples}; it belongs to "
                "another dataset"
            )
        rows = state["rows"]
        if isinstance(rows, str):
            # a cache made with its own path keeps it (under torchrun each process maps its own file, and
            # a run directory may have moved); otherwise the saved path
            self.path = self.path if self.path is not None else Path(rows)
            if not self.path.exists():
                log.warning("FixedPointCache: %s is gone; every sample starts cold again", self.path)
                self.rows, self.filled = None, torch.zeros(self.num_samples, dtype=torch.bool)
                return
            width = self.path.stat().st_size // (self.num_samples * torch.empty((), dtype=self.dtype).element_size())
            self.rows = self._allocate(width) if width else None
        else:
            self.rows = None if rows is None else rows.to(self.dtype).clone()
        self.filled = filled.clone()


__all__ = ["FixedPointCache"]
