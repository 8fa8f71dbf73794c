"""Block-wise weight packing in onnxruntime's MatMulNBits layout, and the nodes that read it.

A weight is seen as W (N, K): N outputs, K inputs (the Gemm head's (vocab, hidden) weight and the
embedding table already are; a MatMul's (K, N) weight is transposed). K is cut into blocks of
`block_size`; each block has one scale and, by scheme, an offset:

    sym   w = (q - 2^(bits-1)) * scale          no zero-point input
    asym  w = (q - zero) * scale                zero: uint8 per block
    min   w = q * scale + min                   min: float per block (llama.cpp's Q4_1 form)

    packed  uint8 (N, k_blocks, block_size * bits / 8)   4-bit: two values per byte, low nibble first
    scales  float (N, k_blocks)                          stored as float16 (values rounded to it here)
    zeros   uint8 (N, ceil(k_blocks * bits / 8))           4-bit: packed like the weights
    mins    float (N, k_blocks)                          stored as float16

MatMulNBits' fast kernels take integer zero points only. `min` is served one of two ways (graph.py):
- folded (the integer recipes): each block's minimum split into an integer zero point and what is
  left, m = -z·scale + r, |r| <= scale / 2 (fold_min). The remainders r of a row become two 4-bit
  codes each (one 8-bit code for 8-bit weights) in extra blocks appended to the row, which
  MatMulNBits multiplies by the input's block sums (appended to the input): one kernel call, no extra
  branch. The remainders' rounding (1/238 of the largest remainder of their group, ~scale / 476) is
  the only change from the packed weights.
- exact (GGUF kept blocks, which promise ggml's weights): the sym kernel plus a correction branch,
  Σ_blocks (min + 2^(bits-1)·scale) · Σ(x in block).

GatherBlockQuantized (uint8 data) follows the same conventions, so one packed tensor can serve both
the output head and a tied token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Packed:
    """One weight in MatMulNBits layout: sym when `zeros` and `mins` are both None."""

    data: np.ndarray  # uint8 (N, k_blocks, blob)
    scales: np.ndarray  # float32 (N, k_blocks), values representable in float16
    zeros: np.ndarray | None  # uint8 (N, ceil(k_blocks * bits / 8))
    bits: int
    block_size: int
    k: int
    mins: np.ndarray | None = None  # float32 (N, k_blocks), values representable in float16
    coded: dict[str, Coded] | None = None  # scales / mins stored as 8-bit codes (min_max_coded)

    @property
    def scheme(self) -> str:
        return "min" if self.mins is not None else "asym" if self.zeros is not None else "sym"

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def k_blocks(self) -> int:
        return self.data.shape[1]

    def dequantize(self) -> np.ndarray:
        """W (N, K) as float32: the values the kernels compute with (used by tests and GPTQ checks)."""
        q = unpack_values(self.data, self.bits).astype(np.float32)  # (N, k_blocks, block_size)
        if self.mins is not None:
            w = q * self.scales[..., None] + self.mins[..., None]
        else:
            if self.zeros is None:
                z = np.full(self.scales.shape, 2.0 ** (self.bits - 1), np.float32)
            else:
                z = unpack_values(self.zeros, self.bits).reshape(self.n, -1)[:, : self.k_blocks]
            w = (q - z[..., None].astype(np.float32)) * self.scales[..., None]
        return w.reshape(self.n, -1)[:, : self.k]


@dataclass
class Folded:
    """Scheme min in MatMulNBits' zero-point form (module docstring): the row's own k_blocks, then the
    remainder blocks (zero point 2^(bits-1)): `digits` regions of equal size, each holding one code of
    every block's remainder, the first the most significant (its scales 2^bits times the next's).
    Computes Σ_blocks (q - z)·scale·x + r̂·Σ(x in block), r̂ the sum of a block's codes' values."""

    data: np.ndarray  # uint8 (N, k_blocks + extra, blob)
    scales: np.ndarray  # float32 (N, k_blocks + extra), float16-representable
    zeros: np.ndarray  # uint8 (N, ceil((k_blocks + extra) * bits / 8))
    bits: int
    block_size: int
    k: int
    k_blocks: int
    digits: int = 1

    @property
    def extra(self) -> int:
        return self.data.shape[1] - self.k_blocks

    @property
    def k_served(self) -> int:
        """The kernel's K: the row's padded blocks, then the remainder blocks."""
        return self.data.shape[1] * self.block_size

    def dequantize(self) -> np.ndarray:
        """W (N, K) float32: the weights the folded form computes with."""
        n, kb = self.data.shape[0], self.k_blocks
        q = unpack_values(self.data, self.bits).astype(np.float32)  # (N, kb + extra, block)
        z = unpack_values(self.zeros, self.bits)[:, : kb + self.extra].astype(np.float32)
        v = (q - z[..., None]) * self.scales[..., None]
        regions = v[:, kb:].reshape(n, self.digits, -1)[:, :, :kb]
        return (v[:, :kb] + regions.sum(axis=1)[..., None]).reshape(n, -1)[:, : self.k]


# 4-bit codes a remainder the recipes serve: one leaves a remainder's rounding at up to 1/14 of its
# group's largest, two at 1/238. SmolLM2 int4 against fp32 (built-in texts, teacher-forced KL en / zh):
# one code 0.048 / 0.065, two 0.045 / 0.062, the exact form 0.046 / 0.062; the decode step the same
# within this machine's noise (7.97-8.96 ms with two against 8.13-9.15 ms with one, interleaved).
REMAINDER_CODES = 2


def fold_min(p: Packed, digits: int = REMAINDER_CODES) -> Folded:
    """Scheme min's blocks in the zero-point form (module docstring). z = round(-m / scale) clipped to
    the code range, r = m + z·scale; each remainder block's group of `block_size` remainders of a row
    has one scale (its largest |r| over the largest value `digits` codes hold, rounded up to float16).
    8-bit weights take one code."""
    if p.mins is None:
        raise ValueError("fold_min: the packed weight is not scheme min")
    n, kb, bs, bits = p.n, p.k_blocks, p.block_size, p.bits
    digits = 1 if bits == 8 else digits
    if digits not in (1, 2):
        raise ValueError(f"fold_min: digits must be 1 or 2, got {digits}")
    base, centre, top = 2**bits, 2 ** (bits - 1), 2**bits - 1
    d, m = p.scales.astype(np.float64), p.mins.astype(np.float64)
    z = np.clip(np.rint(-m / np.where(d == 0, 1, d)), 0, top)
    r = m + z * d
    groups = -(-kb // bs)
    r = np.concatenate([r, np.zeros((n, groups * bs - kb))], axis=1).reshape(n, groups, bs)
    # the largest value the codes hold: centre - 1 for one; (hi - centre)·base + (lo - centre) for
    # two, whose range [-centre·(base+1), ...] is kept symmetric at centre·base - centre - 1
    most = centre - 1 if digits == 1 else centre * base - centre - 1
    want = np.abs(r).max(axis=-1) / most
    s = want.astype(np.float16)
    s = np.where(s.astype(np.float64) < want, np.nextafter(s, np.float16(np.inf)), s)  # round up
    s = np.where(s == 0, np.float16(1), s).astype(np.float32)
    v = np.clip(np.rint(r / s[..., None]), -most, most).astype(np.int64)
    if digits == 1:
        codes, scales = [v + centre], [s]
    else:
        u = v + centre * base + centre  # (hi - centre)·base + (lo - centre) = v
        codes, scales = [u // base, u % base], [s * base, s]
    data = np.concatenate([p.data, *(pack_values(c.astype(np.uint8), bits) for c in codes)], axis=1)
    zeros = np.concatenate([z, np.full((n, groups * digits), centre)], axis=1)
    return Folded(
        data, np.concatenate([p.scales, *scales], axis=1), pack_values(zeros, bits), bits, bs, p.k, kb, digits
    )


def unpack_values(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes -> one uint8 value per element (4-bit: low nibble first); last axis grows."""
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def pack_values(q: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of unpack_values along the last axis (its length must be even for 4 bits)."""
    q = q.astype(np.uint8)
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.uint8)], axis=-1)
    return (q[..., 0::2] & 0x0F) | (q[..., 1::2] << 4)


@dataclass
class Coded:
    """Per-block values stored as uint8 codes with a float16 offset and step per row:
    value = lo + code * step (computed in float32, as the graph does)."""

    codes: np.ndarray  # uint8 (N, k_blocks)
    lo: np.ndarray  # float16 (N, 1)
    step: np.ndarray  # float16 (N, 1)

    @classmethod
    def of(cls, x: np.ndarray) -> Coded:
        lo = x.min(axis=1, keepdims=True).astype(np.float16)
        hi = x.max(axis=1, keepdims=True)
        step = ((hi - lo.astype(np.float32)) / 255).astype(np.float16)
        step = np.where(step == 0, np.float16(1), step)
        codes = np.rint((x - lo.astype(np.float32)) / step.astype(np.float32))
        return cls(np.clip(codes, 0, 255).astype(np.uint8), lo, step)

    def values(self) -> np.ndarray:
        return self.lo.astype(np.float32) + self.codes.astype(np.float32) * self.step.astype(np.float32)


def half(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to what float16 storage keeps (finite: clipped to its range)."""
    return np.clip(x, -65504.0, 65504.0).astype(np.float16).astype(np.float32)


def rtn(w_nk: np.ndarray, bits: int, block_size: int, scheme: str) -> Packed:
    """Round-to-nearest: sym / asym with onnxruntime's own C++ packers (the ones its quantizer uses),
    min with min_max()."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if scheme == "min":
        return min_max(w_nk, bits, block_size)
    symmetric = scheme == "sym"
    n, k = w_nk.shape
    w_kn = np.ascontiguousarray(w_nk.T, dtype=np.float32)  # the packers read (K, N)
    k_blocks = -(-k // block_size)
    data = np.zeros((n, k_blocks, block_size * bits // 8), np.uint8)
    zeros = np.zeros((n, -(-k_blocks * bits // 8)), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    packer = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    packer(data, w_kn, scales, zeros, block_size, n, k, symmetric)
    return Packed(data, half(scales), None if symmetric else zeros, bits, block_size, k)


def _blocks(w_nk: np.ndarray, block_size: int) -> np.ndarray:
    """(N, K) -> (N, k_blocks, block_size) float64, a padded tail repeating the row's last value
    (so it widens no block's range)."""
    n, k = w_nk.shape
    kb = -(-k // block_size)
    w = np.asarray(w_nk, np.float64)
    if kb * block_size != k:
        w = np.concatenate([w, np.repeat(w[:, -1:], kb * block_size - k, axis=1)], axis=1)
    return w.reshape(n, kb, block_size)


def min_max(w_nk: np.ndarray, bits: int, block_size: int, refits: int = 2, rows: int = 4096) -> Packed:
    """Scheme `min`: per block w ≈ q·d + m with d = (max - min) / (2^bits - 1), m = min, then
    `refits` rounds of least squares for (d, m) given the codes (kept only where they lower the
    block's error). Weights already on such a grid (a dequantized Q4_1 GGUF) come back exactly.
    Works through `rows` rows at a time to bound memory on a vocabulary-sized head."""
    n, k = w_nk.shape
    parts = [_min_max_rows(w_nk[i : i + rows], bits, block_size, refits) for i in range(0, n, rows)]
    data, d, m = (np.concatenate(x) for x in zip(*parts, strict=True))
    return Packed(data, d, None, bits, block_size, k, mins=m)


def min_max_coded(w_nk: np.ndarray, bits: int, block_size: int) -> Packed:
    """Scheme min with each row's scales and minimums stored as 8-bit codes (double quantization, as
    llama.cpp's K-quants and QLoRA do): 2 bytes per block instead of 4, so block 16 costs what block 32
    costs with float16 scales. The codes are fitted first, then the weights rounded to them."""
    n, k = w_nk.shape
    p = min_max(w_nk, bits, block_size)
    d, m = Coded.of(p.scales), Coded.of(p.mins)
    dv, mv = d.values(), m.values()
    q = _codes(_blocks(w_nk, block_size), dv, mv, 2**bits - 1)
    data = pack_values(q.astype(np.uint8), bits)
    return Packed(data, dv, None, bits, block_size, k, mins=mv, coded={"scales": d, "mins": m})


def _codes(w: np.ndarray, d: np.ndarray, m: np.ndarray, maxq: int) -> np.ndarray:
    """Blocks w (N, k_blocks, block) rounded to the grid q·d + m, q in [0, maxq] (a zero d: q = 0)."""
    return np.clip(np.rint((w - m[..., None]) / np.where(d == 0, 1, d)[..., None]), 0, maxq)


def _min_max_rows(w_nk: np.ndarray, bits: int, block_size: int, refits: int):
    maxq = 2**bits - 1
    w = _blocks(w_nk, block_size)
    lo, hi = w.min(axis=-1), w.max(axis=-1)
    d, m = half((hi - lo) / maxq).astype(np.float64), half(lo).astype(np.float64)

    def codes(d, m):
        return _codes(w, d, m, maxq)

    def error(q, d, m):
        return np.square(q * d[..., None] + m[..., None] - w).sum(axis=-1)

    q = codes(d, m)
    best = error(q, d, m)
    for _ in range(refits):
        sq, sw = q.sum(-1), w.sum(-1)
        det = block_size * np.square(q).sum(-1) - sq * sq
        ok = det > 0
        d2 = np.where(ok, (block_size * (q * w).sum(-1) - sq * sw) / np.where(ok, det, 1), d)
        m2 = np.where(ok, (sw - d2 * sq) / block_size, m)
        d2, m2 = half(d2).astype(np.float64), half(m2).astype(np.float64)
        q2 = codes(d2, m2)
        e2 = error(q2, d2, m2)
        better = e2 < best
        d, m, best = np.where(better, d2, d), np.where(better, m2, m), np.where(better, e2, best)
        q = np.where(better[..., None], q2, q)
    return pack_values(q.astype(np.uint8), bits), d.astype(np.float32), m.astype(np.float32)


def from_integers(
    q_nk: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, block_size: int, k: int
) -> Packed:
    """Pack integer codes q (N, K_padded) with per-block scales / integer zeros (N, k_blocks)."""
    n = q_nk.shape[0]
    k_blocks = scales.shape[1]
    pad = k_blocks * block_size - q_nk.shape[1]
    if pad:
        fill = zeros if zeros is not None else np.full((n, k_blocks), 2 ** (bits - 1))
        q_nk = np.concatenate([q_nk, np.repeat(fill[:, -1:], pad, axis=1)], axis=1)
    data = pack_values(q_nk.reshape(n, k_blocks, block_size), bits)
    z = None if zeros is None else pack_values(zeros.astype(np.uint8), bits)
    return Packed(data, half(scales), z, bits, block_size, k)


def hqq(w_nk: np.ndarray, bits: int, block_size: int) -> Packed:
    """Half-quadratic quantization through onnxruntime's HQQ solver (needs torch). Its float zero
    points z become scheme `min`: w = (q - z)·s = q·s + (-z·s)."""
    try:
        import torch
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            HQQWeightOnlyQuantConfig,
            HQQWeightOnlyQuantizer,
        )
    except ImportError as e:
        raise RuntimeError(
            f"algorithm 'hqq' needs onnxruntime's HQQ solver and what it imports ({e.name} is missing): "
            "pip install 'onnxlm[export]'"
        ) from None

    solver = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits))
    n, k = w_nk.shape
    q, scale, zero = solver.quantize_internal(
        torch.from_numpy(np.array(w_nk, np.float32)), bits=bits, group_size=block_size
    )
    k_blocks = -(-k // block_size)
    data = pack_values(q.numpy().reshape(n, k_blocks, block_size), bits)
    s = scale.numpy().reshape(n, k_blocks).astype(np.float32)
    z = zero.numpy().reshape(n, k_blocks).astype(np.float32)
    return Packed(data, half(s), None, bits, block_size, k, mins=half(-z * s))
