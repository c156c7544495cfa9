"""The CPU's dequantisation: the stored quantised weight exactly, in float32."""
import numpy as np
import pytest

from reap_stream.families.dequant import dequantize_float32
from reap_stream.blas import mlx_core

mx = mlx_core()
DTYPES = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}


def _quantised(shape, dtype, bits, group_size, seed=0):
    w = mx.random.normal(shape, key=mx.random.key(seed)).astype(DTYPES[dtype])
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    mx.eval(q, s, b)
    return q, s, b


def _exact(q, s, b, bits, group_size):
    """scale * q + bias in float64 from the packed words, unpacked by numpy, then rounded once."""
    words = np.array(q)
    values = (words[..., None] >> np.arange(0, 32, bits, dtype=np.uint32)) & ((1 << bits) - 1)
    values = values.reshape(*words.shape[:-1], -1, group_size).astype(np.float64)
    scales = np.array(s.astype(mx.float32)).astype(np.float64)[..., None]
    biases = np.array(b.astype(mx.float32)).astype(np.float64)[..., None]
    return (values * scales + biases).reshape(*words.shape[:-1], -1).astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shape,group_size", [((48, 256), 64), ((3, 16, 128), 32), ((8, 256), 128)])
def test_half_precision_affine_weights_dequantise_to_the_exact_float32_value(bits, dtype, shape, group_size):
    q, s, b = _quantised(shape, dtype, bits, group_size)
    got = dequantize_float32(q, s, b, group_size=group_size, bits=bits)
    assert got.dtype == mx.float32 and got.shape == shape
    np.testing.assert_array_equal(np.array(got), _exact(q, s, b, bits, group_size))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(32, 256), (2, 8, 128)])
def test_float32_scales_give_mlx_own_bits(bits, shape):
    # with float32 scales MLX's kernel computes in float32 too, with the same two roundings
    q, s, b = _quantised(shape, "fp32", bits, 64, seed=1)
    ours = dequantize_float32(q, s, b, group_size=64, bits=bits)
    theirs = mx.dequantize(q, s, b, group_size=64, bits=bits, dtype=mx.float32)
    assert ours.shape == shape and mx.array_equal(ours, theirs).item()


def test_half_precision_scales_differ_from_mlx_only_by_its_rounding():
    q, s, b = _quantised((32, 256), "bf16", 4, 64, seed=2)
    ours = np.array(dequantize_float32(q, s, b, group_size=64, bits=4)).astype(np.float64)
    rounded = np.array(mx.dequantize(q, s, b, group_size=64, bits=4, dtype=mx.float32))
    assert not np.array_equal(ours, rounded)
    # MLX rounds scale * q, then the sum, to bf16 (8 significant bits): half an ulp each
    bias = np.repeat(np.array(b.astype(mx.float32)), 64, axis=-1)
    assert np.all(np.abs(ours - rounded) <= 2.0 ** -8 * (np.abs(ours - bias) + np.abs(ours)) * (1 + 1e-6))


@pytest.mark.parametrize("bits,mode", [(2, "affine"), (3, "affine"), (6, "affine"), (4, "mxfp4")])
def test_other_widths_and_modes_are_mlx_own_dequantisation(bits, mode):
    group = 32 if mode == "mxfp4" else 64
    w = mx.random.normal((16, 256), key=mx.random.key(3))
    packed = mx.quantize(w, group_size=group, bits=bits, mode=mode)
    q, s = packed[0], packed[1]
    b = packed[2] if len(packed) > 2 else None
    ours = dequantize_float32(q, s, b, group_size=group, bits=bits, mode=mode)
    theirs = mx.dequantize(q, s, b, group_size=group, bits=bits, mode=mode, dtype=mx.float32)
    assert mx.array_equal(ours, theirs).item()
