"""Every family module against transformers on tiny random-weight models:

(a) prefill logits at batch 2 with left padding, (b) prefill then one-token decode steps through our
explicit past/present against a full no-cache forward, (c) greedy generation against `generate`,
(d) ONNX export (TorchScript exporter) run by onnxruntime against torch, at other shapes than traced.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from onnxlm.bundle import GraphIO  # noqa: E402
from onnxlm.export.registry import get_family  # noqa: E402

VOCAB = 1000
TOL = 1e-4
# no eos (a random model may emit it and stop generate early), no pad row in the embeddings
NO_SPECIAL = dict(bos_token_id=1, eos_token_id=None, pad_token_id=None)
LLAMA_LIKE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    **NO_SPECIAL,
)


def _configs():
    T = transformers
    return {
        "llama_bias": lambda: T.LlamaConfig(
            attention_bias=True, mlp_bias=True, tie_word_embeddings=False, **LLAMA_LIKE
        ),
        "mistral_window": lambda: T.MistralConfig(sliding_window=4, tie_word_embeddings=False, **LLAMA_LIKE),
        "qwen2": lambda: T.Qwen2Config(tie_word_embeddings=True, **LLAMA_LIKE),
        "qwen2_mixed_window": lambda: T.Qwen2Config(
            use_sliding_window=True, sliding_window=4, max_window_layers=1, **LLAMA_LIKE
        ),
        "phi3_partial_rotary": lambda: T.Phi3Config(partial_rotary_factor=0.5, **LLAMA_LIKE),
        **_new_family_configs(T),
        "gpt2": lambda: T.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB, **NO_SPECIAL
        ),
        "gpt2_inverse_idx": lambda: T.GPT2Config(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            vocab_size=VOCAB,
            scale_attn_by_inverse_layer_idx=True,
            reorder_and_upcast_attn=True,
            tie_word_embeddings=False,
            **NO_SPECIAL,
        ),
        "bloom": lambda: T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB, **NO_SPECIAL),
        "bloom_6heads_post_ln": lambda: T.BloomConfig(
            hidden_size=48,
            n_layer=2,
            n_head=6,
            vocab_size=VOCAB,
            apply_residual_connection_post_layernorm=True,
            **NO_SPECIAL,
        ),
    }


def _new_family_configs(T):
    """The families of 2025-26 and the rope scalings: each with its twist active on a 9-token prompt."""
    rot = 4  # phi3 below: head_dim 16 * partial_rotary_factor 0.5, halved
    gemma = dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=4, hidden_activation="gelu_pytorch_tanh"
    )
    return {
        "qwen3_untied": lambda: T.Qwen3Config(head_dim=32, tie_word_embeddings=False, **LLAMA_LIKE),
        "qwen3_tied": lambda: T.Qwen3Config(head_dim=48, tie_word_embeddings=True, **LLAMA_LIKE),
        "olmo2": lambda: T.Olmo2Config(**LLAMA_LIKE),
        "granite": lambda: T.GraniteConfig(
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.0625,
            logits_scaling=8.0,
            **LLAMA_LIKE,
        ),
        "smollm3_nope_window": lambda: T.SmolLM3Config(
            no_rope_layers=[1, 0],
            use_sliding_window=True,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            **LLAMA_LIKE,
        ),
        "gemma2_softcap_window": lambda: T.Gemma2Config(
            attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **gemma, **LLAMA_LIKE
        ),
        "gemma3_local_global": lambda: T.Gemma3TextConfig(
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=3.0,  # set in the config, unused by transformers' Gemma 3
            final_logit_softcapping=5.0,
            rope_theta=1_000_000.0,
            rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
            **gemma,
            **LLAMA_LIKE,
        ),
        "llama_dynamic": lambda: T.LlamaConfig(
            rope_scaling={"rope_type": "dynamic", "factor": 2.0},
            **dict(LLAMA_LIKE, max_position_embeddings=8),
        ),
        "phi3_longrope_short": lambda: T.Phi3Config(
            partial_rotary_factor=0.5,
            original_max_position_embeddings=64,
            rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0] * 4},
            **dict(LLAMA_LIKE, max_position_embeddings=128),
        ),
        "phi3_longrope_fused": lambda: T.Phi3Config(
            original_max_position_embeddings=4,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
                "long_factor": [4.0] * 8,
            },
            **dict(LLAMA_LIKE, max_position_embeddings=32),
        ),
        "phi3_longrope_short_fused": lambda: T.Phi3Config(
            original_max_position_embeddings=64,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
                "long_factor": [4.0] * 8,
            },
            **dict(LLAMA_LIKE, max_position_embeddings=128),
        ),
        "qwen2_yarn": lambda: T.Qwen2Config(
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            **LLAMA_LIKE,
        ),
        # the 5-token prompts of the greedy test are past the original length: long factors from the start
        "phi3_longrope": lambda: T.Phi3Config(
            partial_rotary_factor=0.5,
            original_max_position_embeddings=4,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0, 1.5, 2.0, 3.0][:rot],
                "long_factor": [2.0, 4.0, 8.0, 16.0][:rot],
            },
            **dict(LLAMA_LIKE, max_position_embeddings=32),
        ),
    }


CASES = list(_configs())
NEW_FAMILIES = list(_new_family_configs(transformers))
EXPORT_CASES = [
    "llama_bias",
    "mistral_window",
    "qwen2",
    "qwen2_mixed_window",
    "phi3_partial_rotary",
    "gpt2",
    "gpt2_inverse_idx",
    "bloom",
    *NEW_FAMILIES,
]


def randomize(model, std=0.2):
    """Every parameter random, norms' scales and all biases included (the default init leaves them 1 and 0,
    which would hide a swapped norm or bias), and livelier than the 0.02-std init, so greedy decoding
    varies and has no near-ties."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and name.endswith("weight"):  # a norm's scale
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(noise * (0.3 if p.dim() == 1 else std))


@functools.cache
def models(case):
    """(transformers model, our module, config), both fp32 eval, from one seeded random init."""
    config = _configs()[case]()
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize(hf)
    ours = get_family(config.model_type).build(config, hf.state_dict())
    return hf, ours, config


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def empty_past(m, batch, length=0):
    a = m.a
    return [torch.zeros(batch, a.num_kv_heads, length, a.head_dim) for _ in range(2 * a.num_layers)]


def run_ours(m, ids, mask, pos, past):
    with torch.no_grad():
        out = m(ids, mask, pos, *past) if m.uses_position_ids else m(ids, mask, *past)
    return out[0], list(out[1:])


def run_hf(hf, ids, mask, pos):
    kwargs = {"position_ids": pos} if hf.config.model_type != "bloom" else {}
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits


def padded_batch(seq=9, pad=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("case", CASES)
def test_prefill_left_padding(case):
    hf, m, _ = models(case)
    ids, mask = padded_batch()
    ref = run_hf(hf, ids, mask, positions(mask))
    got, presents = run_ours(m, ids, mask, positions(mask), empty_past(m, 2))
    keep = mask.bool()  # padding slots' logits are meaningless in both
    assert (got[keep] - ref[keep]).abs().max().item() < TOL
    assert all(p.shape == (2, m.a.num_kv_heads, ids.shape[1], m.a.head_dim) for p in presents)


# dynamic NTK keeps each cached key as rotated when computed (so does transformers' generate): decode steps
# differ from one full forward by design; test_greedy_matches_generate covers it
PATH_DEPENDENT = {"llama_dynamic"}


@pytest.mark.parametrize("case", [c for c in CASES if c not in PATH_DEPENDENT])
def test_decode_steps_match_full_forward(case):
    hf, m, _ = models(case)
    ids, mask = padded_batch()
    new = torch.randint(2, VOCAB, (2, 3), generator=torch.Generator().manual_seed(2))
    full_ids = torch.cat([ids, new], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    ref = run_hf(hf, full_ids, full_mask, positions(full_mask))[:, -3:]
    _, past = run_ours(m, ids, mask, positions(mask), empty_past(m, 2))
    for step in range(3):
        total = ids.shape[1] + step + 1
        step_mask = full_mask[:, :total]
        logits, past = run_ours(m, new[:, step : step + 1], step_mask, positions(step_mask)[:, -1:], past)
        assert (logits[:, 0] - ref[:, step]).abs().max().item() < TOL, f"decode step {step}"


@pytest.mark.parametrize("case", CASES)
def test_greedy_matches_generate(case):
    hf, m, _ = models(case)
    prompt = torch.randint(2, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=16, pad_token_id=0)
    ref = ref[0, prompt.shape[1] :].tolist()
    logits, past = run_ours(m, prompt, mask, positions(mask), empty_past(m, 1))
    tokens = []
    for _ in range(16):
        tok = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(tok.item())
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        logits, past = run_ours(m, tok, mask, positions(mask)[:, -1:], past)
    assert tokens == ref


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_onnx_export_matches_torch(case, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, m, _ = models(case)
    layers = m.a.num_layers
    io = GraphIO() if m.uses_position_ids else GraphIO(position_ids=None)
    # trace at batch 2, seq 4 after 3 past slots
    ids, mask = padded_batch(seq=7, pad=2, seed=4)
    trace_inputs = [ids[:, 3:], mask] + ([positions(mask)[:, 3:]] if m.uses_position_ids else [])
    trace_past = [torch.randn(p.shape) for p in empty_past(m, 2, 3)]
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(
        m,
        (*trace_inputs, *trace_past),
        path,
        dynamo=False,
        opset_version=17,
        input_names=io.input_names(layers),
        output_names=io.output_names(layers),
        dynamic_axes=io.dynamic_axes(layers),
    )
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(path, load_external_data=False)
    vocab_sized = [
        t.name for t in proto.graph.initializer if np.prod(t.dims) == m.a.vocab_size * m.a.hidden_size
    ]
    tied = getattr(m.a, "tie_word_embeddings", False)
    assert len(vocab_sized) == (1 if tied else 2), vocab_sized  # a tied head is the embedding, stored once
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    # run at other shapes: batch 3, 2 new tokens after 5 past slots, one row left-padded
    ids, mask = (
        torch.randint(2, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5)),
        torch.ones(3, 7, dtype=torch.long),
    )
    mask[2, :3] = 0
    past = [
        torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        for i, p in enumerate(empty_past(m, 3, 5))
    ]
    inputs = [ids[:, 5:], mask] + ([positions(mask)[:, 5:]] if m.uses_position_ids else [])
    logits, presents = run_ours(m, inputs[0], mask, inputs[2] if m.uses_position_ids else None, past)
    feeds = {name: t.numpy() for name, t in zip(io.input_names(layers), inputs + past, strict=True)}
    outs = session.run(io.output_names(layers), feeds)
    assert np.abs(outs[0] - logits.numpy()).max() < TOL
    for got, want in zip(outs[1:], presents, strict=True):
        assert got.shape == tuple(want.shape)
        assert np.abs(got - want.numpy()).max() < TOL


def test_unknown_rope_type_refused_by_name():
    config = transformers.LlamaConfig(**LLAMA_LIKE)
    params = {"rope_type": "mrope", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]}
    config.rope_scaling = params  # transformers 4.x reads this one, 5.x the next
    if getattr(config, "rope_parameters", None) is not None:
        config.rope_parameters = params
    with pytest.raises(NotImplementedError, match="rope_type 'mrope' is not exported"):
        get_family("llama").build(config, {})


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "smollm3", "gemma2", "gemma3_text"])
def test_unknown_attention_layer_type_refused_by_name(model_type):
    config = transformers.AutoConfig.for_model(model_type, **LLAMA_LIKE)
    config.layer_types = ["full_attention", "chunked_attention"]  # e.g. Llama 4's; not built here
    with pytest.raises(NotImplementedError, match="layer_types 'chunked_attention' are not exported"):
        get_family(model_type).build(config, {})


def test_fused_dynamic_rope_equals_plain_step_by_step():
    """Dynamic NTK rotates each key with the frequencies of the step that cached it (path-dependent, like
    transformers' generate): the fused module's per-step caches follow the plain module's rotary, prefill
    below max_position_embeddings (8) and decode steps past it."""
    hf, plain, config = models("llama_dynamic")
    fused = get_family("llama").build(config, hf.state_dict(), graph="fused")
    ids = torch.randint(2, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    want, past = run_ours(plain, ids, mask, positions(mask), empty_past(plain, 1))
    with torch.no_grad():
        out = fused(*fused_inputs(ids, [0], [5], torch.arange(5)[None]), *empty_buffers(fused, 1, 16))
    got, buffers = out[0], list(out[1:])
    assert (got - want).abs().max() < TOL
    held = 5
    for _ in range(6):  # crosses 8 tokens held
        tok = want[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
        want, past = run_ours(plain, tok, mask, positions(mask)[:, -1:], past)
        with torch.no_grad():
            out = fused(*fused_inputs(tok, [held], [1], torch.zeros(1, 1, dtype=torch.long)), *buffers)
        got, buffers = out[0], list(out[1:])
        held += 1
        assert (got[:, 0] - want[:, -1]).abs().max() < TOL, f"{held} tokens held"


def test_fused_refuses_dynamic_rope_over_part_of_the_head():
    config = transformers.LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **LLAMA_LIKE)
    config.partial_rotary_factor = 0.5
    with pytest.raises(NotImplementedError, match="dynamic rotary over part of the head"):
        get_family("llama").build(config, {}, graph="fused")


@pytest.mark.parametrize("case", ["gpt2", "bloom"])
def test_hub_checkpoint_names(case):
    """Hub checkpoints of these families often lack the `transformer.` prefix, and old GPT-2 ones carry
    the causal-mask buffers; both load, and give the same module."""
    hf, m, config = models(case)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    if case == "gpt2":
        n = config.n_positions
        state["h.0.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
        state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    again = get_family(config.model_type).build(config, state)
    for (name, p), (_, q) in zip(m.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), name


# --- the fused graph's module: eager math of the contrib operators, then their ONNX export ------------
# the rest of NEW_FAMILIES: dynamic NTK (path-dependent: its own test below) and longrope over 8 of 16
# channels (4 cos/sin columns, fewer than GroupQueryAttention's 8): the *_fused longrope cases rotate all 16
FUSED_CASES = (
    ["llama_bias", "mistral_window", "qwen2", "qwen2_mixed_window"]
    + [c for c in NEW_FAMILIES if c not in ("llama_dynamic", "phi3_longrope", "phi3_longrope_short")]
    + ["phi3_longrope_fused", "phi3_longrope_short_fused"]
)


@functools.cache
def fused_module(case):
    hf, _, config = models(case)
    return get_family(config.model_type).build(config, hf.state_dict(), graph="fused")


def fused_inputs(ids, held, q, index):
    """The fused module's step inputs: ids (batch, seq) right-padded, rows holding `held` tokens
    before the step and bringing `q`; logits at chunk positions `index` (batch, n)."""
    after = torch.tensor(held) + torch.tensor(q)
    return [
        ids,
        (after - 1).to(torch.int32),
        after.max().to(torch.int32),
        torch.tensor(q, dtype=torch.int32),
        torch.as_tensor(index),
    ]


def empty_buffers(m, batch, capacity):
    a = m.a
    return [torch.zeros(batch, a.num_kv_heads, capacity, a.head_dim) for _ in range(2 * a.num_layers)]


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_module_matches_transformers(case):
    """Ragged rows in one right-padded chunk, then decode steps: each row equals transformers run alone."""
    hf, _, _ = models(case)
    m = fused_module(case)
    g = torch.Generator().manual_seed(7)
    lengths = [9, 6]
    rows = [torch.randint(2, VOCAB, (n,), generator=g) for n in lengths]
    ids = torch.zeros(2, 9, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    buffers = empty_buffers(m, 2, 16)
    with torch.no_grad():
        out = m(*fused_inputs(ids, [0, 0], lengths, torch.arange(9).expand(2, 9)), *buffers)
    logits, buffers = out[0], list(out[1:])
    for r, row in enumerate(rows):
        ref = run_hf(hf, row[None], torch.ones(1, len(row), dtype=torch.long), torch.arange(len(row))[None])
        assert (logits[r, : len(row)] - ref[0]).abs().max() < TOL
    held = list(lengths)
    last = torch.stack([logits[r, n - 1] for r, n in enumerate(held)])  # (batch, vocab)
    for _ in range(4):  # decode: one token per row, the buffers carried over
        nxt = last.argmax(-1)  # (batch,)
        rows = [torch.cat([row, nxt[r : r + 1]]) for r, row in enumerate(rows)]
        with torch.no_grad():
            out = m(*fused_inputs(nxt[:, None], held, [1, 1], torch.zeros(2, 1, dtype=torch.long)), *buffers)
        last, buffers = out[0][:, 0], list(out[1:])
        held = [h + 1 for h in held]
        for r, row in enumerate(rows):
            ref = run_hf(
                hf, row[None], torch.ones(1, len(row), dtype=torch.long), torch.arange(len(row))[None]
            )
            assert (last[r] - ref[0, -1]).abs().max() < TOL


def test_fused_module_refuses_what_gqa_cannot_do():
    hf, _, config = models("phi3_partial_rotary")  # rotary over 8 of 16 channels: cos/sin of 4 columns
    with pytest.raises(NotImplementedError, match="multiple of 8"):
        get_family("phi3").build(config, hf.state_dict(), graph="fused")


@pytest.mark.parametrize("case", [*FUSED_CASES, "llama_dynamic"])
def test_fused_onnx_export_matches_torch(case, tmp_path):
    """The contrib operators in onnxruntime equal the module's eager math, with one buffer per layer
    bound as both past and present (IO binding), at other shapes than traced."""
    ort = pytest.importorskip("onnxruntime")
    m = fused_module(case)
    layers = m.a.num_layers
    io = GraphIO.shared_buffer()
    ids = torch.randint(2, VOCAB, (2, 3), generator=torch.Generator().manual_seed(4))
    trace = fused_inputs(ids, [4, 4], [3, 3], torch.arange(3).expand(2, 3))
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(
        m,
        (*trace, *empty_buffers(m, 2, 8)),
        path,
        dynamo=False,
        opset_version=17,
        custom_opsets={"com.microsoft": 1},
        input_names=io.input_names(layers),
        output_names=io.output_names(layers),
        dynamic_axes=io.dynamic_axes(layers),
    )
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    # batch 3, capacity 12: rows hold 5, 2, 7 tokens and bring 4, 2, 0 (right-padded; the last idles)
    held, q = [5, 2, 7], [4, 2, 0]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, VOCAB, (3, 4), generator=g)
    buffers = [torch.randn(b.shape, generator=g) for b in empty_buffers(m, 3, 12)]
    inputs = fused_inputs(ids, held, q, torch.tensor([[3], [1], [0]]))
    with torch.no_grad():
        out = m(*inputs, *buffers)
    arrays = [b.numpy().copy() for b in buffers]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    binding = session.io_binding()
    for name, t in zip(io.input_names(layers), inputs, strict=False):
        binding.bind_cpu_input(name, t.numpy())
    binding.bind_output(io.logits, "cpu")
    for past, present, value in zip(
        io.input_names(layers)[5:], io.output_names(layers)[1:], values, strict=True
    ):
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)
    session.run_with_iobinding(binding)
    logits = binding.get_outputs()[0].numpy()
    assert logits.shape == (3, 1, VOCAB)
    assert np.abs(logits[:2] - out[0][:2].numpy()).max() < TOL  # the idle row's logits mean nothing
    for got, want in zip(arrays, out[1:], strict=True):  # the buffers, written in place
        for r in range(3):
            n = held[r] + q[r]
            assert np.abs(got[r, :, :n] - want[r, :, :n].numpy()).max() < TOL
