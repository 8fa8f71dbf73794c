"""Tiny bundles for the runtime, serving and benchmark tests: a random Llama (2 layers, hidden 64, tied
embeddings) made by `tests.fixtures.make_hf_folder` with the shared tokenizer and ChatML template,
exported by the real exporter.

`tiny_bundle(graph)` builds it once per process and graph; `long_bundle()` is the same model with a
2048-token window, for prompts that carry tools and JSON schemas.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures import EOS, IM_END, load_hf_model, make_hf_folder


@dataclass
class TinyBundle:
    path: Path
    hf_model: object  # transformers.LlamaForCausalLM (the reference)
    tokenizer: object  # tokenizers.Tokenizer, the bundle's tokenizer.json
    context_length: int


def build_bundle(out: Path, context_length: int = 128, seed: int = 0, graph: str | None = None) -> TinyBundle:
    """Export a tiny random Llama to a bundle at `out` (its HF folder beside it, `<out>-hf`).

    The tokenizer puts BOS first itself (a post-processor, as Llama's does); eos is [</s>, <|im_end|>];
    weights N(0, 0.1) give peakier logits than 0.3: fewer near-ties in greedy parity."""
    from tokenizers import Tokenizer

    from onnxlm.bundle import TOKENIZER
    from onnxlm.export.convert import export

    folder = make_hf_folder(
        out.with_name(out.name + "-hf"),
        "llama",
        seed,
        init_std=0.1,
        add_bos=True,
        max_position_embeddings=context_length,
        tie_word_embeddings=True,
        eos_token_id=[EOS, IM_END],
    )
    export(folder, out, graph=graph, progress=False)
    return TinyBundle(out, load_hf_model(folder), Tokenizer.from_file(str(out / TOKENIZER)), context_length)


@functools.cache
def tiny_bundle(graph: str | None = None) -> TinyBundle:
    """The tiny bundle, once per process and graph (None: the exporter's default)."""
    root = Path(tempfile.mkdtemp(prefix="onnxlm-runtime-test-"))
    atexit.register(shutil.rmtree, root, True)
    return build_bundle(root / "tiny", graph=graph)


@functools.cache
def long_bundle() -> Path:
    """Tool definitions and JSON schemas in the prompt need more room than the usual 128 tokens."""
    root = Path(tempfile.mkdtemp(prefix="onnxlm-openai-test-"))
    atexit.register(shutil.rmtree, root, True)
    return build_bundle(root / "tiny-long", context_length=2048).path
