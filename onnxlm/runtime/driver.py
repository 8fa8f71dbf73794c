"""The decode driver: one per KV layout, the only code that pads, prefills and steps a batch. Engine
generation (generate.py), the server's scheduler, speculation and prefix reuse all stand on it.

    rows = make_rows(model, chunk=512)           # SharedRows or ConcatRows, by the manifest's kv_layout
    job = rows.start([ids_a, ids_b])             # a prefill of new rows, run one chunk per call
    while (last := job.step()) is None: ...      # last: (k, vocab) each new row's last-token logits
    rows.join(job)                               # the new rows join after the running ones
    logits = rows.decode([[t0], [t1, d1, d2]])   # (batch, K, vocab): row b's logits after each token
    rows.rollback(1, 2)                          # row 1 forgets its last 2 tokens (rejected drafts)
    rows.drop(0)                                 # the last row moves into row 0's place

A row's KV grows with the tokens it holds (SharedRows reserves ~25% ahead, so the long-decode
MatMul form, which reads the whole buffer, stays within its 4/3 bound), and rows that leave give
their slots back: buffers shrink when most of them are unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from .kv_cache import KVCache
from .session import release_free_heap
from .shared_kv import SharedKVCache

GROWTH = 1.25  # a full buffer is rebuilt this much larger (at least MIN_ROOM more slots)
MIN_ROOM = 64


class Forward(Protocol):
    """What the drivers need of a model (generate.Model)."""

    facts: object
    io: object

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache | SharedKVCache: ...


def pad_token(facts) -> int:
    return facts.pad_token_id if facts.pad_token_id is not None else (facts.eos_token_ids or [0])[0]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask, position_ids, each (batch, longest prompt), left-padded."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, width - len(p) :] = p
            mask[row, width - len(p) :] = 1
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return ids, mask, pos


def right_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids (batch, longest prompt) right-padded, and each prompt's length (batch,)."""
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    ids = np.full((len(prompts), int(lengths.max())), pad_id, dtype=np.int64)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = p
    return ids, lengths


def long_rows(io, lengths) -> np.ndarray:
    """The long_rope input (batch,) int64 for rows whose sequences hold `lengths` tokens: 1 past the
    manifest's io.long_rope_after (a longrope graph; see GraphIO)."""
    return (np.asarray(lengths) > io.long_rope_after).astype(np.int64)


def window_feeds(io, facts, ids: Sequence[int], every_position: bool = False) -> dict[str, np.ndarray]:
    """The feeds of one graph call that runs `ids` from an empty cache, for either KV layout, as plain
    numpy (no binding; a shared-buffer graph gets a buffer of the window's size): for evaluation and
    calibration runs that want the graph's outputs over a window, not generation. Logits at the last
    position, or at every position (`every_position`)."""
    n = len(ids)
    feed = {io.input_ids: np.array([list(ids)], np.int64)}
    if io.shared:
        feed[io.seqlens_k] = np.array([n - 1], np.int32)
        feed[io.total_sequence_length] = np.array(n, np.int32)
        feed[io.query_seqlens] = np.array([n], np.int32)
        feed[io.logits_index] = (np.arange(n) if every_position else np.array([n - 1]))[None].astype(np.int64)
        past = n  # a buffer that holds the window
    else:
        feed[io.attention_mask] = np.ones((1, n), np.int64)
        if io.position_ids:
            feed[io.position_ids] = np.arange(n, dtype=np.int64)[None]
        past = 0
    if io.long_rope:
        feed[io.long_rope] = long_rows(io, [n])
    for i in range(facts.num_layers):
        for name in (io.past_key.format(i=i), io.past_value.format(i=i)):
            feed[name] = np.zeros((1, facts.num_kv_heads, past, facts.head_dim), np.dtype(io.kv_dtype))
    return feed


def chunk_end(start: int, want: int | None, lengths: Sequence[int], limit: int | None = None) -> int:
    """Where a prefill call from `start` over rows of these prompt lengths ends: after `want`
    positions (all when None) and at most at `limit`, except that no call brings a row exactly one
    token while it has more than that in all. onnxruntime computes a row that brings one token along
    other paths than a row bringing several (seen alone and beside a wider row, on float32 and int4
    graphs): its keys, values and logits differ from those of the same token computed in a wider
    call, by ~1e-5 in float32 and by up to ~0.7 in a logit once an int4 graph's 8-bit activations
    round the other way. Calls of two tokens and more agree bit for bit. So a row never ends on a
    call of one token or takes one token a call, and how a prompt is chunked (the server sizes
    chunks by its load) changes nothing."""
    seq = max(lengths, default=0)
    top = seq if limit is None else min(seq, limit)
    end = min(top, seq if want is None else start + max(want, 2))
    lone = {n - 1 for n in lengths if n - 1 > start}  # ends that would leave a row one token
    for e in [*range(end, start + 1, -1), *range(end + 1, top + 1)]:
        if e not in lone:
            return e
    return end


def float_rows(prompts: Sequence[Sequence[int]], reuse, above: int | None) -> list[bool]:
    """Which rows an int8 cache (io.float_prefill_above = above) prefills on its float32 form: a prompt
    of more than `above` tokens in every call, a last short chunk included, and its rest after a
    cached prefix that a cold prefill would have computed as it is (Hit.as_cold), so that neither how
    the prompt is chunked (the server sizes chunks by its load) nor how much of it the prefix cache
    held changes a logit; and a rest of more than `above` tokens after any prefix. A short rest after
    a prefix holding generated positions (a chat's follow-up) takes the decode form: it is faster
    there, and no form would give the cold prefill's logits."""
    if above is None:
        return [False] * len(prompts)
    reuse = list(reuse or [None] * len(prompts))
    return [
        len(p) - (0 if r is None else r.n) > above or (len(p) > above and (r is None or r.as_cold))
        for p, r in zip(prompts, reuse, strict=True)
    ]


def exact_after(prompt_len: int, hit, above: int | None) -> int:
    """How many leading positions of a prompt just prefilled (after `hit`, a prefix.Hit or None) hold
    what a cold prefill of a longer prompt starting with it computes there (PrefixCache's `exact`)."""
    if prompt_len < 2 or (above is not None and prompt_len <= above):
        return 0  # a one-token call, or the decode form: a longer prompt computes them otherwise
    return prompt_len if hit is None or hit.as_cold else int(hit.exact)


# A long prompt's prefill allocates tens of MB a call (its attention's scores grow with chunk x context)
# and frees them when the call ends (or its arena shrinks: session.SHRINK_FROM); glibc keeps much
# of that in its heaps once its mmap threshold has risen (SmolLM2 int8, prompts of 1,000-3,000 tokens
# after a quantize in the same process: +299 MB). Handing the free pages back (malloc_trim, 2-20 ms)
# after a prefill of at least this many tokens keeps the process at its size after load.
TRIM_AFTER = 512


def _token_lists(tokens) -> list[list[int]]:
    arr = np.asarray(tokens) if not isinstance(tokens, list) else None
    if arr is not None and arr.ndim == 1:
        return [[int(t)] for t in arr]
    return [[int(t) for t in row] for row in tokens]


class Prefill:
    """What both layouts' prefills share: a right- or left-padded `ids` run `chunk` positions a call
    from `start`; `step` is the layout's own."""

    ids: np.ndarray
    start: int
    cache: KVCache | SharedKVCache
    seqs: list[list[int]]  # each row's whole sequence (a reused prefix included)
    long: np.ndarray | None  # the long_rope input of every chunk: by each row's whole length

    def _setup(self, rows: Rows, prompts: Sequence[Sequence[int]]) -> None:
        self.model, self.chunk = rows.model, rows.chunk
        self.seqs = [list(p) for p in prompts]
        io = self.model.io
        self.long = long_rows(io, [len(p) for p in prompts]) if io.long_rope else None

    @property
    def tokens(self) -> int:
        """Positions this prefill still has to run (its whole width at first)."""
        return max(0, self.ids.shape[1] - self.start)

    def step(self) -> np.ndarray | None:
        raise NotImplementedError

    def run(self) -> np.ndarray:
        while (last := self.step()) is None:
            pass
        return last

    def free(self) -> None:
        self.cache.free()


# --- what both layouts share: rows whose rotary switches at a length (longrope) ------------------------
class RowsBase:
    """The public face of a driver. For a longrope graph (the manifest's io.long_rope_after = A) each row
    keeps its token ids: a row holding at most A tokens rotates with the short factors, one holding more
    with the long ones, and its cached keys must match. So the call that takes a row past A runs the
    row's whole sequence again from position 0 (a prefill, long throughout) instead of a decode step, as
    transformers' generate does for one sequence; a decode of several tokens (speculation) is split at
    A, and a rollback back under A prefills the row again, short. Per row, unlike transformers' batched
    generate (where the padded batch switches with its longest row): a row never depends on its
    batchmates, which a server needs."""

    model: Forward
    chunk: int | None

    def __init__(self, model, chunk: int | None = 512):
        self.model, self.chunk = model, chunk
        self.pad = pad_token(model.facts)
        io = model.io
        self.switch: int | None = io.long_rope_after if io.long_rope else None
        self.history: list[list[int]] = []  # per row, the tokens its KV holds (longrope graphs only)

    def held(self, row: int) -> int:
        raise NotImplementedError

    def start(self, prompts: Sequence[Sequence[int]], reuse=None) -> Prefill:
        raise NotImplementedError

    def kv_kind(self, tokens: int) -> int:
        """What the KV of a row holding `tokens` was computed with: 1 past a longrope switch, else 0; KV
        of different kinds never mix (a cached prefix is reused only by a prompt of its kind)."""
        return int(self.switch is not None and tokens > self.switch)

    def join(self, job: Prefill) -> None:
        self._join(job)
        if self.switch is not None:
            self.history += [list(p) for p in job.seqs]

    def decode(self, tokens) -> np.ndarray:
        """Row b brings tokens[b] (one or more); logits (batch, K, vocab) after each of them (K the
        most any row brings; a row bringing fewer repeats its last)."""
        rows = _token_lists(tokens)
        if self.switch is None:
            return self._decode(rows)
        a = self.switch
        held = [self.held(b) for b in range(len(rows))]
        cut = [len(r) if h > a or h + len(r) <= a else a - h for r, h in zip(rows, held, strict=True)]
        crossing = [b for b, (r, c) in enumerate(zip(rows, cut, strict=True)) if c < len(r)]
        if not crossing:
            logits = self._decode(rows)
            self._extend(rows)
            return logits
        return self._decode_across(rows, cut, crossing)

    def _decode_across(self, rows: list[list[int]], cut: list[int], crossing: list[int]) -> np.ndarray:
        """Rows in `crossing` pass the switch within this call: the tokens before it (cut[b]) decode as
        usual, the row's whole sequence through its next token is prefilled again, long, and the rest
        decode after it."""
        first = [r[:c] for r, c in zip(rows, cut, strict=True)]
        out: list[list[np.ndarray]] = [[] for _ in rows]
        if any(first):
            self._collect(out, first, self._decode(first))
            self._extend(first)
        seqs = [self.history[b] + [rows[b][cut[b]]] for b in crossing]
        last = self._refill(crossing, seqs)
        for i, b in enumerate(crossing):
            out[b].append(last[i])
        rest = [rows[b][cut[b] + 1 :] if b in crossing else [] for b in range(len(rows))]
        if any(rest):
            self._collect(out, rest, self._decode(rest))
            self._extend(rest)
        width = max(len(r) for r in rows)
        return np.stack([np.stack(o + [o[-1]] * (width - len(o))) for o in out])  # (batch, K, vocab)

    @staticmethod
    def _collect(out: list[list[np.ndarray]], rows: list[list[int]], logits: np.ndarray) -> None:
        for b, r in enumerate(rows):
            out[b] += list(logits[b, : len(r)])

    def _extend(self, rows: list[list[int]]) -> None:
        for h, r in zip(self.history, rows, strict=True):
            h.extend(r)

    def _refill(self, rows: list[int], seqs: list[list[int]]) -> np.ndarray:
        """Prefill `seqs` afresh (long factors throughout for one past the switch) and put their KV in
        place of `rows`'; the last-token logits (len(rows), vocab)."""
        job = self.start(seqs)
        last = job.run()
        self._join(job)  # the new rows go last, then each moves into its row's place
        for row in reversed(rows):
            self._drop(row)
        for row, seq in zip(rows, seqs, strict=True):
            self.history[row] = list(seq)
        return last

    def rollback(self, row: int, n: int) -> None:
        """Row `row` forgets its last `n` tokens (rejected drafts)."""
        if not n:
            return
        self._rollback(row, n)
        if self.switch is None:
            return
        seq = self.history[row]
        before = len(seq)
        del seq[before - n :]
        if before > self.switch >= len(seq) and seq:  # back under the switch: its keys are long ones
            self._refill([row], [list(seq)])

    def drop(self, row: int) -> None:
        """Row `row` leaves; the last row moves into its place."""
        self._drop(row)
        if self.switch is not None:
            self.history[row] = self.history[-1]
            self.history.pop()

    def free(self) -> None:
        self._free()
        self.history = []

    def _join(self, job) -> None:
        raise NotImplementedError

    def _decode(self, rows: list[list[int]]) -> np.ndarray:
        raise NotImplementedError

    def _rollback(self, row: int, n: int) -> None:
        raise NotImplementedError

    def _drop(self, row: int) -> None:
        raise NotImplementedError

    def _free(self) -> None:
        raise NotImplementedError


# --- shared-buffer graphs -----------------------------------------------------------------------------
class SharedPrefill(Prefill):
    """New rows' prompts through a shared-buffer graph, `chunk` positions per call, in a buffer of
    their own; a row may start from reused KV (a cached prefix, prefix.Hit), then only the rest is
    prefilled; a row whose whole prompt is reused with the logits that followed it runs nothing."""

    def __init__(self, rows: SharedRows, prompts: Sequence[Sequence[int]], reuse=None):
        self._setup(rows, prompts)
        reuse = list(reuse or [None] * len(prompts))
        held = [0 if r is None else r.n for r in reuse]  # tokens each row starts with
        self.rest = [list(p[n:]) for p, n in zip(prompts, held, strict=True)]
        self.given = {row: r.logits for row, r in enumerate(reuse) if r is not None and r.logits is not None}
        if any(not r and row not in self.given for row, r in enumerate(self.rest)):
            raise ValueError("a prefill must bring at least one new token per row, or its logits")
        self.cache = self.model.new_cache(len(prompts), capacity=max(len(p) for p in prompts))
        assert isinstance(self.cache, SharedKVCache)
        self.ceiling = rows.ceiling
        for row, r in enumerate(reuse):
            if r is not None:
                self.cache.write(row, r.kv, r.n)
        self.ids, self.lengths = right_pad(self.rest, rows.pad)
        # An int8 cache's float32 form, for the rows float_rows says (SplitPrefill keeps the kinds apart)
        self.float_form = any(float_rows(prompts, reuse, getattr(self.model.io, "float_prefill_above", None)))
        self.start = 0
        self.last: np.ndarray | None = None  # (k, vocab)

    def _given(self, vocab: int, dtype) -> np.ndarray:
        last = np.empty((len(self.rest), vocab), dtype)
        for row, logits in self.given.items():
            last[row] = logits
        return last

    def step(self) -> np.ndarray | None:
        """Run the next chunk; the last-token logits (k, vocab) once the whole prompt is in."""
        seq = self.ids.shape[1]
        if seq == 0:  # every row's prompt and logits were reused
            logits = next(iter(self.given.values()))
            self.last = self._given(len(logits), logits.dtype)
            return self.last
        # Every row, a finished one bringing nothing included, needs room for the padded chunk after
        # what it holds (GroupQueryAttention checks it): a long prompt mostly reused from the prefix
        # cache is done after one chunk while a shorter new one goes on.
        held = int(self.cache.lengths.max())
        start = self.start
        end = chunk_end(start, self.chunk, self.lengths.tolist(), start + self.ceiling - held)
        if end <= start:
            raise ValueError(
                f"a row holds the whole context ({self.ceiling} tokens) while another brings more"
            )
        if held + end - start > self.cache.capacity:
            self.cache.reserve(held + end - start)
        q = np.clip(self.lengths - start, 0, end - start)  # (k,) real tokens in this chunk
        index = np.maximum(q - 1, 0)[:, None]
        chunk = self.ids[:, start:end]
        if self.float_form:
            logits = self.model.step(chunk, q, index, self.cache, self.long, prefill=True)[:, 0]
        else:
            logits = self.model.step(chunk, q, index, self.cache, self.long)[:, 0]
        if self.last is None:
            self.last = self._given(logits.shape[1], logits.dtype)  # (k, vocab)
        ends = (self.lengths > start) & (self.lengths <= end)  # rows whose last token is in this chunk
        self.last[ends] = logits[ends]
        self.start = end
        if end < seq:
            return None
        if seq >= TRIM_AFTER:
            release_free_heap()
        return self.last

    def expand(self, rows: Sequence[int]) -> None:
        """After the prefill: the cache's rows become `rows` (indices may repeat: prompts shared by
        several sequences were prefilled once)."""
        self.cache.repeat(rows)
        self.seqs = [self.seqs[r] for r in rows]


class SplitPrefill(Prefill):
    """Prompts of both kinds an int8 cache tells apart (float_rows): those it prefills on the int8 form
    and those on the float32 form, each kind prefilled as a
    SharedPrefill of its own, the short first, then put back in the given order. Run in one call, a
    short prompt would take the float32 form because of a longer batchmate, and its logits would
    depend on who it arrived with."""

    def __init__(self, rows: SharedRows, prompts: Sequence[Sequence[int]], reuse, kinds: list[bool]):
        self.model, self.seqs = rows.model, [list(p) for p in prompts]
        reuse = list(reuse or [None] * len(prompts))
        self.groups = [[i for i, k in enumerate(kinds) if k == kind] for kind in (False, True)]
        self.parts = [
            SharedPrefill(rows, [prompts[i] for i in g], [reuse[i] for i in g]) for g in self.groups
        ]
        self.cache: SharedKVCache | None = None  # both parts' rows, in the given order, once run
        self.last: np.ndarray | None = None

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.parts)

    @property
    def chunk(self) -> int | None:
        return self.parts[-1].chunk

    @chunk.setter
    def chunk(self, value: int | None) -> None:
        for p in self.parts:
            p.chunk = value

    def step(self) -> np.ndarray | None:
        part = next(p for p in self.parts if p.last is None or p.tokens)
        if part.step() is None or part is not self.parts[-1]:
            return None
        order = np.argsort(np.concatenate(self.groups), kind="stable")  # given row -> row of the parts
        self.last = np.concatenate([p.last for p in self.parts])[order]
        self.cache = self.parts[0].cache
        self.cache.append(self.parts[1].cache)
        self.parts[1].free()
        self.cache.repeat(order.tolist())
        return self.last

    def expand(self, rows: Sequence[int]) -> None:
        assert self.cache is not None, "expand a prefill that has run"
        self.cache.repeat(rows)
        self.seqs = [self.seqs[r] for r in rows]

    def free(self) -> None:
        if self.cache is not None:
            self.cache.free()
        else:
            for p in self.parts:
                p.free()


class SharedRows(RowsBase):
    """Rows of any lengths in one buffer per layer (seqlens_k per row); joiners are prefilled in a
    buffer of their own and copied in."""

    def __init__(self, model, chunk: int | None = 512):
        super().__init__(model, chunk)
        self.ceiling = model.facts.context_length
        self.cache: SharedKVCache | None = None

    supports_reuse = True

    @property
    def batch(self) -> int:
        return 0 if self.cache is None else self.cache.batch

    def held(self, row: int) -> int:
        assert self.cache is not None
        return int(self.cache.lengths[row])

    def start(self, prompts: Sequence[Sequence[int]], reuse=None) -> SharedPrefill | SplitPrefill:
        above = getattr(self.model.io, "float_prefill_above", None)
        if above is not None and len(prompts) > 1:
            kinds = float_rows(prompts, reuse, above)
            if any(kinds) and not all(kinds):
                return SplitPrefill(self, prompts, reuse, kinds)
        return SharedPrefill(self, prompts, reuse)

    def _join(self, job: SharedPrefill | SplitPrefill) -> None:
        if self.cache is None:
            self.cache = job.cache
        else:
            self.cache.append(job.cache)
            job.free()

    def _decode(self, tokens) -> np.ndarray:
        """Row b brings tokens[b] (one or more); logits (batch, K, vocab) after each of them (K the
        most any row brings; a row bringing fewer repeats its last).

        Every row, whatever it brings, needs room for the padded chunk after what it holds
        (GroupQueryAttention checks it). Where that would pass the buffer's ceiling (the context)
        after the fullest row, while another row brings more tokens (its drafts, a draft model's
        catch-up), the call runs in pieces that fit."""
        assert self.cache is not None
        rows = _token_lists(tokens)
        width = max(len(r) for r in rows)
        if width <= self.ceiling - int(self.cache.lengths.max()):
            return self._call(rows)
        out: list[list[np.ndarray]] = [[] for _ in rows]
        done = 0
        while done < width:
            fit = self.ceiling - int(self.cache.lengths.max())
            if fit < 1:  # a row at the context's end, another still bringing tokens
                raise ValueError(
                    f"a row holds the whole context ({self.ceiling} tokens) while another brings more"
                )
            piece = [r[done : done + fit] for r in rows]
            self._collect(out, piece, self._call(piece))
            done += fit
        return np.stack([np.stack(o + [o[-1]] * (width - len(o))) for o in out])

    def _call(self, rows: list[list[int]]) -> np.ndarray:
        # built from Python lists, a few numpy calls a step: after the model has streamed its weights
        # every numpy call starts cold (tens of µs each inside the decode loop)
        assert self.cache is not None
        lens = [len(r) for r in rows]
        width = max(lens)
        ids = np.array([list(r) + [0] * (width - n) for r, n in zip(rows, lens, strict=True)], np.int64)
        self._ensure(int(self.cache.lengths.max()) + width)
        # each row's logits at its chunk positions, a row bringing fewer repeating its last
        index = np.array([[min(j, max(n - 1, 0)) for j in range(width)] for n in lens], np.int64)
        return self.model.step(ids, np.array(lens, np.int32), index, self.cache)

    def _ensure(self, need: int) -> None:
        assert self.cache is not None
        if need > self.cache.capacity:
            room = max(int(need * GROWTH), need + MIN_ROOM)
            self.cache.reserve(min(self.ceiling, room))

    def _rollback(self, row: int, n: int) -> None:
        assert self.cache is not None
        if n:
            self.cache.forget(row, n)

    def read(self, row: int) -> list[np.ndarray]:
        """Row `row`'s keys and values, per layer (kv_heads, held, head_dim) copies (for reuse)."""
        assert self.cache is not None
        return self.cache.read(row)

    def _drop(self, row: int) -> None:
        assert self.cache is not None
        if self.cache.batch == 1:
            self._free()
            return
        self.cache.drop(row)
        self.cache.shrink(room=max(int(self.cache.offset * GROWTH), self.cache.offset + MIN_ROOM))

    def _free(self) -> None:
        if self.cache is not None:
            self.cache.free()
        self.cache = None


# --- concat graphs ------------------------------------------------------------------------------------
class ConcatPrefill(Prefill):
    """New rows' prompts through a concat graph, left-padded, `chunk` positions per call."""

    def __init__(self, rows: ConcatRows, prompts: Sequence[Sequence[int]], reuse=None):
        if reuse is not None and any(r is not None for r in reuse):
            raise ValueError("a concat-layout graph does not reuse cached prefixes")
        self._setup(rows, prompts)
        self.ids, self.mask, self.pos = left_pad(prompts, rows.pad)
        self.cache = self.model.new_cache(len(prompts))
        self.start = 0

    def step(self) -> np.ndarray | None:
        seq = self.ids.shape[1]
        start = self.start
        end = chunk_end(start, self.chunk, [seq])  # left-padded: every row ends at the last column
        logits = self.model.forward(
            self.ids[:, start:end],
            self.mask[:, :end],
            self.pos[:, start:end],
            self.cache,
            long_rope=self.long,
        )
        self.start = end
        return logits if end >= seq else None  # (k, vocab): left padding puts every row's last token last

    def expand(self, rows: Sequence[int]) -> None:
        """As SharedPrefill.expand (KVCache.select takes repeated rows)."""
        self.cache.select(list(rows))
        self.ids, self.mask, self.pos = self.ids[rows], self.mask[rows], self.pos[rows]
        self.seqs = [self.seqs[r] for r in rows]
        self.long = None if self.long is None else self.long[list(rows)]


class ConcatRows(RowsBase):
    """Left-padded rows whose cache grows by concatenation; a joiner or the batch is padded on the left
    to line up. Forgotten tokens (rejected drafts) become holes in the attention mask, and leading
    columns no row needs any more are trimmed."""

    supports_reuse = False

    def __init__(self, model, chunk: int | None = 512):
        super().__init__(model, chunk)
        self.cache: KVCache | None = None
        self.mask = np.zeros((0, 0), np.int64)  # (batch, offset) 1 on real positions
        self.next_pos = np.zeros(0, np.int64)  # (batch,) position of each row's next token

    @property
    def batch(self) -> int:
        return 0 if self.cache is None else self.cache.batch

    def held(self, row: int) -> int:
        return int(self.mask[row].sum())

    def start(self, prompts: Sequence[Sequence[int]], reuse=None) -> ConcatPrefill:
        return ConcatPrefill(self, prompts, reuse)

    def _join(self, job: ConcatPrefill) -> None:
        mask, next_pos = job.mask, job.mask.sum(axis=1)
        if self.cache is None:
            self.cache, self.mask, self.next_pos = job.cache, mask, next_pos
            return
        pad_self, pad_other = self.cache.append(job.cache)
        self.mask = np.concatenate(
            [np.pad(self.mask, ((0, 0), (pad_self, 0))), np.pad(mask, ((0, 0), (pad_other, 0)))]
        )
        self.next_pos = np.concatenate([self.next_pos, next_pos])

    def _decode(self, tokens) -> np.ndarray:
        """As SharedRows.decode; a row bringing fewer tokens than K is left-padded within the chunk."""
        assert self.cache is not None
        rows = _token_lists(tokens)
        q = np.array([len(r) for r in rows], np.int64)
        width = int(q.max())
        ids = np.full((len(rows), width), self.pad, np.int64)
        cols = np.zeros((len(rows), width), np.int64)
        pos = np.ones((len(rows), width), np.int64)
        for b, r in enumerate(rows):
            ids[b, width - len(r) :] = r
            cols[b, width - len(r) :] = 1
            pos[b, width - len(r) :] = self.next_pos[b] + np.arange(len(r))
        self.mask = np.concatenate([self.mask, cols], axis=1)
        raw = self.model.forward(ids, self.mask, pos, self.cache, all_positions=True)  # (batch, K, vocab)
        self.next_pos = self.next_pos + q
        if width == 1:
            return raw
        out = np.empty_like(raw)
        for b, n in enumerate(q):
            out[b, :n] = raw[b, width - n :]
            out[b, n:] = raw[b, width - 1]
        return out

    def _rollback(self, row: int, n: int) -> None:
        if n:
            real = np.flatnonzero(self.mask[row])
            self.mask[row, real[-n:]] = 0
            self.next_pos[row] -= n

    def read(self, row: int) -> list[np.ndarray]:
        raise NotImplementedError("a concat-layout graph does not reuse cached prefixes")

    def _drop(self, row: int) -> None:
        assert self.cache is not None
        if self.cache.batch == 1:
            self._free()
            return
        moved = self.cache.drop(row)
        if moved is not None:
            self.mask[row], self.next_pos[row] = self.mask[moved], self.next_pos[moved]
        self.mask, self.next_pos = self.mask[:-1], self.next_pos[:-1]
        unused = int(np.argmax(self.mask.any(axis=0)))  # leading columns that are padding in every row
        if unused >= max(32, self.mask.shape[1] // 4):
            self.cache.trim_front(unused)
            self.mask = self.mask[:, unused:]

    def _free(self) -> None:
        self.cache = None
        self.mask, self.next_pos = np.zeros((0, 0), np.int64), np.zeros(0, np.int64)


Rows = SharedRows | ConcatRows


def make_rows(model, chunk: int | None = 512) -> Rows:
    """The driver the model's kv_layout calls for."""
    return (SharedRows if model.io.shared else ConcatRows)(model, chunk)
