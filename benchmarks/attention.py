"""Attention over the shared KV buffer: GroupQueryAttention against the alternatives, measured.

    python benchmarks/attention.py --contexts 64,512,2048 [--bundle BUNDLE] [--out results/]

Part 1 (always): one decode step of --layers attention layers (SmolLM2's shape by default: 9 query
heads over 3 KV heads of 64) per context, in three forms over the same preallocated buffers, bound
once with IO binding as both past and present:

    gqa        com.microsoft GroupQueryAttention, rotary inside (the fused export's form)
    gqa-fp16   the same with float16 KV buffers and Casts around it (half the cache bytes)
    matmul     RotaryEmbedding, ScatterND writing the new keys/values into the buffer in place,
               then MatMul / Softmax / MatMul over the whole buffer with a causal mask
    long-decode  what exported bundles run for decode steps past io.long_decode_from: the If around
               GroupQueryAttention taking its MatMul branch (one GEMV per query head for the values)

Every form's output is checked against gqa's before it is timed.

Part 2 (--bundle): the whole model with every GroupQueryAttention of the bundle's graph replaced by
the matmul form (onnxlm.rewrites.matmul_attention; a batch of one),
against the bundle as it is, interleaved: time to first token and decode tokens/s per context.
The rewritten graph lives in memory only; the bundle is not touched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from onnxlm.rewrites import matmul_attention, wrap_long_decode  # noqa: E402

FORMS = ("gqa", "gqa-fp16", "matmul", "long-decode")


def _opset_model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


def rotary_caches(capacity: int, head_dim: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    freqs = np.arange(capacity)[:, None] * inv[None]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def gqa_layers(layers: int, heads: int, kv_heads: int, d: int, capacity: int, fp16: bool = False):
    """`layers` GroupQueryAttention nodes reading one packed q|k|v input (batch, seq, ...)."""
    kv_type = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    cos, sin = rotary_caches(capacity, d)
    dt = np.float16 if fp16 else np.float32
    inits = [numpy_helper.from_array(cos.astype(dt), "cos"), numpy_helper.from_array(sin.astype(dt), "sin")]
    inputs = [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, "seq", (heads + 2 * kv_heads) * d]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
        helper.make_tensor_value_info("query_seqlens", TensorProto.INT32, [1]),
    ]
    qkv = "qkv"
    nodes, outputs = [], []
    if fp16:
        nodes.append(helper.make_node("Cast", ["qkv"], ["qkv16"], to=kv_type))
        qkv = "qkv16"
    for i in range(layers):
        inputs += [
            helper.make_tensor_value_info(f"past_k{i}", kv_type, [1, kv_heads, capacity, d]),
            helper.make_tensor_value_info(f"past_v{i}", kv_type, [1, kv_heads, capacity, d]),
        ]
        out = f"attn{i}_16" if fp16 else f"attn{i}"
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [qkv, "", "", f"past_k{i}", f"past_v{i}", "seqlens_k", "total", "cos", "sin"]
                + [""] * 7
                + ["query_seqlens"],
                [out, f"present_k{i}", f"present_v{i}"],
                name=f"/layers.{i}/GroupQueryAttention",
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv_heads,
                do_rotary=1,
            )
        )
        if fp16:
            nodes.append(helper.make_node("Cast", [out], [f"attn{i}"], to=TensorProto.FLOAT))
        outputs += [
            helper.make_tensor_value_info(f"attn{i}", TensorProto.FLOAT, None),
            helper.make_tensor_value_info(f"present_k{i}", kv_type, None),
            helper.make_tensor_value_info(f"present_v{i}", kv_type, None),
        ]
    return _opset_model(nodes, inputs, outputs, inits)


class Bound:
    """A session over `model` with every past/present pair bound to one buffer, as the runtime binds."""

    def __init__(self, model: onnx.ModelProto, layers: int, shape, dtype, threads: int, seed: int = 0):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        rng = np.random.default_rng(seed)
        self.buffers = [rng.standard_normal(shape).astype(dtype) for _ in range(2 * layers)]
        self.layers = layers
        self.binding = self.session.io_binding()
        for i in range(layers):
            self.binding.bind_output(f"attn{i}")
        for i in range(layers):
            for j, kv in enumerate("kv"):
                value = ort.OrtValue.ortvalue_from_numpy(self.buffers[2 * i + j])
                self.binding.bind_ortvalue_input(f"past_{kv}{i}", value)
                self.binding.bind_ortvalue_output(f"present_{kv}{i}", value)

    def feed(self, qkv: np.ndarray, held_after: int) -> None:
        seq = qkv.shape[1]
        for name, value in {
            "qkv": qkv,
            "seqlens_k": np.array([held_after - 1], np.int32),
            "total": np.array(held_after, np.int32),
            "query_seqlens": np.array([seq], np.int32),
        }.items():
            self.binding.bind_cpu_input(name, np.ascontiguousarray(value))

    def run(self) -> list[np.ndarray]:
        """One step; returns each layer's attention output."""
        self.session.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()[: self.layers]


def per_layer_step(args, context: int) -> dict:
    """Microseconds per layer of one decode step at `context` tokens, each form; outputs checked."""
    capacity = context + args.room
    shape = (1, args.kv_heads, capacity, args.head_dim)
    qkv = np.random.default_rng(1).standard_normal((1, 1, (args.heads + 2 * args.kv_heads) * args.head_dim))
    qkv = qkv.astype(np.float32)
    graphs = {
        "gqa": gqa_layers(args.layers, args.heads, args.kv_heads, args.head_dim, capacity),
        "gqa-fp16": gqa_layers(args.layers, args.heads, args.kv_heads, args.head_dim, capacity, fp16=True),
    }
    graphs["matmul"] = matmul_attention(
        gqa_layers(args.layers, args.heads, args.kv_heads, args.head_dim, capacity)
    )
    graphs["long-decode"] = wrap_long_decode(
        gqa_layers(args.layers, args.heads, args.kv_heads, args.head_dim, capacity), from_tokens=1
    )
    row, reference = {}, None
    for form, model in graphs.items():
        bound = Bound(
            model, args.layers, shape, np.float16 if form == "gqa-fp16" else np.float32, args.threads
        )
        bound.feed(qkv, context)
        attn = bound.run()
        if reference is None:
            reference = attn
        diff = max(
            float(np.abs(a.astype(np.float32) - r).max()) for a, r in zip(attn, reference, strict=True)
        )
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            for _ in range(args.steps):
                bound.session.run_with_iobinding(bound.binding)
            times.append((time.perf_counter() - t) / args.steps / args.layers * 1e6)
        row[form] = {"us_per_layer": round(min(times), 1), "max_abs_diff_vs_gqa": diff}
    return row


def whole_model(args, contexts: list[int]) -> dict:
    """The bundle as it is against its graph with matmul attention: TTFT and decode tok/s, interleaved."""
    from onnxlm.bundle import MODEL, check_bundle
    from onnxlm.runtime.engine import Engine
    from onnxlm.runtime.session import session_options

    root = Path(args.bundle)
    manifest = check_bundle(root)
    engines = {"gqa": Engine.load(root, threads=args.threads)}
    graph = matmul_attention(onnx.load(str(root / MODEL)))  # external data read into memory
    session = ort.InferenceSession(
        graph.SerializeToString(), session_options(args.threads), providers=["CPUExecutionProvider"]
    )
    del graph
    engines["matmul"] = Engine.from_parts(root, manifest, session)
    rng = np.random.default_rng(0)
    out = {}
    for context in contexts:
        ids = rng.integers(200, manifest.model.vocab_size - 200, context).tolist()
        runs = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                t = engine.generate(
                    ids, max_new_tokens=args.new_tokens, ignore_eos=True, temperature=0
                ).timings
                runs[name].append((t.ttft_s, t.tokens_per_s))
        out[str(context)] = {
            name: {
                "ttft_s": round(statistics.median(r[0] for r in rs), 3),
                "decode_tok_s": round(statistics.median(r[1] for r in rs), 1),
            }
            for name, rs in runs.items()
        }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--contexts", default="64,512,2048", help="comma-separated tokens held (default: %(default)s)"
    )
    ap.add_argument(
        "--layers", type=int, default=10, help="attention layers per graph (default: %(default)s)"
    )
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument(
        "--room", type=int, default=128, help="buffer positions past the context (default: %(default)s)"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=20, help="decode steps per timing (default: %(default)s)")
    ap.add_argument(
        "--repeat", type=int, default=5, help="timings per form; the best is kept (default: %(default)s)"
    )
    ap.add_argument(
        "--bundle", help="also compare the whole model: this bundle against its matmul-attention graph"
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write attention.json here")
    args = ap.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "versions": {"python": platform.python_version(), "onnxruntime": ort.__version__},
        "threads": args.threads,
        "shape": {
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "layers": args.layers,
        },
        "per_layer_decode_step": {str(c): per_layer_step(args, c) for c in contexts},
    }
    print(
        f"decode step, microseconds per attention layer ({args.threads} threads, onnxruntime {ort.__version__})"
    )
    print("| context | " + " | ".join(FORMS) + " |\n|---|" + "---|" * len(FORMS))
    for c, row in result["per_layer_decode_step"].items():
        print(f"| {c} | " + " | ".join(f"{row[f]['us_per_layer']}" for f in FORMS) + " |")
    if args.bundle:
        result["whole_model"] = whole_model(args, contexts)
        print(f"\nwhole model ({args.bundle}): TTFT s / decode tok/s, medians of {args.rounds}")
        for c, row in result["whole_model"].items():
            print(
                f"| {c} | "
                + " | ".join(f"{k}: {v['ttft_s']} s / {v['decode_tok_s']}" for k, v in row.items())
                + " |"
            )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
