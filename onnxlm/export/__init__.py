"""Export: sources -> per-family PyTorch module -> ONNX -> validated bundle (needs the `export` extra).

`onnxlm.export(source, out_dir, ...)` is this package's `export`: the package root imports it by name,
so `onnxlm.export` is the function and the modules stay reachable as `from onnxlm.export.x import y`.
This file imports nothing at load time: `import onnxlm` must not pull in torch or transformers.
"""

from __future__ import annotations

import os
from pathlib import Path


def export(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    via: str = "onnxlm",
    graph: str | None = None,
    long_decode_from: int | None = None,  # a test holds the two signatures equal
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    validate: bool = True,
    progress: bool = True,
) -> Path:
    """Export a model (Hugging Face folder, .gguf file or default name such as "smollm2") to a
    validated bundle at `out_dir`; returns its path.

    via: "onnxlm" (our per-family modules) or "optimum". graph: "fused" (onnxruntime's contrib
    operators over a shared KV buffer) or "plain" (standard ONNX operators); None: fused where the
    family and config allow it. long_decode_from: on the fused graph, decode steps holding at least this
    many tokens compute attention as MatMul / Softmax; None (the default): GroupQueryAttention always. Pickle
    checkpoints need allow_pickle, a repository's own code trust_remote_code; an existing `out_dir`
    is replaced only with overwrite. See onnxlm.export.convert.export."""
    from .convert import export as convert

    return convert(
        source,
        out_dir,
        via=via,
        graph=graph,
        long_decode_from=long_decode_from,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
        validate=validate,
        progress=progress,
    )
