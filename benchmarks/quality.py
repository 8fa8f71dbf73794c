"""Perplexity of onnxlm bundles and of peers' models on the same tokens, windows and texts.

    python benchmarks/quality.py --bundle fp32=B1 --bundle int4=B2 \
        --onnx genai-int4=DIR --gguf llama.cpp-Q4_1=FILE --text en --json out.json

--bundle   an onnxlm bundle (through onnxlm.runtime.eval)
--onnx     a foreign ONNX decoder folder (model.onnx + data, e.g. onnxruntime-genai's builder output):
           its inputs/outputs are read off the graph and it runs through the same onnxlm code
--gguf     a GGUF file through llama-cpp-python (`pip install llama-cpp-python`), fed the same token ids

Every model sees the token ids of the first bundle's tokenizer (the peers here share its vocabulary),
the same sliding windows, and float64 log-sum-exp. A peer that is not installed is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from onnxlm import bundle as B
from onnxlm.runtime import eval as E


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        if "=" not in v:
            raise SystemExit(f"{flag} takes NAME=PATH, got {v!r}")
        name, path = v.split("=", 1)
        out.append((name, path))
    return out


def wrap_foreign(folder: Path, reference: Path, work: Path) -> Path:
    """An onnxlm bundle around a foreign ONNX decoder: its graph described from its own IO."""
    import onnx

    from onnxlm.export.optimum import describe_graph

    ref = B.check_bundle(reference)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)

    class Cfg:  # describe_graph reads these few config facts
        num_attention_heads = ref.model.num_heads
        num_key_value_heads = ref.model.num_kv_heads
        head_dim = ref.model.head_dim
        hidden_size = ref.model.hidden_size
        vocab_size = ref.model.vocab_size
        max_position_embeddings = ref.model.context_length

    io, facts = describe_graph(graph, Cfg)
    out = work / folder.name
    writer = B.BundleWriter(out)
    with writer as tmp:
        for f in folder.iterdir():
            if f.name.startswith("model.onnx"):
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copyfile(f, tmp / f.name)
        shutil.copyfile(reference / B.TOKENIZER, tmp / B.TOKENIZER)
        special = {
            k: getattr(ref.model, k)
            for k in ("bos_token_id", "eos_token_ids", "pad_token_id", "add_bos_token")
        }
        writer.commit(
            B.Manifest(
                model=B.ModelFacts(model_type=ref.model.model_type, **facts, **special),
                io=io,
                provenance={"source": f"foreign:{folder.name}"},
            )
        )
    return out


def gguf_perplexity(path: str, ids: np.ndarray, window: int, stride: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(
        model_path=path, n_ctx=window, logits_all=True, n_threads=threads, n_batch=window, verbose=False
    )

    def logits_of(chunk: np.ndarray) -> np.ndarray:  # (len, vocab), every position (logits_all)
        llm.reset()
        llm.eval(chunk.tolist())
        return np.asarray(llm.scores[: len(chunk)], dtype=np.float32)

    return E.sliding_nll(logits_of, ids, window, stride)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", action="append", default=[], help="NAME=BUNDLE (the first one tokenizes)")
    ap.add_argument("--onnx", action="append", default=[], help="NAME=FOLDER with model.onnx")
    ap.add_argument("--gguf", action="append", default=[], help="NAME=FILE.gguf (llama-cpp-python)")
    ap.add_argument(
        "--text", action="append", default=[], help="en, zh, or a UTF-8 file (default: en and zh)"
    )
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    bundles = _pairs(args.bundle, "--bundle")
    if not bundles:
        raise SystemExit("give at least one --bundle (its tokenizer is used for every model)")
    texts = {
        t: (E.builtin_text(t) if t in E.BUILTIN_TEXTS else E.read_text(t))
        for t in (args.text or ["en", "zh"])
    }
    reference = Path(bundles[0][1])
    ref_engine = E.load_engine(str(reference))
    stride = args.window // 2
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="onnxlm-quality-") as work:
        models = [(n, "onnxlm", p) for n, p in bundles]
        for name, folder in _pairs(args.onnx, "--onnx"):
            models.append((name, "onnx", str(wrap_foreign(Path(folder), reference, Path(work)))))
        models += [(n, "gguf", p) for n, p in _pairs(args.gguf, "--gguf")]
        for name, kind, path in models:
            row = {"model": name, "kind": kind, "path": path}
            size_path = Path(path) / B.MODEL_DATA if kind != "gguf" else Path(path)
            row["bytes"] = size_path.stat().st_size if size_path.exists() else None
            for tname, text in texts.items():
                ids = np.asarray(ref_engine.tokenizer.encode(text), dtype=np.int64)
                try:
                    if kind == "gguf":
                        r = gguf_perplexity(path, ids, args.window, stride, args.threads)
                    else:
                        r = E.perplexity(path, text, window=args.window, stride=stride, progress=False)
                except ImportError as e:
                    row[tname] = {"skipped": f"not installed ({e.name})"}
                    continue
                row[tname] = {k: r[k] for k in ("ppl", "nll_mean", "tokens", "seconds")}
                print(
                    f"{name:>18} {tname}: ppl {r['ppl']:.4f} over {r['tokens']} tokens ({r['seconds']:.1f} s)",
                    file=sys.stderr,
                )
            rows.append(row)
    base = rows[0]
    lines = [
        "| model | bytes | " + " | ".join(f"ppl {t} | vs {base['model']}" for t in texts) + " |",
        "| --- | --- | " + " | ".join("--- | ---" for _ in texts) + " |",
    ]
    for row in rows:
        cells = [row["model"], f"{row['bytes'] / 1e6:.1f} MB" if row["bytes"] else "?"]
        for t in texts:
            r = row.get(t, {})
            if "ppl" not in r:
                cells += [r.get("skipped", "—"), ""]
                continue
            cells += [f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / base[t]['ppl'] - 1):+.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    import onnxruntime

    machine = {
        "machine": platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "processor": platform.processor() or platform.uname().machine,
    }
    print(table)
    print(f"\nwindow {args.window}, stride {stride}, threads {args.threads}; {json.dumps(machine)}")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine, "window": args.window, "stride": stride, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
