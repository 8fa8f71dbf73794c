"""What the CLI's commands do, as plain functions: the CLI parses options and calls these.

This is the top layer (it may use export, quantize and the runtime); nothing imports it but cli.py.
"""

from __future__ import annotations

from pathlib import Path

from . import bundle as B


def default_gguf(bundle_dir: str | Path) -> Path | None:
    """The cached GGUF of the default model a bundle was exported from (`onnxlm pull` put it there), or
    None: never fetched here."""
    from .export import sources

    want = B.read_manifest(Path(bundle_dir)).provenance.get("source_sha256")
    for p in sources.DEFAULTS.values():
        if p.gguf_sha256 == want and sources.cached_gguf(p).is_file():
            return sources.cached_gguf(p)
    return None
