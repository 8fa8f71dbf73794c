"""OpenAI response bodies: whole answers and stream chunks for n choices per prompt, with tool calls,
logprobs (each token's own bytes) and echo with the prompt's logprobs."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..engine import Engine
from ..generate import SeqOutput
from ..tools import ToolCallStream, parse_tool_calls
from .protocol import GenRequest

# (token id, its logprob or None for the first prompt token, the top alternatives or None)
Entry = tuple[int, float | None, list[tuple[int, float]] | None]


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: prompt tokens whose KV came from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def cached_tokens(req: GenRequest, streams: dict) -> int:
    """Prompt tokens reused from the prefix cache, counted once per prompt (its n choices share it)."""
    per_prompt: dict[int, int] = {}
    for index, stream in streams.items():
        p = index // req.n
        per_prompt[p] = max(per_prompt.get(p, 0), stream.request.seq.cached_tokens)
    return sum(per_prompt.values())


def entries(outs: Sequence[SeqOutput]) -> list[Entry]:
    return [(o.token_id, o.logprob, o.top_logprobs) for o in outs]


class LogprobText:
    """Token strings for logprobs entries (special tokens shown, as OpenAI does) and their bytes: each
    token's own bytes, so the pieces of a character split across tokens rejoin exactly."""

    def __init__(self, engine: Engine):
        self.decode = engine.tokenizer.decode
        self.bytes = engine.tokenizer.token_bytes

    def token(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)

    def chat_entry(self, out: SeqOutput) -> dict[str, Any]:
        def one(t: int, lp: float) -> dict[str, Any]:
            return {"token": self.token(t), "logprob": lp, "bytes": list(self.bytes(t))}

        return {
            **one(out.token_id, out.logprob),
            "top_logprobs": [one(t, lp) for t, lp in out.top_logprobs or []],
        }

    def completion_logprobs(self, items: Sequence[Entry], offset: int = 0) -> dict[str, Any]:
        tokens = [self.token(t) for t, _, _ in items]
        offsets, at = [], offset
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in items],
            "top_logprobs": [
                None if top is None else {self.token(t): lp for t, lp in top} for _, _, top in items
            ],
            "text_offset": offsets,
        }


def prompt_logprobs(engine: Engine, ids: list[int], top: int) -> list[Entry]:
    """Each prompt token's logprob given the tokens before it (None for the first), with the `top` most
    likely alternatives at each position; one forward pass over the prompt."""
    logits = engine.model.logits(ids)  # (seq, vocab)
    out: list[Entry] = [(ids[0], None, None)]
    for start in range(0, len(ids) - 1, 256):  # in slices: (seq, vocab) float64 at once is large
        rows = logits[start : min(len(ids) - 1, start + 256)].astype(np.float64)
        lse = rows.max(-1, keepdims=True)
        lse = lse + np.log(np.exp(rows - lse).sum(-1, keepdims=True))
        logp = rows - lse  # (rows, vocab)
        for r in range(len(rows)):
            pos = start + r + 1
            best = None
            if top:
                idx = np.argpartition(-logp[r], top - 1)[:top]
                idx = idx[np.argsort(-logp[r][idx], kind="stable")]
                best = [(int(t), float(logp[r][t])) for t in idx]
            out.append((ids[pos], float(logp[r][ids[pos]]), best))
    return out


def _message(req: GenRequest, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if req.tools:
        content, calls = parse_tool_calls(text)
        if calls:
            message = {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}
            reason = "tool_calls" if reason == "stop" else reason
    return message, reason


def completion_body(
    req: GenRequest,
    rid: str,
    model: str,
    results: dict[int, list[SeqOutput]],
    text: LogprobText,
    echoes: dict[int, list[Entry]] | None = None,
    cached: int = 0,
) -> dict[str, Any]:
    """The whole answer: one choice per (prompt, sample), in index order; `cached`: prompt tokens
    reused from the prefix cache."""
    choices = []
    for index in sorted(results):
        outs = results[index]
        content = "".join(o.text for o in outs)
        reason = outs[-1].finish_reason if outs else "length"
        if req.chat:
            message, reason = _message(req, content, reason)
            logprobs = {"content": [text.chat_entry(o) for o in outs]} if req.logprobs else None
            choices.append(
                {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}
            )
            continue
        prefix, items = "", entries(outs)
        if req.echo:
            prompt = index // req.n
            prefix = req.prompt_texts[prompt]
            items = (echoes or {}).get(prompt, []) + items
        logprobs = text.completion_logprobs(items) if req.logprobs else None
        choices.append(
            {"index": index, "text": prefix + content, "logprobs": logprobs, "finish_reason": reason}
        )
    completion_tokens = sum(len(o) for o in results.values())
    return {
        "id": rid,
        "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(req.prompt_tokens, completion_tokens, cached),
    }


def chunk_body(
    req: GenRequest, rid: str, model: str, created: int, choice: dict | None, u: dict | None = None
) -> dict[str, Any]:
    body = {
        "id": rid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice] if choice is not None else [],
    }
    if u is not None:
        body["usage"] = u
    return body


class ChoiceStream:
    """One choice's stream chunks: the role first (chat), then a chunk per piece of text, tool-call
    delta or logprob, then the finish reason. Tool calls arrive as OpenAI streams them: a delta with
    the call's index, id and name, then deltas with fragments of its arguments."""

    def __init__(self, req: GenRequest, index: int, text: LogprobText):
        self.req, self.index, self.text = req, index, text
        self.tools = ToolCallStream() if req.chat and req.tools else None
        self.offset = 0  # completions: text_offset of the next token
        self.reason: str | None = None
        self.tokens = 0

    def _choice(self, delta_or_text: Any, logprobs: dict | None, reason: str | None = None) -> dict:
        if self.req.chat:
            return {
                "index": self.index,
                "delta": delta_or_text,
                "logprobs": logprobs,
                "finish_reason": reason,
            }
        return {"index": self.index, "text": delta_or_text, "logprobs": logprobs, "finish_reason": reason}

    def start(self, prompt_text: str = "", echo: list[Entry] | None = None) -> list[dict]:
        if self.req.chat:
            return [self._choice({"role": "assistant", "content": ""}, None)]
        if not self.req.echo:
            return []
        logprobs = self.text.completion_logprobs(echo or []) if self.req.logprobs else None
        self.offset = len(prompt_text) if not self.req.logprobs else sum(map(len, logprobs["tokens"]))
        return [self._choice(prompt_text, logprobs)]

    def push(self, out: SeqOutput) -> list[dict]:
        self.tokens += 1
        self.reason = out.finish_reason or self.reason
        if not self.req.chat:
            logprobs = (
                self.text.completion_logprobs(entries([out]), self.offset) if self.req.logprobs else None
            )
            self.offset += len(self.text.token(out.token_id)) if self.req.logprobs else len(out.text)
            return [self._choice(out.text, logprobs)] if out.text or logprobs else []
        logprobs = {"content": [self.text.chat_entry(out)]} if self.req.logprobs else None
        deltas = self._deltas(out.text, final=out.finish_reason is not None)
        if not deltas and logprobs:
            deltas = [{}]
        return [self._choice(d, logprobs if i == 0 else None) for i, d in enumerate(deltas)]

    def _deltas(self, text: str, final: bool) -> list[dict]:
        if self.tools is None:
            return [{"content": text}] if text else []
        events = self.tools.push(text) + (self.tools.finish() if final else [])
        out: list[dict] = []
        for kind, value in events:
            if kind == "content":
                out.append({"content": value})
            else:
                out.append({"tool_calls": [value]})
        return out

    def finish(self) -> dict:
        reason = self.reason
        if self.tools is not None and self.tools.calls and reason == "stop":
            reason = "tool_calls"
        return self._choice({} if self.req.chat else "", None, reason)
