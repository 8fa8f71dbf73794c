"""Prove an exported graph equal to PyTorch: prefill and N greedy decode steps through the KV cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import bundle as B

PREFILL_TOLERANCE = 1e-3  # max |Δ logits| allowed on the prefill, fp32


class ValidationError(Exception):
    pass


def _onnx_steps(model_path: Path, io: B.GraphIO, facts: B.ModelFacts, prompt: list[int], steps: int):
    """Prefill + greedy decode with onnxruntime and plain numpy feeds; returns per-step last logits."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    if io.shared:
        return _shared_steps(sess, io, facts, prompt, steps)
    L = facts.num_layers
    kv_shape = (1, facts.num_kv_heads, 0, facts.head_dim)
    past = {
        n: np.zeros(kv_shape, np.float32)
        for n in io.input_names(L)
        if n.startswith(io.past_key.split("{")[0])
    }
    ids = np.array([prompt], dtype=np.int64)
    total = len(prompt)
    out_logits, tokens, prefill = [], [], None
    for step in range(steps + 1):
        feeds = {io.input_ids: ids, io.attention_mask: np.ones((1, total), np.int64), **past}
        if io.position_ids:
            feeds[io.position_ids] = np.arange(total - ids.shape[1], total, dtype=np.int64)[None]
        if io.long_rope:  # as transformers steps through its cache (no re-prefill here)
            feeds[io.long_rope] = np.array([total > io.long_rope_after], np.int64)
        outs = dict(zip(io.output_names(L), sess.run(io.output_names(L), feeds), strict=True))
        logits = outs[io.logits]
        if step == 0:
            prefill = logits[0]
        out_logits.append(logits[0, -1])
        tok = int(logits[0, -1].argmax())
        tokens.append(tok)
        for i in range(L):
            past[io.past_key.format(i=i)] = outs[io.present_key.format(i=i)]
            past[io.past_value.format(i=i)] = outs[io.present_value.format(i=i)]
        ids = np.array([[tok]], dtype=np.int64)
        total += 1
    return prefill, out_logits, tokens


def _shared_steps(sess, io: B.GraphIO, facts: B.ModelFacts, prompt: list[int], steps: int):
    """The same through a shared-buffer graph: one buffer per layer bound (IO binding) as both past and
    present, so the graph must update it in place; the prefill asks for every position's logits."""
    import onnxruntime as ort

    capacity = len(prompt) + steps
    buffers = {}  # past name -> (present name, the buffer's OrtValue over a numpy array)
    for i in range(facts.num_layers):
        for past, present in ((io.past_key, io.present_key), (io.past_value, io.present_value)):
            arr = np.zeros((1, facts.num_kv_heads, capacity, facts.head_dim), np.float32)
            buffers[past.format(i=i)] = (present.format(i=i), arr, ort.OrtValue.ortvalue_from_numpy(arr))
    ids, held = np.array([prompt], dtype=np.int64), 0
    out_logits, tokens, prefill = [], [], None
    for step in range(steps + 1):
        seq = ids.shape[1]
        binding = sess.io_binding()
        feeds = {
            io.input_ids: ids,
            io.seqlens_k: np.array([held + seq - 1], np.int32),
            io.total_sequence_length: np.array(held + seq, np.int32),
            io.query_seqlens: np.array([seq], np.int32),
            io.logits_index: np.arange(seq, dtype=np.int64)[None],
        }
        if io.long_rope:
            feeds[io.long_rope] = np.array([held + seq > io.long_rope_after], np.int64)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(io.logits, "cpu")
        for past, (present, _, value) in buffers.items():
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        sess.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        if any(
            o.data_ptr() != v.data_ptr() for o, (_, _, v) in zip(outputs[1:], buffers.values(), strict=True)
        ):
            raise ValidationError("the graph did not update its KV buffers in place")
        logits = outputs[0].numpy()  # (1, seq, vocab)
        if step == 0:
            prefill = logits[0]
        out_logits.append(logits[0, -1])
        tok = int(logits[0, -1].argmax())
        tokens.append(tok)
        ids, held = np.array([[tok]], dtype=np.int64), held + seq
    return prefill, out_logits, tokens


def _torch_steps(hf_model, prompt: list[int], steps: int):
    import inspect

    import torch

    # transformers 5.x names the cache `cache` (its old name still works, with a warning on every export)
    name = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = hf_model(input_ids=ids, use_cache=True)
        prefill = out.logits[0].numpy()
        logits, tokens = [out.logits[0, -1].numpy()], [int(out.logits[0, -1].argmax())]
        past = getattr(out, name)
        for _ in range(steps):
            out = hf_model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{name: past})
            past = getattr(out, name)
            logits.append(out.logits[0, -1].numpy())
            tokens.append(int(out.logits[0, -1].argmax()))
    return prefill, logits, tokens


def compare(
    model_path: Path, io: B.GraphIO, facts: B.ModelFacts, hf_model, prompt: list[int], steps: int = 8
) -> dict[str, Any]:
    """Figures for the manifest: max |Δ logits| on the prefill and the decode steps, greedy agreement."""
    ref_prefill, ref_logits, ref_tokens = _torch_steps(hf_model, prompt, steps)
    got_prefill, got_logits, got_tokens = _onnx_steps(model_path, io, facts, prompt, steps)
    decode_delta = max(
        float(np.abs(a - b).max()) for a, b in zip(ref_logits[1:], got_logits[1:], strict=True)
    )
    agree = sum(a == b for a, b in zip(ref_tokens, got_tokens, strict=True))
    return {
        "reference": f"transformers {type(hf_model).__name__} (fp32, eager attention)",
        "prompt_tokens": len(prompt),
        "decode_steps": steps,
        "prefill_max_abs_diff": float(np.abs(ref_prefill - got_prefill).max()),
        "decode_max_abs_diff": decode_delta,
        "greedy_tokens_reference": ref_tokens,
        "greedy_tokens_onnx": got_tokens,
        "greedy_agreement": agree / len(ref_tokens),
        "tolerance": PREFILL_TOLERANCE,
    }


def check_figures(figures: dict[str, Any]) -> None:
    if figures["greedy_tokens_reference"] != figures["greedy_tokens_onnx"]:
        raise ValidationError(
            f"greedy tokens differ from PyTorch: {figures['greedy_tokens_onnx']} vs "
            f"{figures['greedy_tokens_reference']}; no bundle written"
        )
    if figures["prefill_max_abs_diff"] > PREFILL_TOLERANCE:
        raise ValidationError(
            f"prefill logits differ from PyTorch by {figures['prefill_max_abs_diff']:.2e} "
            f"(> {PREFILL_TOLERANCE:.0e}); no bundle written"
        )
