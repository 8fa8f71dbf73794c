"""GPTQ (Frantar et al., 2022) for MatMul weights, calibrated on text run through the fp32 graph.

onnxruntime's quantizer offers GPTQ through a numpy port (neural_compressor/weight_only.py) whose
updates read the lower triangle of an upper-triangular inverse Cholesky factor, so its error
feedback is all zeros and it reduces to round-to-nearest on a different grid; here is the algorithm
as published, writing integer codes straight into MatMulNBits' layout (no requantization).

    H = Σ x xᵀ over the calibration tokens (per MatMul input)   (K, K)
    U = chol(H⁻¹)ᵀ, upper triangular
    for each row k of W (K, N): q_k = quant(w_k); w_{k+1:} -= U[k, k+1:]ᵀ (w_k - q_k) / U[k, k]
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..runtime.driver import window_feeds
from .pack import Packed, from_integers, half

WINDOW = 512  # tokens per calibration sample
MAX_SAMPLES = 16
MIN_TOKENS = 16
HESSIAN_BUDGET = 1 << 30  # bytes of Hessians held at once; more inputs mean more passes over the text


def calibration_feeds(text: str, tokenizer_file: Path, manifest) -> list[dict[str, np.ndarray]]:
    """Tokenized calibration text as graph feeds: windows of WINDOW tokens from an empty cache, for
    either kv_layout (concat: mask and positions; shared_buffer: lengths and a buffer of the window)."""
    from tokenizers import Tokenizer

    facts, io = manifest.model, manifest.io
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(text, add_special_tokens=False).ids
    if len(ids) < MIN_TOKENS:
        raise ValueError(f"calibration text is {len(ids)} tokens; GPTQ needs at least {MIN_TOKENS}")
    feeds = []
    size = min(WINDOW, facts.context_length)  # the graph sees no further than its context
    for start in range(0, len(ids), size):
        window = ids[start : start + size]
        if len(window) < MIN_TOKENS or len(feeds) == MAX_SAMPLES:
            break
        if facts.add_bos_token and facts.bos_token_id is not None:
            window = [facts.bos_token_id] + window[:-1]
        feed = window_feeds(io, facts, window)
        feeds.append(feed)
    return feeds


def hessians(model: onnx.ModelProto, inputs: list[tuple[str, int]], feeds: list[dict]) -> Iterator[dict]:
    """Yield {input name: H (K, K) float64} in groups that fit HESSIAN_BUDGET, one pass over feeds each.

    The model is run as it is (fp32) with the named tensors added as outputs, then restored."""
    import onnxruntime as ort

    if model.ByteSize() > (2 << 30) - (64 << 20):
        raise ValueError("GPTQ calibration runs the graph from memory and supports models under 2 GB")
    groups, group, size = [], [], 0
    for name, k in inputs:
        if group and size + 8 * k * k > HESSIAN_BUDGET:
            groups.append(group)
            group, size = [], 0
        group.append((name, k))
        size += 8 * k * k
    groups += [group] if group else []
    kept = list(model.graph.output)
    for group in groups:
        names = [name for name, _ in group]
        del model.graph.output[:]
        model.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names])
        try:
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        finally:
            del model.graph.output[:]
            model.graph.output.extend(kept)
        acc = {name: np.zeros((k, k)) for name, k in group}
        tokens = 0
        for feed in feeds:
            outs = session.run(names, feed)
            for name, x in zip(names, outs, strict=True):
                x = x.reshape(-1, x.shape[-1])  # (tokens, K)
                acc[name] += (x.T @ x).astype(np.float64)
            tokens += outs[0].reshape(-1, outs[0].shape[-1]).shape[0]
        del session
        yield {name: h * (2.0 / max(tokens, 1)) for name, h in acc.items()}


def _params(g: np.ndarray, bits: int, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero of one block of rows g (block, N): onnxruntime's RTN conventions for sym / asym;
    for min the block's own range with a float zero (-min / scale)."""
    maxq = 2**bits - 1
    if scheme == "min":
        lo, hi = g.min(axis=0), g.max(axis=0)
        scale = half((hi - lo) / maxq).astype(np.float64)
        scale = np.where(scale == 0, 1.0, scale)
        return scale, -half(lo) / scale
    if scheme == "sym":  # the largest-magnitude value maps to -2^(bits-1) exactly
        m = g[np.argmax(np.abs(g), axis=0), np.arange(g.shape[1])]
        scale = m / -(2 ** (bits - 1))
        zero = np.full(g.shape[1], 2.0 ** (bits - 1))
    else:
        lo, hi = np.minimum(g.min(axis=0), 0), np.maximum(g.max(axis=0), 0)
        scale = (hi - lo) / maxq
        zero = np.clip(np.round(-lo / np.where(scale == 0, 1, scale)), 0, maxq)
    return np.where(scale == 0, 1.0, scale), zero


def gptq(
    w_nk: np.ndarray,
    h: np.ndarray,
    bits: int,
    block_size: int,
    scheme: str,
    percdamp: float = 0.01,
    lazy: int = 128,
) -> Packed:
    """Quantize W (N, K) given the Hessian of its input (K, K); returns MatMulNBits-packed codes."""
    n, k = w_nk.shape
    kb = -(-k // block_size)
    kp = kb * block_size
    w = np.zeros((kp, n))
    w[:k] = w_nk.T  # (K, N): one row per input channel
    hp = np.eye(kp)
    hp[:k, :k] = h
    dead = np.diag(hp) == 0
    hp[dead, dead] = 1.0
    w[dead] = 0.0
    hp[np.diag_indices(kp)] += percdamp * np.mean(np.diag(hp)[:k])
    u = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper: uᵀu = H⁻¹
    maxq = 2**bits - 1
    q = np.zeros((kp, n), np.uint8)
    scales, zeros = np.zeros((kb, n)), np.zeros((kb, n))
    lazy = max(lazy // block_size, 1) * block_size
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        w1, u1 = w[i1:i2].copy(), u[i1:i2, i1:i2]
        err = np.zeros_like(w1)
        for i in range(i2 - i1):
            r = i1 + i
            if r % block_size == 0:
                s, z = _params(w1[i : i + block_size], bits, scheme)
                scales[r // block_size], zeros[r // block_size] = s, z
            qi = np.clip(np.round(w1[i] / s + z), 0, maxq)  # z is a float for scheme min
            q[r] = qi
            err[i] = (w1[i] - (qi - z) * s) / u1[i, i]
            w1[i:] -= np.outer(u1[i, i:], err[i])
        w[i2:] -= u[i1:i2, i2:].T @ err
    if scheme == "min":  # w = (q - z)·s = q·s + (-z·s)
        packed = from_integers(q.T, scales.T, None, bits, block_size, k)
        packed.mins = half(-(zeros * scales).T).astype(np.float32)
        return packed
    return from_integers(
        q.T, scales.T, None if scheme == "sym" else zeros.T.astype(np.uint8), bits, block_size, k
    )
