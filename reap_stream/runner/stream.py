"""Layer-major streaming forward pass over an mlx_lm model that is never whole in memory.

Only layer i's weights are in memory while it runs (runner/skeleton.Weights); the hidden states of
every chunk between layers live in WORK_DIR/hidden_NNN/ (runner/spill.py), and progress.json says
which layer comes next, so a killed run resumes there and recomputes at most one layer. On the CPU,
chunks of >= 2 sequences run as two half-batches on two lanes where that gives the same bytes
(runner/lanes.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..blas import mlx_core
from ..errors import BadInput
from ..families.expert_source import read_first, release_slab_buffers
from ..families.masking import mask_experts, unmask_router
from ..families.model import Model
from ..families.table import attr
from ..io.files import write_text_atomic
from ..io.reading import read_json_object
from ..procstats import release_freed_memory
from .budget import MAX_EXPERT_CHUNK
from .chunks import Chunk, chunk_bar
from .lanes import SplitCheck, lanes_pair, shared_lanes, split_layer_forward
from .skeleton import Forward, Runs, open_skeleton
from .trace import split_outputs, trace_layers
from .spill import HiddenSpill

MoECallback = Callable[[int, Chunk, object], None]


class StreamRunner(Runs):
    """Layer-major forward: one layer's weights in memory, hidden states spilled to work_dir."""

    def __init__(self, model: Model, work_dir: str | Path, chunk_tokens: int = 4096,
                 progress: bool = True, parallel: bool = True, expert_chunk_bytes: int | None = MAX_EXPERT_CHUNK,
                 expert_kernel: str = "auto"):
        self.where = model.where
        # run chunks of >= 2 sequences as two half-batches on two CPU streams (same bytes)
        self.parallel = parallel
        self._split_check: SplitCheck | None = None
        self.work_dir = Path(work_dir)
        self.chunk_tokens = int(chunk_tokens)
        self.progress = progress
        skeleton, self.weights = open_skeleton(model)
        self.fwd = Forward(skeleton, model.family, model.structure.top_k, self.where, expert_chunk_bytes, expert_kernel)
        self.model = self.fwd.model
        self.spill = HiddenSpill(self.work_dir)
        self._head: list[str] | None = None

    @property
    def start_layer(self) -> int:
        """The first layer run() computes: where a killed run stopped."""
        path = self.work_dir / "progress.json"
        if not os.path.lexists(path):
            return 0
        n = read_json_object(path, "progress record").get("next_layer")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.num_layers:
            raise BadInput(path, f"next_layer {n!r:.40} is not a layer of this model; delete the work dir")
        return n

    def resume_at(self, layer: int) -> None:
        """Start at `layer` instead, whose input is already spilled (a distributed rank that was
        killed one step behind the others: runner/distributed.common_start)."""
        if not self.spill.complete(layer):
            raise BadInput(self.work_dir, f"hidden states for layer {layer} are missing; delete the work dir and rerun")
        self._set_next_layer(layer)
        for i in range(layer):
            self.spill.drop(i)

    def _set_next_layer(self, n: int) -> None:
        write_text_atomic(self.work_dir / "progress.json", json.dumps({"next_layer": n}))

    def embed(self, chunks: list[Chunk]) -> None:
        """h_0 for every chunk, from the model's own embedding code (non-layer weights only)."""
        mx = mlx_core()
        if self.spill.complete(0):
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        ids = np.concatenate([c.tokens.reshape(-1) for c in chunks]) if chunks else np.zeros(0, np.int64)
        with self.weights.embedding_rows(ids) as table:   # a rank may have no chunks
            names = self.weights.load(None, skip=lambda n: n.startswith("lm_head.") or n in table)
            self.spill.begin(0)
            for c in chunk_bar(chunks, "embed", self.progress):
                h = trace_layers(self.model, c.tokens, family=self.family)[0].x
                mx.eval(h)
                self.spill.write(0, c.index, h)
            self.spill.finish(0)
            self.weights.drop(names)
        release_freed_memory()

    def run(self, chunks: list[Chunk], on_moe: MoECallback | None = None,
            mask: dict[int, list[int]] | None = None, stop: int | None = None,
            on_layer_done: Callable[[int], None] | None = None) -> Iterator[int]:
        """Stream layers start_layer..stop-1 (default: all); yields each finished layer after
        on_layer_done(layer) has run (where callers commit per-layer results)."""
        mx = mlx_core()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        stop = self.num_layers if stop is None else stop
        start = self.start_layer
        if start == 0:
            self.embed(chunks)
        if not self.spill.complete(start) and start < stop:
            raise BadInput(self.work_dir, f"hidden states for layer {start} are missing; delete the work dir and rerun")
        for i in range(start, stop):
            source = self.weights.experts(i) if i in self.fwd.blocks else None
            read_first(source, self.fwd.chunk_bytes)
            names = self.weights.load(i, experts=source)
            self.fwd.sources = {i: source} if source is not None else {}
            router = attr(self.fwd.blocks[i], self.family.router) if i in self.fwd.blocks else None
            had_bias = router is not None and "bias" in router
            if mask and mask.get(i):
                mask_experts(self.model, {i: mask[i]}, self.family)
            self.spill.begin(i + 1)
            for c in chunk_bar(chunks, f"layer {i}", self.progress):
                h = self.spill.read(i, c.index)
                cb = None if on_moe is None else (lambda cap, c=c, i=i: on_moe(i, c, cap))
                check = c.index == 0  # the self-check: every layer's first chunk
                if self._split(i, c.tokens.shape):
                    out = split_layer_forward(self.fwd, shared_lanes(), i, h, c.tokens, cb, check)
                else:
                    tracers = trace_layers(self.model, c.tokens, family=self.family)
                    handed = self.spill.read_state(i, c.index) if tracers[i].needs else ()
                    states = {(s.layer, s.index): handed[s.index - 1] for s in tracers[i].needs}
                    out = self.fwd.layer_forward(i, h, tracers[i], cb, check,
                                                 lanes_pair if self.parallel else None, states)
                    out, state = split_outputs(self.family, out)
                    if state and i + 1 < len(tracers) and tracers[i + 1].needs:
                        mx.eval(out, [v for v in state if v is not None])
                        self.spill.write_state(i + 1, c.index, state)
                mx.eval(out)
                self.spill.write(i + 1, c.index, out)
            self.spill.finish(i + 1)
            if on_layer_done is not None:
                on_layer_done(i)
            self._set_next_layer(i + 1)
            self.spill.drop(i)
            self.fwd.sources = {}
            self.weights.drop(names)
            if router is not None:
                unmask_router(router, had_bias)  # what masking added to the router
            release_freed_memory()
            yield i
        release_slab_buffers()

    def logits(self, chunk: Chunk):
        """Logits of a chunk from the spilled output of the last layer (model's own head code).

        The head's weights (final norm, head; the embedding only when the head is tied to it) are
        read on the first call and kept for the following chunks until close()."""
        mx = mlx_core()
        n = self.num_layers
        if not self.spill.complete(n):
            raise BadInput(self.work_dir, "the last layer's output is not in the work dir; run all layers first")
        if self._head is None:
            needed = set(self.weights.head_names())
            self._head = self.weights.load(None, skip=lambda name: name not in needed)
        h = self.spill.read(n, chunk.index)
        out = trace_layers(self.model, chunk.tokens, final=h, family=self.family)[0].model_output
        mx.eval(out)
        return out

    def close(self) -> None:
        """Drop the head weights, the slab buffers and every spilled hidden state."""
        release_slab_buffers()
        if self._head is not None:
            self.weights.drop(self._head)
            self._head = None
        for i in range(self.num_layers + 1):
            self.spill.drop(i)

    def _split(self, i: int, shape: tuple) -> bool:
        """Run this chunk as two half-batches on two lanes? Only on the CPU (where one stream
        uses one core) and only where it provably gives the same bytes (SplitCheck)."""
        mx = mlx_core()
        if not self.parallel or shape[0] < 2 or mx.default_device() != mx.cpu or self.family.layer_outputs > 1:
            return False
        if self._split_check is None:
            self._split_check = SplitCheck()
        return self._split_check.ok(self.fwd, i, int(shape[0]), int(shape[1]))
