"""Decode speed and time to first token of onnxlm and every peer installed, side by side.

    python benchmarks/compare.py --onnxlm fp32=BUNDLE --onnxlm int4=BUNDLE \
        --hf HF_FOLDER --optimum OPTIMUM_FOLDER --genai fp32=DIR --genai int4=DIR --gguf Q4_1=FILE \
        --contexts 100,2000 --new-tokens 128 --rounds 3 --memory --baseline "genai int4" --out results/

Every engine gets the same prompt token ids, the same thread count, greedy decoding with the end of
sequence ignored (exactly --new-tokens tokens), and runs are interleaved round by round, each round's
order rotated by one (who runs after whom moves an engine's speed by up to ~6%), so that drift and
order hit all alike; medians are reported, and with --baseline NAME every engine's decode speed over
NAME's in the same round (per round and the median: this kind of machine moves more between rounds
than the engines differ). A peer whose package is missing is reported as skipped, not faked.
With --memory, each engine then runs once more alone in a fresh process (load, generate --new-tokens
at the first context) to measure its peak RSS and what it holds resident afterwards.
--onnxlm-ifs NAME=BUNDLE loads a bundle with split_forms=False: an int8 cache's graph in one session
with its Ifs, to compare with the two forms sharing packed weights that onnxlm runs by default
(onnxlm/runtime/split.py).
Writes compare.json, compare.md and compare.png (tokens/s by engine and context) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

THIS = Path(__file__).resolve()

Run = Callable[[list[int], int], tuple[float, float]]  # (prompt ids, new tokens) -> (ttft s, decode tok/s)


def onnxlm_engine(bundle: str, threads: int, split_forms: bool | None = None) -> Run:
    import onnxlm

    engine = onnxlm.load(bundle, threads=threads, split_forms=split_forms)

    def run(ids, n):
        # wall clock around the public stream, exactly as the peers are timed (the chunks' own creation
        # included, which Timings leave out)
        t0 = time.perf_counter()
        first, count = None, 0
        for _chunk in engine.stream(ids, max_new_tokens=n, ignore_eos=True):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        return first - t0, (count - 1) / (end - first) if count > 1 else 0.0

    return run


def torch_engine(folder: str, threads: int) -> Run:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    @torch.no_grad()
    def run(ids, n):
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        tok = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        past, t1 = out.past_key_values, time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        return ttft, (n - 1) / (time.perf_counter() - t1)

    return run


def optimum_engine(folder: str, threads: int) -> Run:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(folder, session_options=so, use_cache=True)

    def run(ids, n):
        t0 = time.perf_counter()
        out = model(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            use_cache=True,
        )
        tok = int(out.logits[0, -1].argmax())
        ttft = time.perf_counter() - t0
        past, total, t1 = out.past_key_values, len(ids), time.perf_counter()
        for _ in range(n - 1):
            total += 1
            out = model(
                input_ids=torch.tensor([[tok]]),
                attention_mask=torch.ones(1, total, dtype=torch.long),
                past_key_values=past,
                use_cache=True,
            )
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        return ttft, (n - 1) / (time.perf_counter() - t1)

    return run


def genai_engine(folder: str, threads: int) -> Run:
    import onnxruntime_genai as og

    config = og.Config(folder)
    config.clear_providers()
    model = og.Model(config)  # intra-op threads: genai_config.json's session_options (set below)

    def run(ids, n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        ttft = time.perf_counter() - t0
        t1, count = time.perf_counter(), 1
        while not gen.is_done() and count < n:
            gen.generate_next_token()
            count += 1
        return ttft, (count - 1) / (time.perf_counter() - t1)

    return run


def last_token(llm) -> int:
    """Greedy token from the logits llama.cpp computed for the last position (its `scores` array
    is only filled with logits_all=True, which would compute the head at every prompt position)."""
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return int(np.argmax(logits))


def gguf_engine(path: str, threads: int, n_ctx: int) -> Run:
    from llama_cpp import Llama

    # n_ctx sized to the longest run: a larger cache slows llama.cpp's attention for nothing
    llm = Llama(
        model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False
    )

    def run(ids, n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = last_token(llm)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = last_token(llm)
        return ttft, (n - 1) / (time.perf_counter() - t1)

    return run


def set_genai_threads(folder: str, threads: int) -> None:
    """genai reads its thread count from genai_config.json; make it use every core like the others."""
    path = Path(folder) / "genai_config.json"
    cfg = json.loads(path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != threads:
        opts["intra_op_num_threads"] = threads
        path.write_text(json.dumps(cfg, indent=4))


def make_engine(kind: str, path: str, threads: int, n_ctx: int) -> Run:
    if kind in ("onnxlm", "onnxlm-ifs"):
        return onnxlm_engine(path, threads, split_forms=False if kind == "onnxlm-ifs" else None)
    if kind == "hf":
        return torch_engine(path, threads)
    if kind == "optimum":
        return optimum_engine(path, threads)
    if kind == "genai":
        set_genai_threads(path, threads)
        return genai_engine(path, threads)
    if kind == "gguf":
        return gguf_engine(path, threads, n_ctx)
    raise ValueError(f"unknown engine kind {kind!r}")


MEMORY_FIELDS = {"peak_rss_mb": "VmHWM", "rss_mb": "VmRSS"}  # from /proc/self/status, kB


def memory_child(kind: str, path: str, threads: int, prompt_file: str, n: int) -> None:
    """Run in a fresh process: load one engine, generate n tokens, print the process's peak RSS
    (VmHWM: this program's own, where getrusage would report the parent's too) and what it holds
    resident with the engine still loaded."""
    ids = json.loads(Path(prompt_file).read_text())
    run = make_engine(kind, path, threads, len(ids) + n + 16)
    run(ids, n)
    with open("/proc/self/status") as f:
        status = f.read()
    print(
        json.dumps(
            {k: int(status.split(f"{field}:")[1].split()[0]) / 1024 for k, field in MEMORY_FIELDS.items()}
        )
    )
    del run


def measure_memory(kind: str, path: str, threads: int, prompt_file: Path, n: int) -> dict:
    """One engine's memory, measured by memory_child in a fresh process on the prompt in prompt_file."""
    cmd = [sys.executable, str(THIS), "--memory-of", kind, path, "--threads", str(threads)]
    cmd += ["--memory-prompt", str(prompt_file), "--new-tokens", str(n)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {
            "error": done.stderr.strip().splitlines()[-1]
            if done.stderr.strip()
            else f"exit {done.returncode}"
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


WEIGHT_SUFFIXES = (".onnx", ".data", ".onnx_data", ".safetensors", ".gguf")


def model_bytes(path: str) -> int:
    """Bytes of the weights an engine reads: the file, or a folder's graph and weight files."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def prompt_ids(tokenizer_json: str, n: int) -> list[int]:
    from tokenizers import Tokenizer

    from onnxlm.runtime.eval import builtin_text

    tok = Tokenizer.from_file(tokenizer_json)
    ids = tok.encode(builtin_text("en"), add_special_tokens=False).ids
    return (ids * (n // len(ids) + 1))[:n]


def rotated(names: list[str], r: int) -> list[str]:
    """Round r's engine order: the list rotated by r. An engine run right after another one measured
    up to ~6% slower than run after itself (benchmarks/README.md, eighth session): with a fixed order
    the same engine would open every round (after the last one's run) and, of two, the same one would
    always go second."""
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def paired_ratios(
    samples: dict[tuple[str, int], list[tuple[float, float]]],
    baselines: list[str],
    engines: list[str],
    contexts: list[int],
) -> list[dict]:
    """Every engine's decode tok/s over each baseline's in the same round, per context: the rounds'
    ratios and their median (engines interleaved within a round see the same machine; across rounds
    this machine's speed moves more than the engines differ)."""
    out = []
    for base in baselines:
        for name in engines:
            if name == base:
                continue
            rounds = {
                str(c): [a[1] / b[1] for a, b in zip(samples[name, c], samples[base, c], strict=True)]
                for c in contexts
            }
            median = {c: statistics.median(r) for c, r in rounds.items()}
            out.append({"engine": name, "baseline": base, "rounds": rounds, "median": median})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnxlm", action="append", default=[], help="NAME=BUNDLE")
    ap.add_argument(
        "--onnxlm-ifs",
        action="append",
        default=[],
        help="NAME=BUNDLE loaded with split_forms=False (an int8 cache's graph in one session, its Ifs)",
    )
    ap.add_argument("--hf", default=None, help="HF folder for PyTorch eager")
    ap.add_argument("--optimum", default=None, help="optimum-exported folder (ORTModelForCausalLM)")
    ap.add_argument("--genai", action="append", default=[], help="NAME=onnxruntime-genai model folder")
    ap.add_argument("--gguf", action="append", default=[], help="NAME=FILE.gguf (llama-cpp-python)")
    ap.add_argument("--contexts", default="100,2000")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", type=Path, default=Path("benchmark-results"))
    ap.add_argument("--memory", action="store_true", help="peak RSS of each engine, each in its own process")
    ap.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="an engine as named in the table (e.g. 'genai int4'): every engine's decode tok/s over its "
        "own in the same round, per round and the median (a round's engines share the machine's state)",
    )
    ap.add_argument("--memory-of", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--memory-prompt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        return memory_child(*args.memory_of, args.threads, args.memory_prompt, args.new_tokens)
    if not args.onnxlm:
        raise SystemExit("give at least one --onnxlm NAME=BUNDLE (its tokenizer makes the prompts)")

    n_ctx = max(int(c) for c in args.contexts.split(",")) + args.new_tokens + 16
    specs: list[tuple[str, str, str]] = []  # (name, kind, path)
    for v in args.onnxlm:
        name, path = v.split("=", 1)
        specs.append((f"onnxlm {name}", "onnxlm", path))
    for v in args.onnxlm_ifs:
        name, path = v.split("=", 1)
        specs.append((f"onnxlm {name}", "onnxlm-ifs", path))
    if args.hf:
        specs.append(("PyTorch eager fp32", "hf", args.hf))
    if args.optimum:
        specs.append(("optimum ORT fp32", "optimum", args.optimum))
    for v in args.genai:
        name, path = v.split("=", 1)
        specs.append((f"genai {name}", "genai", path))
    for v in args.gguf:
        name, path = v.split("=", 1)
        specs.append((f"llama.cpp {name}", "gguf", path))

    first = args.onnxlm[0].split("=", 1)[1]
    contexts = [int(c) for c in args.contexts.split(",")]
    prompts = {c: prompt_ids(str(Path(first) / "tokenizer.json"), c) for c in contexts}
    from onnxlm.runtime.bench import read_bandwidth_gb_per_s

    bandwidth = read_bandwidth_gb_per_s()  # first: loaded engines' idle thread pools would compete for it
    engines: dict[str, Run] = {}
    skipped: dict[str, str] = {}
    for name, kind, path in specs:
        try:
            engines[name] = make_engine(kind, path, args.threads, n_ctx)
            engines[name](prompts[contexts[0]][:16], 4)  # warm-up
        except ImportError as e:
            skipped[name] = f"not installed ({e.name})"
    unknown = [b for b in args.baseline if b not in engines]
    if unknown:  # before the rounds: a misspelt name should not cost a whole run
        raise SystemExit(f"--baseline {unknown[0]!r}: not an engine that runs here ({', '.join(engines)})")
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    orders = []
    for r in range(args.rounds):
        order = rotated(list(engines), r)
        orders.append(order)
        for c in contexts:
            for name in order:
                ttft, tps = engines[name](prompts[c], args.new_tokens)
                samples.setdefault((name, c), []).append((ttft, tps))
                print(
                    f"round {r + 1} ctx {c:5d} {name:22s} ttft {ttft * 1000:8.0f} ms  decode {tps:6.1f} tok/s",
                    file=sys.stderr,
                )

    paired = paired_ratios(samples, args.baseline, list(engines), contexts)
    sizes = {name: model_bytes(path) for name, kind, path in specs if name in engines}
    rows = []
    for (name, c), vals in samples.items():
        tps = statistics.median(v[1] for v in vals)
        rows.append(
            {
                "engine": name,
                "context": c,
                "ttft_s": statistics.median(v[0] for v in vals),
                "decode_tokens_per_s": tps,
                "model_bytes": sizes[name],
                "decode_gb_per_s": sizes[name] * tps / 1e9,  # the weights a token reads; KV comes on top
                "runs": len(vals),
                "rounds": [{"ttft_s": t, "decode_tokens_per_s": d} for t, d in vals],
            }
        )
    memory: dict[str, dict] = {}
    if args.memory:  # after the timed rounds, one engine at a time (the ones loaded here sit idle)
        args.out.mkdir(parents=True, exist_ok=True)
        prompt_file = args.out / "memory-prompt.json"
        prompt_file.write_text(json.dumps(prompts[contexts[0]]))
        for name, kind, path in specs:
            if name in engines:
                memory[name] = measure_memory(kind, path, args.threads, prompt_file, args.new_tokens)
                print(f"memory {name:22s} {memory[name]}", file=sys.stderr)
    import onnxruntime

    versions = {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__}
    for mod in ("onnxruntime_genai", "llama_cpp", "torch", "transformers", "optimum"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            pass
    machine = {
        "cpus": len(os.sched_getaffinity(0)),
        "processor": platform.processor() or platform.machine(),
        "threads": args.threads,
        "read_gb_per_s": bandwidth,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine,
        "versions": versions,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "orders": orders,
        "rows": rows,
        "memory": memory,
        "skipped": skipped,
        "paired": paired,
    }
    (args.out / "compare.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Decode tok/s and time to first token (medians of {args.rounds}); {args.new_tokens} new tokens, "
        f"greedy, end of sequence ignored, {args.threads} threads, {machine['cpus']} CPUs; {versions}",
        "",
        "| engine | model | " + " | ".join(f"ctx {c}: decode tok/s | GB/s | TTFT" for c in contexts) + " |",
        "| --- | ---: | " + " | ".join("---: | ---: | ---:" for _ in contexts) + " |",
    ]
    by = {(r["engine"], r["context"]): r for r in rows}
    for name in engines:
        cells = [
            f"{by[name, c]['decode_tokens_per_s']:.1f} | {by[name, c]['decode_gb_per_s']:.1f} | "
            f"{by[name, c]['ttft_s'] * 1000:.0f} ms"
            for c in contexts
        ]
        lines.append(f"| {name} | {sizes[name] / 1e6:.0f} MB | " + " | ".join(cells) + " |")
    for name, why in skipped.items():
        lines.append(f"| {name} | skipped: {why} |")
    lines += [
        "",
        f"GB/s = model bytes x decode tokens/s (the weights each token reads; the KV cache comes on top), "
        f"beside this machine's read bandwidth: {bandwidth:.1f} GB/s (numpy, all CPUs).",
    ]
    if paired:
        lines += [
            "",
            "Decode tok/s over the baseline's in the same round (median; each round):",
            "",
            "| engine | baseline | " + " | ".join(f"ctx {c}" for c in contexts) + " |",
            "| --- | --- | " + " | ".join("---" for _ in contexts) + " |",
        ]
        for p in paired:
            cells = [
                f"{p['median'][str(c)]:.2f}x ({', '.join(f'{x:.2f}' for x in p['rounds'][str(c)])})"
                for c in contexts
            ]
            lines.append(f"| {p['engine']} | {p['baseline']} | " + " | ".join(cells) + " |")
    if memory:
        lines += [
            "",
            f"Memory: each engine alone in a fresh process, loading and generating {args.new_tokens} tokens "
            f"at context {contexts[0]}",
            "",
            "| engine | peak RSS | resident after |",
            "| --- | ---: | ---: |",
        ]
        for name, m in memory.items():
            cells = (
                f"{m['peak_rss_mb']:.0f} MB | {m['rss_mb']:.0f} MB"
                if "error" not in m
                else f"failed: {m['error']} |"
            )
            lines.append(f"| {name} | {cells} |")
    (args.out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / max(1, len(contexts))
        names = list(engines)
        for i, c in enumerate(contexts):
            ax.bar(
                [j + i * width for j in range(len(names))],
                [by[n, c]["decode_tokens_per_s"] for n in names],
                width,
                label=f"context {c}",
            )
        ax.set_xticks(
            [j + width * (len(contexts) - 1) / 2 for j in range(len(names))], names, rotation=20, ha="right"
        )
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"decode speed, {machine['cpus']} CPUs, {args.new_tokens} new tokens")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "compare.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no chart", file=sys.stderr)


if __name__ == "__main__":
    main()
