"""Block-wise weight packing in onnxruntime's MatMulNBits layout, and the nodes that read it.

A weight is seen as W (N, K): N outputs, K inputs (the Gemm head's (vocab, hidden) weight and the
embedding table already are; a MatMul's (K, N) weight is transposed). K is cut into blocks of
`block_size`; each block has one scale (and, asymmetric, one zero point):

    w = (q - zero) * scale        q in [0, 2^bits); zero = 8 / 128 when symmetric (no zero-point input)

    packed  uint8 (N, k_blocks, block_size * bits / 8)   4-bit: two values per byte, low nibble first
    scales  float (N, k_blocks)
    zeros   uint8 (N, ceil(k_blocks * bits / 8))           4-bit: packed like the weights

GatherBlockQuantized (uint8 data) follows the same conventions, so one packed tensor can serve both
the output head and a tied token embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Packed:
    """One weight in MatMulNBits layout. `zeros` is None when symmetric; float zeros come from HQQ."""

    data: np.ndarray  # uint8 (N, k_blocks, blob)
    scales: np.ndarray  # float32 (N, k_blocks)
    zeros: np.ndarray | None  # uint8 (N, ceil(k_blocks * bits / 8)) or float32 (N, k_blocks)
    bits: int
    block_size: int
    k: int

    @property
    def n(self) -> int:
        return self.data.shape[0]

    @property
    def k_blocks(self) -> int:
        return self.data.shape[1]

    def dequantize(self) -> np.ndarray:
        """W (N, K) as float32: the values the kernels compute with (used by tests and GPTQ checks)."""
        q = unpack_values(self.data, self.bits).astype(np.float32)  # (N, k_blocks, block_size)
        if self.zeros is None:
            z = np.full(self.scales.shape, 2.0 ** (self.bits - 1), np.float32)
        elif self.zeros.dtype == np.uint8:
            z = (
                unpack_values(self.zeros, self.bits)
                .reshape(self.n, -1)[:, : self.k_blocks]
                .astype(np.float32)
            )
        else:
            z = self.zeros.reshape(self.scales.shape).astype(np.float32)
        w = (q - z[..., None]) * self.scales[..., None]
        return w.reshape(self.n, -1)[:, : self.k]


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


def rtn(w_nk: np.ndarray, bits: int, block_size: int, symmetric: bool) -> Packed:
    """Round-to-nearest with onnxruntime's own C++ packers (the ones its quantizer uses)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w_nk.shape
    w_kn = np.ascontiguousarray(w_nk.T, dtype=np.float32)  # the packers read (K, N)
    k_blocks = -(-k // block_size)
    data = np.zeros((n, k_blocks, block_size * bits // 8), np.uint8)
    zeros = np.zeros((n, -(-k_blocks * bits // 8)), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    packer = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    packer(data, w_kn, scales, zeros, block_size, n, k, symmetric)
    return Packed(data, scales, None if symmetric else zeros, bits, block_size, k)


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
    return Packed(data, scales.astype(np.float32), z, bits, block_size, k)


def hqq(w_nk: np.ndarray, bits: int, block_size: int) -> Packed:
    """Half-quadratic quantization through onnxruntime's HQQ solver (needs torch); float zero points."""
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
    return Packed(
        data,
        scale.numpy().reshape(n, k_blocks).astype(np.float32),
        zero.numpy().reshape(n, k_blocks).astype(np.float32),
        bits,
        block_size,
        k,
    )
