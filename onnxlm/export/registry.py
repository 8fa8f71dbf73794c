"""model_type -> family module. Each family module exposes `build(config, state_dict[, graph]) -> nn.Module`
and, when it can export more than the plain graph, `GRAPHS` (the graphs it exports).

The built module's forward is `(input_ids, attention_mask, [position_ids,] *past) -> (logits, *present)`,
past/present as (batch, kv_heads, seq, head_dim) per layer, key then value; `uses_position_ids` on the
module says whether the middle input exists. The manifest's model facts are read from the built module's
args (`module.a`: layers, heads, sizes), the context window from the family's `context_length(config)`
where it has one, else from the config (convert.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# family module name -> the Hugging Face model_types it serves
FAMILIES: dict[str, tuple[str, ...]] = {
    "llama": ("llama", "mistral"),
    "qwen2": ("qwen2",),
    "phi3": ("phi3",),
    "qwen3": ("qwen3",),
    "olmo2": ("olmo2",),
    "granite": ("granite",),
    "smollm3": ("smollm3",),
    "gemma2": ("gemma2",),
    "gemma3": ("gemma3_text",),
    "gpt2": ("gpt2",),
    "bloom": ("bloom",),
}


class UnsupportedModel(Exception):
    pass


def supported_model_types() -> list[str]:
    return sorted(t for types in FAMILIES.values() for t in types)


def family_for(model_type: str) -> str:
    for family, types in FAMILIES.items():
        if model_type in types:
            return family
    raise UnsupportedModel(
        f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}. "
        "Other families can be exported through optimum's exporter: --via optimum "
        "(pip install 'onnxlm[optimum]')"
    )


@dataclass
class Family:
    name: str
    module: object

    @property
    def graphs(self) -> tuple[str, ...]:
        """The graphs this family exports ("plain", "fused")."""
        return tuple(getattr(self.module, "GRAPHS", ("plain",)))

    def build(self, config, state_dict, graph: str = "plain"):
        if graph == "plain":
            return self.module.build(config, state_dict)
        return self.module.build(config, state_dict, graph=graph)


def get_family(model_type: str) -> Family:
    name = family_for(model_type)
    return Family(name, importlib.import_module(f"onnxlm.export.models.{name}"))
