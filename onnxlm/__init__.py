"""onnxlm: export Transformer language models to ONNX bundles and run them with onnxruntime.

import onnxlm
onnxlm.export("smollm2", "bundles/smollm2")
engine = onnxlm.load("bundles/smollm2")
print(engine.chat([{"role": "user", "content": "Hello"}]).text)
"""

from __future__ import annotations

# the function, bound over the subpackage's name (as mlx_lm binds `convert`); it imports torch only when
# called, and `from onnxlm.export.convert import ...` still finds the subpackage in sys.modules
from .export import export

__version__ = "0.1.0"

__all__ = ["Engine", "load", "export", "__version__"]


def __getattr__(name):  # lazy: `import onnxlm` stays light (no onnxruntime until the runtime is used)
    if name in ("Engine", "load"):
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'onnxlm' has no attribute {name!r}")
