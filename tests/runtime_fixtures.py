"""A tiny bundle for the runtime tests: random Llama (2 layers, hidden 64), byte-level BPE tokenizer
trained here on English and Chinese (so Chinese characters split across tokens), ChatML template.

`tiny_bundle()` builds it once per process. Until onnxlm.export.convert exists this exports with our
llama module directly; swap `_export` for the real exporter when it lands.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ["<|pad|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD, BOS, EOS, IM_START, IM_END = range(len(SPECIALS))

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model that liked to talk.",
    "Hello world! This is a tiny tokenizer for testing the runtime.",
    "The weather is nice today, and the sun is shining on the river.",
    "我们今天去公园散步。",
    "你好，世界！这是一个测试。",
    "机器学习模型可以生成文本。",
    "Numbers: 1 2 3 4 5 6 7 8 9 10, and some punctuation ; : ? !",
]


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


@dataclass
class TinyBundle:
    path: Path
    hf_model: object  # transformers.LlamaForCausalLM (the reference)
    tokenizer: object  # tokenizers.Tokenizer
    context_length: int


def _export(module, path: Path, num_layers: int, kv_heads: int, head_dim: int) -> None:
    """ONNX export with the manifest's GraphIO names and dynamic axes; weights as one external file."""
    import onnx
    import torch

    from onnxlm.bundle import MODEL_DATA, GraphIO

    io = GraphIO()
    ids = torch.randint(0, 100, (2, 5))
    mask = torch.ones(2, 8, dtype=torch.long)
    pos = torch.arange(3, 8).expand(2, 5)
    past = [torch.randn(2, kv_heads, 3, head_dim) for _ in range(2 * num_layers)]
    raw = path.parent / "raw.onnx"
    torch.onnx.export(
        module,
        (ids, mask, pos, *past),
        str(raw),
        input_names=io.input_names(num_layers),
        output_names=io.output_names(num_layers),
        dynamic_axes=io.dynamic_axes(num_layers),
        opset_version=17,
        dynamo=False,
    )
    proto = onnx.load(str(raw))
    raw.unlink()
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=MODEL_DATA,
        size_threshold=0,
    )


def build_bundle(out: Path, context_length: int = 128, seed: int = 0) -> TinyBundle:
    import warnings

    import torch
    import transformers

    from onnxlm.bundle import MODEL, TOKENIZER, BundleWriter, GraphIO, Manifest, ModelFacts
    from onnxlm.export.models import llama

    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=[EOS, IM_END],
        pad_token_id=PAD,
        initializer_range=0.1,  # peakier logits than 0.02: fewer near-ties in greedy parity
    )
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    module = llama.build(cfg, hf.state_dict())
    facts = ModelFacts(
        model_type="llama",
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        hidden_size=64,
        vocab_size=vocab,
        context_length=context_length,
        bos_token_id=BOS,
        eos_token_ids=[EOS, IM_END],
        pad_token_id=PAD,
        add_bos_token=True,
    )
    writer = BundleWriter(out)
    with writer as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _export(module, tmp / MODEL, 2, 2, 16)
        tok.save(str(tmp / TOKENIZER))
        writer.commit(
            Manifest(model=facts, io=GraphIO(), chat_template=CHAT_TEMPLATE, provenance={"source": "tests"})
        )
    return TinyBundle(out, hf, tok, context_length)


@functools.cache
def tiny_bundle() -> TinyBundle:
    root = Path(tempfile.mkdtemp(prefix="onnxlm-runtime-test-"))
    atexit.register(shutil.rmtree, root, True)
    return build_bundle(root / "tiny")
