"""Engine: a loaded bundle and the public ways to generate with it.

    engine = Engine.load("bundle/")
    engine.generate("Once upon a time", max_new_tokens=32).text
    for chunk in engine.stream_chat([{"role": "user", "content": "Hi"}]):
        print(chunk.text, end="")

Three layers: `steps` (the token-step generator) -> `stream` (small chunks) -> `generate` (the text).
Generation parameters (keywords of every method): max_new_tokens=256, temperature=0 (greedy), top_k=0,
top_p=1, min_p=0, repetition_penalty=1, seed=None, stop=None (str or list), stop_token_ids=None,
ignore_eos=False, logprobs=False (each token's logprob in Chunk.logprob / Completion.logprobs; off, they
cost four passes over the vocabulary a token), top_logprobs=0, presence_penalty=0, frequency_penalty=0,
logit_bias=None, min_tokens=0, and at most one constraint on the output (llguidance): json_schema= (a dict),
regex=, grammar= (Lark). chat / stream_chat also take tools=, tool_choice=, parallel_tool_calls=
(see tools.py; chat's Completion carries the parsed tool_calls).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bundle import MODEL, TOKENIZER, BundleError, Manifest, check_bundle
from .batch import generate_steps
from .generate import GenerationParams, Model, Step
from .prefix import PrefixCache
from .session import (
    make_session,
    release_free_heap,
    release_mapped_files,
    releasing_mapped_files,
    spins_when_idle,
    split_wanted,
)
from .speculate import Costs, ModelDrafter, NgramDrafter, step_ratio, verify_gap
from .tokenizer import Tokenizer
from .tools import ToolCall, parse_tool_calls, prepare_chat

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger("onnxlm.runtime")
Prompt = str | Sequence[int]
ROLES = ("system", "developer", "user", "assistant", "tool")
VERIFY_EXACT = 1e-3  # max |Δ logit| between a multi-token and a one-token call still called exact


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV was reused from the prefix cache


@dataclass
class Timings:
    prefill_s: float = 0.0  # the prompt's forward pass(es)
    decode_s: float = 0.0  # wall time of every later round: drafting, forward passes, sampling
    sample_s: float = 0.0
    ttft_s: float = 0.0  # time to first token (wall): admission, prefill and the first sample
    prompt_tokens_per_s: float = 0.0
    tokens_per_s: float = 0.0  # decode steps per second of decode_s (a step gives each live sequence a token)

    def _finish(self, prompt_tokens: int, steps: int) -> Timings:
        self.prompt_tokens_per_s = prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        self.tokens_per_s = (steps - 1) / self.decode_s if self.decode_s and steps > 1 else 0.0
        return self


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated tokens only; the stop/eos token that ended generation included
    finish_reason: str  # "stop" (eos, stop token or stop string) or "length"
    usage: Usage
    logprobs: list[float] = field(default_factory=list)  # with logprobs=True (else empty)
    timings: Timings = field(default_factory=Timings)
    tool_calls: list[ToolCall] = field(default_factory=list)  # chat with tools: the calls made


@dataclass
class Chunk:
    text: str  # text delta; "" while a partial character or possible stop string is held back
    token_id: int
    logprob: float | None  # with logprobs=True (else None)
    finish_reason: str | None = None  # set on the last chunk
    usage: Usage | None = None  # set on the last chunk
    timings: Timings | None = None  # set on the last chunk
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob) with top_logprobs=k


def _params(params: dict[str, Any]) -> GenerationParams:
    return GenerationParams.from_kwargs(**params)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate OpenAI-style chat messages; text-part lists become strings. Raises ValueError."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise ValueError("messages is empty; give at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {', '.join(ROLES)}; got {role!r}")
        if "content" not in m:
            raise ValueError(f"messages[{i}] ({role}) has no 'content'")
        content = m["content"]
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise ValueError(
                        f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported"
                    )
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None and role == "assistant" and m.get("tool_calls"):
            pass  # an assistant turn that only calls tools
        elif not isinstance(content, str):
            raise ValueError(
                f"messages[{i}] ({role}): content must be a string, got {type(content).__name__}"
            )
        out.append({**m, "content": content})
    return out


def load_model(
    root: Path,
    providers: Sequence[str] | str | None = None,
    threads: int | None = None,
    verify_hashes: bool = False,
    io_binding: bool = True,
    idle_spin: bool = True,
    split_forms: bool | None = None,
) -> Model:
    """A bundle's checked manifest and graph, in a session (idle_spin: see session_options;
    split_forms: an int8 cache's graph as two graphs without Ifs, see session.split_wanted)."""
    manifest = check_bundle(root, verify_hashes=verify_hashes)
    release_free_heap()  # the JSON parse's leftovers stay out of the peak the session adds to
    with releasing_mapped_files(root):  # the build's peak: the mapped file resident beside its packing
        session = make_session(
            root / MODEL,
            providers=providers,
            threads=threads,
            idle_spin=idle_spin,
            split_above=manifest.io.float_prefill_above if split_wanted(split_forms) else None,
            query_input=manifest.io.query_seqlens,
        )
    release_mapped_files(root)  # weights packed at load are held once, not also as mapped file pages
    return Model(session, manifest, io_binding=io_binding)


class Engine:
    """One bundle, ready to generate. Build with `Engine.load(bundle_dir)` (checks the bundle), or
    `Engine.from_parts(bundle_dir, manifest, session)` for a folder being written or a rewritten graph.

    draft: speculative decoding for every generation method: "ngram" (prompt lookup: drafts copied
    from the prompt and the text so far) or a draft Model / bundle path sharing this tokenizer (e.g. an
    int4 bundle drafting for an fp32 one). Greedy output is unchanged token for token; sampled output
    keeps its distribution. prefix_cache_mb: KV of recent chats kept for reuse by `chat`,
    `stream_chat` and the scheduler (0: none).

    Thread-safe: any number of threads may call `generate`, `stream`, `chat`, ... on one Engine at the
    same time, each getting exactly what it would get alone. Each call has its own KV cache and IO
    binding; the shared parts are read-only after loading (the onnxruntime session, whose `run` is
    thread-safe; the tokenizer; the chat template, compiled once under a lock) or locked (the prefix
    cache), and the scheduler is made once under `_lock`. Concurrent calls each run their own forward passes; for batching, use
    the async methods (`astream`, ...), which share the continuous-batching scheduler.
    """

    _lock = threading.Lock()  # guards the scheduler's one-time creation

    def __init__(
        self,
        model: Model,
        tokenizer: Tokenizer,
        manifest: Manifest,
        bundle_dir: Path | None = None,
        draft: str | Model | None = None,
        prefix_cache_mb: float = 256,
        draft_inexact: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.bundle_dir = bundle_dir
        self._scheduler = None
        self.verify_gap: float | None = None  # see speculate.verify_gap; measured when a draft is set
        self.draft: str | Model | None = None
        self.use_draft(draft, inexact=draft_inexact)
        if (
            isinstance(prefix_cache_mb, bool)
            or not isinstance(prefix_cache_mb, (int, float))
            or prefix_cache_mb < 0
        ):
            raise ValueError(f"prefix_cache_mb must be a number >= 0, got {prefix_cache_mb!r}")
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb else None

    @classmethod
    def load(
        cls,
        bundle_dir: str | os.PathLike,
        providers: Sequence[str] | str | None = None,
        threads: int | None = None,
        verify_hashes: bool = False,
        io_binding: bool = True,
        draft: str | os.PathLike | None = None,
        prefix_cache_mb: float = 256,
        draft_inexact: bool = False,
        split_forms: bool | None = None,
    ) -> Engine:
        """Check the bundle (sizes; hashes on request), open a session and the tokenizer; `draft` is
        "ngram", a draft bundle's folder, or None (see the class; draft_inexact: see use_draft).
        split_forms: run an int8 cache's graph as its two forms, sharing packed weights, instead of
        with an If per layer (default: yes, unless ONNXLM_SPLIT=0; see session.split_wanted)."""
        root = Path(bundle_dir)
        manifest = check_bundle(root, verify_hashes=verify_hashes)
        tokenizer = Tokenizer.from_bundle(root, manifest)
        paired = draft is not None and draft != "ngram"  # two sessions taking turns: no idle spinning
        model = load_model(
            root, providers, threads, verify_hashes, io_binding, idle_spin=not paired, split_forms=split_forms
        )
        if paired:
            draft = load_model(
                Path(draft),
                providers,
                threads,
                verify_hashes,
                io_binding,
                idle_spin=False,
                split_forms=split_forms,
            )
        return cls(
            model,
            tokenizer,
            manifest,
            root,
            draft=draft,
            prefix_cache_mb=prefix_cache_mb,
            draft_inexact=draft_inexact,
        )

    @classmethod
    def from_parts(
        cls,
        bundle_dir: str | os.PathLike,
        manifest: Manifest,
        session: ort.InferenceSession | None = None,
        providers: Sequence[str] | str | None = None,
        threads: int | None = None,
        **options: Any,
    ) -> Engine:
        """An Engine over `bundle_dir` with the given manifest, not checked against the folder: for a
        bundle still being written (quantize evaluates before it commits) or a graph rewritten in memory
        (`session`, which replaces the one opened on the folder's model.onnx). `options` as in __init__."""
        root = Path(bundle_dir)
        if session is None:
            session = make_session(root / MODEL, providers=providers, threads=threads)
        return cls(Model(session, manifest), Tokenizer.from_bundle(root, manifest), manifest, root, **options)

    def use_draft(self, draft: str | Model | None, inexact: bool = False) -> None:
        """Speculate with `draft` from now on ("ngram", a draft Model, or None to stop). A graph that
        computes several tokens in one call differently from one at a time (verify_gap above
        VERIFY_EXACT: quantized weights over a float32 cache) would let speculation change greedy
        output, so it is refused (BundleError) unless `inexact`."""
        if draft is not None and draft != "ngram" and not isinstance(draft, Model):
            raise ValueError(f"draft must be 'ngram', a draft bundle or None, got {draft!r}")
        if isinstance(draft, Model):
            mine = self.manifest.files.get(TOKENIZER, {}).get("sha256")
            theirs = draft.manifest.files.get(TOKENIZER, {}).get("sha256")
            if mine is None or mine != theirs:
                raise BundleError(
                    "the draft bundle's tokenizer.json differs from this bundle's; a draft must share the tokenizer"
                )
            if spins_when_idle(self.model.session) or spins_when_idle(draft.session):
                log.warning(
                    "the target's or the draft's session keeps its threads spinning between runs, "
                    "taking the cores from the other while it runs (verifies measured 2x dearer): "
                    "load both with Engine.load(bundle, draft=DRAFT_BUNDLE), or open their sessions "
                    "with session_options(idle_spin=False)"
                )
        if draft is not None and self.verify_gap is None:
            until = self.manifest.io.dynamic_rope_from or 32  # the probe stays where speculation drafts
            width = min(8, max(1, until // 4))
            self.verify_gap = verify_gap(self.model, min(24, until - width), width)
        if draft is not None and self.verify_gap > VERIFY_EXACT:
            why = (
                f"{self.bundle_dir or 'the model'}: this graph computes several tokens in one call "
                f"differently from one at a time (up to {self.verify_gap:.2g} in a logit: the int8 "
                "activations of onnxruntime's quantized kernels round float32 attention's last-bit "
                "differences into whole steps), so with speculation greedy output could differ from plain "
                "decoding where the two most likely tokens are that close."
            )
            if not inexact:
                raise BundleError(
                    f"{why} Quantize with --kv-cache int8 (its attention computes each query alike: exact) "
                    "or use a float bundle; or speculate anyway with --draft-inexact "
                    "(Engine.load(..., draft_inexact=True))."
                )
            log.warning("%s Speculating anyway (draft_inexact).", why)
        self.draft = draft
        self._costs = Costs()  # verify-step costs measured across calls, for choosing k
        if isinstance(draft, Model):
            self._costs.draft_ratio = step_ratio(self.model, draft)

    def speculator(self):
        """A fresh drafter for one batch (None without a draft); cost measurements carry over."""
        if self.draft is None:
            return None
        spec = NgramDrafter() if self.draft == "ngram" else ModelDrafter(self.draft)
        spec.costs = self._costs
        above = self.manifest.io.float_prefill_above
        for s in (spec, getattr(spec, "lookup", None)):
            if s is not None:
                if above is not None:  # verifies stay on the int8 node, as decode steps do (exact greedy)
                    s.k_max = min(s.k_max, above - 1)
                s.exact_until = self.manifest.io.dynamic_rope_from
        return spec

    @property
    def context_length(self) -> int:
        return self.manifest.model.context_length

    def __repr__(self) -> str:
        m = self.manifest.model
        return (
            f"Engine({self.bundle_dir}, {m.model_type}, {m.num_layers} layers, context {m.context_length}, "
            f"{self.manifest.dtype}, providers={self.model.session.get_providers()})"
        )

    # --- prompts -------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """A str is tokenized (BOS added when the model expects one); a list of ids is used as is."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (bytes, dict)) or not isinstance(prompt, Sequence):
            raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise TypeError("a token-id prompt must contain only integers")
        return [int(t) for t in prompt]

    def render_chat(self, messages: Sequence[dict[str, Any]], **template_vars: Any) -> str:
        """The prompt text the chat template makes of `messages` (add_generation_prompt=True)."""
        return self.tokenizer.apply_chat_template(
            check_messages(messages), add_generation_prompt=True, **template_vars
        )

    def _chat_ids(self, messages, template_vars: dict[str, Any] | None) -> list[int]:
        text = self.render_chat(messages, **(template_vars or {}))
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template wrote any BOS itself

    def chat_request(
        self,
        messages,
        template_vars: dict[str, Any] | None = None,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        **params: Any,
    ) -> tuple[list[int], GenerationParams, bool]:
        """(prompt ids, parameters, whether the answer may hold tool calls) of a chat request: tools go
        into the prompt, and tool_choice 'required' / a named function / 'auto' into the grammar."""
        messages = check_messages(messages)
        messages, extra, grammar, parse = prepare_chat(
            messages, tools, tool_choice, parallel_tool_calls, self.manifest.chat_template
        )
        if grammar is not None:
            taken = [k for k in ("json_schema", "regex", "grammar") if params.get(k) is not None]
            if taken:
                raise ValueError(f"{taken[0]} cannot be combined with tools the model may call")
            params["grammar"] = grammar
        return self._chat_ids(messages, {**extra, **(template_vars or {})}), _params(params), parse

    # --- layer 1: token steps ------------------------------------------------------------------
    def steps(self, prompts: Sequence[Prompt], **params: Any) -> Iterator[Step]:
        """The token-step generator over a batch of prompts (see generate.generate_steps)."""
        p = _params(params)
        ids = [self.encode_prompt(x) for x in prompts]
        return self._steps(ids, p)

    def _steps(self, ids: list[list[int]], p: GenerationParams, reuse: bool = False) -> Iterator[Step]:
        cache = self.prefix_cache if reuse else None
        return generate_steps(
            self.model, self.tokenizer, ids, p, speculator=self.speculator(), prefix_cache=cache
        )

    # --- layer 2: streaming --------------------------------------------------------------------
    def stream(self, prompt: Prompt, **params: Any) -> Iterator[Chunk]:
        """Yield one Chunk per generated token; the last carries finish_reason, usage and timings."""
        p = _params(params)
        ids = self.encode_prompt(prompt)
        return self._stream(ids, p)

    def _stream(self, ids: list[int], p: GenerationParams, reuse: bool = False) -> Iterator[Chunk]:
        steps = self._steps([ids], p, reuse)
        return _chunks(steps, len(ids))

    def stream_chat(
        self, messages: Sequence[dict[str, Any]], template_vars: dict[str, Any] | None = None, **params: Any
    ) -> Iterator[Chunk]:
        """Chunks of the answer's text (with tools, calls arrive as their text: tools.ToolCallStream
        turns it into OpenAI deltas); earlier turns' KV comes from the prefix cache when it holds them."""
        ids, p, _ = self.chat_request(messages, template_vars, **params)
        return self._stream(ids, p, reuse=True)

    # --- layer 3: whole completions ------------------------------------------------------------
    def generate(self, prompt: Prompt, **params: Any) -> Completion:
        return _collect(self.stream(prompt, **params))

    def chat(
        self, messages: Sequence[dict[str, Any]], template_vars: dict[str, Any] | None = None, **params: Any
    ) -> Completion:
        """The answer; with tools, `tool_calls` holds the calls, `text` what was said besides them and
        finish_reason is "tool_calls"."""
        ids, p, parse = self.chat_request(messages, template_vars, **params)
        done = _collect(self._stream(ids, p, reuse=True))
        if parse:
            content, done.tool_calls = parse_tool_calls(done.text)
            if done.tool_calls:
                done.text = content or ""
                done.finish_reason = "tool_calls" if done.finish_reason == "stop" else done.finish_reason
        return done

    def generate_batch(self, prompts: Sequence[Prompt], **params: Any) -> list[Completion]:
        """Generate for several prompts at once (padded as the graph's KV layout wants: right-padded on
        the default shared-buffer graph); each result equals running it alone."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError("generate_batch expects a list of prompts")
        p = _params(params)
        ids = [self.encode_prompt(x) for x in prompts]
        texts = [[] for _ in ids]
        tokens: list[list[int]] = [[] for _ in ids]
        logprobs: list[list[float]] = [[] for _ in ids]
        reasons: list[str | None] = [None] * len(ids)
        timings = Timings()
        steps = 0
        for step in self._steps(ids, p):
            _account(timings, step)
            steps += 1
            for out in step.outputs:
                texts[out.seq].append(out.text)
                tokens[out.seq].append(out.token_id)
                if out.logprob is not None:
                    logprobs[out.seq].append(out.logprob)
                reasons[out.seq] = out.finish_reason
        timings._finish(sum(len(x) for x in ids), steps)
        return [
            Completion(
                "".join(t), tok, r or "length", Usage(len(i), len(tok), len(i) + len(tok)), lp, timings
            )
            for t, tok, lp, r, i in zip(texts, tokens, logprobs, reasons, ids, strict=True)
        ]

    # --- asyncio: concurrent requests share one continuously batched decode loop ------------------
    def scheduler(self, max_batch: int = 8, max_queue: int = 64):
        """The engine's continuous-batching scheduler, made (and its thread started) on first use; later
        calls return the same one. `close()` it to stop the thread."""
        with self._lock:
            if self._scheduler is None:
                self._scheduler = self.new_scheduler(max_batch, max_queue)
                self._scheduler.start()
        return self._scheduler

    def new_scheduler(self, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int | None = 512):
        """A continuous-batching scheduler on this engine's model, draft and prefix cache (not started)."""
        from .scheduler import Scheduler  # asyncio and its threads (~7 MB) only where something serves

        return Scheduler(
            self.model,
            self.tokenizer,
            max_batch,
            max_queue,
            prefill_chunk,
            speculator=self.speculator(),
            prefix_cache=self.prefix_cache,
        )

    async def astream(self, prompt: Prompt, **params: Any) -> AsyncIterator[Chunk]:
        """`stream` for asyncio code: concurrent calls are batched together by `scheduler()`. Raises
        QueueFull when the scheduler is at capacity; leaving the loop early frees the sequence."""
        p = _params(params)
        ids = self.encode_prompt(prompt)
        async for chunk in self._astream(ids, p):
            yield chunk

    async def astream_chat(
        self, messages: Sequence[dict[str, Any]], template_vars: dict[str, Any] | None = None, **params: Any
    ) -> AsyncIterator[Chunk]:
        ids, p, _ = self.chat_request(messages, template_vars, **params)
        async for chunk in self._astream(ids, p):
            yield chunk

    async def _astream(self, ids: list[int], p: GenerationParams) -> AsyncIterator[Chunk]:
        stream = self.scheduler().open_stream(ids, p)
        start = time.perf_counter()
        timings, n = Timings(), 0
        try:
            async for out in stream:
                n += 1
                if n == 1:
                    timings.ttft_s = time.perf_counter() - start
                chunk = Chunk(
                    out.text, out.token_id, out.logprob, out.finish_reason, top_logprobs=out.top_logprobs
                )
                if out.finish_reason is not None:
                    secs = time.perf_counter() - start - timings.ttft_s
                    timings.decode_s = secs
                    timings.tokens_per_s = (n - 1) / secs if n > 1 and secs > 0 else 0.0
                    chunk.usage = Usage(len(ids), n, len(ids) + n, stream.request.seq.cached_tokens)
                    chunk.timings = timings
                yield chunk
        finally:
            stream.cancel()


def _chunks(steps: Iterator[Step], prompt_tokens: int) -> Iterator[Chunk]:
    timings = Timings()
    n = cached = 0
    for step in steps:
        _account(timings, step)
        if step.cached_tokens:
            cached = step.cached_tokens[0]
        out = step.outputs[0]
        n += 1
        chunk = Chunk(out.text, out.token_id, out.logprob, out.finish_reason, top_logprobs=out.top_logprobs)
        if out.finish_reason is not None:
            chunk.usage = Usage(prompt_tokens, n, prompt_tokens + n, cached)
            chunk.timings = timings._finish(prompt_tokens, n)
        yield chunk


def _account(timings: Timings, step: Step) -> None:
    if step.index == 0:
        timings.prefill_s += step.forward_s
        timings.ttft_s = step.wall_s
    else:
        timings.decode_s += step.wall_s
    timings.sample_s += step.sample_s


def _collect(chunks: Iterator[Chunk]) -> Completion:
    texts, tokens, logprobs = [], [], []
    last = None
    for last in chunks:
        texts.append(last.text)
        tokens.append(last.token_id)
        if last.logprob is not None:
            logprobs.append(last.logprob)
    assert last is not None and last.usage is not None and last.timings is not None
    return Completion(
        "".join(texts), tokens, last.finish_reason or "length", last.usage, logprobs, last.timings
    )


load = Engine.load  # `onnxlm.runtime.load(bundle_dir, ...)`, the same call
