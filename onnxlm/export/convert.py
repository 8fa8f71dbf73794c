"""source -> family module -> ONNX -> validated bundle.

torch and transformers are imported here, lazily, and nowhere in the runtime.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from .. import bundle as B
from . import sources

log = logging.getLogger("onnxlm")

OPSET = 17
GRAPHS = ("fused", "plain")
# What `export` writes when no graph is asked for (where the family has it; else plain). The fused graph
# passes the parity tests of every llama-like family, but quantize/ and eval still feed the plain graph's
# inputs (attention_mask, position_ids, empty past) themselves: flip this once they use Model.logits.
DEFAULT_GRAPH = "fused"  # plain stays for families and configs the fused operators cannot run
VALIDATION_PROMPT = "The capital of France is Paris. The capital of Germany is"


class ExportError(Exception):
    pass


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from .. import __version__

    return {
        "onnxlm": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _source_sha256(src: sources.Source) -> str:
    if src.kind == "gguf":
        return B.sha256_file(src.path)
    h = hashlib.sha256()  # folder: a hash over its config and weight files, in name order
    for f in sorted(src.path.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json") or f.suffix in sources.PICKLE_SUFFIXES):
            h.update(f.name.encode())
            h.update(B.sha256_file(f).encode())
    return h.hexdigest()


def load_source(src: sources.Source, trust_remote_code: bool = False, check_family: bool = True):
    """Load (transformers model in fp32, fast tokenizer) from a resolved source."""
    import torch
    import transformers

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if src.kind == "gguf":
        folder, kwargs["gguf_file"] = str(src.path.parent), src.path.name
    else:
        folder = str(src.path)  # sources.resolve already refused pickle-only folders unless allowed
    config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
    from .registry import family_for

    if check_family:
        family_for(config.model_type)  # fail before loading weights for an unsupported family
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as e:
        raise ExportError(f"{src.path}: could not load a tokenizer ({type(e).__name__}: {e})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(
            f"{src.path}: needs a fast (tokenizers) tokenizer; found {type(tokenizer).__name__}"
        )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", **kwargs
    ).eval()
    return config, model, tokenizer


def special_tokens(config, model, tokenizer) -> dict[str, Any]:
    """bos / eos / pad ids from the config, generation config and tokenizer, and whether the runtime
    must prepend BOS itself (the HF tokenizer adds it but tokenizer.json alone does not)."""
    eos: list[int] = []
    for cfg in (getattr(model, "generation_config", None), config):
        value = getattr(cfg, "eos_token_id", None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in eos:
                eos.append(v)
    if not eos and tokenizer.eos_token_id is not None:
        eos.append(int(tokenizer.eos_token_id))
    bos = config.bos_token_id if config.bos_token_id is not None else tokenizer.bos_token_id
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    hf_ids = tokenizer("hello world")["input_ids"]
    raw_ids = tokenizer.backend_tokenizer.encode("hello world").ids
    add_bos = bos is not None and hf_ids == [bos] + raw_ids
    return {"bos_token_id": bos, "eos_token_ids": eos, "pad_token_id": pad, "add_bos_token": add_bos}


def chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template


def context_length(family_module, config) -> int:
    if hasattr(family_module, "context_length"):
        return int(family_module.context_length(config))
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    raise ExportError(f"the {config.model_type} config gives no context length")


def build_module(family, config, state, graph: str | None):
    """The family's module for `graph` (None: DEFAULT_GRAPH where the family has it and the config allows,
    else plain, the reason in the module's `fallback_reason`). What neither graph can reproduce is refused
    with an ExportError that names it."""
    wanted = graph or (DEFAULT_GRAPH if DEFAULT_GRAPH in family.graphs else "plain")
    if wanted not in family.graphs:
        raise ExportError(f"{config.model_type} has no {wanted} graph; it exports {', '.join(family.graphs)}")
    reason = None
    if wanted != "plain":
        try:
            return family.build(config, state, graph=wanted)
        except NotImplementedError as e:
            if graph is not None:
                raise ExportError(f"{config.model_type}: no {wanted} graph for this config ({e})") from None
            reason = f"no {wanted} graph: {e}"
    try:
        module = family.build(config, state)
    except NotImplementedError as e:
        raise ExportError(f"cannot export this {config.model_type} model: {e}") from None
    if reason:
        log.warning("%s: exporting the plain graph (%s)", config.model_type, reason)
    module.fallback_reason = reason
    return module


def _trace_args(io: B.GraphIO, vocab: int, num_layers: int, kv_heads: int, head_dim: int) -> list[Any]:
    """Example inputs for tracing: batch 2, 3 new positions after 4 cached ones (a buffer of 8 when shared)."""
    import torch

    batch, seq, past = 2, 3, 4
    args: list[Any] = [torch.randint(0, vocab, (batch, seq))]
    if io.shared:
        args += [
            torch.full((batch,), past + seq - 1, dtype=torch.int32),  # seqlens_k
            torch.tensor(past + seq, dtype=torch.int32),  # total_sequence_length
            torch.full((batch,), seq, dtype=torch.int32),  # query_seqlens
            torch.arange(seq).expand(batch, seq).contiguous(),  # logits_index
        ]
        past = 2 * (past + seq) - seq  # capacity 8: the buffer is larger than what it holds
    else:
        args.append(torch.ones(batch, past + seq, dtype=torch.int64))
        if io.position_ids:
            args.append(torch.arange(past, past + seq).expand(batch, seq).contiguous())
    args += [torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * num_layers)]
    if io.long_rope:  # after the KV tensors (decoder.split_long_rope): one row long, one short
        args.append(torch.tensor([1, 0], dtype=torch.int64))
    return args


def export_module(module, io: B.GraphIO, num_layers: int, kv_heads: int, head_dim: int, path: Path) -> None:
    """Trace the module to ONNX at `path` (weights inline; the caller moves them to external data)."""
    import torch

    args = _trace_args(io, module.a.vocab_size, num_layers, kv_heads, head_dim)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(args),
            str(path),
            input_names=io.input_names(num_layers),
            output_names=io.output_names(num_layers),
            dynamic_axes=io.dynamic_axes(num_layers),
            opset_version=OPSET,
            custom_opsets={"com.microsoft": 1},
            dynamo=False,
            do_constant_folding=True,
        )


def _drop_unused_outputs(model) -> None:
    """Unname the optional outputs nothing reads (SkipSimplifiedLayerNormalization's mean and inverse
    standard deviation), so onnxruntime does not compute them."""
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.domain == "com.microsoft":
            for i in range(1, len(node.output)):
                if node.output[i] not in used:
                    node.output[i] = ""


def rotary_caches_in_graph(model, caches: dict[str, tuple], context: int) -> bool:
    """Replace the cos/sin cache initializers (context × rotary_dim/2 floats each, 2 MB for SmolLM2)
    by the nodes that compute them from inv_freq; onnxruntime folds them when it loads the model, so
    the kernels see the same constants and the bundle carries a few hundred bytes instead.

    caches: cache name suffix ("" for cos_cache / sin_cache, "_local") -> [(inv_freq, scaling)], segments of
    `context` positions each, one after the other (a longrope cache: its short entries, then its long ones)."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    present = {k: v for k, v in caches.items() if f"cos_cache{k}" in inits and f"sin_cache{k}" in inits}
    if not present:
        return False
    consts = {
        "rotary_start": np.array(0, np.float32),
        "rotary_limit": np.array(context, np.float32),
        "rotary_delta": np.array(1, np.float32),
        "rotary_axis": np.array([1], np.int64),
    }
    nodes = [
        helper.make_node("Range", ["rotary_start", "rotary_limit", "rotary_delta"], ["rotary_pos"]),
        helper.make_node("Unsqueeze", ["rotary_pos", "rotary_axis"], ["rotary_pos2d"]),
    ]
    for suffix, segments in present.items():
        for name in (f"cos_cache{suffix}", f"sin_cache{suffix}"):
            model.graph.initializer.remove(inits[name])
        parts: dict[str, list[str]] = {"cos": [], "sin": []}
        for j, (inv_freq, scaling) in enumerate(segments):
            tag = suffix if j == 0 else f"{suffix}_{j}"  # the first segment keeps the old names
            consts[f"rotary_inv_freq{tag}"] = np.asarray(inv_freq, np.float32)
            freqs = f"rotary_freqs{tag}"
            nodes.append(helper.make_node("Mul", ["rotary_pos2d", f"rotary_inv_freq{tag}"], [freqs]))
            if scaling != 1.0:
                consts[f"rotary_scaling{tag}"] = np.array(scaling, np.float32)
            for fn, kind in (("Cos", "cos"), ("Sin", "sin")):
                out = f"{kind}_cache{suffix}" if len(segments) == 1 else f"{kind}_cache{tag}_segment"
                raw = out if scaling == 1.0 else f"{out}_unscaled"
                nodes.append(helper.make_node(fn, [freqs], [raw]))
                if raw != out:
                    nodes.append(helper.make_node("Mul", [raw, f"rotary_scaling{tag}"], [out]))
                parts[kind].append(out)
        if len(segments) > 1:
            for kind, outs in parts.items():
                nodes.append(helper.make_node("Concat", outs, [f"{kind}_cache{suffix}"], axis=0))
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    for i, node in enumerate(nodes):
        node.name = f"/rotary_caches/{node.op_type}_{i}"
    for node in reversed(nodes):
        model.graph.node.insert(0, node)
    return True


def write_graph(
    raw_path: Path, bundle_tmp: Path, rotary_spec=None, long_decode_from: int | None = None
) -> None:
    """Move every weight into one external data file beside model.onnx (computing the rotary caches
    in the graph when the module says how; attention switching to MatMul / Softmax for decode steps
    from `long_decode_from` tokens held, see onnxlm/rewrites.py)."""
    import onnx

    from ..rewrites import wrap_long_decode

    model = onnx.load(str(raw_path))  # the family module's output_head keeps a tied head as one tensor
    _drop_unused_outputs(model)
    if rotary_spec is not None:
        rotary_caches_in_graph(model, *rotary_spec)  # (caches, context)
    if long_decode_from is not None:
        wrap_long_decode(model, long_decode_from)
    B.save_graph(model, bundle_tmp)


def export(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    via: str = "onnxlm",
    graph: str | None = None,
    long_decode_from: int | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    validate: bool = True,
    progress: bool = True,
) -> Path:
    """Export a model (HF folder, .gguf file or default name) to a validated bundle at `out_dir`.

    graph: "fused" (onnxruntime's contrib operators over a shared KV buffer) or "plain" (standard ONNX
    operators, KV concatenated each step); None takes DEFAULT_GRAPH, and plain where the family or the
    config cannot have the fused one. long_decode_from: on the fused graph, decode steps holding at
    least this many tokens compute attention as MatMul / Softmax (onnxlm/rewrites.py); None (the default:
    with onnxruntime 1.32 the switch no longer pays end to end) or a number not below the context window:
    GroupQueryAttention always."""
    from tqdm.auto import tqdm

    from .registry import get_family
    from .validate import check_figures, compare

    if via not in ("onnxlm", "optimum"):
        raise ExportError(f"unknown exporter {via!r}; choose onnxlm or optimum")
    if long_decode_from is not None and (isinstance(long_decode_from, bool) or long_decode_from < 1):
        raise ExportError(
            f"long_decode_from must be a positive number of tokens or None, got {long_decode_from!r}"
        )
    if graph not in (None, *GRAPHS):
        raise ExportError(f"unknown graph {graph!r}; choose {' or '.join(GRAPHS)}")
    if via == "optimum" and graph not in (None, "plain"):
        raise ExportError("the optimum exporter writes only the plain graph")
    writer = B.BundleWriter(out_dir, overwrite=overwrite)  # refuse a bad target before any work
    steps = tqdm(total=5, desc="export", disable=not progress, unit="step")
    try:  # an error prints on its own line, under the closed bar
        steps.set_postfix_str("loading")
        src = sources.resolve(source, allow_pickle=allow_pickle)
        config, hf_model, tokenizer = load_source(src, trust_remote_code, check_family=via == "onnxlm")
        steps.update()
        with writer as tmp, tempfile.TemporaryDirectory(prefix="onnxlm-export-") as work:
            raw = Path(work) / "raw.onnx"
            rotary_spec, fallback = None, None
            if via == "optimum":
                from .optimum import export_with_optimum

                steps.set_postfix_str("optimum export")
                io, facts = export_with_optimum(hf_model, tokenizer, config, raw, trust_remote_code)
                steps.update()
            else:
                family = get_family(config.model_type)
                steps.set_postfix_str(f"building {family.name}")
                module = build_module(family, config, hf_model.state_dict(), graph)
                fallback = getattr(module, "fallback_reason", None)
                a = module.a
                if getattr(module, "graph", "plain") == "fused":
                    io = B.GraphIO.shared_buffer()
                else:
                    io = B.GraphIO(position_ids="position_ids" if module.uses_position_ids else None)
                facts = dict(
                    num_layers=a.num_layers,
                    num_heads=a.num_heads,
                    num_kv_heads=a.num_kv_heads,
                    head_dim=a.head_dim,
                    hidden_size=a.hidden_size,
                    vocab_size=a.vocab_size,
                    context_length=context_length(family.module, config),
                )
                steps.update()
                if io.shared and long_decode_from is not None and long_decode_from < facts["context_length"]:
                    io.long_decode_from = long_decode_from
                if getattr(module, "long_rope_after", None) is not None:
                    io.long_rope, io.long_rope_after = "long_rope", module.long_rope_after
                io.dynamic_rope_from = getattr(module, "dynamic_rope_from", None)
                steps.set_postfix_str("tracing to ONNX")
                export_module(module, io, a.num_layers, a.num_kv_heads, a.head_dim, raw)
                rotary_spec = getattr(module, "rotary_spec", None)
                del module
            steps.update()
            steps.set_postfix_str("writing")
            write_graph(raw, tmp, rotary_spec, io.long_decode_from)
            tokenizer.backend_tokenizer.save(str(tmp / B.TOKENIZER))
            steps.update()
            model_facts = B.ModelFacts(
                model_type=config.model_type, **facts, **special_tokens(config, hf_model, tokenizer)
            )
            figures: dict[str, Any] = {}
            if validate:
                steps.set_postfix_str("validating against PyTorch")
                prompt = tokenizer(VALIDATION_PROMPT)["input_ids"]
                figures = compare(tmp / B.MODEL, io, model_facts, hf_model, prompt, steps=8)
                check_figures(figures)
            steps.update()
            steps.close()
            manifest = B.Manifest(
                model=model_facts,
                io=io,
                dtype="float32",
                chat_template=chat_template(tokenizer),
                provenance={
                    "source": f"{src.kind}:{Path(src.name).name}",
                    "source_kind": src.kind,
                    "source_sha256": _source_sha256(src),
                    "exporter": via,
                    **({"graph_fallback": fallback} if fallback else {}),
                    "opset": OPSET,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "versions": _versions(),
                },
                validation=figures,
            )
            return writer.commit(manifest)
    except BaseException:
        steps.close()
        raise
