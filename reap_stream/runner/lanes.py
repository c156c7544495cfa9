"""Two CPU lanes: a chunk's layer run as two half-batches on two MLX CPU streams, bytes as one call.

MLX's CPU element-wise kernels (attention's softmax) use one thread per stream, so running a chunk
of >= 2 sequences as two half-batches on two streams (`Lanes`, `split_layer_forward`) is what puts
the second core to work. With 2 BLAS threads configured, each lane calls the BLAS single-threaded
(blas.lane_threads). The MoE block still sees the whole chunk, and the split is only taken where
`SplitCheck` has shown that every matmul of the layer outside the MoE block gives the same bits on
half the rows at the lanes' thread count, so the bytes never change. In that configuration the
block's experts are shared out to both lanes too, in every mode (families/experts.run_experts),
the same calls whichever lane runs them.
"""
from __future__ import annotations

import atexit
import queue
import threading
from concurrent.futures import Future
from typing import Callable

import numpy as np

from ..blas import blas_threads, lane_threads, mlx_core, total_threads
from .cpu import eager_linears, float32_attention
from .skeleton import Forward, MoEHook
from .trace import trace_layers


class _Rendezvous:
    """The MoE block of a layer run as two half-batches: both halves meet here, the block runs
    once on the whole chunk (so routing, expert grouping and telemetry are those of the chunk),
    and each half gets its rows of the output back. While the lead lane (part 0) runs the block,
    the other lane serves it: the block's experts are shared out to both (`pair`)."""

    def __init__(self, hook: MoEHook):
        self.hook = hook
        hook.pair = self.pair
        self.parts: list = [None, None]
        self.out = None
        self.barrier = threading.Barrier(2)
        self.lane = threading.local()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()

    def __call__(self, x):
        mx = mlx_core()
        part = self.lane.part
        mx.eval(x)  # this half's attention and norms, on this lane's stream: the lanes overlap here
        self.parts[part] = x
        self.barrier.wait()
        if part == 0:
            try:
                whole = mx.concatenate(self.parts, axis=0)
                with blas_threads(total_threads()):  # the block as in an unsplit run
                    self.out = self.hook(whole)
                    mx.eval(self.out)
            finally:
                self._tasks.put(None)  # the other lane stops serving
        else:
            _serve(self._tasks)
        self.barrier.wait()
        rows = self.parts[0].shape[0]
        return self.out[:rows] if part == 0 else self.out[rows:]

    def pair(self, first: Callable, second: Callable) -> tuple:
        """first() on the lead lane and second() on the serving lane at the same time; first's
        error is raised before second's, after second has finished."""
        future: Future = Future()
        self._tasks.put((second, future))
        try:
            a = first()
        finally:
            future.exception()  # wait for the serving lane
        return a, future.result()


def _serve(tasks: queue.SimpleQueue) -> None:
    """Run (fn, future) items until None, each result or error into its future."""
    while (item := tasks.get()) is not None:
        fn, future = item
        try:
            future.set_result(fn())
        except BaseException as e:  # raised by whoever waits on the future
            future.set_exception(e)


class Lanes:
    """The calling thread plus a worker thread with its own MLX CPU stream.

    MLX runs each CPU stream's element-wise kernels on that stream's one thread, so two halves of
    a chunk evaluated on two streams use both cores where one stream leaves one idle (attention's
    softmax dominates small-hidden models on the CPU backend). Streams belong to the thread that
    made them, hence a persistent worker that makes its own.

    The worker must release its MLX state before the interpreter finalizes: MLX keeps a
    thread-local cache of compiled functions (mlx_lm compiles its activations) whose destructor,
    run when the OS thread ends, takes the GIL to drop Python references; once the main thread
    is finalizing that aborts the process ("terminate called without an active exception",
    2-30 % of exits in tools/check_clean_exit.py). So the worker is a daemon stopped by
    `close()` (at the latest from atexit, which runs before finalization), and it calls
    `mx.clear_streams()` before it ends."""

    def __init__(self):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="reap-lane", daemon=True)
        self._closed = False
        self._thread.start()
        atexit.register(self.close)

    def _work(self) -> None:
        mx = mlx_core()
        try:
            with mx.stream(mx.new_stream(mx.cpu)):
                _serve(self._tasks)
        finally:
            # this thread's streams and compile cache, while Python is alive (the call came
            # with MLX 0.31.2, per-thread CPU state with 0.32; older versions need neither)
            if hasattr(mx, "clear_streams"):
                mx.clear_streams()

    def _submit(self, fn: Callable) -> Future:
        if self._closed:
            raise RuntimeError("lanes are closed")
        future: Future = Future()
        self._tasks.put((fn, future))
        return future

    def both(self, first: Callable, second: Callable, barrier: threading.Barrier | None = None) -> tuple:
        """first() here and second() on the worker, at the same time; an error in either breaks
        `barrier` (so the other stops waiting) and is raised here, first's before second's."""
        def guarded(fn):
            def run():
                try:
                    return fn()
                except BaseException:
                    if barrier is not None:
                        barrier.abort()
                    raise
            return run

        future = self._submit(guarded(second))
        try:
            a = guarded(first)()
        except threading.BrokenBarrierError:
            future.result()  # the worker failed first: raise its error
            raise
        except BaseException:
            future.exception()  # wait for the worker to stop before the caller moves on
            raise
        return a, future.result()

    def close(self) -> None:
        """Stop the worker after its queued tasks; safe to call more than once."""
        if not self._closed:
            self._closed = True
            self._tasks.put(None)
            atexit.unregister(self.close)
        self._thread.join()


_shared: Lanes | None = None
_shared_lock = threading.Lock()


def lanes_pair(first: Callable, second: Callable) -> tuple:
    """experts.Pair on the shared lanes, made on first use: run_experts decides whether to share
    experts out (CPU, single-threaded lanes), so elsewhere no worker thread is started."""
    return shared_lanes().both(first, second)


def shared_lanes() -> Lanes:
    """The process's lanes, made once: MLX keeps a stream's thread until the process exits, so
    runners share one worker and its stream instead of making one each."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Lanes()
        return _shared


def _ready(obj) -> None:
    """Evaluate every mx.array in obj: work queued on the caller's stream cannot be run from the
    worker thread (MLX streams belong to their thread)."""
    mx = mlx_core()
    from mlx.utils import tree_flatten
    leaves = [v for _, v in tree_flatten(obj) if isinstance(v, mx.array)]
    if leaves:
        mx.eval(leaves)


def _held_arrays(layer) -> list:
    """Arrays a layer's modules hold besides their parameters, e.g. a RoPE's frequencies ("_freqs",
    which mlx_lm computes lazily on the thread that built the model)."""
    mx = mlx_core()
    held = []
    for _, m in layer.named_modules():
        private = [v for k, v in m.items() if k.startswith("_")]   # parameters() leaves these out
        held += [v for v in (*private, *vars(m).values()) if isinstance(v, mx.array)]
    return held


# Modules whose parameters act on each token's row alone: splitting the batch cannot change them.
ROW_WISE_MODULES = ("RMSNorm", "LayerNorm", "RoPE", "SuScaledRoPE", "Llama3RoPE", "YarnRoPE")
# Modules that are a matmul over the rows: BLAS may pick another kernel (another summation order)
# for fewer rows, e.g. OpenBLAS's small-matrix path, so each shape is probed before a split.
MATMUL_MODULES = ("Linear", "QuantizedLinear", "Float32Linear", "Float32QuantizedLinear")


class SplitCheck:
    """Whether running layer i as two half-batches gives the bytes of one call, per chunk shape.

    Verdicts are cached by the shapes that matter (module type, weight shapes and dtype, rows),
    so a model whose layers look alike probes once per chunk shape."""

    def __init__(self):
        self._verdicts: dict[tuple, bool] = {}

    def ok(self, fwd: Forward, i: int, batch: int, length: int) -> bool:
        layer = fwd.model.layers[i]
        block = fwd.blocks.get(i)
        if block is layer:
            return False  # a layer-level MoE: the rendezvous stands in for a block this layer does not have
        inside_block = {id(m) for _, m in block.named_modules()} if block is not None else set()
        for _, module in layer.named_modules():
            if id(module) in inside_block:
                continue  # the MoE block always sees the whole chunk
            kind = type(module).__name__
            if kind in MATMUL_MODULES:
                if not self._probe(module, batch, length):
                    return False
            elif kind not in ROW_WISE_MODULES and _own_arrays(module):
                return False  # parameters used in a way we cannot vouch for: run whole
        return True

    def _probe(self, module, batch: int, length: int) -> bool:
        mx = mlx_core()
        w = module["weight"]
        in_dims = w.shape[1] * 32 // module.bits if "scales" in module else w.shape[1]
        key = (type(module).__name__, tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(_own_arrays(module).items())),
               batch, length)
        if key not in self._verdicts:
            dtype = module["scales"].dtype if "scales" in module else w.dtype
            # generic values (uniform in [-1, 1), numpy's generator: MLX's is ~4x slower on the CPU)
            x = mx.array(np.random.default_rng(0).random((batch, length, in_dims), dtype=np.float32) * 2 - 1).astype(dtype)
            rows = batch // 2
            # before any rounding to the model's dtype, which would hide most differences
            call = getattr(module, "float32_call", module)
            whole = call(x)
            mx.eval(x, whole, _own_arrays(module))   # the other lane may only use finished arrays

            def half(part: slice):
                def run():
                    out = call(x[part])
                    mx.eval(out)
                    return out
                return run
            with blas_threads(lane_threads()):  # as the lanes will run it: at once, one on each
                halves = mx.concatenate(shared_lanes().both(half(slice(0, rows)), half(slice(rows, None))), axis=0)
            self._verdicts[key] = bool(mx.array_equal(whole, halves, equal_nan=True).item())
        return self._verdicts[key]


def _own_arrays(module) -> dict:
    mx = mlx_core()
    return {k: v for k, v in module.items() if isinstance(v, mx.array)}


def split_layer_forward(fwd: Forward, lanes: Lanes, i: int, h, tokens: np.ndarray,
                        on_capture: Callable | None, check: bool):
    """Layer i on a chunk of >= 2 sequences as two half-batches on two lanes; bytes as one call.

    Everything row-wise (norms, attention per sequence, projections, residuals) is computed per
    half; the MoE block sees the whole chunk (experts.capture groups experts over all its tokens,
    which fixes the order of every float sum). Attention is mlx_lm's own code, called per half
    with the arguments its forward builds for that half."""
    mx = mlx_core()
    rows = tokens.shape[0] // 2
    halves = (tokens[:rows], tokens[rows:])
    tracers = [trace_layers(fwd.model, t)[i] for t in halves]  # model surgery: caller's thread only
    layer = fwd.model.layers[i]
    # the worker may only depend on finished arrays (lazy views of loaded weights included)
    _ready(([t.args for t in tracers], [t.kwargs for t in tracers], h, fwd.loaded_params(i), _held_arrays(layer)))
    meet = None
    if i in fwd.blocks:
        block = fwd.blocks[i]
        meet = _Rendezvous(fwd.hook(i, on_capture, check))
        layer[fwd.family.block] = meet

    def half(part: int):
        def run():
            if meet is not None:
                meet.lane.part = part
            x = h[:rows] if part == 0 else h[rows:]
            with eager_linears():
                out = layer(x, *tracers[part].args, **tracers[part].kwargs)
                mx.eval(out)
            return out
        return run

    barrier = meet.barrier if meet is not None else threading.Barrier(2)
    try:
        with blas_threads(lane_threads()), float32_attention():  # single-threaded lanes at 2 threads (SplitCheck probed this)
            a, b = lanes.both(half(0), half(1), barrier)
    finally:
        if meet is not None:
            layer[fwd.family.block] = block
            meet.hook.pair = None   # the hook and the rendezvous refer to each other: let the layer's experts go now
    return mx.concatenate([a, b], axis=0)
