"""Sampling: a function built once from a request's parameters, then called on every step's logits.

    sampler = make_sampler(temperature=0.7, top_p=0.9, seed=1)
    processors = make_logits_processors(repetition_penalty=1.1, presence_penalty=0.5, prompt_len=12)
    for p in processors:
        logits = p(tokens, logits)      # tokens: per row, the prompt and generated ids so far
    next_ids = sampler(logits)          # (batch, vocab) -> (batch,)

Temperature 0 means argmax. Truncation order: top-k, then top-p, then min-p (as vLLM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Sampler = Callable[[np.ndarray], np.ndarray]
LogitsProcessor = Callable[[Sequence[Sequence[int]], np.ndarray], np.ndarray]


class ParamError(ValueError):
    """A generation parameter out of its range; `param` names it (the server's 400 does too)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _number(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ParamError(name, f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ParamError(name, f"{name} must be finite, got {value}")
    if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ParamError(name, f"{name} must be in {lb}{lo:g}, {hi:g}{rb}, got {value:g}")
    return value


def _integer(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParamError(name, f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ParamError(name, f"{name} must be >= {lo}, got {value}")
    return int(value)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def make_sampler(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """A closure over logits (batch, vocab) -> token ids (batch,).

    temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 disable their truncation. A seeded sampler
    draws the same tokens for the same logits every time it is rebuilt with that seed.
    """
    temperature = _number("temperature", temperature, 0.0, math.inf)
    top_k = _integer("top_k", top_k, 0)
    top_p = _number("top_p", top_p, 0.0, 1.0, lo_open=True)
    min_p = _number("min_p", min_p, 0.0, 1.0)
    if seed is not None:
        seed = _integer("seed", seed, 0)

    if temperature == 0.0:

        def greedy(logits: np.ndarray) -> np.ndarray:
            return np.argmax(logits, axis=-1)

        return greedy

    rng = np.random.default_rng(seed)
    # two (batch, vocab) float64 buffers, reused from token to token: a fresh 49k-vocabulary float64
    # temporary is 384 KB, which the C allocator maps anew, and its first touch costs ~300 µs a token
    scratch: list[np.ndarray] = []

    def sample(logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.ndim != 2:
            raise ValueError(f"sampler expects logits of shape (batch, vocab), got {logits.shape}")
        if not scratch or scratch[0].shape != logits.shape:
            scratch[:] = [np.empty(logits.shape, np.float64), np.empty(logits.shape, np.float64)]
        x, spare = scratch
        np.copyto(x, logits)
        x /= temperature  # in float64, as every step below
        rows, vocab = x.shape
        if 0 < top_k < vocab:
            kth = np.array([[kth_largest(row, top_k, spare[0])] for row in x])
            np.copyto(x, -np.inf, where=x < kth)
        np.subtract(x, x.max(axis=-1, keepdims=True), out=x)
        np.exp(x, out=x)
        x /= x.sum(axis=-1, keepdims=True)
        if top_p < 1.0:
            for row in x:
                kept = nucleus(row, top_p)
                values = row[kept]
                row.fill(0.0)
                row[kept] = values
        if min_p > 0.0:
            np.copyto(x, 0.0, where=x < min_p * x.max(axis=-1, keepdims=True))
        x /= x.sum(axis=-1, keepdims=True)
        cdf = np.cumsum(x, axis=-1, out=spare)
        u = rng.random((rows, 1)) * cdf[:, -1:]
        # the first index whose cdf exceeds u: the count of entries <= u, the cdf never decreasing
        ids = np.array([np.searchsorted(cdf[r], u[r, 0], side="right") for r in range(rows)])
        return np.minimum(ids, vocab - 1)

    return sample


# candidates for the nucleus: the tokens at least this fraction as likely as the most likely one
NUCLEUS_FLOORS = (1e-3, 1e-5, 1e-7)


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The tokens of probs (vocab,) inside the top_p nucleus, most likely first: the smallest set of
    most likely tokens whose mass reaches top_p (at least one), in the order a stable sort by
    descending probability gives (ties by index). Sorting a 49k vocabulary costs ~4 ms a token,
    more than the rest of a decode step's Python side, and so does argpartition over it: the nucleus
    is looked for among the tokens at least 1e-3 as likely as the most likely one (usually tens to
    hundreds), or 1e-5 or 1e-7 where those hold too little mass, then among all. Every token left
    out is less likely than every candidate, so the answer is exact as soon as the cut falls inside
    the candidates (or they are all the nonzero ones: a zero left out changes nothing)."""
    nonzero = np.count_nonzero(probs)
    top = probs.max()
    for floor in NUCLEUS_FLOORS:
        candidates = np.flatnonzero(probs >= top * floor)
        if len(candidates) > len(probs) // 2:  # a flat distribution: sort it all at once
            break
        if len(candidates) < nonzero and probs[candidates].sum() < top_p:
            continue  # too little mass to hold the cut: a lower floor
        order = candidates[np.lexsort((candidates, -probs[candidates]))]  # a stable sort's order
        kept, cut = _nucleus_prefix(probs[order], top_p)
        if cut or len(candidates) == nonzero:
            return order[:kept]
    order = np.argsort(-probs, kind="stable")
    return order[: _nucleus_prefix(probs[order], top_p)[0]]


TOP_K_MARGINS = (8.0, 32.0)  # candidates for the k-th largest logit: within this of the largest


def kth_largest(x: np.ndarray, k: int, scratch: np.ndarray) -> float:
    """The k-th largest value of x (vocab,), exactly; scratch: a float64 buffer of x's size. A
    partition of the whole vocabulary costs ~0.4 ms a token: the values within a margin of the
    largest are partitioned instead whenever there are at least k of them (then they are the largest
    values, so their k-th is x's), else all of x."""
    top = x.max()
    for margin in TOP_K_MARGINS:
        near = x[x >= top - margin]
        if len(near) >= k:
            return float(np.partition(near, len(near) - k)[len(near) - k])
    np.copyto(scratch, x)
    scratch.partition(len(x) - k)
    return float(scratch[len(x) - k])


def _nucleus_prefix(sorted_p: np.ndarray, top_p: float) -> tuple[int, bool]:
    """How many of `sorted_p` (descending) the nucleus keeps: those with less than top_p of mass
    strictly before them; and whether one of `sorted_p` is dropped (the cut lies inside it)."""
    before = np.cumsum(sorted_p) - sorted_p  # mass of strictly more likely tokens
    kept = int(np.count_nonzero(before < top_p))  # a prefix: `before` never decreases
    return max(kept, 1), kept < len(sorted_p)


def repetition_penalty_processor(penalty: float) -> LogitsProcessor:
    """transformers' rule: for tokens already seen, divide positive logits and multiply negative ones."""
    penalty = _number("repetition_penalty", penalty, 0.0, math.inf, lo_open=True)

    def process(tokens: Sequence[Sequence[int]], logits: np.ndarray) -> np.ndarray:
        out = np.array(logits, copy=True)
        for row, seen in enumerate(tokens):
            if len(seen) == 0:
                continue
            idx = np.unique(np.asarray(seen, dtype=np.int64))
            vals = out[row, idx]
            out[row, idx] = np.where(vals < 0, vals * penalty, vals / penalty)
        return out

    return process


def penalties_processor(presence: float, frequency: float, prompt_len: int) -> LogitsProcessor:
    """OpenAI's presence and frequency penalties over the generated tokens (those after the first
    `prompt_len` of each row): logit -= presence * [count > 0] + frequency * count."""

    def process(tokens: Sequence[Sequence[int]], logits: np.ndarray) -> np.ndarray:
        out = np.array(logits, copy=True)
        for row, seen in enumerate(tokens):
            generated = np.asarray(seen[prompt_len:], dtype=np.int64)
            if len(generated) == 0:
                continue
            ids, counts = np.unique(generated, return_counts=True)
            out[row, ids] -= presence + frequency * counts
        return out

    return process


def logit_bias_processor(bias: dict[int, float]) -> LogitsProcessor:
    """Add a fixed bias to some tokens' logits (OpenAI's logit_bias; -100 all but bans a token)."""
    ids = np.array(list(bias), dtype=np.int64)
    values = np.array(list(bias.values()), dtype=np.float32)

    def process(tokens: Sequence[Sequence[int]], logits: np.ndarray) -> np.ndarray:
        out = np.array(logits, copy=True)
        out[:, ids] += values
        return out

    return process


def min_tokens_processor(min_tokens: int, stop_ids: Sequence[int], prompt_len: int) -> LogitsProcessor:
    """Forbid the stop tokens (EOS and stop_token_ids) until `min_tokens` tokens have been generated."""
    ids = np.array(sorted(stop_ids), dtype=np.int64)

    def process(tokens: Sequence[Sequence[int]], logits: np.ndarray) -> np.ndarray:
        out = np.array(logits, copy=True)
        for row, seen in enumerate(tokens):
            if len(seen) - prompt_len < min_tokens:
                out[row, ids] = -np.inf
        return out

    return process


def check_logit_bias(bias, vocab_size: int | None = None) -> dict[int, float]:
    """{token id: bias in [-100, 100]} from a dict whose keys may be ids as strings (JSON's)."""
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise ParamError("logit_bias", f"logit_bias must map token ids to numbers, got {type(bias).__name__}")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ParamError("logit_bias", f"logit_bias: {key!r} is not a token id") from None
        if isinstance(key, bool) or token < 0 or (vocab_size is not None and token >= vocab_size):
            raise ParamError(
                "logit_bias", f"logit_bias: token id {key!r} is outside the vocabulary (size {vocab_size})"
            )
        out[token] = _number("logit_bias", value, -100.0, 100.0)
    return out


def make_logits_processors(
    repetition_penalty: float | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: dict[int, float] | None = None,
    min_tokens: int = 0,
    stop_ids: Sequence[int] = (),
    prompt_len: int = 0,
) -> list[LogitsProcessor]:
    """The processors a request asks for, in the order they apply; none for default parameters.
    `prompt_len` tells where each row's generated tokens start (the penalties and min_tokens count
    only those); `stop_ids` are the tokens min_tokens holds back."""
    processors: list[LogitsProcessor] = []
    if repetition_penalty is not None:
        _number("repetition_penalty", repetition_penalty, 0.0, math.inf, lo_open=True)
        if repetition_penalty != 1.0:
            processors.append(repetition_penalty_processor(repetition_penalty))
    presence = _number("presence_penalty", presence_penalty, -2.0, 2.0)
    frequency = _number("frequency_penalty", frequency_penalty, -2.0, 2.0)
    if presence or frequency:
        processors.append(penalties_processor(presence, frequency, prompt_len))
    bias = check_logit_bias(logit_bias)
    if bias:
        processors.append(logit_bias_processor(bias))
    if _integer("min_tokens", min_tokens, 0) and stop_ids:
        processors.append(min_tokens_processor(min_tokens, stop_ids, prompt_len))
    return processors


def apply_processors(
    processors: Sequence[LogitsProcessor], tokens: Sequence[Sequence[int]], logits: np.ndarray
) -> np.ndarray:
    for p in processors:
        logits = p(tokens, logits)
    return logits
