"""Speculative decoding, measured: onnxlm with and without drafts against the peers, on input-grounded
prompts (summarise, extract from or rewrite a document given in the prompt) and open-ended ones.

    python benchmarks/speculate.py --onnxlm int4=B_INT4 --onnxlm fp32=B_FP32 --draft fp32=B_INT4 \
        --genai int4=GENAI_INT4 --gguf Q4_1=FILE --new-tokens 128 --rounds 2 --out results/

Every engine gets the same prompt token ids (onnxlm's chat template over benchmarks/prompts/), greedy
decoding of exactly --new-tokens tokens (the end of sequence ignored, as compare.py does, so every
engine decodes as many), and runs are interleaved prompt by prompt and round by round (the engines' order rotated by one each prompt, as compare.py does). Each onnxlm bundle runs plain, with n-gram drafts (`ngram`) and, given --draft NAME=BUNDLE,
drafted by that bundle (`+draft`: the bundle's drafts or prompt lookup's, whichever a round is worth
more, as `Engine.load(draft=...)` does; `+draft model only`: the bundle's alone; the markdown says
what share of drafts came from lookup); their tokens are checked equal to the plain run's (a mismatch is reported,
not hidden). llama.cpp runs plain and with llama-cpp-python's prompt-lookup drafting. Decode tokens/s
is (tokens - 1) / (time after the first token); medians over rounds, then the geometric mean over
prompts. --onnxlm-ifs NAME=BUNDLE runs a bundle plain and with n-gram drafts as
`Engine.load(split_forms=False)` loads it (an int8 cache's graph in one session, with its Ifs).
Writes speculate.json and speculate.md into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

THIS = Path(__file__).resolve()
PROMPTS = THIS.parent / "prompts"

Run = Callable[[list[int], int], dict]  # (prompt ids, max new tokens) -> {ttft, tps, tokens, ...}


def onnxlm_run(
    bundle: str, threads: int, draft: str | None, lookup: bool = True, split_forms: bool | None = None
) -> Run:
    """lookup=False: a draft bundle's own drafts only (no prompt-lookup rounds); split_forms: see
    onnxlm/runtime/split.py."""
    import onnxlm

    # draft_inexact: a bundle whose verifies compute differently from single steps (int4 over a float32
    # cache) is measured too; its "tokens = plain" column then says whether greedy output moved
    engine = onnxlm.load(
        bundle, threads=threads, draft=draft, prefix_cache_mb=0, draft_inexact=True, split_forms=split_forms
    )

    def run(ids, n):
        spec = engine.speculator()
        if not lookup:
            spec.lookup = None
        from onnxlm.runtime.batch import generate_steps
        from onnxlm.runtime.generate import GenerationParams

        t0 = time.perf_counter()
        tokens, first = [], None
        for step in generate_steps(
            engine.model,
            engine.tokenizer,
            [ids],
            GenerationParams(max_new_tokens=n, ignore_eos=True),
            speculator=spec,
        ):
            if first is None:
                first = time.perf_counter()
            tokens.append(step.outputs[0].token_id)
        end = time.perf_counter()
        out = {"ttft": first - t0, "tps": (len(tokens) - 1) / (end - first) if len(tokens) > 1 else 0.0}
        if spec is not None:
            out.update(spec.stats())
        out["tokens"] = tokens
        return out

    return run


def genai_run(folder: str, threads: int) -> Run:
    import onnxruntime_genai as og

    sys.path.insert(0, str(THIS.parent))
    from compare import set_genai_threads

    set_genai_threads(folder, threads)
    config = og.Config(folder)
    config.clear_providers()
    model = og.Model(config)

    def run(ids, n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        first = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        end = time.perf_counter()
        seq = list(gen.get_sequence(0))[len(ids) :]
        return {
            "ttft": first - t0,
            "tps": (len(seq) - 1) / (end - first) if len(seq) > 1 else 0.0,
            "tokens": seq,
        }

    return run


def gguf_run(path: str, threads: int, lookup: bool) -> Run:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None
    llm = Llama(
        model_path=path,
        n_ctx=4096,
        n_threads=threads,
        n_threads_batch=threads,
        n_batch=512,
        draft_model=draft,
        logits_all=lookup,  # llama-cpp-python verifies drafts from every position's logits
        verbose=False,
    )

    def run(ids, n):
        t0 = time.perf_counter()
        tokens, first = [], None
        for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if first is None:
                first = time.perf_counter()
            tokens.append(int(tok))  # llama.cpp's generate does not stop at the end of sequence itself
            if len(tokens) >= n:
                break
        end = time.perf_counter()
        count = len(tokens)
        return {
            "ttft": first - t0,
            "tps": (count - 1) / (end - first) if count > 1 else 0.0,
            "tokens": tokens,
        }

    return run


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special_tokens=False)


def load_prompts(tokenizer) -> dict[str, list[tuple[str, list[int]]]]:
    tasks = json.loads((PROMPTS / "tasks.json").read_text(encoding="utf-8"))
    grounded = []
    for i, t in enumerate(tasks["grounded"]):
        doc = (PROMPTS / t["doc"]).read_text(encoding="utf-8")
        grounded.append((f"g{i}:{t['doc'].split('.')[0]}", chat_ids(tokenizer, f"{t['task']}\n\n{doc}")))
    opened = [(f"o{i}", chat_ids(tokenizer, text)) for i, text in enumerate(tasks["open"])]
    return {"grounded": grounded, "open": opened}


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else 0.0


def versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": str(__import__("os").cpu_count()),
    }
    try:
        out["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    for mod in ("onnxruntime", "onnxruntime_genai", "llama_cpp", "onnxlm"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = "not installed"
    return out


def pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        if "=" not in v:
            raise SystemExit(f"{flag} takes NAME=PATH, got {v!r}")
        out.append(tuple(v.split("=", 1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--onnxlm", action="append", default=[], metavar="NAME=BUNDLE")
    ap.add_argument(
        "--draft", action="append", default=[], metavar="NAME=DRAFT_BUNDLE", help="a draft for --onnxlm NAME"
    )
    ap.add_argument(
        "--onnxlm-ifs",
        action="append",
        default=[],
        metavar="NAME=BUNDLE",
        help="a bundle loaded with split_forms=False (plain and +ngram)",
    )
    ap.add_argument("--genai", action="append", default=[], metavar="NAME=FOLDER")
    ap.add_argument("--gguf", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=__import__("os").cpu_count())
    ap.add_argument("--sets", default="grounded,open", help="prompt sets to run: grounded, open")
    ap.add_argument("--out", default="results")
    a = ap.parse_args()

    import onnxlm

    bundles = pairs(a.onnxlm, "--onnxlm")
    if not bundles:
        raise SystemExit("give at least one --onnxlm NAME=BUNDLE (its tokenizer makes the prompt ids)")
    drafts = dict(pairs(a.draft, "--draft"))
    tok = onnxlm.load(bundles[0][1], threads=a.threads, prefix_cache_mb=0).tokenizer
    sets = load_prompts(tok)
    engines: dict[str, tuple[Run, str | None]] = {}  # label -> (run, label of the plain run to match)
    for name, path in bundles:
        engines[f"onnxlm {name}"] = (onnxlm_run(path, a.threads, None), None)
        engines[f"onnxlm {name} +ngram"] = (onnxlm_run(path, a.threads, "ngram"), f"onnxlm {name}")
        if name in drafts:
            engines[f"onnxlm {name} +draft"] = (onnxlm_run(path, a.threads, drafts[name]), f"onnxlm {name}")
            engines[f"onnxlm {name} +draft model only"] = (
                onnxlm_run(path, a.threads, drafts[name], lookup=False),
                f"onnxlm {name}",
            )
    for name, path in pairs(a.onnxlm_ifs, "--onnxlm-ifs"):
        engines[f"onnxlm {name}"] = (onnxlm_run(path, a.threads, None, split_forms=False), None)
        engines[f"onnxlm {name} +ngram"] = (
            onnxlm_run(path, a.threads, "ngram", split_forms=False),
            f"onnxlm {name}",
        )
    skipped = []
    for name, path in pairs(a.genai, "--genai"):
        try:
            engines[f"genai {name}"] = (genai_run(path, a.threads), None)
        except ImportError as e:
            skipped.append(f"genai {name}: {e}")
    for name, path in pairs(a.gguf, "--gguf"):
        try:
            engines[f"llama.cpp {name}"] = (gguf_run(path, a.threads, False), None)
            engines[f"llama.cpp {name} +lookup"] = (gguf_run(path, a.threads, True), None)
        except ImportError as e:
            skipped.append(f"llama.cpp {name}: {e}")

    results: dict = {
        "versions": versions(),
        "new_tokens": a.new_tokens,
        "rounds": a.rounds,
        "skipped": skipped,
        "sets": {},
    }
    sys.path.insert(0, str(THIS.parent))
    from compare import rotated

    for set_name in a.sets.split(","):
        prompts = sets[set_name]
        runs: dict[str, dict[str, list[dict]]] = {e: {p: [] for p, _ in prompts} for e in engines}
        for r in range(a.rounds):
            for i, (pname, ids) in enumerate(prompts):
                for label in rotated(list(engines), r * len(prompts) + i):  # each prompt's order rotated
                    out = engines[label][0](ids, a.new_tokens)
                    runs[label][pname].append(out)
                    print(
                        f"[{set_name} r{r}] {pname} ({len(ids)} tok) {label}: {out['tps']:.1f} tok/s",
                        file=sys.stderr,
                    )
        table = {}
        for label, (_, plain) in engines.items():
            per = {p: statistics.median(o["tps"] for o in outs) for p, outs in runs[label].items()}
            row = {
                "tps": geomean(list(per.values())),
                "ttft": statistics.median(o["ttft"] for outs in runs[label].values() for o in outs),
                "per_prompt": per,
            }
            if plain is not None:
                same = [
                    o["tokens"] == ref["tokens"]
                    for p in runs[label]
                    for o, ref in zip(runs[label][p], runs[plain][p], strict=True)
                ]
                row["identical_to_plain"] = all(same)
                drafted = sum(o.get("drafted", 0) for outs in runs[label].values() for o in outs)
                acc = sum(o.get("accepted", 0) for outs in runs[label].values() for o in outs)
                row["acceptance"] = acc / drafted if drafted else 0.0
                looked = sum(o.get("lookup_drafted", 0) for outs in runs[label].values() for o in outs)
                if label.endswith(
                    "+draft"
                ):  # a draft bundle also takes prompt-lookup drafts where worth more
                    row["lookup_share"] = looked / drafted if drafted else 0.0
            table[label] = row
        results["sets"][set_name] = {"prompt_tokens": {p: len(ids) for p, ids in prompts}, "engines": table}

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculate.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    md = [
        f"speculate.py: {a.new_tokens} new tokens, {a.rounds} rounds, {a.threads} threads; {results['versions']}",
        "",
    ]
    for set_name, s in results["sets"].items():
        md += [
            f"### {set_name} prompts ({', '.join(str(n) for n in s['prompt_tokens'].values())} tokens)",
            "",
        ]
        md += [
            "| engine | decode tok/s (geomean) | TTFT (median) | acceptance | tokens = plain |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for label, row in s["engines"].items():
            acc = f"{row['acceptance']:.0%}" if "acceptance" in row else ""
            if "lookup_share" in row:
                acc += f" ({row['lookup_share']:.0%} of drafts by lookup)"
            same = {True: "yes", False: "**no**"}.get(row.get("identical_to_plain"), "")
            md.append(f"| {label} | {row['tps']:.1f} | {row['ttft'] * 1000:.0f} ms | {acc} | {same} |")
        md.append("")
    if skipped:
        md += ["skipped: " + "; ".join(skipped)]
    (out / "speculate.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
