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


@pytest.mark.parametrize("kind", ["bf16", "q4"])
def test_a_large_expert_weight_is_converted_in_pieces_with_the_bits_of_a_whole_one(kind, monkeypatch):
    from types import SimpleNamespace

    from reap_stream.families import experts
    from reap_stream.families.experts import PIECE_BYTES, _expert_linear, weight_pieces
    from reap_stream.procstats import MMAP_THRESHOLD

    rows, in_dims = 1024, 4096   # 16 MiB in float32: at the threshold
    spans = weight_pieces(rows, in_dims)
    assert len(spans) > 1 and spans[0][0] == 0 and spans[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all((hi - lo) * in_dims * 4 <= PIECE_BYTES for lo, hi in spans)
    assert weight_pieces(rows, in_dims // 2) == [(0, rows)] and rows * in_dims // 2 * 4 < MMAP_THRESHOLD

    w = mx.random.normal((2, rows, in_dims), key=mx.random.key(4)).astype(mx.bfloat16)
    x = mx.random.normal((16, in_dims), key=mx.random.key(5)).astype(mx.bfloat16)
    lin = SimpleNamespace(group_size=64, bits=4, mode="affine")
    if kind == "q4":
        q, s, b = mx.quantize(w, group_size=64, bits=4)
        arrays = {"weight": q, "scales": s, "biases": b}
        whole = dequantize_float32(q[1], s[1], b[1], group_size=64, bits=4)
    else:
        arrays = {"weight": w}
        whole = w[1].astype(mx.float32)
    converted = []
    monkeypatch.setattr(experts, "dequantize_float32", lambda q, *a, **k: converted.append(q.shape[0]) or
                        dequantize_float32(q, *a, **k))
    got = _expert_linear(lin, arrays, 1, x)
    assert got.shape == (16, rows)
    assert converted == ([hi - lo for lo, hi in spans] if kind == "q4" else [])
    np.testing.assert_array_equal(np.array(got), np.array(x.astype(mx.float32) @ whole.T))
