"""Fallback exporter for families without a module of ours: optimum's ONNX exporter.

The graph it makes is read back and described in the manifest like any other (names, KV shapes),
so the runtime drives it without knowing who exported it.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from .. import bundle as B


class OptimumUnavailable(Exception):
    pass


def _static_dim(value_info, axis: int) -> int | None:
    dim = value_info.type.tensor_type.shape.dim[axis]
    return dim.dim_value if dim.HasField("dim_value") else None


def describe_graph(model, config) -> tuple[B.GraphIO, dict]:
    """GraphIO and architecture facts read from an exported graph's inputs and outputs."""
    io = B.GraphIO()
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    pattern = re.compile(r"^past_key_values\.(\d+)\.key$")
    layers = sorted(int(m.group(1)) for n in inputs if (m := pattern.match(n)))
    if not layers or layers != list(range(len(layers))):
        raise ValueError(
            f"the exported graph has no per-layer past KV inputs in the expected form: {sorted(inputs)[:6]}"
        )
    L = len(layers)
    if "position_ids" not in inputs:
        io.position_ids = None
    missing = [n for n in io.input_names(L) if n not in inputs] + [
        n for n in io.output_names(L) if n not in outputs
    ]
    if missing:
        raise ValueError(f"the exported graph lacks {missing[:4]}; its KV layout is not one onnxlm can drive")
    past = inputs[io.past_key.format(i=0)]
    if len(past.type.tensor_type.shape.dim) != 4:
        raise ValueError("the exported graph's past KV is not (batch, heads, seq, head_dim)")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv_heads = _static_dim(past, 1) or getattr(config, "num_key_value_heads", None) or heads
    head_dim = _static_dim(past, 3) or getattr(config, "head_dim", None)
    if not head_dim and heads and getattr(config, "hidden_size", None):
        head_dim = config.hidden_size // heads
    if not kv_heads or not head_dim:
        raise ValueError(
            "the exported graph's past KV has no static head count / head size, nor a config to say"
        )
    heads = heads or kv_heads
    facts = dict(
        num_layers=L,
        num_heads=int(heads),
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=int(getattr(config, "hidden_size", heads * head_dim)),
        vocab_size=int(config.vocab_size),
        context_length=int(
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
        ),
    )
    return io, facts


def export_with_optimum(hf_model, tokenizer, config, raw_path: Path, trust_remote_code: bool = False):
    """Export through optimum into `raw_path` (single file); return (GraphIO, facts)."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError:
        raise OptimumUnavailable(
            "--via optimum needs optimum's exporter: pip install 'onnxlm[optimum]' (optimum-onnx; transformers < 4.58)"
        ) from None
    import onnx

    with tempfile.TemporaryDirectory(prefix="onnxlm-optimum-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        hf_model.save_pretrained(src)  # one path for every source kind, GGUF included
        tokenizer.save_pretrained(src)
        main_export(
            str(src),
            out,
            task="text-generation-with-past",
            local_files_only=True,
            do_validation=False,
            trust_remote_code=trust_remote_code,
            no_post_process=True,
        )
        model = onnx.load(str(out / "model.onnx"))  # pulls in its external data
        io, facts = describe_graph(model, config)
        onnx.save_model(
            model,
            str(raw_path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=raw_path.name + ".data",
        )
    return io, facts
