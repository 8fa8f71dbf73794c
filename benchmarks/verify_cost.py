"""What a speculative verify costs: one call of a bundle's graph bringing w tokens to a row, over a
one-token decode step, at several contexts; and, apart, onnxruntime's 4-bit MatMulNBits alone with
M rows against one (what sets an int4 bundle's curve).

    python benchmarks/verify_cost.py --bundle fp32=B_FP32 --bundle int4=B_INT4 --contexts 100,1000,2200 \
        --rounds 8 --lookup-bound --out results/

A verify of k drafts is a call of width k + 1; speculation gains where the drafts kept per round
outweigh the call's extra cost (runtime/speculate.py picks k from the same ratios, measured as it
goes). Bundles' sessions stop their threads spinning between runs (they share the cores), calls are
interleaved bundle by bundle and round by round, every call is rolled back so the context stays put,
and the first round (new shapes) is dropped; medians. Writes verify_cost.json and verify_cost.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROWS = (1, 2, 4, 8, 16, 64, 512)


def bundle_ratios(bundles: dict[str, str], contexts: list[int], widths: list[int], rounds: int, threads: int):
    from onnxlm.runtime.engine import load_model
    from onnxlm.runtime.speculate import _primed, _probe

    models = {n: load_model(Path(p), None, threads, False, True, idle_spin=False) for n, p in bundles.items()}
    out = {}
    for ctx in contexts:
        rows = {n: _primed(m, _probe(m, ctx)) for n, m in models.items()}
        secs = {n: {w: [] for w in [1, *widths]} for n in models}
        try:
            for r in range(rounds + 1):
                for n, m in models.items():
                    for w in secs[n]:
                        t0 = time.perf_counter()
                        rows[n].decode([_probe(m, w)])
                        if r:
                            secs[n][w].append(time.perf_counter() - t0)
                        rows[n].rollback(0, w)
        finally:
            for r in rows.values():
                r.free()
        for n, by_w in secs.items():
            step = statistics.median(by_w[1])
            out.setdefault(n, {})[ctx] = {
                "step_ms": step * 1e3,
                "ratio": {w: statistics.median(by_w[w]) / step for w in widths},
            }
    return out


def matmulnbits_rows(threads: int, rounds: int, accuracy: int = 4) -> dict:
    """A chain of 20 MatMulNBits of SmolLM2's MLP shapes (576 x 3072 and back, block 32, random codes),
    run with M rows: seconds over M = 1."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k_in, n_out, block, layers = 576, 3072, 32, 20
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        k, n = (k_in, n_out) if i % 2 == 0 else (n_out, k_in)
        codes = rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8)
        scales = (rng.random(n * (k // block)) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(codes, f"w{i}"), numpy_helper.from_array(scales, f"s{i}")]
        nodes.append(
            helper.make_node(
                "MatMulNBits", [x, f"w{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy,
            )
        )  # fmt: skip
        x = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k_in])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    secs = {}
    for m in ROWS:
        feed = {"x": rng.standard_normal((m, k_in)).astype(np.float32)}
        for _ in range(3):
            sess.run(None, feed)
        times = []
        for _ in range(rounds * 2):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        secs[m] = statistics.median(times)
    return {
        "one_row_ms": secs[1] * 1e3,
        "ratio": {m: secs[m] / secs[1] for m in ROWS},
        "accuracy_level": accuracy,
    }


def lookup_speedup(prompt: list[int], tokens: list[int], k: int, price: dict[int, float]) -> float:
    """Tokens per one-token step's time when greedy `tokens` (after `prompt`) are decoded with prompt
    lookup drafting up to k a round: each round keeps the drafts that agree with `tokens` and emits one
    more, and costs price[width] steps (width = drafts + 1; 1 for a plain round)."""
    import numpy as np

    from onnxlm.runtime.speculate import ngram_draft

    t, emitted, cost = 1, 0, 0.0  # the first token comes from the prefill
    while t < len(tokens):
        draft = ngram_draft(np.asarray(prompt + tokens[:t], np.int64), min(k, len(tokens) - t - 1))
        kept = next((j for j, d in enumerate(draft) if tokens[t + j] != d), len(draft))
        emitted += kept + 1
        t += kept + 1
        cost += price[len(draft) + 1]
    return emitted / cost


def lookup_bound(bundle: str, ratio: dict[int, float], threads: int, new_tokens: int) -> dict:
    """What prompt lookup can reach on this bundle with one fixed draft length k, from its own greedy
    output on benchmarks/prompts (speculate.py's prompts) and the verify costs measured above: per
    round, drafts copied from the latest longest n-gram match (runtime.speculate.ngram_draft), the
    tokens kept those greedy decoding produces, the round priced at its width's ratio. No estimate
    drifts and nothing is explored, so the engine's adaptive k (speculate.py) stays below the best k."""
    import numpy as np
    from speculate import load_prompts

    import onnxlm
    from onnxlm.runtime.batch import generate_steps
    from onnxlm.runtime.generate import GenerationParams

    engine = onnxlm.load(bundle, threads=threads, prefix_cache_mb=0)
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    price = {1: 1.0, **ratio}
    out = {}
    for kind, prompts in load_prompts(engine.tokenizer).items():
        runs = [
            (ids, [s.outputs[0].token_id for s in generate_steps(engine.model, None, [ids], params)])
            for _, ids in prompts
        ]
        speedups = {}
        for k in [k for k in range(1, 9) if all(w in price for w in range(2, k + 2))]:
            per_prompt = [lookup_speedup(ids, toks, k, price) for ids, toks in runs]
            speedups[k] = float(np.exp(np.mean(np.log(per_prompt))))
        out[kind] = speedups
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", default=[], metavar="NAME=BUNDLE")
    ap.add_argument("--contexts", default="100,1000")
    ap.add_argument(
        "--widths", default="2,3,4,5,6,7,8,9", help="--lookup-bound prices k only where 2..k+1 are all here"
    )
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=__import__("os").cpu_count())
    ap.add_argument("--no-kernel", action="store_true", help="skip the MatMulNBits rows measurement")
    ap.add_argument(
        "--lookup-bound",
        action="store_true",
        help="per bundle, the speedup prompt lookup with a fixed k reaches at the first context's costs",
    )
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    bundles = {}
    for b in args.bundle:
        if "=" not in b:
            raise SystemExit(f"--bundle takes NAME=BUNDLE, got {b!r}")
        name, path = b.split("=", 1)
        bundles[name] = path
    contexts = [int(c) for c in args.contexts.split(",")]
    widths = [int(w) for w in args.widths.split(",")]

    import onnxruntime as ort

    result = {"onnxruntime": ort.__version__, "threads": args.threads, "contexts": contexts, "widths": widths}
    if bundles:
        result["bundles"] = bundle_ratios(bundles, contexts, widths, args.rounds, args.threads)
        if args.lookup_bound:
            import sys

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            result["lookup_bound"] = {
                name: lookup_bound(
                    path, result["bundles"][name][contexts[0]]["ratio"], args.threads, args.new_tokens
                )
                for name, path in bundles.items()
            }
    if not args.no_kernel:
        result["matmulnbits"] = matmulnbits_rows(args.threads, args.rounds)

    lines = [f"onnxruntime {ort.__version__}, {args.threads} threads, medians of {args.rounds} rounds", ""]
    if bundles:
        lines += [
            "| bundle | context | one-token step ms | " + " | ".join(f"width {w}" for w in widths) + " |",
            "| --- | ---: | ---: | " + " | ".join("---:" for _ in widths) + " |",
        ]
        for name, by_ctx in result["bundles"].items():
            for ctx, r in by_ctx.items():
                cells = " | ".join(f"{r['ratio'][w]:.2f}x" for w in widths)
                lines.append(f"| {name} | {ctx} | {r['step_ms']:.2f} | {cells} |")
        lines.append("")
    if "lookup_bound" in result:
        lines += [
            f"Prompt lookup with a fixed k, priced at the {contexts[0]}-token costs above (geometric mean over "
            "benchmarks/prompts, greedy, end of sequence ignored):",
            "",
            "| bundle | prompts | "
            + " | ".join(f"k={k}" for k in next(iter(result["lookup_bound"].values()))["grounded"])
            + " |",
            "| --- | --- | "
            + " | ".join("---:" for _ in next(iter(result["lookup_bound"].values()))["grounded"])
            + " |",
        ]
        for name, kinds in result["lookup_bound"].items():
            for kind, by_k in kinds.items():
                lines.append(f"| {name} | {kind} | " + " | ".join(f"{v:.2f}x" for v in by_k.values()) + " |")
        lines.append("")
    if "matmulnbits" in result:
        k = result["matmulnbits"]
        lines += [
            f"MatMulNBits chain (20 of 576x3072 / 3072x576, 4-bit, block 32, accuracy_level 4), M rows over one "
            f"({k['one_row_ms']:.2f} ms): " + ", ".join(f"M={m} {v:.2f}x" for m, v in k["ratio"].items()),
            "",
        ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "verify_cost.json").write_text(json.dumps(result, indent=2))
    (out / "verify_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
