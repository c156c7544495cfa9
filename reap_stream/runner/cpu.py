"""How the CPU runs a model's half-precision and quantised matmuls: through the float32 BLAS.

MLX's CPU kernels compute half-precision matmuls at ~5 GFLOP/s (float32 reaches ~60 with OpenBLAS
here) and quantised ones at 0.3-2 GFLOP/s, accumulating in the model's dtype (~10 % relative error
in bf16); its half-precision attention took 4x as long as float32. So on the CPU, a model's Linear
and QuantizedLinear layers (`float32_linears`) and mlx_lm's attention (`float32_attention`) compute
in float32, weights upcast or dequantised per call, and round the result to the dtype the layer
returns, as a GPU's float32-accumulating kernels do; the attention's softmax runs in numpy (MLX's
CPU `exp` is ~10x slower). Float32 models run mlx's own code unchanged. Inside `eager_linears`
(the two lanes) each such matmul is evaluated as it is made.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import numpy as np

from ..blas import mlx_core
from ..families.dequant import dequantize_float32


def _float32_result(x, w):
    """The dtype a half-precision or quantised matmul of x by w's dtype returns."""
    mx = mlx_core()
    return mx.result_type(x, w) if mx.issubdtype(w.dtype, mx.floating) else x.dtype


def _linear_f32(module, x, w):
    mx = mlx_core()
    y = x.astype(mx.float32) @ w.T
    if "bias" in module:
        y = y + module["bias"].astype(mx.float32)
    return y


_eager = threading.local()


@contextlib.contextmanager
def eager_linears() -> Iterator[None]:
    """In this thread, evaluate each Float32Linear / Float32QuantizedLinear result as it is made:
    two lanes each evaluating a layer as one lazy graph were slower than one lane alone, a matmul
    at a time they are not (docs/memory.md). Not for tracing, which builds the whole model lazily
    and evaluates only what it needs."""
    before = getattr(_eager, "on", False)
    _eager.on = True
    try:
        yield
    finally:
        _eager.on = before


def _settled(y):
    if getattr(_eager, "on", False):
        mlx_core().eval(y)
    return y


class _Float32Linear:
    """nn.Linear on the CPU: half-precision weights upcast and run through the float32 BLAS
    (MLX's CPU half-precision matmul runs at ~5 GFLOP/s against ~60 for float32 here); the result
    is rounded to the dtype the layer returns, as a GPU's float32-accumulating kernel does.
    Float32 layers run mlx's own code."""

    def __call__(self, x):
        w = self["weight"]
        y = self.float32_call(x)
        return _settled(y if w.dtype == mlx_core().float32 else y.astype(_float32_result(x, w)))

    def float32_call(self, x):
        """The float32 result before rounding (what runner.lanes.SplitCheck compares bitwise:
        rounding to bf16 would hide most float32 differences)."""
        mx = mlx_core()
        w = self["weight"]
        if w.dtype == mx.float32:
            return super().__call__(x)
        return _linear_f32(self, x, w.astype(mx.float32))


class _Float32QuantizedLinear:
    """nn.QuantizedLinear on the CPU: the weight dequantised to float32 per call and run through
    the BLAS (MLX's CPU quantised matmul runs at 0.3-2 GFLOP/s and accumulates in the model's
    dtype: ~10 % relative error in bf16); the result in the dtype the layer returns."""

    def __call__(self, x):
        return _settled(self.float32_call(x).astype(_float32_result(x, self["scales"])))

    def float32_call(self, x):
        w = dequantize_float32(self["weight"], self["scales"], self.get("biases"), group_size=self.group_size,
                               bits=self.bits, mode=self.mode)
        return _linear_f32(self, x, w)


@functools.lru_cache(maxsize=1)
def float32_classes() -> dict:
    """nn.Linear -> Float32Linear, nn.QuantizedLinear -> Float32QuantizedLinear (subclasses made
    on first use: mlx is imported after the BLAS is in place)."""
    mlx_core()
    import mlx.nn as nn

    return {base: type(f"Float32{base.__name__}", (mixin, base), {})
            for base, mixin in ((nn.Linear, _Float32Linear), (nn.QuantizedLinear, _Float32QuantizedLinear))}


def float32_linears(model) -> None:
    """On the CPU, every Linear and QuantizedLinear of `model` computes in float32 through the
    BLAS (float32_classes, swapped in place: parameters and names unchanged). A no-op on an
    accelerator."""
    mx = mlx_core()
    if mx.default_device() != mx.cpu:
        return
    swaps = float32_classes()
    for _, module in model.named_modules():
        new = swaps.get(type(module))
        if new is not None:
            module.__class__ = new


_attention_depth = 0
_attention_lock = threading.Lock()


@contextlib.contextmanager
def float32_attention() -> Iterator[None]:
    """On the CPU, mlx_lm's attention (mx.fast.scaled_dot_product_attention, looked up at call
    time) runs in float32 for half-precision inputs, its result rounded back (MLX's CPU half
    precision attention took 4x as long as float32 here), as `float32_sdpa` wherever it takes
    the mask. Re-entrant; the lanes share it."""
    global _attention_depth
    mx = mlx_core()
    if mx.default_device() != mx.cpu:
        yield
        return
    with _attention_lock:
        if _attention_depth == 0:
            _install_attention(mx)
        _attention_depth += 1
    try:
        yield
    finally:
        with _attention_lock:
            _attention_depth -= 1
            if _attention_depth == 0:
                mx.fast.scaled_dot_product_attention = _ORIGINAL_SDPA[0]


_ORIGINAL_SDPA: list = []


def _install_attention(mx) -> None:
    if not _ORIGINAL_SDPA:
        _ORIGINAL_SDPA.append(mx.fast.scaled_dot_product_attention)
    original = _ORIGINAL_SDPA[0]
    half = (mx.float16, mx.bfloat16)

    def up(a):
        return a.astype(mx.float32) if isinstance(a, mx.array) and a.dtype in half else a

    def sdpa(q, k, v, *args, **kwargs):
        if q.dtype not in half:
            return original(q, k, v, *args, **kwargs)
        plain = not args and "scale" in kwargs and set(kwargs) <= {"scale", "mask", "sinks"}
        if plain and _numpy_mask_ok(kwargs.get("mask")):
            return float32_sdpa(up(q), up(k), up(v), kwargs["scale"], kwargs.get("mask"),
                                up(kwargs.get("sinks"))).astype(q.dtype)
        kwargs = {name: up(a) for name, a in kwargs.items()}
        return original(up(q), up(k), up(v), *args, **kwargs).astype(q.dtype)

    mx.fast.scaled_dot_product_attention = sdpa


def _numpy_mask_ok(mask) -> bool:
    """Masks float32_sdpa takes: none, "causal", or an array without a head axis (or with one head)."""
    mx = mlx_core()
    if mask is None or (isinstance(mask, str) and mask == "causal"):
        return True
    return isinstance(mask, mx.array) and (mask.ndim < 3 or (mask.ndim <= 4 and mask.shape[-3] == 1))


def float32_sdpa(q, k, v, scale: float, mask, sinks=None):
    """Attention as MLX's CPU composes it (q·scale @ kᵀ for the query heads sharing a key head, the
    mask, softmax over the keys, @ v), one (sequence, key head) at a time, with the softmax in
    numpy on the scores' own buffer: MLX's CPU `exp` costs ~12 ns an element, numpy's ~1, and its
    batched matmul took twice as long as the same matmuls one by one (docs/memory.md).
    q [B, Hq, L, D], k / v [B, Hkv, S, D], float32; `sinks` [Hq]: a logit per head that takes part
    in the softmax's normalisation and sees no value (gpt-oss), as MLX's."""
    mx = mlx_core()
    b, hq, n, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    rep = hq // hkv
    qs = (q * scale).reshape(b, hkv, rep * n, d)
    add, keep = _numpy_mask(mask, n, s)
    sink = None if sinks is None else np.array(sinks.astype(mx.float32), copy=False).reshape(hkv, rep, 1, 1)
    outs = []
    for i in range(b):
        for h in range(hkv):
            scores = qs[i, h] @ k[i, h].T
            mx.eval(scores)
            a = np.array(scores, copy=False)
            if not (a.flags.c_contiguous and a.flags.writeable):
                a = np.array(a)
                scores = None
            a3 = a.reshape(rep, n, s)
            if add is not None:
                a3 += add[i % len(add)]
            if keep is not None:
                np.copyto(a3, -np.inf, where=~keep[i % len(keep)])
            top = a3.max(axis=-1, keepdims=True)
            if sink is not None:
                np.maximum(top, sink[h], out=top)
            np.subtract(a3, top, out=a3)
            np.exp(a3, out=a3)
            total = a3.sum(axis=-1, keepdims=True)
            if sink is not None:
                total += np.exp(sink[h] - top)
            np.divide(a3, total, out=a3)
            outs.append((scores if scores is not None else mx.array(a)) @ v[i, h])
            mx.eval(outs[-1])   # so one group's scores are alive at a time
    return mx.stack(outs).reshape(b, hq, n, v.shape[-1])


def _numpy_mask(mask, n: int, s: int) -> tuple:
    """(added to the scores, or None; where they are kept, or None), each [1 or B, L, S]."""
    mx = mlx_core()
    if mask is None:
        return None, None
    if isinstance(mask, str):   # "causal": query i (at position i + s - n) sees keys up to it
        return _causal(n, s)[None], None
    m = mask if mask.ndim < 3 else mask.squeeze(-3)
    m = m.reshape((1,) * (3 - m.ndim) + m.shape)
    m = np.array(m if m.dtype in (mx.bool_, mx.float32) else m.astype(mx.float32), copy=False)
    m = np.broadcast_to(m, (m.shape[0], n, s))
    return (None, m) if m.dtype == np.bool_ else (m, None)


@functools.lru_cache(maxsize=8)
def _causal(n: int, s: int) -> np.ndarray:
    """0 where query i may see key j (j <= i + s - n), -inf elsewhere; read-only, shared."""
    m = np.where(np.arange(s)[None, :] > np.arange(n)[:, None] + (s - n), -np.inf, 0.0).astype(np.float32)
    m.flags.writeable = False
    return m
