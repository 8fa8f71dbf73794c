"""The grammar mask's cost per decode step: constrained rows (llguidance's batched mask fill plus the
mask applied in the numpy sampler) against the same batch unconstrained.

    python benchmarks/grammar_mask.py BUNDLE                   # batch 1 and 8, a JSON schema
    python benchmarks/grammar_mask.py BUNDLE --batch 1 4 8 --steps 64 --json out.json

Each batch runs `--steps` decode steps twice through the public token-step generator
(generate.generate_steps): free, and with every row under the schema. A step's time is its forward
pass plus its sampling (which with a grammar includes fill_masks); the mask's cost is the extra
sampling time per step as a fraction of the constrained step. Targets: <= 10% at batch 1, <= 15% at 8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxlm.runtime import load  # noqa: E402
from onnxlm.runtime.batch import generate_steps  # noqa: E402
from onnxlm.runtime.generate import GenerationParams  # noqa: E402

# long enough to fill the steps: a list of records with strings, numbers and enums
SCHEMA = {
    "type": "array",
    "minItems": 64,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "user", "guest"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
}
PROMPT = "Write a JSON list of people with their name, age and role:\n"


def run(engine, batch: int, steps: int, constrained: bool) -> tuple[float, float, int]:
    """(median forward s, median sample s, steps run) over the decode steps (the prefill's left out)."""
    params = GenerationParams(
        max_new_tokens=steps + 1,
        temperature=1.0,
        seed=0,
        ignore_eos=not constrained,
        json_schema=SCHEMA if constrained else None,
    )
    ids = [engine.tokenizer.encode(PROMPT + " " * i) for i in range(batch)]  # rows differ a little
    forward, sample = [], []
    for step in generate_steps(engine.model, engine.tokenizer, ids, params):
        if step.index > 0 and len(step.outputs) == batch:  # only steps with every row still running
            forward.append(step.forward_s)
            sample.append(step.sample_s)
    return statistics.median(forward), statistics.median(sample), len(forward)


def measure(engine, batch: int, steps: int) -> dict:
    run(engine, batch, 4, True)  # warm up: the tokenizer for llguidance, the session's first calls
    f_free, s_free, _ = run(engine, batch, steps, False)
    f_con, s_con, n = run(engine, batch, steps, True)
    step = f_con + s_con
    return {
        "batch": batch,
        "steps": n,
        "forward_ms": round(1e3 * f_con, 3),
        "sample_free_ms": round(1e3 * s_free, 3),
        "sample_constrained_ms": round(1e3 * s_con, 3),
        "mask_ms": round(1e3 * (s_con - s_free), 3),
        "mask_fraction": round((s_con - s_free) / step, 4),
        "target": 0.10 if batch == 1 else 0.15,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", dest="json_out", default=None, help="Write the figures to this file.")
    args = ap.parse_args()
    engine = load(args.bundle, threads=args.threads)
    rows = [measure(engine, b, args.steps) for b in args.batch]
    print(
        "| batch | steps | forward ms | sample ms free | sample ms constrained | mask ms | mask / step | target |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['steps']} | {r['forward_ms']:.2f} | {r['sample_free_ms']:.2f} | "
            f"{r['sample_constrained_ms']:.2f} | {r['mask_ms']:.2f} | {100 * r['mask_fraction']:.1f}% | "
            f"<= {100 * r['target']:.0f}% |"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
