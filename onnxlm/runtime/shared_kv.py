"""The shared-buffer KV cache of the fused graph: one buffer per layer, written in place by the graph
(kv_cache.py holds the plain graph's concatenated cache)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..bundle import GraphIO, Manifest
from .kv_cache import Tensor, _numpy, is_ortvalue, ort_module
from .session import release_free_heap

# Freeing at least this many bytes of buffers hands the C heap's free pages back (malloc_trim, 2-20 ms).
# numpy's buffers come from glibc, which maps a large one on its own and unmaps it on free only until
# its mmap threshold has risen (it rises as large blocks are freed, up to 32 MB); after that a freed
# buffer stays in the heap. SmolLM2 int8 after prompts of 3,000 tokens: 66 MB held, none after a trim.
GIVE_BACK_BYTES = 16 << 20


def _given_back(freed: int) -> None:
    if freed >= GIVE_BACK_BYTES:
        release_free_heap()


class SharedKVCache:
    """The fast path: per layer one key and one value buffer (batch, kv_heads, capacity, head_dim),
    allocated once and bound (IO binding) as both the graph's past and its present, so the graph's
    GroupQueryAttention writes each step's keys and values in place: a step copies no cache.

    Row b's tokens sit at slots [0, lengths[b]) of its buffer rows (prompts are right-padded, and
    padding never enters the cache). Each step says how many real tokens every row brings:

        cache = SharedKVCache.from_manifest(manifest, batch=2, capacity=600)
        feeds = {**token_inputs, **cache.feeds(query_lens)}   # buffers, seqlens_k, total_sequence_length,
        outputs = run_bound(session, feeds, [logits],          # query_seqlens
                            bound_outputs=cache.bound_outputs())
        cache.update(outputs)                                  # lengths += query_lens
    """

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        batch: int = 1,
        capacity: int = 0,
        io: GraphIO | None = None,
        dtype: str | np.dtype = "float32",
        device: str = "cpu",
        plain: bool = False,
    ):
        if min(num_layers, kv_heads, head_dim, batch, capacity) < 1:
            raise ValueError(
                f"SharedKVCache needs positive sizes, got layers={num_layers} kv_heads={kv_heads} "
                f"head_dim={head_dim} batch={batch} capacity={capacity}"
            )
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.capacity = capacity
        self.io = io or GraphIO.shared_buffer()
        if not self.io.shared:
            raise ValueError(f"SharedKVCache needs a shared_buffer graph, not kv_layout {self.io.kv_layout}")
        self.dtype = np.dtype(dtype)
        self.device = device
        # plain: host buffers are bound as the arrays themselves (a runner over onnxruntime's C API,
        # runtime/split.py), not as OrtValues of the Python binding, which such a process never loads
        self.plain = plain and device == "cpu"
        self._batch = batch
        self.lengths = np.zeros(batch, np.int32)  # tokens held per row
        self._pending: np.ndarray | None = None  # the query lengths of the step in flight
        self._past_names = [
            n
            for i in range(num_layers)
            for n in (self.io.past_key.format(i=i), self.io.past_value.format(i=i))
        ]
        self._present_names = [
            n
            for i in range(num_layers)
            for n in (self.io.present_key.format(i=i), self.io.present_value.format(i=i))
        ]
        self._arrays: list[np.ndarray] | None = None  # host buffers (cpu), key and value per layer
        self._bases: list[np.ndarray] | None = None  # what _arrays view (cpu): room for rows to join
        self._values: list[Tensor] | None = None  # what is bound; on cpu they are or wrap _arrays
        self.binding: object | None = (
            None  # what a runner keeps bound to the buffers; dropped when they change
        )

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        batch: int = 1,
        capacity: int | None = None,
        device: str = "cpu",
        plain: bool = False,
    ) -> SharedKVCache:
        m = manifest.model
        cap = capacity or m.context_length
        io = manifest.io
        return cls(m.num_layers, m.num_kv_heads, m.head_dim, batch, cap, io, io.kv_dtype, device, plain)

    # --- state ---------------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Tokens held by the longest row."""
        return int(self.lengths.max()) if len(self.lengths) else 0

    def __len__(self) -> int:
        return self.offset

    @property
    def batch(self) -> int:
        return self._batch

    def _shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.kv_heads, self.capacity, self.head_dim)  # (batch, kv_heads, capacity, head_dim)

    def _allocate(self, room: int = 0) -> None:
        """Buffers for the batch; on cpu with `room` rows in all, so rows can join without a new buffer."""
        self.binding = None
        shape = self._shape(self._batch)
        if self.device == "cpu":  # zeros: calloc'd, pages are committed only as the cache fills
            shape = self._shape(max(room, self._batch))
            self._bases = [np.zeros(shape, self.dtype) for _ in self._past_names]
            self._arrays = [b[: self._batch] for b in self._bases]  # contiguous views
            self._values = [self._wrap(a) for a in self._arrays]
        else:
            self._arrays = None
            ort = ort_module()
            self._values = [
                ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0)
                for _ in self._past_names
            ]

    def _wrap(self, array: np.ndarray) -> Tensor:
        """What is bound for a host buffer: the array itself (plain) or an OrtValue over it."""
        return array if self.plain else ort_module().OrtValue.ortvalue_from_numpy(array)

    def free(self) -> None:
        """Drop the buffers; the cache is empty and allocates again (same batch) on its next step. Large
        buffers go back to the system at once (_given_back)."""
        held = self.nbytes()
        self._arrays = self._values = self._bases = None
        self.binding = None
        self.lengths = np.zeros(self._batch, np.int32)
        self._pending = None
        _given_back(held)

    # --- one step ------------------------------------------------------------------------------
    def feeds(
        self, query_lens: Sequence[int] | np.ndarray | None = None, width: int | None = None
    ) -> dict[str, Tensor]:
        """The buffers and the length inputs for a step that brings `query_lens[b]` real tokens to row b
        (default: one each) in a chunk `width` wide (default: the most any row brings). Rows bringing
        none must already hold tokens (they idle this step)."""
        lengths = self.step_inputs(query_lens, width)
        assert self._values is not None
        return {**dict(zip(self._past_names, self._values, strict=True)), **lengths}

    def step_inputs(
        self, query_lens: Sequence[int] | np.ndarray | None = None, width: int | None = None
    ) -> dict[str, np.ndarray]:
        """Only the length inputs of a step (seqlens_k, total_sequence_length, query_seqlens), for a
        runner that keeps the buffers bound; `feeds` is these and the buffers.

        GroupQueryAttention places every row's padded chunk (`width` positions) after what the row
        holds, within total_sequence_length positions (a float32 form's present) or the buffer: so the
        total is the fullest row's length plus the width, not the longest row after the step (a row
        bringing fewer tokens than another, still holding more, would not fit)."""
        q = np.ones(self._batch, np.int32) if query_lens is None else np.asarray(query_lens, np.int32)
        ql = q.tolist()  # checked as Python ints: fewer numpy calls in the decode loop
        if q.shape != (self._batch,) or min(ql) < 0:
            raise ValueError(f"SharedKVCache.feeds: query_lens {ql} for a batch of {self._batch}")
        held = self.lengths.tolist()
        after = [h + n for h, n in zip(held, ql, strict=True)]  # tokens held after the step
        if min(after) < 1:
            raise ValueError("SharedKVCache.feeds: a row with no tokens must bring at least one")
        total = max(held) + max(max(ql), width or 0)
        if total > self.capacity:
            raise ValueError(
                f"SharedKVCache.feeds: {total} tokens (the fullest row and a chunk {max(ql)} wide) do not "
                f"fit the buffer's {self.capacity} positions"
            )
        if self._values is None:
            self._allocate()
        self._pending = q
        io = self.io
        return {
            io.seqlens_k: np.array([a - 1 for a in after], np.int32),
            io.total_sequence_length: np.array(total, np.int32),
            io.query_seqlens: q,
        }

    def output_names(self) -> list[str]:
        return list(self._present_names)

    def bound_outputs(self) -> dict[str, Tensor]:
        """Present name -> the very buffer bound as past: the graph writes into it."""
        if self._values is None:
            self._allocate()
        return dict(zip(self._present_names, self._values, strict=True))

    def buffers(self) -> list[tuple[str, str, Tensor]]:
        """(past name, present name, buffer) of every layer's key and value, to bind once and keep."""
        if self._values is None:
            self._allocate()
        return list(zip(self._past_names, self._present_names, self._values, strict=True))

    def advance(self) -> None:
        """The step fed last ran in place (bound buffers): its tokens are now held."""
        if self._pending is None:
            raise RuntimeError("SharedKVCache.advance: no step in flight (call feeds or step_inputs first)")
        self.lengths = self.lengths + self._pending
        self._pending = None

    def update(self, outputs: Mapping[str, Tensor]) -> None:
        """Advance the lengths by the step's query lengths. Presents that are the bound buffers (IO
        binding) need nothing; any other present (a numpy run) is copied into the buffer."""
        if self._pending is None:
            raise RuntimeError("SharedKVCache.update: no step in flight (call feeds first)")
        assert self._values is not None
        for i, (name, value) in enumerate(zip(self._present_names, self._values, strict=True)):
            try:
                got = outputs[name]
            except KeyError:
                raise KeyError(f"SharedKVCache.update: the step's outputs have no {name!r}") from None
            if _address(got) is not None and _address(got) == _address(value):
                continue
            arr = _numpy(got)
            if arr.shape != self._shape(self._batch):
                raise ValueError(
                    f"SharedKVCache.update: {name} of shape {arr.shape}, expected {self._shape(self._batch)}"
                )
            if self._arrays is not None:
                np.copyto(self._arrays[i], arr)
            else:
                value.update_inplace(np.ascontiguousarray(arr))
        self.advance()

    # --- edits ---------------------------------------------------------------------------------
    def trim(self, n: int) -> int:
        """Forget the last `n` tokens of every row (the buffer is untouched); returns how many the
        longest row dropped."""
        if n < 0:
            raise ValueError(f"SharedKVCache.trim: n must be >= 0, got {n}")
        n = min(n, self.offset)
        self.lengths = np.maximum(self.lengths - n, 0).astype(np.int32)
        return n

    def select(self, rows: Sequence[int]) -> None:
        """Keep only the given rows, in that order: they move to the front of the same buffers (no new
        allocation on cpu when `rows` ascend), and the bound views shrink to the new batch."""
        rows = list(rows)
        if not rows or any(not 0 <= r < self._batch for r in rows) or len(set(rows)) != len(rows):
            raise ValueError(f"SharedKVCache.select: rows {rows} invalid for batch {self._batch}")
        if rows == list(range(self._batch)):
            return
        n = len(rows)
        self.binding = None
        if self._values is not None:
            if self._arrays is not None:
                ascending = rows == sorted(rows)
                for j, arr in enumerate(self._arrays):
                    if ascending:
                        for dst, src in enumerate(
                            rows
                        ):  # dst <= src: moving forward never overwrites a source
                            if dst != src:
                                arr[dst] = arr[src]
                    else:
                        arr[:n] = arr[rows]
                    self._arrays[j] = arr[:n]  # a contiguous view of the same memory
                self._values = [self._wrap(a) for a in self._arrays]
            else:  # device buffers: a round trip through host memory (rare)
                hosts = [v.numpy()[rows] for v in self._values]
                self._values = [ort_module().OrtValue.ortvalue_from_numpy(h, self.device, 0) for h in hosts]
        self.lengths = self.lengths[rows]
        self._batch = n

    # --- continuous batching: rows join and leave ------------------------------------------------
    def _host(self) -> list[np.ndarray]:
        """The buffers as host arrays (views on cpu; copies from a device)."""
        assert self._values is not None
        return self._arrays if self._arrays is not None else [v.numpy() for v in self._values]

    def _rebuild(self, batch: int, capacity: int, room: int, rows: list[tuple[SharedKVCache, int]]) -> None:
        """New buffers (batch rows of `capacity` slots, room for `room` on cpu) holding `rows`, each
        (cache, row) copied over its filled slots only."""
        sources = [(c._host(), r, int(c.lengths[r])) for c, r in rows]
        lengths = np.array([n for _, _, n in sources], np.int32)
        self._batch, self.capacity = batch, capacity
        if self.device == "cpu":
            self._allocate(room)
            dst = self._arrays
        else:
            dst = [np.zeros(self._shape(batch), self.dtype) for _ in self._past_names]
        assert dst is not None
        for j, arr in enumerate(dst):
            for b, (src, r, n) in enumerate(sources):
                arr[b, :, :n] = src[j][r, :, :n]
        if self.device != "cpu":
            self._values = [ort_module().OrtValue.ortvalue_from_numpy(a, self.device, 0) for a in dst]
        self.lengths = lengths
        self._pending = None
        self.binding = None

    def write(self, row: int, arrays: Sequence[np.ndarray], n: int) -> None:
        """Fill row `row`'s first `n` slots with `arrays` (per layer key then value, each (kv_heads,
        >= n, head_dim)), e.g. a cached prefix; the row then holds `n` tokens."""
        if not 0 <= row < self._batch or not 0 < n <= self.capacity or len(arrays) != len(self._past_names):
            raise ValueError(f"SharedKVCache.write: row {row}, {n} tokens, {len(arrays)} arrays for {self!r}")
        if self._values is None:
            self._allocate()
        if self._arrays is not None:
            for dst, src in zip(self._arrays, arrays, strict=True):
                dst[row, :, :n] = src[:, :n]
        else:  # device buffers: a host round trip (rare)
            for value, src in zip(self._values, arrays, strict=True):
                host = value.numpy()
                host[row, :, :n] = src[:, :n]
                value.update_inplace(host)
        self.lengths = self.lengths.copy()
        self.lengths[row] = n

    def read(self, row: int) -> list[np.ndarray]:
        """Row `row`'s filled slots, per layer key then value (kv_heads, held, head_dim), as copies."""
        if self._values is None:
            return []
        n = int(self.lengths[row])
        return [np.array(h[row, :, :n]) for h in self._host()]

    def repeat(self, rows: Sequence[int]) -> None:
        """The batch becomes `rows` of this one, in that order; a row may appear several times (each
        copy then grows on its own)."""
        rows = list(rows)
        if not rows or any(not 0 <= r < self._batch for r in rows):
            raise ValueError(f"SharedKVCache.repeat: rows {rows} out of range for batch {self._batch}")
        if self._values is None:
            self.lengths, self._batch = self.lengths[rows], len(rows)
            return
        self._rebuild(len(rows), self.capacity, len(rows), [(self, r) for r in rows])

    def forget(self, row: int, n: int) -> None:
        """Row `row` forgets its last `n` tokens (rejected drafts); their slots are written over later."""
        if not 0 <= n <= int(self.lengths[row]):
            raise ValueError(f"SharedKVCache.forget: row {row} holds {int(self.lengths[row])}, not {n}")
        self.lengths = self.lengths.copy()
        self.lengths[row] -= n

    def shrink(self, room: int) -> bool:
        """Give memory back (cpu): rebuild smaller when the buffers hold more than twice the rows or
        slots in use (`room`: slots to keep per row, at least the longest row). True if rebuilt."""
        if self._bases is None:
            return False
        room = max(room, self.offset, 1)
        if self._bases[0].shape[0] <= 2 * self._batch and self.capacity <= 2 * room:
            return False
        rows = [(self, r) for r in range(self._batch)]
        held = self.nbytes()
        self._rebuild(self._batch, min(self.capacity, room), self._batch, rows)
        _given_back(held - self.nbytes())
        return True

    def reserve(self, capacity: int) -> None:
        """At least `capacity` slots per row (filled slots are copied when the buffers must grow)."""
        if capacity <= self.capacity:
            return
        if self._values is None:
            self.capacity = capacity
            return
        self._rebuild(self._batch, capacity, self._batch, [(self, r) for r in range(self._batch)])

    def append(self, other: SharedKVCache) -> None:
        """Add `other`'s rows (a prefilled request) after this cache's, copying their filled slots; rows
        of any lengths share the buffer (seqlens_k is per row). On cpu the buffers keep spare rows, so
        most joins copy only the newcomer's slots."""
        dims = (self.num_layers, self.kv_heads, self.head_dim)
        if (other.num_layers, other.kv_heads, other.head_dim) != dims:
            raise ValueError(f"SharedKVCache.append: {other!r} does not match {self!r}")
        if other._values is None or self._values is None:
            raise ValueError("SharedKVCache.append: both caches must hold tokens (run their prefill first)")
        batch = self._batch + other.batch
        capacity = max(self.capacity, other.offset)
        if self._bases is None:  # device buffers: one host round trip (rare)
            rows = [(self, r) for r in range(self._batch)] + [(other, r) for r in range(other.batch)]
            self._rebuild(batch, capacity, batch, rows)
            return
        if self._bases[0].shape[0] < batch or capacity > self.capacity:
            mine = [(self, r) for r in range(self._batch)]
            self._rebuild(self._batch, capacity, max(batch, 2 * self._batch), mine)
            assert self._bases is not None
        src, n = other._host(), other.offset
        for j, base in enumerate(self._bases):
            base[self._batch : batch, :, :n] = src[j][:, :, :n]
        self._arrays = [b[:batch] for b in self._bases]
        self._values = [self._wrap(a) for a in self._arrays]
        self.binding = None
        self.lengths = np.concatenate([self.lengths, other.lengths]).astype(np.int32)
        self._batch = batch

    def drop(self, row: int) -> int | None:
        """Remove one row; the last row moves into its place (only its filled slots are copied, no other
        row moves). Returns the old index of the row that moved, or None when `row` was the last."""
        if not 0 <= row < self._batch or self._batch < 2:
            raise ValueError(f"SharedKVCache.drop: cannot drop row {row} of a batch of {self._batch}")
        last = self._batch - 1
        if self._values is None:
            self._swap_lengths(row)
            return last if row != last else None
        if self._arrays is None:  # device: a host round trip through select
            rows = list(range(last))
            if row != last:
                rows[row] = last
            self.select(rows)
            return last if row != last else None
        n = int(self.lengths[last])
        if row != last:
            for arr in self._arrays:
                arr[row, :, :n] = arr[last, :, :n]
        self._arrays = [a[:last] for a in self._arrays]
        self._values = [self._wrap(a) for a in self._arrays]
        self.binding = None
        self._swap_lengths(row)
        return last if row != last else None

    def _swap_lengths(self, row: int) -> None:
        last = self._batch - 1
        lengths = self.lengths.copy()
        lengths[row] = lengths[last]
        self.lengths = lengths[:last]
        self._batch = last

    def layer(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer `i`'s key and value (batch, kv_heads, offset, head_dim), copies; slots at or past a
        row's length hold nothing meaningful."""
        if self._values is None:
            empty = np.zeros((self._batch, self.kv_heads, 0, self.head_dim), self.dtype)
            return empty, empty
        k, v = (_numpy(t)[:, :, : self.offset].copy() for t in self._values[2 * i : 2 * i + 2])
        return k, v

    def nbytes(self) -> int:
        """Bytes the buffers take (allocated, not filled)."""
        if self._values is None:
            return 0
        return len(self._values) * int(np.prod(self._shape(self._batch))) * self.dtype.itemsize

    def __repr__(self) -> str:
        return (
            f"SharedKVCache(layers={self.num_layers}, batch={self._batch}, kv_heads={self.kv_heads}, "
            f"capacity={self.capacity}, lengths={self.lengths.tolist()}, head_dim={self.head_dim}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def _address(t: Tensor) -> int | None:
    """Where a buffer's data starts: an OrtValue's, or a host array's (the plain binding's)."""
    if is_ortvalue(t):
        return t.data_ptr()
    return t.__array_interface__["data"][0] if isinstance(t, np.ndarray) else None
