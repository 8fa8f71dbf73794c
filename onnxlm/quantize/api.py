"""quantize(): a float32 bundle in, a new quantized bundle out (atomically; the source untouched)."""

from __future__ import annotations

import datetime
import functools
import os
import time
from pathlib import Path
from typing import Any

from .. import bundle as B
from .recipes import KV_CHOICES, RECIPES, SCHEMES, get_recipe

BLOCK_SIZES = (16, 32, 64, 128)
ALGORITHMS = ("rtn", "hqq", "gptq")


class QuantizeError(ValueError):
    """A quantize request that cannot be carried out; the message says why."""


def quantize(
    bundle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    recipe: str = "int4",
    *,
    block_size: int = 32,
    scheme: str = "min",
    accuracy_level: int = 4,
    algorithm: str = "rtn",
    calibration_text: str | None = None,
    kv_cache: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    staging: bool = False,
) -> Path:
    """Write a quantized copy of the float32 bundle `bundle_dir` to `out_dir`; returns out_dir.

    recipe: int8 | int4 | int4-mixed | fp16 (see recipes.RECIPES). block_size, scheme (of 4-bit
    weights: min = per-block scale and float minimum, sym, asym = integer zero point; see pack.py),
    accuracy_level (MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute) and algorithm
    (rtn | hqq | gptq; gptq needs calibration_text) apply to the integer recipes. kv_cache: float32 |
    float16 | int8 (kv.py; int8 scales calibrated on calibration_text, else the built-in eval texts),
    with any recipe but fp16 (whose cache is float16 already), or auto (auto_kv_cache: int8 for the
    int4 recipe over the fused graph, float32 otherwise). staging: mark the
    result unfinished so that it does not load until bundle.finish_staging (quantize_with_report's use).
    """
    started = time.perf_counter()
    rec = _check_options(recipe, block_size, scheme, accuracy_level, algorithm, calibration_text, kv_cache)
    src = Path(bundle_dir)
    manifest = B.check_bundle(src, verify_hashes=True)  # hashes: provenance names what we really read
    if manifest.dtype != "float32" or manifest.quantization:
        raise QuantizeError(
            f"{src}: is already quantized ({manifest.dtype}); quantize the float32 bundle it was made from"
        )
    _check_out(src, Path(out_dir), overwrite)
    writer = B.BundleWriter(out_dir, overwrite=overwrite, staging=staging)

    import onnx
    from tqdm.auto import tqdm

    from . import graph as G

    model = onnx.load(str(src / B.MODEL), load_external_data=False)
    if rec.name == "fp16":
        model = onnx.shape_inference.infer_shapes(model)  # types for the converter's casts, weights unloaded
    B.load_weights(model, src)  # (onnx's loader refuses a data file with several hard links)
    facts, io = manifest.model, B.GraphIO(**vars(manifest.io))
    if kv_cache == "auto":
        kv_cache = auto_kv_cache(rec.name, model, io)
        _check_options(recipe, block_size, scheme, accuracy_level, algorithm, calibration_text, kv_cache)
    sites = G.find_sites(model, facts.num_layers, facts.hidden_size, facts.vocab_size)
    if not sites:
        raise QuantizeError(f"{src / B.MODEL}: no MatMul, Gemm or embedding Gather reads a float32 weight")
    if kv_cache != "float32":
        _kv_check(model, io, kv_cache, src)  # before the long work, not after it
    bar = tqdm(total=len(sites) + 2, desc=f"quantize {rec.name}", unit="weight", disable=not progress)
    try:
        if rec.name == "fp16":
            model, record = _fp16(model, sites, manifest, io)
            bar.update(len(sites))
        else:
            from .weights import Settings

            settings = Settings(block_size, scheme, accuracy_level, algorithm)
            record = _integer(model, sites, rec, src, manifest, settings, calibration_text, bar)
        if kv_cache != "float32":
            bar.set_postfix_str(f"{kv_cache} KV cache")
            record["kv_cache"] = _kv_cache(model, src, manifest, io, kv_cache, calibration_text)
        with writer as tmp:
            bar.set_postfix_str("writing")
            B.save_graph(model, tmp)
            del model
            B.copy_side_files(manifest, src, tmp)
            bar.update()
            bar.set_postfix_str("loading in onnxruntime")
            _check_loads(tmp / B.MODEL)
            bar.update()
            record["bytes"] = {
                "before": (src / B.MODEL_DATA).stat().st_size,
                "after": (tmp / B.MODEL_DATA).stat().st_size,
            }
            record["seconds"] = round(time.perf_counter() - started, 1)
            return writer.commit(_manifest(manifest, src, io, rec.dtype, record))
    finally:
        bar.close()


def _check_options(recipe, block_size, scheme, accuracy_level, algorithm, calibration_text, kv_cache="auto"):
    try:
        rec = get_recipe(recipe)
    except ValueError as e:
        raise QuantizeError(str(e)) from None
    if block_size not in BLOCK_SIZES:
        raise QuantizeError(
            f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}; got {block_size!r}"
        )
    if scheme not in SCHEMES:
        raise QuantizeError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    if algorithm == "hqq" and scheme != "min":
        raise QuantizeError("algorithm 'hqq' finds float zero points: it needs scheme 'min'")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise QuantizeError(f"accuracy_level must be 0-4 (4: int8 compute on CPU); got {accuracy_level!r}")
    if algorithm not in ALGORITHMS:
        raise QuantizeError(f"unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    if algorithm != "rtn" and rec.default != "int4":
        raise QuantizeError(f"algorithm {algorithm!r} applies to the 4-bit recipes; {recipe} uses rtn")
    if algorithm == "gptq" and not (isinstance(calibration_text, str) and calibration_text.strip()):
        raise QuantizeError(
            "algorithm 'gptq' needs calibration_text: representative text, ideally thousands of tokens"
        )
    if kv_cache not in KV_CHOICES:
        raise QuantizeError(f"kv_cache must be one of {', '.join(KV_CHOICES)}; got {kv_cache!r}")
    if kv_cache not in ("float32", "auto") and rec.name == "fp16":
        raise QuantizeError("the fp16 recipe's KV cache is float16 already; kv_cache applies to the others")
    if calibration_text is not None and algorithm != "gptq" and kv_cache not in ("int8", "auto"):
        raise QuantizeError("calibration_text is only used by algorithm 'gptq' and an int8 kv_cache")
    return rec


def auto_kv_cache(recipe: str, model, io: B.GraphIO) -> str:
    """The KV cache `quantize(kv_cache="auto")` gives recipe `recipe`'s bundle of `model` (with `io`):
    int8 for the int4 recipe where the graph can take it (the fused graph), float32 otherwise. On CPU
    the int8 cache decodes int4 about as fast as the float32 one up to ~500 tokens and faster beyond
    (SmolLM2: 1.13x at 2,000 tokens, 1.15x / 1.38x at 4,000 / 7,900; benchmarks/README.md), at a
    quarter of the cache's memory, and its verify calls compute what its decode steps do, so
    speculation is exact. The other recipes keep the float32 cache they were measured with."""
    from . import kv

    if recipe != "int4":
        return "float32"
    try:
        kv.check("int8", model, io)
    except kv.KVCacheError:
        return "float32"
    return "int8"


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse an output that is, holds or lies in the source, is a link, or holds links."""
    if out.is_symlink():
        raise QuantizeError(f"{out}: is a symbolic link; refusing to write through it")
    s, o = src.resolve(), out.resolve()
    if o == s:
        raise QuantizeError(f"{out}: is the source bundle; write the quantized bundle to a new folder")
    if s in o.parents:
        raise QuantizeError(f"{out}: lies inside the source bundle {src}; choose a folder outside it")
    if o in s.parents:
        raise QuantizeError(f"{out}: contains the source bundle {src}; choose another folder")
    if not out.exists():
        return
    if not overwrite:
        raise QuantizeError(f"{out}: already exists (pass overwrite=True to replace it)")
    if not out.is_dir():
        raise QuantizeError(f"{out}: exists and is not a folder; refusing to replace it")
    for root, dirs, files in os.walk(out, followlinks=False):
        for name in dirs + files:
            if (Path(root) / name).is_symlink():
                raise QuantizeError(
                    f"{Path(root) / name}: a symbolic link inside {out}; refusing to replace a folder that holds links"
                )
    if (out / B.MANIFEST).is_file():
        B.read_manifest(out)  # raises BundleError when it is not one of ours
    elif any(out.iterdir()):
        raise QuantizeError(f"{out}: exists and is not an onnxlm bundle; refusing to replace it")


def _check_loads(model_path: Path) -> None:
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / NotImplemented types
        raise QuantizeError(f"the quantized graph does not load in onnxruntime: {e}") from None


def _integer(model, sites, rec, src, manifest, settings, text, bar) -> dict:
    from . import weights as W

    formats = W.plan(sites, lambda site: rec.choose(site, settings.scheme, settings.accuracy_level))
    record: dict[str, Any] = {
        "recipe": rec.name,
        "summary": rec.summary,
        "rules": rec.describe(settings.scheme, settings.accuracy_level),
        "algorithm": settings.algorithm,
        "algorithm_scope": "4-bit weights (gptq: those with a MatMul input to calibrate on); 8-bit weights use rtn",
        "block_size": settings.block_size,
        "scheme": settings.scheme,
        **({"min_form": settings.min_form} if settings.scheme == "min" else {}),
        "scales_stored_as": "float32",
        "accuracy_level": settings.accuracy_level,
    }
    results = []
    if settings.algorithm == "gptq":
        from .gptq import calibration_feeds, hessians

        feeds = calibration_feeds(text, src / B.TOKENIZER, manifest)
        groups = W.groups(sites)
        calibrated = [
            g[0]
            for g in groups.values()
            if len(g) == 1 and g[0].role != "embedding" and formats[g[0].node] == "int4"
        ]
        by_name = {n.name: n for n in model.graph.node}
        source = {s.node: by_name[s.node].input[0] for s in calibrated}
        inputs = list(dict.fromkeys((source[s.node], s.k) for s in calibrated))
        for hs in hessians(model, inputs, feeds):
            chunk = [s for s in calibrated if source[s.node] in hs]
            results.append(
                W.apply(model, chunk, formats, settings, {s.node: hs[source[s.node]] for s in chunk}, bar)
            )
        record["calibration"] = {
            "samples": len(feeds),
            "tokens": int(sum(f[manifest.io.input_ids].size for f in feeds)),
        }
        sites = [s for s in sites if s not in calibrated]
    results.append(W.apply(model, sites, formats, settings, None, bar))
    record["nodes"], record["tied"], record["notes"] = {}, [], {}
    for r in results:
        record["nodes"].update(r.nodes)
        record["tied"] += r.tied
        record["notes"].update(r.notes)
    return record


def _kv_check(model, io: B.GraphIO, kind: str, src: Path) -> None:
    from . import kv

    try:
        kv.check(kind, model, io)
    except kv.KVCacheError as e:
        raise QuantizeError(f"{src}: {e}") from None


def _kv_cache(model, src: Path, manifest, io: B.GraphIO, kind: str, text: str | None) -> dict:
    """Rewrite `model` for a `kind` KV cache; int8 scales come from the float32 bundle over `text`
    (default: the built-in evaluation texts, so score an int8-cache bundle on other text too)."""
    from ..rewrites import rotary_dim
    from . import kv

    scales = None
    if kind == "int8":
        if text is None:
            from ..runtime.eval import builtin_texts

            text = "\n\n".join(builtin_texts().values())
        sha = tuple(manifest.files.get(f, {}).get("sha256") for f in (B.MODEL, B.MODEL_DATA))
        try:
            scales = _kv_scales(str(src), sha, text, rotary_dim(model, manifest.model.head_dim))
        except ValueError as e:  # too little text
            raise QuantizeError(f"int8 KV cache calibration: {e}") from None
    return kv.rewrite(model, io, kind, scales)


@functools.lru_cache(maxsize=2)
def _kv_scales(src: str, sha: tuple, text: str, rotary: int) -> tuple:
    """kv.calibrate, once per source bundle (by its graph's and weights' hashes, which quantize has
    checked), text and rotary width: `auto` quantizes the same source several times."""
    from . import kv

    root = Path(src)
    return tuple(kv.calibrate(root, B.read_manifest(root), text, rotary))


def _fp16(model, sites, manifest, io: B.GraphIO):
    from ..rewrites import unwrap_long_decode
    from . import fp16

    if unwrap_long_decode(model):  # float16 MatMul has no CPU kernel; GPUs run GroupQueryAttention well
        io.long_decode_from = None

    facts = manifest.model
    state = {
        n.output[0] for n in model.graph.node if n.name in {s.node for s in sites if s.role == "embedding"}
    }
    for i in range(facts.num_layers):
        state |= {io.past_key.format(i=i), io.past_value.format(i=i)}
    model, kept = fp16.convert(model, [io.logits], state)
    io.kv_dtype, io.logits_dtype = "float16", "float32"
    record = {
        "recipe": "fp16",
        "summary": RECIPES["fp16"].summary,
        "nodes": {s.node: "float16" for s in sites},
        "keep_fp32": {
            "ops": list(fp16.KEEP_OPS),
            "scopes": fp16.KEEP_SCOPES.pattern,
            "position_and_mask_subgraph": True,
            "nodes": len(kept),
        },
        "io": {"kv": "float16", "logits": "float32"},
    }
    return model, record


def _manifest(src_manifest: B.Manifest, src: Path, io: B.GraphIO, dtype: str, record: dict) -> B.Manifest:
    import onnx
    import onnxruntime

    from .. import __version__

    files = src_manifest.files
    provenance = dict(src_manifest.provenance)
    provenance["quantized_from"] = {
        "bundle": src.resolve().name,
        "dtype": src_manifest.dtype,
        "model_sha256": files[B.MODEL]["sha256"],
        "data_sha256": files.get(B.MODEL_DATA, {}).get("sha256"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"onnxlm": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    return B.Manifest(
        model=src_manifest.model,
        io=io,
        dtype=dtype,
        quantization=record,
        chat_template=src_manifest.chat_template,
        provenance=provenance,
        validation={},  # the export's figures describe the float32 graph, not this one
    )
