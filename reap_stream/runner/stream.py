"""Layer-major streaming forward pass over an mlx_lm model that is never whole in memory.

API (shared by `collect` and, later, `eval`):

    runner = StreamRunner(model_dir, work_dir, chunk_tokens=4096)
    chunks = runner.chunks(sequences)              # deterministic batches of equal-length sequences
    for layer in runner.run(chunks, on_moe=cb, mask=pruned_map, stop=None, on_layer_done=commit):
        ...                                        # yields each layer once its output is spilled
    logits = runner.final_logits(chunk)            # [B, L, V] from the last spilled hidden state

    cb(layer: int, chunk: Chunk, cap: routing.Capture) is called for every MoE layer and chunk;
    on_layer_done(layer) runs after layer's output is complete and before its input is deleted,
    which is where callers commit per-layer results atomically. `mask` ({layer: [expert ids]})
    routes as the "masked original" (masking.mask_experts), so pruned experts are never chosen.

    MemoryRunner(model_dir, chunk_tokens=...) has the same run()/final_logits() over the whole
    model in memory (chunk-major, no spill): the parity and speed baseline.

How a layer is run: the whole mlx_lm `Model(args)` is instantiated (its random init stays lazy and
is never evaluated), and only layer i's tensors are read, from the shards' byte ranges, into it.
Each layer's call convention (mask, cache, extra arguments) is taken from the model's own forward:
the decoder layers are swapped for tracers that record their arguments and pass the hidden state
through, so attention masks, sliding windows and the like are exactly what mlx_lm builds. The MoE
block of a layer is swapped for a hook that routes exactly and evaluates experts grouped by
expert (routing.capture); everything else is mlx_lm's own code.

On the CPU, StreamRunner runs a chunk of >= 2 sequences as two half-batches on two MLX streams
(`Lanes`, `split_layer_forward`): MLX's CPU element-wise kernels (attention's softmax) use one
thread per stream, so this is what puts the second core to work. With 2 BLAS threads configured,
each lane calls the BLAS single-threaded (blas.lane_threads). The MoE block still sees the whole
chunk, and the split is only taken where `SplitCheck` has shown that every matmul of the layer
outside the MoE block gives the same bits on half the rows at the lanes' thread count, so the
bytes never change. In that configuration the block's experts are shared out to both lanes too,
in every mode (routing.run_experts), the same calls whichever lane runs them.

Hidden states between layers live in WORK_DIR/hidden_NNN/ as one Zarr array per chunk, in the
model's dtype (bf16 as its uint16 bits), uncompressed. progress.json says which layer comes next;
a killed run resumes there and recomputes at most one layer.
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..io import zarr as zarr_io
from ..blas import blas_threads, lane_threads, total_threads
from ..io.safetensors import Checkpoint, TensorRef, read_array
from ..errors import BadInput
from ..families.table import Family, family_of
from ..io.files import write_text_atomic

# mlx is imported lazily (after blas.ensure_blas) by _mx()


def _mx():
    from ..blas import ensure_blas

    ensure_blas()
    import mlx.core as mx
    return mx


@dataclass(frozen=True)
class Chunk:
    """A batch of equal-length sequences processed together."""

    index: int
    tokens: np.ndarray   # [B, L] int32
    start: int           # first row of this chunk in the flattened calibration tokens

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)


def make_chunks(sequences: list[np.ndarray], chunk_tokens: int, max_batch: int | None = None) -> list[Chunk]:
    """Consecutive sequences of equal length, grouped up to chunk_tokens tokens and max_batch
    sequences (at least one)."""
    chunks: list[Chunk] = []
    batch: list[np.ndarray] = []
    start = row = 0
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int32).reshape(-1)
        full = (len(batch) + 1) * len(seq) > chunk_tokens or (max_batch is not None and len(batch) >= max_batch)
        if batch and (len(seq) != len(batch[0]) or full):
            chunks.append(Chunk(len(chunks), np.stack(batch), start))
            start, batch = row, []
        batch.append(seq)
        row += len(seq)
    if batch:
        chunks.append(Chunk(len(chunks), np.stack(batch), start))
    return chunks


# ------------------------------------------------------------------ model skeleton + weights

class _ShapeProxy:
    """What mlx_lm's quantisation inference reads of a weight: shape and dtype."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


_MX_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "U8": "uint8",
              "I32": "int32", "I8": "int8", "U16": "uint16", "I64": "int64"}


def to_mx(ref: TensorRef):
    """An mx.array holding exactly the bytes of one tensor (read from its byte range only)."""
    mx = _mx()
    if ref.dtype not in _MX_DTYPES:
        raise BadInput(ref.file, f"tensor {ref.name!r}: dtype {ref.dtype} is not supported by the streaming runner")
    # one map per tensor, gone once copied: a map kept for a whole layer would hold the layer's
    # pages in RSS next to their copies (measured: +43 MiB peak on an h512 / 64-expert model)
    arr = np.ascontiguousarray(read_array(ref))
    if ref.dtype == "BF16":
        return mx.array(arr).view(mx.bfloat16)
    return mx.array(arr)


def build_skeleton(ckpt: Checkpoint):
    """The mlx_lm Model of ckpt's config, quantised like the checkpoint, with nothing evaluated."""
    mx = _mx()
    import mlx.nn as nn
    from mlx_lm.utils import _get_classes, infer_quant_config

    config = dict(ckpt.config)
    try:
        model_class, args_class = _get_classes(config)
    except ValueError as e:
        raise BadInput(ckpt.root / "config.json", str(e)) from None
    model = model_class(args_class.from_dict(config))
    quant = config.get("quantization")
    if quant is not None:
        proxies = {n: _ShapeProxy(r.shape, getattr(mx, _MX_DTYPES.get(r.dtype, "uint8")))
                   for n, r in ckpt.tensors.items()}

        def predicate(path, module):
            if path in quant:
                return quant[path]
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in proxies:
                return False
            return infer_quant_config(path, module, proxies)

        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                    mode=quant.get("mode", "affine"), class_predicate=predicate)
    return model


def layer_list(model) -> list:
    """The list object the inner model iterates over (so its items can be swapped)."""
    for holder in (getattr(model, "model", None), model):
        layers = getattr(holder, "layers", None) if holder is not None else None
        if isinstance(layers, list) and layers and layers[0] is model.layers[0]:
            return layers
    raise BadInput("model", f"cannot find the decoder layer list of {type(model).__module__}")


class _Tracer:
    """Stands in for a decoder layer: records its call arguments, passes the hidden state on."""

    def __init__(self, out=None):
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.x = None
        self.out = out
        self.model_output = None  # set on tracer 0: the model's (lazy) output

    def __call__(self, x, *args, **kwargs):
        self.x, self.args, self.kwargs = x, args, kwargs
        return x if self.out is None else self.out


def trace_layers(model, tokens: np.ndarray, final=None) -> list[_Tracer]:
    """Run the model's own forward with tracers in place of its layers (nothing heavy is evaluated).

    Tracer i holds layer i's arguments; tracer 0's input `x` is the embedding output. With `final`
    given, every tracer returns it, so the model's output is its head applied to `final`.
    """
    mx = _mx()
    layers = layer_list(model)
    saved = list(layers)
    tracers = [_Tracer(final) for _ in layers]
    try:
        layers[:] = tracers
        out = model(mx.array(tokens))
    finally:
        layers[:] = saved
    tracers[0].model_output = out
    return tracers


# ------------------------------------------------------------------ MoE hook

class _MoEHook:
    """Replaces a layer's MoE block for one call: exact routing, grouped experts, callback."""

    def __init__(self, block, fam: Family, layer: int, top_k: int, num_experts: int,
                 on_capture: Callable | None, check: bool, where: str, pair: Callable | None = None):
        self.block, self.fam, self.layer = block, fam, layer
        self.top_k, self.num_experts = top_k, num_experts
        self.on_capture, self.check, self.where = on_capture, check, where
        self.pair = pair  # shares the experts out to two lanes (routing.Pair)

    def __call__(self, x):
        from ..families import routing

        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        cap = routing.capture(self.block, self.fam, flat, self.top_k, self.num_experts, self.pair)
        if self.check:
            routing.self_check(self.block, self.fam, cap, self.layer, self.where)
        if self.on_capture is not None:
            self.on_capture(cap)
        return cap.output.reshape(shape)


class _Forward:
    """What both runners share: the skeleton, its MoE layers, and one layer's forward with hooks."""

    def __init__(self, model, config: dict, where: str):
        from ..families.masking import moe_blocks

        self.model = model
        self.config = config
        self.family = family_of(config, where)
        self.where = where
        self.blocks = moe_blocks(model)           # layer -> MoE block
        self.num_layers = len(model.layers)
        self.top_k = int(config["num_experts_per_tok"])

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.blocks)

    def num_experts(self, layer: int) -> int:
        from ..families.masking import router_experts
        return router_experts(self.blocks[layer], self.family)

    def hook(self, i: int, on_capture: Callable | None, check: bool, pair: Callable | None = None) -> _MoEHook:
        return _MoEHook(self.blocks[i], self.family, i, self.top_k, self.num_experts(i), on_capture, check,
                        self.where, pair)

    def layer_forward(self, i: int, h, tracer: _Tracer, on_capture: Callable | None, check: bool,
                      pair: Callable | None = None):
        layer = self.model.layers[i]
        if i not in self.blocks:
            return layer(h, *tracer.args, **tracer.kwargs)
        block = self.blocks[i]
        hook = self.hook(i, on_capture, check, pair)
        # decoder layers call self.<block>(x); swapping the dict entry keeps the rest mlx_lm's code
        layer[self.family.block] = hook
        try:
            return layer(h, *tracer.args, **tracer.kwargs)
        finally:
            layer[self.family.block] = block


# ------------------------------------------------------------------ two CPU lanes

class _Rendezvous:
    """The MoE block of a layer run as two half-batches: both halves meet here, the block runs
    once on the whole chunk (so routing, expert grouping and telemetry are those of the chunk),
    and each half gets its rows of the output back. While the lead lane (part 0) runs the block,
    the other lane serves it: the block's experts are shared out to both (`pair`)."""

    def __init__(self, hook: _MoEHook):
        self.hook = hook
        hook.pair = self.pair
        self.parts: list = [None, None]
        self.out = None
        self.barrier = threading.Barrier(2)
        self.lane = threading.local()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()

    def __call__(self, x):
        mx = _mx()
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
        mx = _mx()
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


def _lanes_pair(first: Callable, second: Callable) -> tuple:
    """routing.Pair on the shared lanes, made on first use: run_experts decides whether to share
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
    mx = _mx()
    from mlx.utils import tree_flatten
    leaves = [v for _, v in tree_flatten(obj) if isinstance(v, mx.array)]
    if leaves:
        mx.eval(leaves)


# Modules whose parameters act on each token's row alone: splitting the batch cannot change them.
ROW_WISE_MODULES = ("RMSNorm", "LayerNorm", "RoPE", "SuScaledRoPE", "Llama3RoPE", "YarnRoPE")
# Modules that are a matmul over the rows: BLAS may pick another kernel (another summation order)
# for fewer rows, e.g. OpenBLAS's small-matrix path, so each shape is probed before a split.
MATMUL_MODULES = ("Linear", "QuantizedLinear")


class SplitCheck:
    """Whether running layer i as two half-batches gives the bytes of one call, per chunk shape.

    Verdicts are cached by the shapes that matter (module type, weight shapes and dtype, rows),
    so a model whose layers look alike probes once per chunk shape."""

    def __init__(self):
        self._verdicts: dict[tuple, bool] = {}

    def ok(self, fwd: _Forward, i: int, batch: int, length: int) -> bool:
        layer = fwd.model.layers[i]
        block = fwd.blocks.get(i)
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
        mx = _mx()
        w = module["weight"]
        in_dims = w.shape[1] * 32 // module.bits if "scales" in module else w.shape[1]
        key = (type(module).__name__, tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(_own_arrays(module).items())),
               batch, length)
        if key not in self._verdicts:
            dtype = module["scales"].dtype if "scales" in module else w.dtype
            # generic values (uniform in [-1, 1), numpy's generator: MLX's is ~4x slower on the CPU)
            x = mx.array(np.random.default_rng(0).random((batch, length, in_dims), dtype=np.float32) * 2 - 1).astype(dtype)
            rows = batch // 2
            whole = module(x)
            mx.eval(whole)
            with blas_threads(lane_threads()):  # as the lanes will run it
                halves = mx.concatenate([module(x[:rows]), module(x[rows:])], axis=0)
                mx.eval(halves)
            self._verdicts[key] = bool(mx.array_equal(whole, halves, equal_nan=True).item())
        return self._verdicts[key]


def _own_arrays(module) -> dict:
    mx = _mx()
    return {k: v for k, v in module.items() if isinstance(v, mx.array)}


def split_layer_forward(fwd: _Forward, lanes: Lanes, i: int, h, tokens: np.ndarray,
                        on_capture: Callable | None, check: bool):
    """Layer i on a chunk of >= 2 sequences as two half-batches on two lanes; bytes as one call.

    Everything row-wise (norms, attention per sequence, projections, residuals) is computed per
    half; the MoE block sees the whole chunk (routing.capture groups experts over all its tokens,
    which fixes the order of every float sum). Attention is mlx_lm's own code, called per half
    with the arguments its forward builds for that half."""
    mx = _mx()
    rows = tokens.shape[0] // 2
    halves = (tokens[:rows], tokens[rows:])
    tracers = [trace_layers(fwd.model, t)[i] for t in halves]  # model surgery: caller's thread only
    layer = fwd.model.layers[i]
    # the worker may only depend on finished arrays (lazy views of loaded weights included)
    _ready(([t.args for t in tracers], [t.kwargs for t in tracers], h, layer.parameters()))
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
            out = layer(x, *tracers[part].args, **tracers[part].kwargs)
            mx.eval(out)
            return out
        return run

    barrier = meet.barrier if meet is not None else threading.Barrier(2)
    try:
        with blas_threads(lane_threads()):  # single-threaded lanes at 2 threads (SplitCheck probed this)
            a, b = lanes.both(half(0), half(1), barrier)
    finally:
        if meet is not None:
            layer[fwd.family.block] = block
    return mx.concatenate([a, b], axis=0)


# ------------------------------------------------------------------ hidden-state spill

class HiddenSpill:
    """WORK_DIR/hidden_NNN: the input of layer NNN, one uncompressed Zarr array per chunk.

    Written and read with zarr_io: one raw chunk per array, as zarr-python would store it, without
    its per-call overhead. Uncompressed: lz4+shuffle saves only ~5% (f32) / ~12% (bf16) of these
    near-random values but made the spill 1.4-2.6x slower to write and read back
    (docs/reference_bench.md)."""

    def __init__(self, work_dir: Path):
        self.root = Path(work_dir)

    def path(self, layer: int, tmp: bool = False) -> Path:
        return self.root / (f".hidden_{layer:03d}.tmp" if tmp else f"hidden_{layer:03d}")

    def complete(self, layer: int) -> bool:
        return (self.path(layer) / "zarr.json").is_file()

    def begin(self, layer: int) -> None:
        tmp = self.path(layer, tmp=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        zarr_io.write_group(tmp)

    def write(self, layer: int, chunk: int, h) -> None:
        mx = _mx()
        if h.dtype == mx.bfloat16:
            data, dtype = np.array(h.view(mx.uint16)), "bfloat16"
        else:
            data = np.array(h)
            dtype = data.dtype.name
        zarr_io.write_array(self.path(layer, tmp=True) / f"c{chunk:06d}", data, {"dtype": dtype})

    def finish(self, layer: int) -> None:
        tmp, final = self.path(layer, tmp=True), self.path(layer)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def read(self, layer: int, chunk: int):
        mx = _mx()
        path = self.path(layer) / f"c{chunk:06d}"
        try:
            data, attrs = zarr_io.read_array(path)
        except Exception as e:  # whatever broke in our own work dir, the remedy is the same
            raise BadInput(path, f"unreadable hidden states ({e}); delete the work dir and rerun") from None
        data = mx.array(data)
        if attrs.get("dtype") == "bfloat16":
            data = data.view(mx.bfloat16)
        return data

    def drop(self, layer: int) -> None:
        for p in (self.path(layer), self.path(layer, tmp=True)):
            if p.exists():
                shutil.rmtree(p)


# ------------------------------------------------------------------ runners

# how a model is run: StreamRunner (layer by layer, spilled) or MemoryRunner (whole, in memory)
MODES = ("stream", "memory")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise BadInput("--mode", f"unknown mode {mode!r} (choose {', '.join(MODES)})")


def check_chunk_tokens(chunk_tokens: int) -> None:
    if chunk_tokens < 1:
        raise BadInput("--chunk-tokens", f"must be at least 1 (got {chunk_tokens})")


MoECallback = Callable[[int, Chunk, object], None]


class StreamRunner:
    """Layer-major forward: one layer's weights in memory, hidden states spilled to work_dir."""

    def __init__(self, model_dir: str | Path | Checkpoint, work_dir: str | Path, chunk_tokens: int = 4096,
                 progress: bool = True, parallel: bool = True):
        self.ckpt = Checkpoint.of(model_dir)
        # run chunks of >= 2 sequences as two half-batches on two CPU streams (same bytes)
        self.parallel = parallel
        self._split_check: SplitCheck | None = None
        self.where = str(self.ckpt.root / "config.json")
        family_of(self.ckpt.config, self.where)
        self.work_dir = Path(work_dir)
        self.chunk_tokens = int(chunk_tokens)
        self.progress = progress
        self.fwd = _Forward(build_skeleton(self.ckpt), self.ckpt.config, self.where)
        self.model = self.fwd.model
        self.spill = HiddenSpill(self.work_dir)
        self._params = None
        self._head: list[str] | None = None
        # a non-uniform prune (apply's config record): MoE layer -> experts it holds
        record = self.ckpt.config.get("reap_stream") or {}
        self._layer_experts = {int(k): int(v) for k, v in (record.get("layer_experts") or {}).items()}
        self._layer_prefix = self._find_layer_prefix()
        self._mlx_layout = self._is_mlx_layout()

    # -- facts about the model
    @property
    def family(self) -> Family:
        return self.fwd.family

    @property
    def num_layers(self) -> int:
        return self.fwd.num_layers

    @property
    def moe_layers(self) -> list[int]:
        return self.fwd.moe_layers

    def chunks(self, sequences: list[np.ndarray], max_batch: int | None = None) -> list[Chunk]:
        return make_chunks(sequences, self.chunk_tokens, max_batch)

    def _find_layer_prefix(self) -> str:
        first = self.model.layers[0]
        for path, module in self.model.named_modules():
            if module is first:
                return path[: -len(".0")] + "."
        raise BadInput(self.where, "cannot locate decoder layers in the mlx_lm model")

    def _param_table(self) -> dict:
        from mlx.utils import tree_flatten
        if self._params is None:
            self._params = {n: (tuple(a.shape), a.dtype) for n, a in tree_flatten(self.model.parameters())}
        return self._params

    def _is_mlx_layout(self) -> bool:
        return set(self.ckpt.tensors) <= set(self._param_table())

    def _names_of(self, layer: int | None) -> list[str]:
        pre = self._layer_prefix
        if layer is None:  # everything outside the decoder layers
            return sorted(n for n in self.ckpt.tensors if not n.startswith(pre))
        p = f"{pre}{layer}."
        return sorted(n for n in self.ckpt.tensors if n.startswith(p))

    def _load(self, layer: int | None, skip=lambda name: False) -> list[str]:
        """Read one layer's (or the non-layer) tensors into the skeleton; returns parameter names."""
        weights = {n: to_mx(self.ckpt.tensors[n]) for n in self._names_of(layer) if not skip(n)}
        if not self._mlx_layout and hasattr(self.model, "sanitize"):
            weights = self._sanitize(weights, layer)
        table = self._param_table()
        for n, a in weights.items():
            if n not in table:
                where = self.ckpt.tensors[n].file if n in self.ckpt.tensors else self.ckpt.root
                raise BadInput(where, f"tensor {n!r} is not a parameter of mlx_lm's {self.ckpt.model_type} model")
            if tuple(a.shape) != table[n][0] and not self._pruned_shape(n, tuple(a.shape), table[n][0], layer):
                raise BadInput(self.ckpt.root, f"tensor {n!r} has shape {list(a.shape)}, the model expects {list(table[n][0])}")
        if layer is not None:
            want = [n for n in table if n.startswith(f"{self._layer_prefix}{layer}.")]
            missing = sorted(set(want) - set(weights))
            if missing:
                raise BadInput(self.ckpt.root, f"layer {layer}: tensor {missing[0]!r} is missing from the checkpoint")
        self.model.load_weights(list(weights.items()), strict=False)
        return list(weights)

    def _pruned_shape(self, name: str, shape: tuple, model_shape: tuple, layer: int | None) -> bool:
        """True for an expert-axis tensor of a non-uniform prune: mlx_lm builds every layer with one
        count, the stored tensor holds this layer's (routing follows the router's width)."""
        from ..families.table import classify

        rel = classify(name, self.family)
        return (rel is not None and layer is not None and rel.kind in ("stacked", "router")
                and shape[1:] == model_shape[1:] and shape[0] == self._layer_experts.get(layer))

    def _sanitize(self, weights: dict, layer: int | None) -> dict:
        # Family sanitizers look for layer 0's names (e.g. mixtral); present layer i as layer 0.
        if layer is None:
            return self.model.sanitize(weights)
        pre = self._layer_prefix
        src, dst = f"{pre}{layer}.", f"{pre}0."
        renamed = {dst + n[len(src):]: a for n, a in weights.items()}
        out = self.model.sanitize(renamed)
        return {src + n[len(dst):] if n.startswith(dst) else n: a for n, a in out.items()}

    def _drop(self, names: list[str]) -> None:
        """Replace loaded tensors by lazy zeros, which hold no memory."""
        mx = _mx()
        table = self._param_table()
        self.model.load_weights([(n, mx.zeros(table[n][0], table[n][1])) for n in names], strict=False)
        mx.clear_cache()

    # -- progress
    def _progress_path(self) -> Path:
        return self.work_dir / "progress.json"

    def next_layer(self) -> int:
        try:
            return int(json.loads(self._progress_path().read_text())["next_layer"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def _set_next_layer(self, n: int) -> None:
        write_text_atomic(self._progress_path(), json.dumps({"next_layer": n}))

    # -- the pass
    def embed(self, chunks: list[Chunk]) -> None:
        """h_0 for every chunk, from the model's own embedding code (non-layer weights only)."""
        mx = _mx()
        if self.spill.complete(0):
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        names = self._load(None, skip=lambda n: n.startswith("lm_head."))
        self.spill.begin(0)
        for c in self._bar(chunks, "embed"):
            h = trace_layers(self.model, c.tokens)[0].x
            mx.eval(h)
            self.spill.write(0, c.index, h)
        self.spill.finish(0)
        self._drop(names)

    def run(self, chunks: list[Chunk], on_moe: MoECallback | None = None,
            mask: dict[int, list[int]] | None = None, stop: int | None = None,
            on_layer_done: Callable[[int], None] | None = None) -> Iterator[int]:
        """Stream layers next_layer()..stop-1 (default: all); yields each finished layer."""
        mx = _mx()
        from ..families.masking import mask_experts

        self.work_dir.mkdir(parents=True, exist_ok=True)
        stop = self.num_layers if stop is None else stop
        start = self.next_layer()
        if start == 0:
            self.embed(chunks)
        if not self.spill.complete(start) and start < stop:
            raise BadInput(self.work_dir, f"hidden states for layer {start} are missing; delete the work dir and rerun")
        for i in range(start, stop):
            names = self._load(i)
            router = getattr(self.fwd.blocks[i], self.family.router) if i in self.fwd.blocks else None
            had_bias = router is not None and "bias" in router
            if mask and mask.get(i):
                mask_experts(self.model, {i: mask[i]})
            self.spill.begin(i + 1)
            for c in self._bar(chunks, f"layer {i}"):
                h = self.spill.read(i, c.index)
                cb = None if on_moe is None else (lambda cap, c=c, i=i: on_moe(i, c, cap))
                check = c.index == 0  # the self-check: every layer's first chunk
                if self._split(i, c.tokens.shape):
                    out = split_layer_forward(self.fwd, shared_lanes(), i, h, c.tokens, cb, check)
                else:
                    out = self.fwd.layer_forward(i, h, trace_layers(self.model, c.tokens)[i], cb, check,
                                                 self._pair())
                mx.eval(out)
                self.spill.write(i + 1, c.index, out)
            self.spill.finish(i + 1)
            if on_layer_done is not None:
                on_layer_done(i)
            self._set_next_layer(i + 1)
            self.spill.drop(i)
            self._drop(names)
            if router is not None and not had_bias and "bias" in router:
                del router["bias"]  # the -inf bias masking added
            yield i

    def final_logits(self, chunk: Chunk):
        """Logits of a chunk from the spilled output of the last layer (model's own head code).

        The non-layer weights (embedding, norm, head) are read on the first call and kept for the
        following chunks until cleanup()."""
        mx = _mx()
        n = self.num_layers
        if not self.spill.complete(n):
            raise BadInput(self.work_dir, "the last layer's output is not in the work dir; run all layers first")
        if self._head is None:
            self._head = self._load(None)
        h = self.spill.read(n, chunk.index)
        out = trace_layers(self.model, chunk.tokens, final=h)[0].model_output
        mx.eval(out)
        return out

    def cleanup(self) -> None:
        if self._head is not None:
            self._drop(self._head)
            self._head = None
        for i in range(self.num_layers + 1):
            self.spill.drop(i)

    def _split(self, i: int, shape: tuple) -> bool:
        """Run this chunk as two half-batches on two lanes? Only on the CPU (where one stream
        uses one core) and only where it provably gives the same bytes (SplitCheck)."""
        mx = _mx()
        if not self.parallel or shape[0] < 2 or mx.default_device() != mx.cpu:
            return False
        if self._split_check is None:
            self._split_check = SplitCheck()
        return self._split_check.ok(self.fwd, i, int(shape[0]), int(shape[1]))

    def _pair(self) -> Callable | None:
        """Two lanes for the experts of an unsplit layer call."""
        return _lanes_pair if self.parallel else None

    def _bar(self, items, desc: str):
        from tqdm import tqdm
        total = sum(c.num_tokens for c in items)
        bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False, disable=None if self.progress else True)
        for c in items:
            yield c
            bar.update(c.num_tokens)
        bar.close()


class MemoryRunner:
    """The whole model in memory (mlx_lm's load_model, via loader for non-uniform prunes),
    chunk-major, the same hooks."""

    def __init__(self, model_dir: str | Path | Checkpoint, chunk_tokens: int = 4096, progress: bool = True):
        from ..families.loader import load_pruned_model

        self.ckpt = Checkpoint.of(model_dir)
        self.where = str(self.ckpt.root / "config.json")
        family_of(self.ckpt.config, self.where)
        _mx()
        model, _ = load_pruned_model(self.ckpt.root)
        self.fwd = _Forward(model, self.ckpt.config, self.where)
        self.model = model
        self.chunk_tokens = int(chunk_tokens)
        self.progress = progress

    family = StreamRunner.family
    num_layers = StreamRunner.num_layers
    moe_layers = StreamRunner.moe_layers
    chunks = StreamRunner.chunks
    _bar = StreamRunner._bar

    def run(self, chunks: list[Chunk], on_moe: MoECallback | None = None,
            mask: dict[int, list[int]] | None = None, stop: int | None = None) -> list:
        """Final hidden state per chunk, after layers 0..stop-1."""
        mx = _mx()
        from ..families.masking import mask_experts

        if mask:
            mask_experts(self.model, {i: ids for i, ids in mask.items() if ids})
        stop = self.num_layers if stop is None else stop
        outs = []
        for c in self._bar(chunks, "chunks"):
            tracers = trace_layers(self.model, c.tokens)
            h = tracers[0].x
            for i in range(stop):
                cb = None if on_moe is None else (lambda cap, c=c, i=i: on_moe(i, c, cap))
                h = self.fwd.layer_forward(i, h, tracers[i], cb, c.index == 0, _lanes_pair)  # as in stream mode
                mx.eval(h)
            outs.append(h)
        return outs

    def final_logits(self, chunk: Chunk, h):
        out = trace_layers(self.model, chunk.tokens, final=h)[0].model_output
        _mx().eval(out)
        return out
