"""Evaluation through the runtime alone: sliding-window perplexity, and agreement with a reference bundle.

    from onnxlm.runtime.eval import evaluate, format_report
    print(format_report(evaluate("bundles/int4", against="bundles/fp32")))

Perplexity follows Hugging Face's sliding-window recipe: windows of `window` tokens start every `stride`
tokens; each window scores only the tokens the previous window did not, so every token after the first
is scored exactly once with up to `window - stride` tokens of context carried by the overlap. Each window
is one prefill from an empty KV cache, read through the graph's full (batch, seq, vocab) logits.

Needs onnxruntime, numpy and tokenizers only (never torch or transformers).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import MODEL_DATA, STAGING_MARK, Manifest
from .engine import Engine

DEFAULT_WINDOW = 512
TOP_K = 5
BUILTIN_TEXTS = ("en", "zh")  # onnxlm/data/eval_{name}.txt

BundleLike = str | os.PathLike | Engine
TextLike = str | os.PathLike | Mapping[str, str] | None


# --- texts -------------------------------------------------------------------------------------
def builtin_text(name: str) -> str:
    """One of the texts shipped with onnxlm ("en" or "zh"), written for the project."""
    if name not in BUILTIN_TEXTS:
        raise ValueError(f"no built-in eval text {name!r}; there are {', '.join(BUILTIN_TEXTS)}")
    return resources.files("onnxlm").joinpath("data", f"eval_{name}.txt").read_text(encoding="utf-8")


def builtin_texts() -> dict[str, str]:
    return {name: builtin_text(name) for name in BUILTIN_TEXTS}


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file, with an error that names the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _texts(text: TextLike) -> dict[str, str]:
    """name -> text: the built-in texts, one string ("text"), one file (its name), or a mapping."""
    if text is None:
        return builtin_texts()
    if isinstance(text, str):
        return {"text": text}
    if isinstance(text, os.PathLike):
        return {Path(text).name: read_text(text)}
    if isinstance(text, Mapping):
        if not text:
            raise ValueError("no texts given")
        return {str(k): v for k, v in text.items()}
    raise TypeError(f"text must be a str, a path or a mapping of name -> str, got {type(text).__name__}")


# --- bundles -----------------------------------------------------------------------------------
def load_engine(
    bundle: BundleLike,
    manifest: Manifest | None = None,
    providers: Any = None,
    threads: int | None = None,
) -> Engine:
    """An Engine for `bundle` (an Engine passes through). With `manifest`, the folder is opened without
    the bundle checks: for a bundle still being written (quantize evaluates before it commits)."""
    if isinstance(bundle, Engine):
        return bundle
    if not isinstance(bundle, (str, os.PathLike)):
        raise TypeError(f"bundle must be a bundle folder or an Engine, got {type(bundle).__name__}")
    if manifest is None:
        return Engine.load(bundle, providers=providers, threads=threads)
    return Engine.from_parts(bundle, manifest, providers=providers, threads=threads)


def describe(engine: Engine) -> dict[str, Any]:
    """Where a bundle is, what it is, and its bytes (model.onnx.data, and all files together)."""
    root = engine.bundle_dir
    sizes = {}
    if root is not None and Path(root).is_dir():
        sizes = {
            p.name: p.stat().st_size for p in Path(root).iterdir() if p.is_file() and p.name != STAGING_MARK
        }
    quant = engine.manifest.quantization or {}
    return {
        "path": str(root) if root is not None else None,
        "dtype": engine.manifest.dtype,
        "recipe": quant.get("recipe") if isinstance(quant, dict) else None,
        "weights_bytes": sizes.get(MODEL_DATA, 0),
        "bundle_bytes": sum(sizes.values()),
    }


# --- windows and logits ------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    begin: int  # first token fed
    end: int  # one past the last token fed
    scored: int  # the last `scored` tokens of the window are scored

    def __len__(self) -> int:
        return self.end - self.begin


def windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """Hugging Face's sliding windows over n_tokens. With stride < window the scored spans tile tokens
    1..n_tokens-1; with stride == window (no overlap) each window's first token goes unscored, as in HF."""
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        scored = end - max(prev_end, begin + 1)  # the window's first token has nothing to predict it
        if scored > 0:  # a 1-token last window without overlap has nothing to score
            out.append(Window(begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _check_window(window: int, stride: int | None, context: int) -> tuple[int, int]:
    """Validate window and stride (None: half the window), then fit them to the context length."""

    def positive(name: str, v: Any, low: int) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        return int(v)

    window = positive("window", window, 2)
    if stride is None:
        window = min(window, context)  # the graph sees no further than its context
        return window, window // 2
    stride = positive("stride", stride, 1)
    if stride > window:
        raise ValueError(f"stride ({stride}) must not exceed window ({window}): tokens would be skipped")
    window = min(window, context)
    return window, min(stride, window)


def _encode(engine: Engine, text: str, max_tokens: int | None) -> np.ndarray:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("the text is empty; perplexity needs at least 2 tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 2
    ):
        raise ValueError(f"max_tokens must be an integer >= 2, got {max_tokens!r}")
    ids = engine.tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"the text is {len(ids)} token(s); perplexity needs at least 2")
    return np.asarray(ids, dtype=np.int64)


def full_logits(engine: Engine, ids: np.ndarray) -> np.ndarray:
    """One prefill of ids (seq,) from an empty cache; the logits of every position (seq, vocab), float32,
    whatever the bundle's KV layout."""
    return engine.model.logits(ids)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """(n, vocab) float32 -> log-probabilities; the normaliser is summed in float64."""
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    lse = np.log(np.exp(z).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    return z - lse


LogitsOf = Callable[[np.ndarray], np.ndarray]  # token ids (seq,) -> logits of every position (seq, vocab)


def _scored_logprobs(logits_of: Engine | LogitsOf, ids: np.ndarray, w: Window) -> np.ndarray:
    """Log-probabilities (scored, vocab) predicting the window's last `scored` tokens."""
    chunk = ids[w.begin : w.end]
    logits = (
        full_logits(logits_of, chunk) if isinstance(logits_of, Engine) else logits_of(chunk)
    )  # (len, vocab)
    n = len(w)
    return log_softmax(logits[n - w.scored - 1 : n - 1])


def sliding_nll(
    logits_of: Engine | LogitsOf,
    ids: np.ndarray,
    window: int,
    stride: int,
    progress: bool = False,
    desc: str = "perplexity",
) -> dict[str, Any]:
    """Negative log-likelihood of ids over Hugging Face's sliding windows, under any model that gives
    the logits of every position of a window (an Engine, or another engine's function: benchmarks)."""
    spans = windows(len(ids), window, stride)
    t0 = time.perf_counter()
    nll_sum, scored = 0.0, 0
    for w in _progress(spans, desc, progress):
        logp = _scored_logprobs(logits_of, ids, w)  # (scored, vocab)
        targets = ids[w.end - w.scored : w.end]
        nll_sum -= float(logp[np.arange(w.scored), targets].sum(dtype=np.float64))
        scored += w.scored
    nll = nll_sum / scored
    return {
        "ppl": math.exp(nll),
        "nll_mean": nll,
        "tokens": scored,
        "text_tokens": len(ids),
        "windows": len(spans),
        "window": window,
        "stride": stride,
        "seconds": time.perf_counter() - t0,
    }


def _progress(items: list, desc: str, enabled: bool) -> Iterator:
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, unit="window", file=sys.stderr, leave=False))


# --- perplexity and comparison -----------------------------------------------------------------
def perplexity(
    bundle_or_engine: BundleLike,
    text: str,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict[str, Any]:
    """Sliding-window perplexity of `text` under a bundle.

    Returns {"ppl", "nll_mean" (nats/token), "tokens" (scored), "text_tokens", "windows", "window",
    "stride" (after clamping to the context length), "seconds"}.
    """
    engine = load_engine(bundle_or_engine)
    window, stride = _check_window(window, stride, engine.manifest.model.context_length)
    ids = _encode(engine, text, max_tokens)
    return sliding_nll(engine, ids, window, stride, progress, desc)


def compare(
    bundle: BundleLike,
    reference_bundle: BundleLike,
    text: str,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    desc: str = "compare",
) -> dict[str, Any]:
    """Teacher forcing over the same windows through `bundle` and `reference_bundle`.

    Per scored token: greedy agreement (argmaxes equal), top-5 containment (the bundle's argmax is in
    the reference's top 5), KL(reference || bundle) in nats. Returns {"agreement", "top5", "kl_mean",
    "kl_max", "ppl", "nll_mean", "reference_ppl", "reference_nll_mean", "ppl_change_pct", "tokens",
    "text_tokens", "windows", "window", "stride", "seconds"}.
    """
    engine = load_engine(bundle)
    ref = load_engine(reference_bundle)
    context = min(engine.manifest.model.context_length, ref.manifest.model.context_length)
    window, stride = _check_window(window, stride, context)
    ids = _encode(ref, text, max_tokens)
    if not np.array_equal(_encode(engine, text, max_tokens), ids):
        raise ValueError("the two bundles tokenize the text differently; compare needs the same tokenizer")
    spans = windows(len(ids), window, stride)
    t0 = time.perf_counter()
    nll, ref_nll, kl_sum, kl_max, agree, top5, scored = 0.0, 0.0, 0.0, 0.0, 0, 0, 0
    for w in _progress(spans, desc, progress):
        lp = _scored_logprobs(engine, ids, w)  # (scored, vocab)
        rp = _scored_logprobs(ref, ids, w)
        if lp.shape != rp.shape:
            raise ValueError(
                f"the bundles' vocabularies differ ({lp.shape[-1]} vs {rp.shape[-1]} logits); "
                "compare needs the same vocabulary"
            )
        rows = np.arange(w.scored)
        targets = ids[w.end - w.scored : w.end]
        nll -= float(lp[rows, targets].sum(dtype=np.float64))
        ref_nll -= float(rp[rows, targets].sum(dtype=np.float64))
        guess = lp.argmax(axis=-1)  # (scored,)
        agree += int((guess == rp.argmax(axis=-1)).sum())
        best = np.argpartition(rp, -TOP_K, axis=-1)[:, -TOP_K:]  # (scored, 5) the reference's top 5
        top5 += int((best == guess[:, None]).any(axis=-1).sum())
        kl = np.maximum((np.exp(rp) * (rp - lp)).sum(axis=-1, dtype=np.float64), 0.0)  # (scored,)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        scored += w.scored
    ppl, ref_ppl = math.exp(nll / scored), math.exp(ref_nll / scored)
    return {
        "agreement": agree / scored,
        "top5": top5 / scored,
        "kl_mean": kl_sum / scored,
        "kl_max": kl_max,
        "ppl": ppl,
        "nll_mean": nll / scored,
        "reference_ppl": ref_ppl,
        "reference_nll_mean": ref_nll / scored,
        "ppl_change_pct": 100.0 * (ppl / ref_ppl - 1.0),
        "tokens": scored,
        "text_tokens": len(ids),
        "windows": len(spans),
        "window": window,
        "stride": stride,
        "seconds": time.perf_counter() - t0,
    }


# --- the report ---------------------------------------------------------------------------------
def evaluate(
    bundle: BundleLike,
    text: TextLike = None,
    against: BundleLike | None = None,
    as_json: bool = False,
    *,
    window: int = DEFAULT_WINDOW,
    stride: int | None = None,
    max_tokens: int | None = None,
    providers: Any = None,
    threads: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Perplexity of `bundle` on `text` (None: the built-in English and Chinese texts; a str; a path to
    a UTF-8 file; or a mapping name -> str), and with `against` the comparison with that reference.

    The result is plain JSON data. `as_json` only turns the progress bars off (the caller prints JSON);
    `progress` overrides that. Per text: perplexity's fields, or compare's with `against`. "worst"
    holds the worst figure over the texts (ppl_change_pct, agreement, top5, kl_mean) for budget checks.
    """
    texts = _texts(text)
    show = (not as_json) if progress is None else bool(progress)
    engine = load_engine(bundle, providers=providers, threads=threads)
    ref = load_engine(against, providers=providers, threads=threads) if against is not None else None
    result: dict[str, Any] = {
        "bundle": describe(engine),
        "reference": describe(ref) if ref is not None else None,
        "texts": {},
    }
    for name, t in texts.items():
        if ref is None:
            r = perplexity(engine, t, window, stride, max_tokens, show, desc=f"perplexity {name}")
        else:
            r = compare(engine, ref, t, window, stride, max_tokens, show, desc=f"compare {name}")
        result["texts"][name] = r
    first = next(iter(result["texts"].values()))
    result["window"], result["stride"] = first["window"], first["stride"]
    if ref is not None:
        rs = result["texts"].values()
        result["worst"] = {
            "ppl_change_pct": max(r["ppl_change_pct"] for r in rs),
            "agreement": min(r["agreement"] for r in rs),
            "top5": min(r["top5"] for r in rs),
            "kl_mean": max(r["kl_mean"] for r in rs),
        }
    return result


def quality_report(
    quantized: BundleLike, reference: BundleLike, text: TextLike = None, **options: Any
) -> dict[str, Any]:
    """The quantize command's report: `evaluate(quantized, text, against=reference, ...)`; render it
    with `format_report`, check a budget with result["worst"]["ppl_change_pct"]."""
    return evaluate(quantized, text, against=reference, **options)


def _mb(n: int | None) -> str:
    return "—" if not n else f"{n / 1e6:,.1f} MB"


def _label(d: dict[str, Any]) -> str:
    return d.get("recipe") or d.get("dtype") or ""


def format_report(result: dict[str, Any]) -> str:
    """A markdown table of `evaluate`'s result (one bundle, or a bundle against its reference)."""
    b, ref, texts = result["bundle"], result.get("reference"), result["texts"]
    head = f"window {result['window']}, stride {result['stride']} tokens"
    if ref is None:
        lines = [
            f"bundle: {b['path']} ({_label(b)}), model.onnx.data {_mb(b['weights_bytes'])}; {head}",
            "",
            "| text | tokens | perplexity | nll / token | seconds |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, r in texts.items():
            lines.append(
                f"| {name} | {r['tokens']} | {r['ppl']:.3f} | {r['nll_mean']:.4f} | {r['seconds']:.1f} |"
            )
        return "\n".join(lines)
    ratio = f"×{b['weights_bytes'] / ref['weights_bytes']:.2f}" if ref["weights_bytes"] else ""
    lines = [
        f"bundle: {b['path']}; reference: {ref['path']}; {head}",
        "",
        f"| | reference ({_label(ref)}) | bundle ({_label(b)}) | change |",
        "| --- | ---: | ---: | ---: |",
        f"| model.onnx.data | {_mb(ref['weights_bytes'])} | {_mb(b['weights_bytes'])} | {ratio} |",
    ]
    for name, r in texts.items():
        lines.append(
            f"| perplexity, {name} ({r['tokens']} tokens) | {r['reference_ppl']:.3f} | {r['ppl']:.3f} "
            f"| {r['ppl_change_pct']:+.2f}% |"
        )
    for name, r in texts.items():
        lines += [
            f"| greedy agreement, {name} | | | {100 * r['agreement']:.1f}% |",
            f"| top-5 containment, {name} | | | {100 * r['top5']:.1f}% |",
            f"| KL(reference ‖ bundle), {name} | | | {r['kl_mean']:.4f} nats/token |",
        ]
    return "\n".join(lines)
