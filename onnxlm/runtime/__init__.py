"""The runtime: onnxruntime, numpy, tokenizers and jinja2 only (never torch or transformers).

from onnxlm.runtime import load
engine = load("bundle/")
print(engine.generate("Hello", max_new_tokens=20).text)
"""

from .engine import Chunk, Completion, Engine, Timings, Usage, load
from .sampling import make_logits_processors, make_sampler

__all__ = [
    "Chunk",
    "Completion",
    "Engine",
    "Timings",
    "Usage",
    "load",
    "make_logits_processors",
    "make_sampler",
]
