"""The CPU's half-precision attention: float32, its softmax in numpy, MLX's semantics and results."""
from __future__ import annotations

import numpy as np
import pytest

from reap_stream.blas import mlx_core
from reap_stream.runner.cpu import _ORIGINAL_SDPA, float32_attention, float32_sdpa

B, HQ, HKV, D = 2, 8, 2, 32


def _arrays(n: int, s: int, dtype=None):
    mx = mlx_core()
    rng = np.random.default_rng(n * 100 + s)
    q, k, v = (mx.array(rng.standard_normal(shape, dtype=np.float32) * 2)
               for shape in ((B, HQ, n, D), (B, HKV, s, D), (B, HKV, s, D)))
    return tuple(a.astype(dtype) for a in (q, k, v)) if dtype is not None else (q, k, v)


def _masks(n: int, s: int) -> dict:
    mx = mlx_core()
    rng = np.random.default_rng(7)
    sees = np.arange(s)[None, :] <= np.arange(n)[:, None] + (s - n)
    return {
        "none": None,
        "causal": "causal",
        "bool [L, S]": mx.array(sees),
        "bool [B, 1, L, S]": mx.array(np.broadcast_to(sees & (rng.random((B, 1, n, s)) < 0.8), (B, 1, n, s)) | (np.eye(n, s, s - n) > 0)),
        "additive bf16 [B, 1, L, S]": mx.array(np.where(rng.random((B, 1, n, s)) < 0.3, -1e4, 0.0).astype(np.float32)).astype(mx.bfloat16),
        "additive [1, S] (padding)": mx.array(np.where(np.arange(s) < 2, -np.inf, 0.0).astype(np.float32)[None]),
    }


def _mlx(q, k, v, mask, sinks=None):
    mx = mlx_core()
    f32 = lambda a: a.astype(mx.float32) if isinstance(a, mx.array) and a.dtype != mx.bool_ else a  # noqa: E731
    original = _ORIGINAL_SDPA[0] if _ORIGINAL_SDPA else mx.fast.scaled_dot_product_attention
    return original(f32(q), f32(k), f32(v), scale=D ** -0.5, mask=f32(mask), sinks=f32(sinks))


@pytest.mark.parametrize("n,s", [(16, 16), (4, 16)])   # queries = keys, and queries at the end of the keys
@pytest.mark.parametrize("mask", list(_masks(16, 16)))
@pytest.mark.parametrize("with_sinks", [False, True])
def test_float32_attention_is_mlx_attention_within_float32_rounding(n, s, mask, with_sinks):
    mx = mlx_core()
    q, k, v = _arrays(n, s)
    m = _masks(n, s)[mask]
    sinks = mx.array(np.linspace(-1, 2, HQ, dtype=np.float32)) if with_sinks else None
    mine = float32_sdpa(q, k, v, D ** -0.5, m, sinks)
    ref = _mlx(q, k, v, m, sinks)
    assert mine.shape == ref.shape == (B, HQ, n, D) and mine.dtype == mx.float32
    np.testing.assert_allclose(np.array(mine), np.array(ref), rtol=1e-5, atol=1e-5)


def test_half_precision_attention_takes_the_numpy_softmax_and_rounds_back():
    mx = mlx_core()
    q, k, v = _arrays(16, 16, mx.bfloat16)
    with float32_attention():
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask="causal")
    assert out.dtype == mx.bfloat16
    mine = float32_sdpa(*(a.astype(mx.float32) for a in (q, k, v)), D ** -0.5, "causal")
    assert mx.array_equal(out, mine.astype(mx.bfloat16)).item()
    assert mx.fast.scaled_dot_product_attention is _ORIGINAL_SDPA[0]   # restored on exit


def test_each_sequence_gets_the_same_bits_alone_as_in_a_batch():
    # the lanes run a chunk as two half-batches (runner/lanes.py): a sequence's attention must not
    # depend on the others
    mx = mlx_core()
    q, k, v = _arrays(16, 16)
    whole = float32_sdpa(q, k, v, D ** -0.5, "causal")
    halves = mx.concatenate([float32_sdpa(q[i:i + 1], k[i:i + 1], v[i:i + 1], D ** -0.5, "causal") for i in range(B)])
    assert mx.array_equal(whole, halves).item()


def test_the_inputs_are_left_as_they_were():
    q, k, v = _arrays(16, 16)
    before = [np.array(a) for a in (q, k, v)]
    float32_sdpa(q, k, v, D ** -0.5, "causal")
    assert all(np.array_equal(np.array(a), b) for a, b in zip((q, k, v), before))


def test_masks_with_a_head_axis_run_mlx_own_attention(monkeypatch):
    mx = mlx_core()
    q, k, v = _arrays(16, 16, mx.bfloat16)
    per_head = mx.array(np.random.default_rng(0).random((B, HQ, 16, 16)) < 0.7) | mx.eye(16, dtype=mx.bool_)
    import reap_stream.runner.cpu as cpu

    called = []
    monkeypatch.setattr(cpu, "float32_sdpa", lambda *a: called.append(a))
    with float32_attention():
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=per_head)
    assert called == []
    assert mx.array_equal(out, _mlx(q, k, v, per_head).astype(mx.bfloat16)).item()
