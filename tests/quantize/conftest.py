"""The quantize tests' fixture: float32 reference bundles of tiny models that take weight noise the way a
trained model does, so that a quantized model's tokens can be held to the reference's top-N."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures import make_hf_folder


def condition(folder: Path) -> Path:
    """Rescale a tiny model's weights in place so that it tolerates small weight noise like a trained one.

    make_hf_folder's N(0, 0.3) weights grow activations ~5x per MatMul: that chaotic model flips its
    top-5 under any 4-bit noise. Here linear weights are scaled to N(0, 1/fan_in), and an untied head
    is the embedding plus a little noise (trained heads also rank tokens like the input embedding;
    an exact copy would be deduplicated by the exporter into a tied weight)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    for name, w in tensors.items():
        if w.ndim == 2 and "embed" not in name and "lm_head" not in name:
            tensors[name] = (w / np.sqrt(w.shape[1]) / 0.3).astype(w.dtype)  # (out, in)
    if "lm_head.weight" in tensors:
        noise = np.random.default_rng(0).normal(0, 0.03, tensors["lm_head.weight"].shape)
        tensors["lm_head.weight"] = (tensors["model.embed_tokens.weight"] + noise).astype(np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def conditioned(tmp_path_factory):
    """conditioned(model_type, graph=None, **config) -> the float32 bundle of a conditioned tiny model
    (config overrides make_hf_folder's), exported once per session and graph (None: the default)."""
    from onnxlm.export.convert import export

    root = tmp_path_factory.mktemp("conditioned")
    folders: dict[tuple, Path] = {}
    bundles: dict[tuple, Path] = {}

    def get(model_type: str, graph: str | None = None, **config) -> Path:
        key = (model_type, tuple(sorted(config.items())))
        if key not in folders:
            folders[key] = condition(make_hf_folder(root / f"hf-{len(folders)}", model_type, **config))
        if (key, graph) not in bundles:
            options = {"graph": graph} if graph else {}
            out = root / f"{model_type}-{len(bundles)}-{graph}"
            bundles[key, graph] = export(folders[key], out, progress=False, **options)
        return bundles[key, graph]

    return get
