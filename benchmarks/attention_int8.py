"""Attention over an int8 KV cache: onnxruntime's int8 GroupQueryAttention against MatMul forms that read
the int8 buffer with integer matrix products, per context and per number of queries a call brings.

    python benchmarks/attention_int8.py --contexts 512,2000,4000,7900 --widths 1,4,9 [--out results/]

One layer of SmolLM2's shape (9 query heads over 3 KV heads of 64), 2 threads by default:

    gqa-int8     com.microsoft GroupQueryAttention with per-channel int8 K / V scales and rotary inside
                 (what an int8-cache bundle's decode form runs), its buffers bound as past and present
    int-qk       q scaled by the key scales and quantized per row to int8; MatMulInteger against the
                 int8 keys; Softmax; the values cast to float32 and a MatMul
    int-qk-pv    the same, the probabilities also quantized per row to uint8 and multiplied by the int8
                 values with MatMulInteger

The MatMul forms do less than the kernel: no rotary, and the call's new keys / values are not written
into the buffer; what they time is the arithmetic over the buffer, the part that grows with the context
and with the queries. A width w is a verify of w - 1 drafted tokens (benchmarks/verify_cost.py times
whole steps). Prints µs per call (best of 3 repeats) and writes JSON + markdown with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from attention import _opset_model, rotary_caches  # benchmarks/attention.py, beside this script
from onnx import TensorProto as T
from onnx import helper, numpy_helper

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
GROUP = HEADS // KV_HEADS
FORMS = ("gqa-int8", "int-qk", "int-qk-pv")


def _scales(rng, shape):
    return rng.uniform(0.01, 0.05, int(np.prod(shape))).astype(np.float32).reshape(shape)


def gqa_int8(capacity: int, rng) -> bytes:
    cos, sin = rotary_caches(capacity + 16, HEAD_DIM)
    inits = [
        helper.make_tensor("ks", T.FLOAT, [KV_HEADS * HEAD_DIM], _scales(rng, [KV_HEADS * HEAD_DIM]).ravel()),
        helper.make_tensor("vs", T.FLOAT, [KV_HEADS * HEAD_DIM], _scales(rng, [KV_HEADS * HEAD_DIM]).ravel()),
        numpy_helper.from_array(cos, "cos"),
        numpy_helper.from_array(sin, "sin"),
    ]
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_k", "past_v", "seqlens_k", "total", "cos", "sin", "", "", "", "ks", "vs"],
        ["out", "present_k", "present_v"],
        domain="com.microsoft",
        do_rotary=1,
        kv_num_heads=KV_HEADS,
        num_heads=HEADS,
        local_window_size=-1,
        k_quant_type="PER_CHANNEL",
        v_quant_type="PER_CHANNEL",
        kv_cache_bit_width=8,
    )
    cache = [1, KV_HEADS, capacity, HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info("qkv", T.FLOAT, [1, "seq", (HEADS + 2 * KV_HEADS) * HEAD_DIM]),
        helper.make_tensor_value_info("past_k", T.INT8, cache),
        helper.make_tensor_value_info("past_v", T.INT8, cache),
        helper.make_tensor_value_info("seqlens_k", T.INT32, [1]),
        helper.make_tensor_value_info("total", T.INT32, []),
    ]
    outputs = [
        helper.make_tensor_value_info(n, t, None)
        for n, t in (("out", T.FLOAT), ("present_k", T.INT8), ("present_v", T.INT8))
    ]
    return _opset_model([node], inputs, outputs, inits).SerializeToString()


def integer_matmuls(capacity: int, rng, int_pv: bool) -> bytes:
    """q (1, kv, group·seq, d) float32; keys and values int8 (1, kv, capacity, d), per-channel scales."""
    inits = [
        helper.make_tensor("ks", T.FLOAT, [KV_HEADS, 1, HEAD_DIM], _scales(rng, [KV_HEADS * HEAD_DIM])),
        helper.make_tensor("vs", T.FLOAT, [KV_HEADS, 1, HEAD_DIM], _scales(rng, [KV_HEADS * HEAD_DIM])),
        helper.make_tensor("i8max", T.FLOAT, [], [127.0]),
        helper.make_tensor("u8max", T.FLOAT, [], [255.0]),
        helper.make_tensor("inv_sqrt_d", T.FLOAT, [], [HEAD_DIM**-0.5]),
    ]
    n = helper.make_node
    nodes = [
        n("Mul", ["q", "ks"], ["q_s"]),
        n("Abs", ["q_s"], ["q_abs"]),
        n("ReduceMax", ["q_abs"], ["q_max"], axes=[-1], keepdims=1),
        n("Div", ["q_max", "i8max"], ["q_step"]),
        n("Div", ["q_s", "q_step"], ["q_f"]),
        n("Round", ["q_f"], ["q_r"]),
        n("Cast", ["q_r"], ["q_i8"], to=T.INT8),
        n("Transpose", ["q_i8"], ["q_t"], perm=[0, 1, 3, 2]),
        n("MatMulInteger", ["keys", "q_t"], ["s_i32"]),  # (1, kv, capacity, group·seq)
        n("Cast", ["s_i32"], ["s_f"], to=T.FLOAT),
        n("Transpose", ["s_f"], ["s_t"], perm=[0, 1, 3, 2]),
        n("Mul", ["q_step", "inv_sqrt_d"], ["s_scale"]),
        n("Mul", ["s_t", "s_scale"], ["scores"]),
        n("Add", ["scores", "mask"], ["masked"]),
        n("Softmax", ["masked"], ["p"], axis=-1),
    ]
    if int_pv:
        nodes += [
            n("ReduceMax", ["p"], ["p_max"], axes=[-1], keepdims=1),
            n("Div", ["p_max", "u8max"], ["p_step"]),
            n("Div", ["p", "p_step"], ["p_f"]),
            n("Round", ["p_f"], ["p_r"]),
            n("Cast", ["p_r"], ["p_u8"], to=T.UINT8),
            n("MatMulInteger", ["p_u8", "values"], ["o_i32"]),
            n("Cast", ["o_i32"], ["o_f"], to=T.FLOAT),
            n("Mul", ["o_f", "p_step"], ["o_p"]),
        ]
    else:
        nodes += [n("Cast", ["values"], ["v_f"], to=T.FLOAT), n("MatMul", ["p", "v_f"], ["o_p"])]
    nodes.append(n("Mul", ["o_p", "vs"], ["out"]))
    cache = [1, KV_HEADS, capacity, HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info("q", T.FLOAT, [1, KV_HEADS, "rows", HEAD_DIM]),
        helper.make_tensor_value_info("keys", T.INT8, cache),
        helper.make_tensor_value_info("values", T.INT8, cache),
        helper.make_tensor_value_info("mask", T.FLOAT, [1, 1, "rows", capacity]),
    ]
    return _opset_model(
        nodes, inputs, [helper.make_tensor_value_info("out", T.FLOAT, None)], inits
    ).SerializeToString()


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _time(call, calls: int) -> float:
    call()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def measure(context: int, width: int, threads: int, rng) -> dict[str, float]:
    capacity = context + 64
    keys = rng.integers(-127, 128, (1, KV_HEADS, capacity, HEAD_DIM), dtype=np.int8)
    values = rng.integers(-127, 128, (1, KV_HEADS, capacity, HEAD_DIM), dtype=np.int8)
    calls = max(5, 20000 // context)

    gqa = _session(gqa_int8(capacity, rng), threads)
    binding = gqa.io_binding()
    buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in (keys.copy(), values.copy())]
    binding.bind_cpu_input(
        "qkv", rng.standard_normal((1, width, (HEADS + 2 * KV_HEADS) * HEAD_DIM), np.float32)
    )
    binding.bind_ortvalue_input("past_k", buffers[0])
    binding.bind_ortvalue_input("past_v", buffers[1])
    binding.bind_ortvalue_output("present_k", buffers[0])
    binding.bind_ortvalue_output("present_v", buffers[1])
    # each call writes the same positions again: the context stays `context` tokens
    binding.bind_cpu_input("seqlens_k", np.array([context + width - 1], np.int32))
    binding.bind_cpu_input("total", np.array(capacity, np.int32))
    binding.bind_output("out")
    out = {"gqa-int8": _time(lambda: gqa.run_with_iobinding(binding), calls)}

    mask = np.zeros((1, 1, GROUP * width, capacity), np.float32)
    mask[..., context + width :] = -np.inf
    feeds = {
        "q": rng.standard_normal((1, KV_HEADS, GROUP * width, HEAD_DIM), np.float32),
        "keys": keys,
        "values": values,
        "mask": mask,
    }
    for form, int_pv in (("int-qk", False), ("int-qk-pv", True)):
        session = _session(integer_matmuls(capacity, rng, int_pv), threads)
        out[form] = _time(lambda s=session: s.run(None, feeds), calls)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="512,2000,4000,7900")
    ap.add_argument("--widths", default="1,4,9")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for width in (int(w) for w in args.widths.split(",")):
            times = measure(context, width, args.threads, rng)
            rows.append({"context": context, "width": width, **{f: round(t, 1) for f, t in times.items()}})
            print(" ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    env = {
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
    }
    lines = [
        f"µs per call of one layer (best of 3 repeats); {env}",
        "",
        "| context | width | " + " | ".join(FORMS) + " |",
        "| ---: | ---: |" + " ---: |" * len(FORMS),
    ]
    lines += [
        f"| {r['context']} | {r['width']} | " + " | ".join(str(r[f]) for f in FORMS) + " |" for r in rows
    ]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_int8.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        (args.out / "attention_int8.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
