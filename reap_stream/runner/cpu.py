"""How the CPU runs a model's half-precision and quantised matmuls: through the float32 BLAS.

MLX's CPU kernels compute half-precision matmuls at ~5 GFLOP/s (float32 reaches ~60 with OpenBLAS
here) and quantised ones at 0.3-2 GFLOP/s, accumulating in the model's dtype (~10 % relative error
in bf16); its half-precision attention took 4x as long as float32. So on the CPU, a model's Linear
and QuantizedLinear layers (`float32_linears`) and mlx_lm's attention (`float32_attention`) compute
in float32, weights upcast or dequantised per call, and round the result to the dtype the layer
returns, as a GPU's float32-accumulating kernels do. Float32 models run mlx's own code unchanged.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

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


class _Float32Linear:
    """nn.Linear on the CPU: half-precision weights upcast and run through the float32 BLAS
    (MLX's CPU half-precision matmul runs at ~5 GFLOP/s against ~60 for float32 here); the result
    is rounded to the dtype the layer returns, as a GPU's float32-accumulating kernel does.
    Float32 layers run mlx's own code."""

    def __call__(self, x):
        w = self["weight"]
        y = self.float32_call(x)
        return y if w.dtype == mlx_core().float32 else y.astype(_float32_result(x, w))

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
        return self.float32_call(x).astype(_float32_result(x, self["scales"]))

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
    precision attention took 4x as long as float32 here). Re-entrant; the lanes share it."""
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
        kwargs = {name: up(a) for name, a in kwargs.items()}
        return original(up(q), up(k), up(v), *args, **kwargs).astype(q.dtype)

    mx.fast.scaled_dot_product_attention = sdpa
