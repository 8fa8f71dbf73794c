"""What the CLI's commands do, as plain functions: cli.py parses options and calls these.

This is the top layer (it may use export, quantize and the runtime); nothing imports it but cli.py.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from . import bundle as B

log = logging.getLogger("onnxlm")


# transformers' notices that tell an onnxlm user nothing: how transformers itself reads a GGUF's tokenizer
NOTICES = (
    "You are using the default legacy behaviour",
    "The tokenizer class you load from this checkpoint is not the same type",
)


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(NOTICES)


@contextlib.contextmanager
def quiet_transformers():
    """Inside: transformers' NOTICES and its own progress bars (the GGUF reader's too) are not shown (onnxlm's progress says
    where export is); its other warnings are. Records of transformers' modules reach the handlers of
    its root logger, so the filter goes on those."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # transformers sets up its root logger's handler on first use
    handlers = logging.getLogger("transformers").handlers
    drop = _DropNotices()
    bars = hf_logging.is_progress_bar_enabled()
    for h in handlers:
        h.addFilter(drop)
    hf_logging.disable_progress_bar()
    try:
        with _no_gguf_bar():
            yield
    finally:
        for h in handlers:
            h.removeFilter(drop)
        if bars:
            hf_logging.enable_progress_bar()


def _no_gguf_bar():
    """transformers' GGUF reader draws its own tqdm bar, outside its progress-bar switch."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_reader
    except ImportError:
        return contextlib.nullcontext()
    return mock.patch.object(gguf_reader, "tqdm", lambda items, *args, **kwargs: items)


def export_bundle(source: str, out_dir: str | Path, long_decode_from: int | None = None, **options) -> Path:
    """`onnxlm export`: long_decode_from None or 0 never switches (the default; rewrites.py)."""
    from .export.convert import export

    with quiet_transformers():
        return export(source, out_dir, long_decode_from=long_decode_from or None, **options)


def default_gguf(bundle_dir: str | Path) -> Path | None:
    """The cached GGUF of the default model a bundle was exported from (`onnxlm pull` put it there), or
    None: never fetched here."""
    from .export import sources

    want = B.read_manifest(Path(bundle_dir)).provenance.get("source_sha256")
    for p in sources.DEFAULTS.values():
        if p.gguf_sha256 == want and sources.cached_gguf(p).is_file():
            return sources.cached_gguf(p)
    return None


def quantize_bundle(
    bundle: str | Path,
    out_dir: str | Path,
    recipe: str = "int4",
    *,
    gguf: str | Path | None = None,
    accuracy_level: int | None = None,
    calibration_text: str | Path | None = None,
    eval_text: str | Path | None = None,
    log_line: Callable[[str], None] = log.info,
    **options: Any,
) -> tuple[Path, str | None]:
    """`onnxlm quantize`: the new bundle and its quality report as text (None without a report).

    With recipe gguf the block layout comes from the file (the default model's cached GGUF unless
    `gguf` names one) and only the compute type is chosen; otherwise accuracy level 4 unless given."""
    from .quantize.report import quantize_with_report
    from .runtime.eval import format_report, read_text

    if recipe == "gguf":  # quantize_with_report refuses a kv_cache here
        options = {"gguf": gguf or default_gguf(bundle), "kv_cache": options.get("kv_cache", "auto")}
    else:
        accuracy_level = 4 if accuracy_level is None else accuracy_level
        options["calibration_text"] = read_text(calibration_text) if calibration_text else None
    out, report = quantize_with_report(
        bundle,
        out_dir,
        recipe,
        text=Path(eval_text) if eval_text else None,
        accuracy_level=accuracy_level,
        log=log_line,
        **options,
    )
    return out, (format_report(report) if report is not None else None)


def info_text(bundle: str | Path, verify: bool = False) -> str:
    """`onnxlm info`: a checked bundle's facts, graph, files and validation figures, one per line."""
    m = B.check_bundle(bundle, verify_hashes=verify)
    f, io = m.model, m.io
    graph = f"{io.graph}, KV {io.kv_layout} ({io.kv_dtype})"
    if io.long_decode_from:
        graph += f"; decode attention as MatMul/Softmax from {io.long_decode_from} tokens held"
    if io.float_prefill_above:
        graph += f"; float32 attention for calls of more than {io.float_prefill_above} tokens a row"
    quant = f" ({quantization_summary(m.quantization)})" if m.quantization else ""
    lines = [
        f"bundle      {bundle}",
        f"model       {f.model_type}: {f.num_layers} layers, {f.num_heads} heads ({f.num_kv_heads} KV), "
        f"head {f.head_dim}, hidden {f.hidden_size}, vocab {f.vocab_size}, context {f.context_length}",
        f"graph       {graph}",
        f"dtype       {m.dtype}{quant}",
        f"source      {m.provenance.get('source')} (exporter {m.provenance.get('exporter')}, "
        f"sha256 {str(m.provenance.get('source_sha256'))[:16]}…)",
        f"chat        {'template present' if m.chat_template else 'no chat template'}",
    ]
    lines += [
        f"file        {name:18} {meta['size'] / 1e6:10.1f} MB  {meta['sha256'][:16]}…"
        for name, meta in m.files.items()
    ]
    total = sum(meta["size"] for meta in m.files.values())
    lines.append(f"total       {total / 1e6:.1f} MB" + ("  (hashes verified)" if verify else ""))
    v = m.validation
    lines.append(
        f"validation  prefill max|Δ| {v['prefill_max_abs_diff']:.2e}, decode max|Δ| "
        f"{v['decode_max_abs_diff']:.2e}, greedy agreement {v['greedy_agreement']:.0%} "
        f"over {v['decode_steps'] + 1} tokens vs {v['reference']}"
        if v
        else "validation  none recorded"
    )
    return "\n".join(lines)


def quantization_summary(q: dict) -> str:
    """One line of a quantization record (`info --json` prints all of it)."""
    parts = [f"recipe {q.get('recipe')}"]
    scheme = q.get("scheme")
    if scheme is not None:  # scheme min says how it is served (pack.py): "min folded" / "min exact"
        parts.append(f"scheme {scheme}" + (f" {q['min_form']}" if q.get("min_form") else ""))
    parts += [f"{k.replace('_', ' ')} {q[k]}" for k in ("block_size", "algorithm") if q.get(k) is not None]
    formats = collections.Counter(q.get("nodes", {}).values())
    if formats:
        parts.append(", ".join(f"{n} {fmt}" for fmt, n in formats.most_common()) + " weights")
    size = q.get("bytes") or {}
    if size.get("before") and size.get("after"):
        parts.append(f"{size['before'] / 1e6:.1f} -> {size['after'] / 1e6:.1f} MB")
    worst = ((q.get("report") or {}).get("worst") or {}).get("ppl_change_pct")
    if worst is not None:
        parts.append(f"perplexity {worst:+.2f}% (worst text)")
    return "; ".join(parts)


def serve(
    bundle: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    api_key_file: str | None = None,
    ray: dict[str, Any] | None = None,
    providers: Sequence[str] | None = None,
    draft: str | None = None,
    grace: float = 30.0,
    allowed_hosts: Sequence[str] = (),
    cors_origins: Sequence[str] = (),
    **options: Any,
) -> None:
    """`onnxlm serve`: one process under uvicorn, or with `ray` (replicas, ray_address,
    cpus_per_replica, min_replicas, max_replicas, target_ongoing) replicas under Ray Serve.
    `options`: max_batch, max_queue, model_name, threads, prefix_cache_mb, draft_inexact."""
    from .runtime.serving.server import read_api_key

    key = read_api_key(api_key, api_key_file)
    if ray is None:
        from .runtime.serving.server import serve as run_server

        run_server(
            bundle,
            host=host,
            port=port,
            api_key=key,
            grace=grace,
            providers=providers,
            allowed_hosts=allowed_hosts,
            cors_origins=cors_origins,
            draft=draft,
            **options,
        )
        return
    from .runtime.serving.guard import is_wildcard_bind
    from .runtime.serving.ray_serve import ReplicaArgs, Scaling, deploy
    from .runtime.serving.server import exposure_warning

    args = ReplicaArgs(
        str(Path(bundle).resolve()),  # every replica (on every node) opens the same absolute path
        api_key=key,
        providers=providers,
        allowed_hosts=[*allowed_hosts, *([] if is_wildcard_bind(host) else [host])],
        cors_origins=list(cors_origins),
        draft=str(Path(draft).resolve()) if draft and draft != "ngram" else draft,
        **options,
    )
    if warning := exposure_warning(host, key):
        log.warning("%s", warning)
    scaling = Scaling(**{k: v for k, v in ray.items() if k != "ray_address" and v is not None}, grace=grace)
    deploy(args, scaling, address=ray.get("ray_address"), host=host, port=port)


def constraint_keywords(json_schema: str | None, regex: str | None, grammar: str | None) -> dict[str, Any]:
    """--json-schema FILE / --regex / --grammar FILE (Lark or GBNF) as the generation keywords they
    stand for (json.JSONDecodeError for a schema file that is not JSON)."""
    out: dict[str, Any] = {}
    if json_schema:
        out["json_schema"] = json.loads(Path(json_schema).read_text(encoding="utf-8"))
    if regex is not None:
        out["regex"] = regex
    if grammar:
        from .runtime.constraints import to_lark

        out["grammar"] = to_lark(Path(grammar).read_text(encoding="utf-8"))
    return out


def print_stream(chunks: Iterable[Any], pieces: list[str] | None = None) -> None:
    """Write streamed deltas to stdout as they come (and keep them in `pieces`); log the token count,
    the decode rate and the finish reason."""
    count, first, reason = 0, None, None
    for chunk in chunks:
        if first is None:
            first = time.perf_counter()
        count += 1
        if chunk.text:
            if pieces is not None:
                pieces.append(chunk.text)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        reason = getattr(chunk, "finish_reason", None) or reason
    sys.stdout.write("\n")
    secs = (time.perf_counter() - first) if first else 0.0
    rate = (count - 1) / secs if count > 1 and secs > 0 else 0.0
    log.info("%d tokens, %.1f tok/s decode, finish: %s", count, rate, reason)


def chat_session(
    engine, system: str | None, params: dict[str, Any], template_vars: dict[str, Any] | None = None
) -> None:
    """`onnxlm chat`: turns read from stdin until EOF or /exit; /reset clears the history. A line that
    is not UTF-8, or one the model refuses (the template, the window), costs that line only."""
    history = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("\033[1m>>> \033[0m")
            sys.stdout.flush()
        raw = sys.stdin.buffer.readline()
        if not raw:
            break
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            print(f"error: that line is not valid UTF-8 (byte {e.start}); the chat goes on", file=sys.stderr)
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if not line:
            continue
        turn = {"role": "user", "content": line}
        pieces: list[str] = []
        try:
            print_stream(engine.stream_chat([*history, turn], template_vars=template_vars, **params), pieces)
        except ValueError as e:
            print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
            continue
        history += [turn, {"role": "assistant", "content": "".join(pieces)}]
