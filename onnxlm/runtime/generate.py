"""One sequence's generation: its parameters, the model's forward call, sampling and stop handling.

    Model.forward / Model.step   one graph call (concat / shared-buffer layout), the cache updated
    GenerationParams             a request's parameters, validated once
    SeqState, sample_next        one sequence's sampler, text, stop strings and finish reason; each
                                 sampled token goes through sample_next, whoever drives the batch

The batch itself (padding, prefill, decode rounds, speculation, prefix reuse) is driven by
driver.py (one driver per KV layout) and batch.py (the sequences on it, generate_steps).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..bundle import Manifest
from . import constraints
from .driver import long_rows, window_feeds
from .kv_cache import KVCache
from .sampling import ParamError, apply_processors, check_logit_bias, make_logits_processors, make_sampler
from .session import SHRINK_FROM, BoundBuffers, binds_arrays, kv_device, run_bound, run_numpy
from .shared_kv import SharedKVCache
from .tokenizer import Detokenizer, Tokenizer

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger("onnxlm.generate")

_ORT_INT = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}
# Model.logits over a float16 cache (or an int8 one whose bundle does not record float_prefill_above):
# tokens per call
READ_CHUNK = 16


@dataclass
class GenerationParams:
    """A request's generation parameters, validated on construction: the one check of them that the
    Python API, the CLI and the server all go through (ParamError, a ValueError naming the parameter;
    TypeError for unknown keywords)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: bool = False  # report each token's logprob (top_logprobs > 0 implies it)
    top_logprobs: int = 0  # also report this many most likely tokens per step (0..20)
    presence_penalty: float = 0.0  # OpenAI's, over the generated tokens (-2..2)
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100]
    min_tokens: int = 0  # EOS and stop_token_ids are held back until this many tokens
    json_schema: dict | str | None = None  # constrain the output (llguidance): at most one of these
    regex: str | None = None
    grammar: str | None = None  # a Lark grammar (llguidance's dialect, %json {...} allowed)
    compiled_grammar: str | None = field(default=None, init=False, repr=False)  # the llguidance form

    def __post_init__(self):
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ParamError("max_new_tokens", f"max_new_tokens must be an integer >= 1, got {n!r}")
        self.max_new_tokens = int(n)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop", f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        ids = list(self.stop_token_ids or [])
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ParamError(
                "stop_token_ids", f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}"
            )
        self.stop_token_ids = [int(t) for t in ids]
        if not isinstance(self.ignore_eos, bool):
            raise ParamError("ignore_eos", f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        k = self.top_logprobs
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= 20:
            raise ParamError("top_logprobs", f"top_logprobs must be an integer in [0, 20], got {k!r}")
        self.top_logprobs = int(k)
        if not isinstance(self.logprobs, (bool, np.bool_)):
            raise ParamError("logprobs", f"logprobs must be True or False, got {self.logprobs!r}")
        self.logprobs = bool(self.logprobs) or self.top_logprobs > 0
        self.sampler()  # validates temperature, top_k, top_p, min_p, seed
        self.logit_bias = check_logit_bias(self.logit_bias) or None
        make_logits_processors(
            self.repetition_penalty, self.presence_penalty, self.frequency_penalty, None, self.min_tokens
        )
        self.compiled_grammar = constraints.compile_grammar(self.json_schema, self.regex, self.grammar)

    @classmethod
    def from_kwargs(cls, **params) -> GenerationParams:
        known = [name for name, f in cls.__dataclass_fields__.items() if f.init]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise TypeError(
                f"unknown generation parameter(s) {', '.join(unknown)}; known: {', '.join(known)}"
            )
        return cls(**params)

    def sampler(self):
        return make_sampler(self.temperature, self.top_k, self.top_p, self.min_p, self.seed)


class Model:
    """One bundle's graph: the session, the manifest's IO names, and one forward call."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, io_binding: bool = True):
        self.session = session
        self.manifest = manifest
        self.io = manifest.io
        self.facts = manifest.model
        self.io_binding = io_binding
        self.device = kv_device(session) if io_binding else "cpu"
        graph_inputs = {i.name: i.type for i in session.get_inputs()}
        graph_outputs = {o.name for o in session.get_outputs()}
        n = self.facts.num_layers
        missing = [x for x in self.io.input_names(n) if x not in graph_inputs]
        missing += [x for x in self.io.output_names(n) if x not in graph_outputs]
        if missing:
            raise ValueError(f"the graph lacks the inputs/outputs the manifest names: {', '.join(missing)}")
        self._int = {name: _ORT_INT.get(t, np.int64) for name, t in graph_inputs.items()}

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache | SharedKVCache:
        """The cache the manifest's kv_layout calls for; a shared buffer holds `capacity` positions per
        row (default: the context window)."""
        if self.io.shared:
            return SharedKVCache.from_manifest(
                self.manifest, batch, capacity, device=self.device, plain=binds_arrays(self.session)
            )
        return KVCache.from_manifest(self.manifest, batch=batch, device=self.device)

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache | SharedKVCache,
        all_positions: bool = False,
        long_rope: np.ndarray | None = None,
    ) -> np.ndarray:
        """input_ids, position_ids (batch, seq); attention_mask (batch, past + seq). Returns the last
        position's logits (batch, vocab) as float32, or every position's (batch, seq, vocab) with
        all_positions (concat graphs only), and moves the cache forward by seq. long_rope (batch,): the
        rows rotating with the long factors, where the graph has that input (default: the rows whose
        tokens after this call pass io.long_rope_after).

        On a shared-buffer graph the chunk's real tokens (mask 1) move to the front of their row and
        positions follow from what the cache holds (the runtime's cumsum convention)."""
        io = self.io
        if io.shared:
            seq = input_ids.shape[1]
            if all_positions:
                raise ValueError("all_positions needs a concat graph; a shared-buffer graph uses step()")
            real = np.asarray(attention_mask)[:, -seq:].astype(bool)  # (batch, seq)
            q = real.sum(axis=1)
            ids = np.zeros_like(input_ids)
            for row in range(len(ids)):
                ids[row, : q[row]] = input_ids[row, real[row]]
            return self.step(ids, q, np.maximum(q - 1, 0)[:, None], cache, long_rope)[:, 0]
        feeds = {
            io.input_ids: input_ids.astype(self._int[io.input_ids], copy=False),
            io.attention_mask: attention_mask.astype(self._int[io.attention_mask], copy=False),
            **cache.feeds(),
        }
        if io.position_ids:
            feeds[io.position_ids] = position_ids.astype(self._int[io.position_ids], copy=False)
        if io.long_rope:
            held = np.asarray(attention_mask).sum(axis=1)  # (batch,) tokens each row holds after the call
            feeds[io.long_rope] = (
                long_rows(io, held) if long_rope is None else np.asarray(long_rope, np.int64)
            )
        names = [io.logits, *cache.output_names()]
        if self.io_binding:
            out = run_bound(self.session, feeds, names, device=self.device, host_outputs=(io.logits,))
            logits = out[io.logits].numpy()
        else:
            out = run_numpy(self.session, feeds, names)
            logits = out[io.logits]
        cache.update(out)
        if all_positions:
            return np.asarray(logits, dtype=np.float32)  # (batch, seq, vocab)
        return np.asarray(logits[:, -1, :], dtype=np.float32)  # (batch, vocab)

    def step(
        self,
        input_ids: np.ndarray,
        query_lens: np.ndarray,
        logits_index: np.ndarray,
        cache: SharedKVCache,
        long_rope: np.ndarray | None = None,
        prefill: bool = False,
    ) -> np.ndarray:
        """One call of a shared-buffer graph. input_ids (batch, seq), right-padded: row b brings its first
        query_lens[b] tokens; logits_index (batch, n): the chunk positions whose logits to return;
        long_rope as in forward; prefill: the call is a chunk of prompts longer than the int8 cache's
        io.float_prefill_above (they take its float32 form however short the chunk; see SharedPrefill).
        Returns logits (batch, n, vocab) float32; the graph has written the new keys/values in place."""
        io = self.io
        inputs = {
            io.input_ids: input_ids.astype(self._int[io.input_ids], copy=False),
            io.logits_index: logits_index.astype(np.int64, copy=False),
        }
        if io.long_rope:
            held = cache.lengths + np.asarray(query_lens)  # (batch,) tokens each row holds after the call
            inputs[io.long_rope] = (
                long_rows(io, held) if long_rope is None else np.asarray(long_rope, np.int64)
            )
        if self.io_binding:  # the buffers stay bound from step to step; only the small inputs change
            bound = cache.binding
            if not isinstance(bound, BoundBuffers) or bound.session is not self.session:
                bound = cache.binding = BoundBuffers(
                    self.session, cache.buffers(), io.logits, io.logits_dtype
                )
            shape = (*logits_index.shape, self.facts.vocab_size)  # (batch, n, vocab)
            width = input_ids.shape[1]
            long_call = int(np.max(query_lens)) >= SHRINK_FROM
            logits = bound.run({**inputs, **cache.step_inputs(query_lens, width)}, shape, prefill, long_call)
            cache.advance()
            return np.array(logits, dtype=np.float32)  # a copy: the array is the next step's output too
        # numpy path: the presents come back as new arrays and are copied into the buffer (debugging)
        out = run_numpy(
            self.session,
            {**inputs, **cache.feeds(query_lens, input_ids.shape[1])},
            [io.logits, *cache.output_names()],
            prefill,
        )
        cache.update(out)
        return np.asarray(out[io.logits], dtype=np.float32)

    def logits(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The logits of every position (seq, vocab) float32 of one sequence, in one call from an empty
        cache, whatever the kv_layout (for evaluation: perplexity, agreement)."""
        ids = np.asarray(ids, dtype=np.int64)[None, :]  # (1, seq)
        seq = ids.shape[1]
        if not self.io.shared:
            feeds = window_feeds(self.io, self.facts, ids[0])
            for name in (self.io.input_ids, self.io.attention_mask, self.io.position_ids):
                if name:
                    feeds[name] = feeds[name].astype(self._int[name], copy=False)
            (logits,) = self.session.run([self.io.logits], feeds)
            return np.asarray(logits[0], dtype=np.float32)
        # A float16 / int8 cache: in chunks, so that (as in decoding) later tokens read what the cache
        # stored; one call would attend over the chunk's own float32 keys and values and hide its cost
        # (an int8 bundle's layers take their float32 form above io.float_prefill_above tokens).
        size = seq if self.io.kv_dtype == "float32" else self.io.float_prefill_above or READ_CHUNK
        cache = self.new_cache(1, capacity=seq)
        try:
            parts = []
            for start in range(0, seq, size):
                n = min(size, seq - start)
                parts.append(
                    self.step(ids[:, start : start + n], np.array([n]), np.arange(n)[None], cache)[0]
                )
            return np.concatenate(parts)
        finally:
            cache.free()


class StopText:
    """Cut text before the first stop string; hold back a tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Add text; return (text safe to release, whether a stop string was hit)."""
        if not self.stops:
            return delta, False
        self.held += delta
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.held)), keep, -1):
                if self.held.endswith(s[:k]):
                    keep = k
                    break
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return out, False

    def release(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class SeqOutput:
    """One sequence's result for one step."""

    seq: int  # index of the sequence in the request's prompt list
    token_id: int
    text: str  # text delta (may be "" while a character or a possible stop string is held back)
    # log-probability of token_id under the model's distribution (before sampling); None unless asked
    # for (logprobs=True): four passes over the vocabulary a row and token, ~2% of a small model's step
    logprob: float | None
    finish_reason: str | None = None  # "stop" | "length" on the sequence's last step
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclass
class Step:
    outputs: list[SeqOutput]
    index: int  # 0 for the token sampled from the prefill's logits
    forward_s: float  # model time that produced this step's logits (the prefill for step 0)
    sample_s: float
    cached_tokens: list[int] | None = None  # step 0: per output, prompt tokens reused from the prefix cache
    # the engine's wall time for this step: admission, prefill and the first sample for step 0; the whole
    # round (drafting, the model, sampling, rows leaving) for a round's first step, 0.0 for its others
    wall_s: float = 0.0


@dataclass
class SeqState:
    """One sequence's generation state: its sampler, text and stop handling, tokens so far."""

    prompt: list[int]
    limit: int
    sampler: object
    processors: list
    detok: Detokenizer | None
    stop: StopText
    stop_ids: set[int] = field(default_factory=set)
    top_logprobs: int = 0
    logprobs: bool = False
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    prompt_logits: np.ndarray | None = None  # the logits after the prompt (kept for the prefix cache)
    exact_tokens: int = 0  # leading prompt positions as a cold prefill computes them (prefix.Hit.exact)
    constraint: constraints.Constraint | None = None  # the grammar the output must follow


def new_seq(prompt: list[int], params: GenerationParams, tokenizer: Tokenizer | None, facts) -> SeqState:
    """The state of one checked prompt (see check_prompts) under `params`."""
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    stop_ids = set(params.stop_token_ids or [])
    if not params.ignore_eos:
        stop_ids |= set(facts.eos_token_ids)
    bias = check_logit_bias(params.logit_bias, facts.vocab_size)
    constraint = None
    if params.compiled_grammar is not None:
        if tokenizer is None:
            raise ValueError("json_schema, regex and grammar need a tokenizer")
        eos = list(facts.eos_token_ids)  # any of them ends a complete output
        constraint = constraints.Constraint(params.compiled_grammar, tokenizer, facts.vocab_size, eos)
    processors = make_logits_processors(
        params.repetition_penalty,
        params.presence_penalty,
        params.frequency_penalty,
        bias,
        params.min_tokens,
        sorted(stop_ids),
        len(prompt),
    )
    return SeqState(
        prompt=prompt,
        # never run past the context window: prompt + generated <= context_length
        limit=min(params.max_new_tokens, facts.context_length - len(prompt)),
        sampler=params.sampler(),  # one per sequence: a seeded batch row equals the prompt run alone
        processors=processors,
        detok=Detokenizer(tokenizer) if tokenizer is not None else None,
        stop=StopText(params.stop),
        stop_ids=stop_ids,
        top_logprobs=params.top_logprobs,
        logprobs=params.logprobs,
        constraint=constraint,
    )


def check_prompts(prompts: Sequence[Sequence[int]], facts) -> list[list[int]]:
    if not prompts:
        raise ValueError("no prompts given")
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise ValueError(f"prompt {i} is empty; at least one token is needed")
        bad = [t for t in p if not 0 <= t < facts.vocab_size]
        if bad:
            raise ValueError(
                f"prompt {i} has token ids outside the vocabulary (size {facts.vocab_size}): {bad[:5]}"
            )
        if len(p) >= facts.context_length:
            raise ValueError(
                f"prompt {i} is {len(p)} tokens, the context window is {facts.context_length} tokens; "
                f"shorten the prompt to at most {facts.context_length - 1} tokens"
            )
        out.append(p)
    return out


def sample_next(seq: SeqState, index: int, logits: np.ndarray) -> SeqOutput:
    """Sample one token for `seq` from its logits (vocab,), update its text and finish state."""
    row = logits[None, :]  # (1, vocab)
    # the context list is built only for processors that read it (a copy of the whole context a token)
    processed = apply_processors(seq.processors, [seq.prompt + seq.tokens], row) if seq.processors else row
    if seq.constraint is not None:
        processed = seq.constraint.apply(processed[0])[None, :]
    token = int(seq.sampler(processed)[0])
    # the token's log-probability needs only logsumexp: a full float64 log_softmax over a 49k
    # vocabulary every step cost more than the rest of the Python side of a decode step
    x = row[0]
    logprob = top = None
    if seq.logprobs or seq.top_logprobs:  # top_logprobs implies logprobs (GenerationParams)
        lse = logsumexp(x)
        logprob = float(x[token]) - lse
    if seq.top_logprobs:
        logp = x.astype(np.float64) - lse  # (vocab,)
        k = min(seq.top_logprobs, len(logp))
        best = np.argpartition(-logp, k - 1)[:k]
        best = best[np.argsort(-logp[best], kind="stable")]
        top = [(int(t), float(logp[t])) for t in best]
    seq.tokens.append(token)
    complete = seq.constraint is not None and _advance(seq.constraint, token)
    text, reason, hit = "", None, False
    if token in seq.stop_ids:
        reason = "stop"
    else:
        if seq.detok is not None:
            text, hit = seq.stop.push(seq.detok.add(token))
        if hit or complete:  # a finished grammar admits nothing more: the output is complete
            reason = "stop"
        elif len(seq.tokens) >= seq.limit:
            reason = "length"
    if reason is not None and not hit and seq.detok is not None:
        # finishing without a stop string: release what was held back (a partial character or stop)
        more, hit = seq.stop.push(seq.detok.flush())
        text += more if hit else more + seq.stop.release()
        reason = "stop" if hit else reason
    seq.finish_reason = reason
    return SeqOutput(index, token, text, logprob, reason, top)


def logsumexp(x: np.ndarray) -> float:
    """log Σ exp(x) of one float32 row through a single scratch array (a step's numpy calls run with
    caches cold from the model's weights: each temporary of a 49k vocabulary costs tens of µs there).
    The float32 sum is numpy's pairwise one: relative error ~1e-7 on a vocabulary this size."""
    m = float(x.max())
    buf = np.subtract(x, np.float32(m), dtype=np.float32)
    np.exp(buf, out=buf)
    return m + math.log(float(buf.sum()))


def _advance(constraint: constraints.Constraint, token: int) -> bool:
    """Move the grammar past `token`; whether the output is now complete (or the grammar failed, which
    the mask prevents: then the sequence ends rather than run unconstrained)."""
    if not constraint.advance(token):
        log.warning("the grammar refused token %d (%s); ending the sequence", token, constraint.error)
        return True
    return constraint.done
