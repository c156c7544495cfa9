"""Quantised weights to float32 on the CPU, exactly and fast.

MLX's CPU `dequantize` computes `scale * q + bias` in the scales' dtype (bf16 / fp16): asked for
float32, it returns each weight rounded to half precision, and it is slow (docs/memory.md). For
affine 4- and 8-bit weights `dequantize_float32` unpacks the bytes and computes the expression in
float32, as a GPU's float32 kernels do: with half-precision scales that is the stored weight
exactly (q <= 255 times such a scale fits float32's mantissa, so only the bias's addition rounds,
once); with float32 scales, MLX's own bits. Other modes and widths keep MLX's kernel.
"""
from __future__ import annotations

from ..blas import mlx_core


def dequantize_float32(w, scales, biases, group_size: int, bits: int, mode: str = "affine"):
    """The float32 weight of an MLX-quantised matrix (or stack): `w` packed uint32 [..., out, in*bits/32],
    `scales` / `biases` [..., out, in/group_size]."""
    mx = mlx_core()
    if mode != "affine" or bits not in (4, 8) or biases is None:
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32)
    q = w.view(mx.uint8)  # little-endian: byte j of a word holds its values 8j/bits onwards
    if bits == 4:
        # each byte b -> the two bytes (b & 15, b >> 4), in that order
        q = q.astype(mx.uint16)
        q = ((q | (q << 4)) & 0x0F0F).view(mx.uint8)
    groups = q.reshape(*scales.shape, group_size)
    out = groups * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)
    return out.reshape(*w.shape[:-1], -1)
