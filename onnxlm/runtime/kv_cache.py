"""The KV cache: per layer one key and one value tensor, (batch, kv_heads, seq, head_dim).

The graph takes the past as inputs and returns the present (past + the new positions) as outputs.
With IO binding the present OrtValues of one step are bound, untouched, as the next step's past:
no numpy round trip and no copy. Without it (numpy fallback) the arrays simply cycle through numpy.

    cache = KVCache.from_manifest(manifest, batch=2)
    feeds = {**token_inputs, **cache.feeds()}       # past_key_values.{i}.key / .value
    outputs = run(feeds, [logits, *cache.output_names()])
    cache.update(outputs)                            # present.{i}.key / .value -> next past
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..bundle import GraphIO, Manifest

Tensor = Any  # np.ndarray | onnxruntime.OrtValue


def ort_module():
    """onnxruntime's Python binding, imported where an OrtValue or InferenceSession is made: a process
    whose sessions all run through the C API (split.SplitSession) never loads it (~20 MB resident
    beside the C library)."""
    import onnxruntime

    return onnxruntime


def is_ortvalue(t: Any) -> bool:
    """Whether `t` is an onnxruntime OrtValue, without importing onnxruntime's Python binding: a
    process that runs its sessions through the C API alone (runtime/split.py) never loads it."""
    ort = sys.modules.get("onnxruntime")
    return ort is not None and isinstance(t, ort.OrtValue)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape()) if is_ortvalue(t) else tuple(t.shape)


def _numpy(t: Tensor) -> np.ndarray:
    return t.numpy() if is_ortvalue(t) else t


class KVCache:
    """Past keys and values of every layer, `offset` positions long (padding included)."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        batch: int = 1,
        io: GraphIO | None = None,
        dtype: str | np.dtype = "float32",
        device: str = "cpu",
    ):
        if num_layers < 1 or kv_heads < 1 or head_dim < 1 or batch < 1:
            raise ValueError(
                f"KVCache needs positive sizes, got layers={num_layers} kv_heads={kv_heads} "
                f"head_dim={head_dim} batch={batch}"
            )
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.io = io or GraphIO()
        self.dtype = np.dtype(dtype)
        self.device = device
        self._batch = batch
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self._past_names = [
            (self.io.past_key.format(i=i), self.io.past_value.format(i=i)) for i in range(num_layers)
        ]
        self._present_names = [
            (self.io.present_key.format(i=i), self.io.present_value.format(i=i)) for i in range(num_layers)
        ]
        self.free()

    @classmethod
    def from_manifest(cls, manifest: Manifest, batch: int = 1, device: str = "cpu") -> KVCache:
        m = manifest.model
        return cls(m.num_layers, m.num_kv_heads, m.head_dim, batch, manifest.io, manifest.io.kv_dtype, device)

    # --- state ---------------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Positions held per sequence (the past length the next step sees)."""
        return _shape(self.keys[0])[2]

    def __len__(self) -> int:
        return self.offset

    @property
    def batch(self) -> int:
        return self._batch

    def _empty(self, batch: int) -> np.ndarray:
        return np.zeros(
            (batch, self.kv_heads, 0, self.head_dim), self.dtype
        )  # (batch, kv_heads, 0, head_dim)

    def free(self) -> None:
        """Drop every tensor; the cache is empty (offset 0) and may be reused for the same batch size."""
        self.keys = [self._empty(self._batch) for _ in range(self.num_layers)]
        self.values = [self._empty(self._batch) for _ in range(self.num_layers)]

    # --- one step ------------------------------------------------------------------------------
    def feeds(self) -> dict[str, Tensor]:
        """Past inputs for the next step, by graph input name (OrtValues pass through unconverted)."""
        out: dict[str, Tensor] = {}
        for (kname, vname), k, v in zip(self._past_names, self.keys, self.values, strict=True):
            out[kname], out[vname] = k, v
        return out

    def output_names(self) -> list[str]:
        """The graph outputs `update` reads, in layer order, key then value."""
        return [name for pair in self._present_names for name in pair]

    def update(self, outputs: Mapping[str, Tensor]) -> None:
        """Take the present tensors of a step as the new past (OrtValues are kept as they are)."""
        keys, values = [], []
        for kname, vname in self._present_names:
            try:
                keys.append(outputs[kname])
                values.append(outputs[vname])
            except KeyError as e:
                raise KeyError(f"KVCache.update: the step's outputs have no {e.args[0]!r}") from None
        want = _shape(keys[0])
        expect = (self._batch, self.kv_heads, None, self.head_dim)
        for t in keys + values:
            shape = _shape(t)
            if (
                len(shape) != 4
                or shape[2] != want[2]
                or any(e is not None and e != s for e, s in zip(expect, shape, strict=True))
            ):
                raise ValueError(
                    f"KVCache.update: present tensor of shape {shape}, expected "
                    f"({self._batch}, {self.kv_heads}, {want[2]}, {self.head_dim}) in every layer"
                )
        if want[2] < self.offset:
            raise ValueError(
                f"KVCache.update: present holds {want[2]} positions, fewer than the past {self.offset}"
            )
        self.keys, self.values = keys, values

    # --- edits (rare: each copies through host memory) -----------------------------------------
    def _rewrap(self, arr: np.ndarray) -> Tensor:
        arr = np.ascontiguousarray(arr)
        if self.device == "cpu":
            return arr
        return ort_module().OrtValue.ortvalue_from_numpy(arr, self.device, 0)

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (e.g. rejected draft tokens); returns how many were dropped."""
        if n < 0:
            raise ValueError(f"KVCache.trim: n must be >= 0, got {n}")
        n = min(n, self.offset)
        if n:
            keep = self.offset - n
            self.keys = [self._rewrap(_numpy(k)[:, :, :keep]) for k in self.keys]
            self.values = [self._rewrap(_numpy(v)[:, :, :keep]) for v in self.values]
        return n

    def select(self, rows: Sequence[int]) -> None:
        """Keep only the given sequences (in that order): finished ones leave the batch."""
        rows = list(rows)
        if not rows or any(not 0 <= r < self._batch for r in rows):
            raise ValueError(f"KVCache.select: rows {rows} out of range for batch {self._batch}")
        if rows == list(range(self._batch)):
            return
        idx = np.asarray(rows)
        self.keys = [self._rewrap(_numpy(k)[idx]) for k in self.keys]
        self.values = [self._rewrap(_numpy(v)[idx]) for v in self.values]
        self._batch = len(rows)

    def append(self, other: KVCache) -> tuple[int, int]:
        """Add `other`'s rows after this cache's (continuous batching: a prefilled request joins). The
        side holding fewer positions is left-padded with zeros so both line up; returns (positions
        padded onto this cache's rows, onto `other`'s rows) for the caller's attention mask."""
        dims = (self.num_layers, self.kv_heads, self.head_dim)
        if (other.num_layers, other.kv_heads, other.head_dim) != dims:
            raise ValueError(f"KVCache.append: {other!r} does not match {self!r}")
        pad_self, pad_other = max(0, other.offset - self.offset), max(0, self.offset - other.offset)

        def pad(t: Tensor, n: int) -> np.ndarray:
            arr = _numpy(t)  # (batch, kv_heads, seq, head_dim)
            return np.pad(arr, ((0, 0), (0, 0), (n, 0), (0, 0))) if n else arr

        self.keys = [
            self._rewrap(np.concatenate([pad(a, pad_self), pad(b, pad_other)]))
            for a, b in zip(self.keys, other.keys, strict=True)
        ]
        self.values = [
            self._rewrap(np.concatenate([pad(a, pad_self), pad(b, pad_other)]))
            for a, b in zip(self.values, other.values, strict=True)
        ]
        self._batch += other.batch
        return pad_self, pad_other

    def drop(self, row: int) -> int | None:
        """Remove one row; the last row moves into its place (no other row moves). Returns the old
        index of the row that moved, or None when `row` was the last."""
        if not 0 <= row < self._batch or self._batch < 2:
            raise ValueError(f"KVCache.drop: cannot drop row {row} of a batch of {self._batch}")
        last = self._batch - 1
        rows = list(range(last))
        if row != last:
            rows[row] = last
        self.select(rows)
        return last if row != last else None

    def trim_front(self, n: int) -> None:
        """Forget the first `n` positions of every row (padding no row needs any more)."""
        if not 0 <= n <= self.offset:
            raise ValueError(f"KVCache.trim_front: n must be in [0, {self.offset}], got {n}")
        if n:
            self.keys = [self._rewrap(_numpy(k)[:, :, n:]) for k in self.keys]
            self.values = [self._rewrap(_numpy(v)[:, :, n:]) for v in self.values]

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer `i`'s key and value as numpy arrays (a copy when they live in OrtValues)."""
        return _numpy(self.keys[i]), _numpy(self.values[i])

    def nbytes(self) -> int:
        per = self._batch * self.kv_heads * self.offset * self.head_dim * self.dtype.itemsize
        return 2 * self.num_layers * per

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.num_layers}, batch={self._batch}, kv_heads={self.kv_heads}, "
            f"offset={self.offset}, head_dim={self.head_dim}, dtype={self.dtype}, device={self.device})"
        )
