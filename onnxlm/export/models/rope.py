"""Rotary parameters as transformers 4.x and 5.x both describe them, and the inverse frequencies.

transformers 4.x: `rope_theta` + `rope_scaling` ({"rope_type": ...} or the older {"type": ...});
transformers 5.x: `rope_parameters` (rope_theta inside), per layer type for models whose local and global
layers differ (gemma3: {"sliding_attention": {...}, "full_attention": {...}}).

Three kinds of rotary by how inv_freq depends on the sequence:
  fixed    default, linear, llama3, yarn                 inv_freq and a cos/sin scaling, once
  dynamic  NTK ("dynamic")                               inv_freq of max(position)+1 at each forward (the
                                                         cached keys keep theirs, as in transformers' generate)
  longrope phi3 ("longrope")                             short factors up to original_max_position_embeddings,
                                                         long ones past it (and transformers recomputes the
                                                         cached keys when a sequence crosses it)
"""

from __future__ import annotations

import inspect

import torch

# rope types the exporter reproduces; anything else is refused by name
KNOWN = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def rope_params(config, layer_type: str | None = None) -> dict:
    """One layer type's rope parameters as a flat dict with rope_type, rope_theta and
    partial_rotary_factor always present."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if all(isinstance(v, dict) for v in params.values()):  # per layer type (transformers 5)
            params = params[layer_type or "full_attention"]
        out = dict(params)
    else:
        out = dict(getattr(config, "rope_scaling", None) or {})
        out.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    out["rope_type"] = out.get("rope_type", out.get("type", "default"))
    out.setdefault("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return out


def per_layer_type(config) -> bool:
    params = getattr(config, "rope_parameters", None)
    return isinstance(params, dict) and bool(params) and all(isinstance(v, dict) for v in params.values())


def rotary_dim(params: dict, head_dim: int) -> int:
    return int(head_dim * params["partial_rotary_factor"])


def default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def hf_inv_freq(config, params: dict, layer_type: str | None = None, **kwargs):
    """transformers' own initialiser for a rope type: (inv_freq, cos/sin scaling)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS[params["rope_type"]]
    if layer_type is not None and "layer_type" in inspect.signature(fn).parameters and per_layer_type(config):
        kwargs["layer_type"] = layer_type
    inv_freq, scaling = fn(config, "cpu", **kwargs)
    return inv_freq.float(), float(scaling)


def check_known(params: dict, model_type: str) -> None:
    if params["rope_type"] not in KNOWN:
        raise NotImplementedError(
            f"{model_type}: rope_type {params['rope_type']!r} is not exported (known: {', '.join(KNOWN)})"
        )


def original_length(config, params: dict) -> int:
    """The pretraining context a longrope model switches factors at."""
    return int(
        params.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or config.max_position_embeddings
    )


def dynamic_inv_freq(
    seq_len: torch.Tensor, base: float, dim: int, factor: float, max_pos: int
) -> torch.Tensor:
    """NTK inv_freq for a sequence of `seq_len` (a 0-d tensor, traced), as transformers computes it:
    the base grows once the sequence passes max_position_embeddings."""
    seq = torch.clamp(seq_len.float(), min=float(max_pos))
    grown = base * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (grown**exponents)


def context_length(config) -> int:
    """The context a model serves: max_position_embeddings, stretched by the factor for dynamic NTK (whose
    max_position_embeddings is where the stretching starts; the other scalings state the extended one)."""
    params = rope_params(config)
    if params["rope_type"] == "dynamic":
        return int(config.max_position_embeddings * float(params["factor"]))
    return int(config.max_position_embeddings)
