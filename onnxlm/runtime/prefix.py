"""Prefix reuse: the KV of recent prompts (and what was generated after them), bounded in bytes, least
recently used out. A new prompt that starts with one of them (a system prompt, the earlier turns of a
chat) copies those positions into its row and prefills only the rest.

    cache = PrefixCache(max_bytes=256 << 20)
    hit = cache.lookup(prompt_ids)       # Hit(n reused, per-layer KV arrays, logits, exact) or None
    cache.store(context_ids, kv_arrays, ends={len(prompt): prompt_logits}, exact=n)  # after a sequence

Keys and values are per layer (kv_heads, positions, head_dim) arrays in the order the cache's buffers
are bound (layer 0 key, layer 0 value, layer 1 key, ...). Entries are only ever read whole-prefix,
so a later entry that extends an earlier one replaces it (and takes over its `ends`).

A prompt met again whole is the one case a prefix cannot answer by itself: its last token must still
run to give the logits of the first new token, and that call (one token, the decode form) computes
them a little differently from the prefill that ran it the first time (a chunk, on an int8 cache
the float32 form), enough to turn a near tie the other way at temperature 0. So an entry also keeps
the logits that followed each prompt it served (`ends`, by prompt length): the same request again
reuses every position and those logits, runs nothing before its first token, and samples from
exactly what the first one sampled from.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


@dataclass
class Entry:
    tokens: np.ndarray  # (n,) int64
    kv: list[np.ndarray]  # per layer key, value: (kv_heads, n, head_dim)
    nbytes: int
    kind: int = 0  # what the KV was computed with (driver.kv_kind): only a prompt of the same kind reuses it
    ends: dict[int, np.ndarray] = field(default_factory=dict)  # prompt length -> the logits after it
    exact: int = 0  # leading positions whose KV is what a cold prefill of them computes (see Hit)


class Hit(NamedTuple):
    """What a prompt reuses: its first n positions' KV; with logits, n is the whole prompt (met
    before) and they are the logits that followed it. exact: how many of the n positions hold what a
    cold prefill of this prompt would have computed there (None: all of them). Prompt positions do,
    once a prompt prefilled on the same form as a longer one (driver.chunk_end, driver.float_rows);
    generated ones do not, since decode steps computed them (a chat's earlier answers)."""

    n: int
    kv: list[np.ndarray]
    logits: np.ndarray | None = None
    exact: int | None = None

    @property
    def as_cold(self) -> bool:
        """Whether every reused position is what a cold prefill computes."""
        return self.exact is None or self.exact >= self.n


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class PrefixCache:
    """Recently computed KV, keyed by the token ids it holds; thread-safe."""

    def __init__(self, max_bytes: int = 256 << 20, min_tokens: int = 16):
        if max_bytes < 0 or min_tokens < 1:
            raise ValueError(
                f"PrefixCache needs max_bytes >= 0 and min_tokens >= 1, got {max_bytes}, {min_tokens}"
            )
        self.max_bytes, self.min_tokens = max_bytes, min_tokens
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._ids = 0
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int], kind: int = 0) -> Hit | None:
        """The longest cached prefix of `prompt` among entries of `kind`, with kv sliced to its n
        positions: the whole prompt with the logits that followed it where an entry served this very
        prompt before, else leaving at least two tokens to prefill (driver.chunk_end says why). None
        when no entry shares min_tokens with it."""
        ids = np.asarray(prompt, np.int64)
        with self._lock:
            best, best_n, whole = None, 0, False
            for key, e in self._entries.items():
                if e.kind != kind:
                    continue
                shared = common_prefix(e.tokens, ids)
                if shared == len(ids) and len(ids) in e.ends:
                    best, best_n, whole = key, len(ids), True
                    break
                n = min(shared, len(ids) - 2)  # a prefill call of one token computes differently
                if n > best_n:
                    best, best_n = key, n
            if best is None or best_n < self.min_tokens:
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            entry = self._entries[best]
            self.hits += 1
            self.reused_tokens += best_n
        kv = [a[:, :best_n] for a in entry.kv]
        return Hit(best_n, kv, entry.ends[best_n] if whole else None, min(entry.exact, best_n))

    def store(
        self,
        tokens: Sequence[int],
        kv: list[np.ndarray],
        kind: int = 0,
        ends: dict[int, np.ndarray] | None = None,
        exact: int = 0,
    ) -> bool:
        """Keep `tokens`' keys and values (they are not copied: give arrays no one else writes), computed
        as `kind` says, and `ends`: for a prompt of length p that `tokens` starts with, the logits that
        followed it; exact: the leading positions a cold prefill would compute as they are (Hit).
        Entries of that kind that are prefixes of it go, their ends kept in the new one; least
        recently used entries go until the total fits."""
        ids = np.asarray(tokens, np.int64)
        ends = {p: v for p, v in (ends or {}).items() if 0 < p <= len(ids)}
        nbytes = sum(a.nbytes for a in kv)
        if len(ids) < self.min_tokens or nbytes > self.max_bytes or not kv:
            return False
        if any(a.shape[1] != len(ids) for a in kv):
            raise ValueError(f"PrefixCache.store: {len(ids)} tokens but KV of {kv[0].shape[1]} positions")
        with self._lock:
            for key in [
                k
                for k, e in self._entries.items()
                if e.kind == kind and common_prefix(e.tokens, ids) == len(e.tokens)
            ]:
                ends = {**self._entries[key].ends, **ends}
                self.nbytes -= self._entries.pop(key).nbytes
            nbytes += sum(v.nbytes for v in ends.values())
            self._ids += 1
            self._entries[self._ids] = Entry(ids, kv, nbytes, kind, ends, min(exact, len(ids)))
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.nbytes,
            "hits": self.hits,
            "misses": self.misses,
            "reused_tokens": self.reused_tokens,
        }
