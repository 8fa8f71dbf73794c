"""How fast can a 4-bit GEMV read weights that do not fit in cache: onnxruntime's MatMulNBits against
a plain hand-written kernel with a float minimum per block (benchmarks/kernels/q4_1_gemv.c, Q4_1's
w = q*d + m, which MatMulNBits cannot run exactly in one kernel: the int4 recipes fold the minimum
into integer zero points plus remainder codes, GGUF kept blocks add a correction branch;
onnxlm/quantize/pack.py).

    python benchmarks/int4_gemv.py [--pairs 60] [--repeat 30] [--rounds 3] [--threads N] [--prefetch 512]
                                   [--bundle B ...]

A chain of 2*pairs matrices of SmolLM2's MLP shapes (576x1536, 1536x576), each one's output the
next one's input, as a decode step runs them: 60 pairs is 106M weights, 80 MB, more than the L3
cache. Both sides store 0.75 bytes a weight (MatMulNBits packs a float scale and a float block sum
per block of 32; the C kernel a float scale and a float minimum). Each side runs in its own process
(their thread pools spin between runs), alternating, `--rounds` times; medians are reported. Each
is first checked against numpy on one matrix. The C kernel needs a C compiler and AVX-512 VNNI;
without them it is reported as skipped.

--bundle B (repeatable) also times that bundle's own MatMulNBits alone (same weights, in graph order,
a Slice where one's output is wider than the next one's input, zeros appended where it is narrower)
against its whole decode step, to say how much of an int4 step the 4-bit matmuls are.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "kernels" / "q4_1_gemv.c"
BLOCK = np.dtype([("d", "<f4"), ("m", "<f4"), ("q", "u1", 16)])  # the C kernel's block_t
SHAPES = ((576, 1536), (1536, 576))  # (K, N)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build(out_dir: Path) -> ctypes.CDLL | str:
    """The compiled kernel, or why it cannot be built here."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler"
    if not {"avx512_vnni", "avx512vl", "avx512f"} <= cpu_flags():
        return "this CPU has no AVX-512 VNNI"
    lib = out_dir / "q4_1_gemv.so"
    if not lib.exists():  # the children load what the parent built
        cmd = [cc, "-O3", "-march=native", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o", str(lib), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return f"build failed: {done.stderr.strip()[-300:]}"
    so = ctypes.CDLL(str(lib))
    p, i = ctypes.c_void_p, ctypes.c_int
    so.q4_1_gemv.argtypes = [p, i, i, p, p]
    so.q4_1_chain.argtypes = [p, p, p, i, p, p, i, i]
    so.q4_1_chain.restype = i
    return so


def q4_1_blocks(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """(n, k/32) blocks whose weights keep a chain's activations at about the same size."""
    w = np.zeros((n, k // 32), BLOCK)
    w["q"] = rng.integers(0, 256, w["q"].shape, dtype=np.uint8)
    w["d"] = rng.uniform(0.5, 1.5, w["d"].shape) / (4.6 * np.sqrt(k))
    w["m"] = -7.5 * w["d"] + rng.normal(0, 0.1, w["d"].shape) * w["d"]
    return w


def q4_1_dense(w: np.ndarray) -> np.ndarray:
    q = w["q"]
    values = np.concatenate([q & 15, q >> 4], axis=-1).astype(np.float32)  # element j, then 16 + j
    return (values * w["d"][..., None] + w["m"][..., None]).reshape(len(w), -1)


def matmulnbits_session(mats: list[tuple[np.ndarray, np.ndarray]], threads: int):
    """An onnxruntime session running symmetric 4-bit MatMulNBits (accuracy level 4, as onnxlm and
    genai use it) over (data (N, K/32, 16), float32 scales) in a chain, each output the next input."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    for i, (data, scales) in enumerate(mats):
        n, kb, _ = data.shape
        inits += [numpy_helper.from_array(data, f"B{i}"), numpy_helper.from_array(scales, f"S{i}")]
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [x, f"B{i}", f"S{i}"],
                [f"y{i}"],
                domain="com.microsoft",
                K=kb * 32,
                N=n,
                bits=4,
                block_size=32,
                accuracy_level=4,
            )
        )
        x = f"y{i}"
    first_k, last_n = mats[0][0].shape[1] * 32, mats[-1][0].shape[0]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, first_k])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, last_n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def matmulnbits_mats(rng: np.random.Generator, pairs: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(data, scales) of 2*pairs matrices of SHAPES, scaled to keep a chain's activations steady."""
    mats = []
    for i in range(2 * pairs):
        k, n = SHAPES[i % 2]
        data = rng.integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
        scales = (rng.uniform(0.5, 1.5, n * k // 32) / (4.6 * np.sqrt(k))).astype(np.float32)
        mats.append((data, scales))
    return mats


def check_matmulnbits(data: np.ndarray, scales: np.ndarray, threads: int) -> float:
    """Relative error of one MatMulNBits against numpy (its nibbles: element 2j low, 2j+1 high)."""
    n, kb, _ = data.shape
    k = kb * 32
    sess = matmulnbits_session([(data, scales)], threads)
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    q = np.stack([data & 15, data >> 4], axis=-1).reshape(n, kb, 32).astype(np.float32)
    dense = ((q - 8) * scales.reshape(n, kb, 1)).reshape(n, k)
    ref = dense @ x[0]
    return float(np.abs(sess.run(None, {"x": x})[0][0] - ref).max() / np.abs(ref).max())


def bundle_matmuls(bundle: Path, threads: int, repeat: int, tmp: Path) -> dict:
    """A bundle's MatMulNBits alone against its decode step (ms)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from onnxlm.runtime.engine import Engine
    from onnxlm.runtime.session import session_options

    # onnxruntime folds the Casts that make the float32 scales; its optimized copy has them as initializers
    opts = session_options(threads)
    opts.optimized_model_filepath = str(tmp / "folded.onnx")
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "folded.data")
    ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(tmp / "folded.onnx"))
    weights = {t.name: t for t in folded.graph.initializer}
    nodes, inits, x, width, first_k = [], {}, "x", None, None
    for i, n in enumerate(n for n in folded.graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        first_k = first_k or attrs["K"]
        width = width or attrs["K"]
        if width > attrs["K"]:
            for name, v in ((f"end{i}", attrs["K"]), ("zero", 0), ("last", -1)):
                inits[name] = numpy_helper.from_array(np.array([v], np.int64), name)
            nodes.append(helper.make_node("Slice", [x, "zero", f"end{i}", "last"], [f"s{i}"]))
            x = f"s{i}"
        elif width < attrs["K"]:  # scheme min folded: the input's block sums follow it (zeros here)
            pads = f"pads{i}"
            inits[pads] = numpy_helper.from_array(np.array([0, 0, 0, attrs["K"] - width], np.int64), pads)
            nodes.append(helper.make_node("Pad", [x, pads], [f"p{i}"]))
            x = f"p{i}"
        for name in n.input[1:]:
            if name:
                inits[name] = weights[name]
        nodes.append(
            helper.make_node("MatMulNBits", [x, *n.input[1:]], [f"y{i}"], domain="com.microsoft", **attrs)
        )
        x, width = f"y{i}", attrs["N"]
    if not nodes:
        return {"matmulnbits": 0}
    graph = helper.make_graph(
        nodes,
        "matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, first_k])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])],
        list(inits.values()),
    )
    model = helper.make_model(graph, opset_imports=list(folded.opset_import))
    onnx.save(model, str(tmp / "matmuls.onnx"), save_as_external_data=True, location="matmuls.data")
    sess = ort.InferenceSession(
        str(tmp / "matmuls.onnx"), session_options(threads), providers=["CPUExecutionProvider"]
    )
    feed = {"x": np.random.default_rng(0).standard_normal((1, first_k)).astype(np.float32) * 0.3}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    del sess
    engine = Engine.load(bundle, threads=threads)
    window, vocab = engine.context_length, engine.manifest.model.vocab_size
    ids = [(1000 + 7 * i) % vocab for i in range(min(100, window // 2))]  # a ~100-token prompt
    engine.generate(ids[:16], max_new_tokens=4, ignore_eos=True)
    tps = engine.generate(ids, max_new_tokens=min(64, window // 4), ignore_eos=True).timings.tokens_per_s
    return {
        "matmulnbits": len([n for n in nodes if n.op_type == "MatMulNBits"]),
        "matmuls_ms": statistics.median(times) * 1e3,
        "step_ms": 1e3 / tps,
    }


def child(side: str, pairs: int, repeat: int, threads: int, prefetch: int, tmp: str) -> dict:
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(576).astype(np.float32)
    if side == "matmulnbits":
        mats = matmulnbits_mats(rng, pairs)
        sess = matmulnbits_session(mats, threads)
        error = check_matmulnbits(*mats[0], threads)

        def run():
            sess.run(None, {"x": x0[None]})
    else:
        so = build(Path(tmp))
        mats = [q4_1_blocks(rng, *SHAPES[i % 2]) for i in range(2 * pairs)]
        one, y = mats[0], np.zeros(SHAPES[0][1], np.float32)
        so.q4_1_gemv(one.ctypes.data, SHAPES[0][0], SHAPES[0][1], x0.ctypes.data, y.ctypes.data)
        ref = q4_1_dense(one) @ x0
        error = float(np.abs(y - ref).max() / np.abs(ref).max())
        ptrs = (ctypes.c_void_p * len(mats))(*[m.ctypes.data for m in mats])
        ks = (ctypes.c_int * len(mats))(*[SHAPES[i % 2][0] for i in range(len(mats))])
        ns = (ctypes.c_int * len(mats))(*[SHAPES[i % 2][1] for i in range(len(mats))])
        a, b = np.zeros(1536, np.float32), np.zeros(1536, np.float32)

        def run():
            a[:576] = x0
            if so.q4_1_chain(ptrs, ks, ns, len(mats), a.ctypes.data, b.ctypes.data, threads, prefetch) != 0:
                raise RuntimeError("q4_1_chain refused its arguments")

    for _ in range(3):
        run()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {"ms": statistics.median(times) * 1e3, "max_rel_error": error}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--prefetch", type=int, default=512, help="bytes ahead the C kernel prefetches (0: none)")
    ap.add_argument(
        "--bundle", action="append", default=[], type=Path, help="also time this bundle's MatMulNBits"
    )
    ap.add_argument("--child", choices=("matmulnbits", "c"), help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.pairs, args.repeat, args.threads, args.prefetch, args.tmp)))
        return {}

    weights = args.pairs * 2 * SHAPES[0][0] * SHAPES[0][1]
    nbytes = weights * 0.75
    with tempfile.TemporaryDirectory() as tmp:
        built = build(Path(tmp))
        sides = ["matmulnbits"] + (["c"] if not isinstance(built, str) else [])
        runs: dict[str, list[dict]] = {s: [] for s in sides}
        for r in range(args.rounds):
            for side in sides if r % 2 == 0 else sides[::-1]:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--tmp", tmp]
                cmd += [
                    "--pairs",
                    str(args.pairs),
                    "--repeat",
                    str(args.repeat),
                    "--threads",
                    str(args.threads),
                ]
                cmd += ["--prefetch", str(args.prefetch)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    import onnxruntime

    result = {
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
        },
        "threads": args.threads,
        "matrices": 2 * args.pairs,
        "weights": weights,
        "bytes": nbytes,
        "skipped": {"c": built} if isinstance(built, str) else {},
        "sides": {},
    }
    for side, vals in runs.items():
        ms = statistics.median(v["ms"] for v in vals)
        result["sides"][side] = {
            "ms_per_chain": ms,
            "us_per_matrix": ms * 1e3 / (2 * args.pairs),
            "gb_per_s": nbytes / ms / 1e6,
            "max_rel_error": max(v["max_rel_error"] for v in vals),
            "rounds": [v["ms"] for v in vals],
        }
    print(
        f"{2 * args.pairs} matrices (576x1536, 1536x576), {weights / 1e6:.0f}M weights, {nbytes / 1e6:.0f} MB "
        f"at 0.75 bytes a weight; {args.threads} threads; onnxruntime {onnxruntime.__version__}"
    )
    for side, s in result["sides"].items():
        name = "MatMulNBits (sym, accuracy 4)" if side == "matmulnbits" else "C kernel (Q4_1, min)"
        print(
            f"  {name:30s} {s['ms_per_chain']:7.2f} ms  {s['us_per_matrix']:6.1f} us/matrix  "
            f"{s['gb_per_s']:5.1f} GB/s  (checked against numpy: max rel error {s['max_rel_error']:.3f})"
        )
    if "c" in result["sides"]:
        ratio = result["sides"]["matmulnbits"]["ms_per_chain"] / result["sides"]["c"]["ms_per_chain"]
        result["c_speedup"] = ratio
        print(f"  C kernel / MatMulNBits speed: {ratio:.2f}x")
    if "c" in result["skipped"]:
        print(f"  C kernel skipped: {result['skipped']['c']}")
    result["bundles"] = {}
    for bundle in args.bundle:
        with tempfile.TemporaryDirectory() as tmp:
            b = result["bundles"][str(bundle)] = bundle_matmuls(bundle, args.threads, args.repeat, Path(tmp))
        if b["matmulnbits"]:
            print(
                f"  {bundle}: its {b['matmulnbits']} MatMulNBits alone {b['matmuls_ms']:.2f} ms, "
                f"its decode step {b['step_ms']:.2f} ms ({b['matmuls_ms'] / b['step_ms']:.0%})"
            )
        else:
            print(f"  {bundle}: no MatMulNBits")
    return result


if __name__ == "__main__":
    main()
