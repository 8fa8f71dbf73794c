"""A tiny random model with a 2048-token window: tool definitions and JSON schemas in the prompt need
more room than the usual tiny bundle's 128 or 256 tokens."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path


@functools.cache
def long_bundle() -> Path:
    from runtime_fixtures import build_bundle

    root = Path(tempfile.mkdtemp(prefix="onnxlm-openai-test-"))
    atexit.register(shutil.rmtree, root, True)
    return build_bundle(root / "tiny-long", context_length=2048).path
