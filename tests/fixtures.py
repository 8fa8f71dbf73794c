"""Tiny random-weight Hugging Face model folders, made on the spot (no hub access needed).

One byte-level BPE tokenizer (trained here on English and Chinese, so Chinese characters split across
tokens), one ChatML template, and `make_hf_folder` serve every test: the family parity tests, the
exporter tests, and (through the real exporter) the runtime tests' bundle.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small model that liked to talk.",
    "Hello world! This is a tiny tokenizer for testing the runtime.",
    "The weather is nice today, and the sun is shining on the river.",
    "Customer service answers questions about orders, refunds and delivery times.",
    "Our HR team explains leave policy, payroll dates and the onboarding checklist.",
    "我们今天去公园散步。",
    "你好，世界！这是一个测试。",
    "机器学习模型可以生成文本。",
    "你好，欢迎使用我们的客服系统。请问有什么可以帮您？",
    "人力资源部负责招聘、培训和员工福利。",
    "Marketing copy should be short, clear and friendly. 市场营销文案要简洁明了。",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 and punctuation: , . ; : ! ? ( ) [ ] { }",
]
# the trainer gives special tokens the first ids, in this order
SPECIALS = ["<|pad|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = SPECIALS[:3]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# model_type -> tiny config overrides (2 layers, GQA where the family has it)
_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
_DECODER = dict(_BASE, intermediate_size=128, num_key_value_heads=2)
TINY = {
    "llama": dict(_DECODER, tie_word_embeddings=False),
    "mistral": dict(_DECODER, sliding_window=16),
    "qwen2": dict(_DECODER, tie_word_embeddings=True),
    "phi3": dict(_DECODER, original_max_position_embeddings=256, rope_scaling=None),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "opt": dict(_BASE, ffn_dim=128, word_embed_proj_dim=64),
    # head_dim 32: not hidden / heads
    "qwen3": dict(_DECODER, head_dim=32, tie_word_embeddings=False),
    "olmo2": dict(_DECODER),
    "granite": dict(
        _DECODER,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0625,
        logits_scaling=8.0,
    ),
    "smollm3": dict(_DECODER, no_rope_layers=[1, 0]),  # layer 1 has no rotary
    # caps small enough to bend the scores and logits of N(0, 0.3) weights; a window shorter than the prompts
    "gemma2": dict(
        _DECODER,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0,
    ),
    "gemma3_text": dict(
        _DECODER,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        rope_local_base_freq=100.0,
    ),
}


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def build_tokenizer():
    """A fresh `tokenizers.Tokenizer` (no post-processor: encoding adds no special tokens)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json())


PAD, BOS, EOS, IM_START, IM_END = (build_tokenizer().token_to_id(t) for t in SPECIALS)
VOCAB = build_tokenizer().get_vocab_size()


def make_hf_folder(
    path: Path,
    model_type: str,
    seed: int = 0,
    *,
    init_std: float = 0.3,
    add_bos: bool = False,
    **overrides,
) -> Path:
    """Write config.json, model.safetensors and a fast tokenizer for a tiny random model.

    Weight matrices are drawn from N(0, init_std) (large enough that greedy tokens are not all the
    same); `add_bos` gives the tokenizer a post-processor that puts BOS before every text;
    `overrides` go into the config (over TINY[model_type] and the special token ids)."""
    import torch
    import transformers
    from tokenizers import processors

    tok = build_tokenizer()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, BOS)]
        )
    kwargs = dict(
        TINY[model_type],
        vocab_size=VOCAB,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    kwargs.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, init_std)
    model.save_pretrained(path, safe_serialization=True)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return Path(path)


def load_hf_model(folder: Path):
    """The folder's model as the reference: fp32, eager attention, eval mode."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def hf_generate(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate, left padded, returning only the new tokens of each prompt."""
    import torch

    model = load_hf_model(folder)
    model.generation_config.eos_token_id = None  # like ignore_eos: always max_new_tokens
    pad = PAD
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
    return [row[width:].tolist() for row in out]
