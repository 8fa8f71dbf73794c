"""Quantize with a measured price: every run ends with a quality report against the source bundle,
stored in the new manifest; a perplexity budget fails the run (nothing written) or, with the `auto`
recipe, raises the most sensitive weights to 8 bits one group at a time until it holds.

    quantize_with_report("bundles/fp32", "bundles/int4", "auto", max_ppl_increase=5.0)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import bundle as B
from ..runtime.eval import evaluate, load_engine
from .api import QuantizeError, _check_out, quantize
from .recipes import RECIPES, V_PROJ, Recipe, Rule, Site

# Raised to int8 in this order by `auto`, most sensitive first (per-group KL on SmolLM2: down_proj
# 0.13, v_proj 0.11, head + embedding 0.10, up 0.075, gate 0.04, o 0.03, q 0.02, k 0.02).
AUTO_GROUPS: tuple[tuple[str, Callable[[Site], bool]], ...] = (
    ("MLP down projections in llama.cpp Q4_K_M's layers", lambda s: s.is_mlp_down and s.more_bits_layer),
    ("value projections in those layers", lambda s: s.proj in V_PROJ and s.more_bits_layer),
    ("output head and embedding", lambda s: s.role in ("head", "embedding")),
    ("every MLP down projection", lambda s: s.is_mlp_down),
    ("every value projection", lambda s: s.proj in V_PROJ),
    ("MLP up projections", lambda s: s.proj in ("up_proj", "gate_up_proj", "c_fc", "dense_h_to_4h")),
    ("everything else", lambda s: True),
)


def auto_recipe(groups: int) -> Recipe:
    """The int4 recipe (its own rules first) with the first `groups` of AUTO_GROUPS at int8."""
    rules = RECIPES["int4"].rules + tuple(Rule(what, when, "int8") for what, when in AUTO_GROUPS[:groups])
    return Recipe(
        "auto", f"int4 with {groups} sensitive group(s) at int8", default="int4", rules=rules, dtype="int4"
    )


def _store_report(bundle: Path, report: dict[str, Any], extra: dict[str, Any]) -> None:
    """Add the report to a bundle's manifest (the manifest lists no hash of itself, so nothing else changes)."""
    manifest = B.read_manifest(bundle, staging_ok=True)
    manifest.quantization = {**(manifest.quantization or {}), **extra, "report": report}
    tmp = bundle / f".{B.MANIFEST}.tmp"
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, bundle / B.MANIFEST)


def quantize_with_report(
    bundle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    recipe: str = "int4",
    *,
    max_ppl_increase: float | None = None,
    report: bool = True,
    text: Any = None,
    eval_tokens: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
    **options: Any,
) -> tuple[Path, dict[str, Any] | None]:
    """quantize(), then evaluate against the source; returns (bundle path, report or None).

    The candidate is written to a hidden staging folder beside `out_dir` and moved into place only when
    it passes, so a failed budget leaves no bundle.
    """
    src, out = Path(bundle_dir), Path(out_dir)
    if max_ppl_increase is not None and (not report or max_ppl_increase < 0):
        raise QuantizeError("max_ppl_increase needs the report and a non-negative percentage")
    if recipe == "auto" and max_ppl_increase is None:
        raise QuantizeError("recipe 'auto' needs max_ppl_increase: the budget it raises weights to meet")
    if recipe == "gguf" and options.get("kv_cache", "auto") not in ("auto", "float32"):
        raise QuantizeError("kv_cache applies to the int8 / int4 / int4-mixed recipes, not gguf")
    _check_out(src, out, overwrite)
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    auto = recipe == "auto"
    # auto tries the int4 recipe itself first: with its head at 8 bits it may already hold the budget
    attempts = range(0, len(AUTO_GROUPS) + 1) if auto else [None]
    try:
        for groups in attempts:
            rec = auto_recipe(groups) if auto else recipe
            shutil.rmtree(staging, ignore_errors=True)
            if rec == "gguf":  # the source GGUF's own blocks, not a recipe over float weights
                from .gguf_blocks import keep_blocks

                try:
                    keep_blocks(
                        src,
                        staging,
                        options.get("gguf"),
                        accuracy_level=options.get("accuracy_level"),
                        progress=progress,
                        staging=True,
                    )
                except ValueError as e:
                    raise QuantizeError(str(e)) from None
            else:
                quantize(src, staging, rec, progress=progress, staging=True, **options)
            if not report:
                break
            candidate = load_engine(staging, B.check_bundle(staging, staging_ok=True))
            result = evaluate(candidate, text, against=src, max_tokens=eval_tokens, progress=progress)
            del candidate
            change = result["worst"]["ppl_change_pct"]
            if auto:
                raised = f"int8 for {groups} group(s) ({AUTO_GROUPS[groups - 1][0]})" if groups else "int4"
                log(f"auto: {raised}: perplexity {change:+.2f}%")
            if max_ppl_increase is None or change <= max_ppl_increase:
                break
            if not auto or groups == len(AUTO_GROUPS):
                raise QuantizeError(
                    f"perplexity rose {change:+.2f}% (worst text), over the budget of +{max_ppl_increase}%; "
                    "no bundle written (try --recipe auto, int4-mixed or int8)"
                )
        extra: dict[str, Any] = {}
        if auto:
            extra["auto_raised_to_int8"] = [what for what, _ in AUTO_GROUPS[:groups]]
        if max_ppl_increase is not None:
            extra["max_ppl_increase_pct"] = max_ppl_increase
        if report:
            result["bundle"]["path"] = str(out)  # where it will live, not the staging folder
            _store_report(staging, result, extra)
        B.finish_staging(staging)
        B.check_bundle(staging)
        B.swap_in(staging, out)  # the old bundle stays until the new one is complete and in place
        return out, (result if report else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)
