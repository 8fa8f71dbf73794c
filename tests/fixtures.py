"""Tiny random-weight Hugging Face model folders, made on the spot (no hub access needed)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Customer service answers questions about orders, refunds and delivery times.",
    "Our HR team explains leave policy, payroll dates and the onboarding checklist.",
    "你好，欢迎使用我们的客服系统。请问有什么可以帮您？",
    "人力资源部负责招聘、培训和员工福利。",
    "Marketing copy should be short, clear and friendly. 市场营销文案要简洁明了。",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ; : ! ? ( ) [ ] { }",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# model_type -> tiny config overrides (2 layers, GQA where the family has it)
TINY = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=16,
    ),
    "qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "phi3": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=256,
        rope_scaling=None,
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "opt": dict(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    ),
}


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """A byte-level BPE tokenizer trained on English and Chinese lines (multi-byte chars split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def make_hf_folder(path: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors and a fast tokenizer for a tiny random model."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json())
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|im_end|>")
    bos = tok.token_to_id("<|im_start|>")
    kwargs = dict(TINY[model_type], vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=0)
    kwargs.update(overrides)
    config = transformers.AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random weights large enough that greedy tokens are not all the same
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return Path(path)


def hf_generate(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate, left padded, returning only the new tokens of each prompt."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: always max_new_tokens
    pad = 0
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
