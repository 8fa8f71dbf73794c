"""onnxlm: export Transformer language models to ONNX bundles and run them with onnxruntime.

import onnxlm
onnxlm.export("smollm2", "bundles/smollm2")
engine = onnxlm.load("bundles/smollm2")
print(engine.chat([{"role": "user", "content": "Hello"}]).text)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Engine", "load", "export", "__version__"]


def __getattr__(name):  # lazy: `import onnxlm` stays light, and never imports torch
    if name in ("Engine", "load"):
        from . import runtime

        return getattr(runtime, name)
    if name == "export":  # the subpackage, callable as onnxlm.export(source, out_dir, **options)
        import importlib

        return importlib.import_module(".export", __name__)
    raise AttributeError(f"module 'onnxlm' has no attribute {name!r}")
