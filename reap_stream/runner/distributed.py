"""One run over several processes: the ranks `mlx.launch` starts (MLX's ring backend over TCP, or
JACCL over Thunderbolt), each on its own share of the calibration chunks, results combined in a
fixed order so that they never depend on timing.

    group = join_group(required=run.distributed)   # no launcher: size 1, every call a no-op
    group.agree(record)                             # refused on every rank unless all are equal
    mine = group.share(chunks)                      # whole chunks, balanced by tokens
    total = group.reduce(arrays, maxes={...})       # float64, added in rank order (max for maxes)
    group.exchange(tag, payload)                    # barrier; every rank's JSON payload
    group.close()

Only MLX's all_gather moves data, after a side-channel barrier (runner/watchdog.py) that stops the
run with one line naming a rank that died, hangs or disagrees. The sums are gathered as their
float64 bytes and added in numpy (ring all_sum adds in the order its chunks travel, and
mx.array(float64 ndarray) would make float32). See docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import heapq
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..blas import mlx_core
from ..errors import BadInput
from ..io.lock import exclusive
from .chunks import Chunk, report_chunks_to
from .watchdog import Watchdog, quiet_ring_logs

SHARE_RULE = "whole chunks, most tokens first to the least loaded rank (v1)"
TIMEOUT_ENV = "REAP_STREAM_DIST_TIMEOUT"   # seconds a rank may show no progress
COORD_ENV = "REAP_STREAM_DIST_COORD"       # ip:port of rank 0's side channel, reachable by every rank
DEFAULT_TIMEOUT = 600.0


@dataclass(frozen=True)
class World:
    """Where this process stands, from the variables mlx.launch sets (nothing is connected yet)."""
    rank: int = 0
    size: int = 1
    coord: tuple[str, int] | None = None   # rank 0's side channel
    backend: str = ""                      # MLX backend to init: ring | jaccl
    launched: bool = False                 # started by mlx.launch (possibly as a group of 1)


def world(env: dict[str, str] | None = None) -> World:
    """The group this process was launched into (ring: MLX_RANK + MLX_HOSTFILE; JACCL: MLX_RANK +
    MLX_JACCL_COORDINATOR + MLX_IBV_DEVICES). `mlx.launch -n 1` leaves an empty hostfile: size 1."""
    env = os.environ if env is None else env
    if env.get("MLX_RANK") is None:
        return World()
    host, port, size, backend = "", 0, 1, ""
    if env.get("MLX_HOSTFILE"):
        nodes = _json_file(env["MLX_HOSTFILE"], "MLX_HOSTFILE") or []
        try:
            addresses = [a.rsplit(":", 1) for node in nodes for a in node]
            port = max(int(p) for _, p in addresses) + 1
            host, size, backend = nodes[0][0].rsplit(":", 1)[0], len(nodes), "ring"
        except (TypeError, ValueError, IndexError, AttributeError):
            if nodes:
                raise BadInput(env["MLX_HOSTFILE"], "is not a ring hostfile ([[\"ip:port\", ...], ...] per rank)") from None
    elif env.get("MLX_JACCL_COORDINATOR"):
        host, _, p = env["MLX_JACCL_COORDINATOR"].rpartition(":")
        devices = _json_file(env.get("MLX_IBV_DEVICES", ""), "MLX_IBV_DEVICES")
        port, size, backend = _port(p, "MLX_JACCL_COORDINATOR") + 1, len(devices or []), "jaccl"
    else:   # e.g. mlx.launch --backend nccl or mpi: every rank would do all the work alone
        raise BadInput("MLX_RANK", "is set but neither MLX_HOSTFILE (ring) nor MLX_JACCL_COORDINATOR (jaccl) "
                                   "is: start the ranks with mlx.launch --backend ring or jaccl")
    if env.get(COORD_ENV):
        host, _, p = env[COORD_ENV].rpartition(":")
        port = _port(p, COORD_ENV)
    try:
        rank = int(env["MLX_RANK"])
    except ValueError:
        raise BadInput("MLX_RANK", f"is not a rank number ({env['MLX_RANK']!r})") from None
    if size <= 1:
        return World(launched=True)
    if not 0 <= rank < size:
        raise BadInput("MLX_RANK", f"rank {rank} is outside the group of {size}")
    return World(rank, size, (host, port), backend, True)


def _json_file(path: str, name: str) -> Any:
    try:
        text = Path(path).read_text().strip()
        return json.loads(text) if text else None
    except (OSError, ValueError) as e:
        raise BadInput(path or name, f"unreadable {name} file ({e})") from None


def _port(text: str, name: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise BadInput(name, f"no port in {text!r} (expected ip:port)")
    return int(text)


def share_chunks(sizes: Sequence[int], size: int) -> list[list[int]]:
    """Chunk indices per rank: largest chunk first to the rank with the fewest tokens so far (ties:
    lower chunk index first, then lower rank); each share ascending. Deterministic everywhere."""
    loads = [(0, r) for r in range(size)]
    shares: list[list[int]] = [[] for _ in range(size)]
    for i in sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i)):
        load, r = heapq.heappop(loads)
        shares[r].append(i)
        heapq.heappush(loads, (load + int(sizes[i]), r))
    return [sorted(s) for s in shares]


def rank_order_reduce(parts: np.ndarray, is_max: np.ndarray) -> np.ndarray:
    """parts [ranks, n] float64 -> [n]: ((p0 + p1) + p2) + ..., or the running max where is_max."""
    total = parts[0].copy()
    for p in parts[1:]:
        np.add(total, p, out=total, where=~is_max)
        np.maximum(total, p, out=total, where=is_max)
    return total


def timeout_from_env() -> float:
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise BadInput(TIMEOUT_ENV, f"must be a number of seconds > 0 (got {text!r})")
    return value


class Group:
    """The ranks of one run (size 1: this process alone, nothing connected)."""

    def __init__(self, where: World, timeout: float = DEFAULT_TIMEOUT):
        self.rank, self.size = where.rank, where.size
        # seconds joining, waiting at barriers (for the slowest rank, mostly), inside MLX's all_gather,
        # adding up
        self.timings = {"join_s": 0.0, "barrier_s": 0.0, "gather_s": 0.0, "reduce_s": 0.0, "gathers": 0,
                        "gather_bytes": 0}
        self._dog: Watchdog | None = None
        self._mx: Any = None
        if self.size == 1:
            return
        started = time.perf_counter()
        quiet_ring_logs()
        self._dog = Watchdog(self.rank, self.size, where.coord, timeout)
        mx = mlx_core()
        self._mx = self._dog.watch("init", lambda: mx.distributed.init(strict=True, backend=where.backend))
        if (self._mx.rank(), self._mx.size()) != (self.rank, self.size):
            self._dog.fail(self.rank, f"MLX made it rank {self._mx.rank()} of {self._mx.size()}")
            raise SystemExit(2)
        report_chunks_to(self.progress)
        self.timings["join_s"] = time.perf_counter() - started

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def exchange(self, tag: str, payload: Any = None) -> list:
        """Barrier: returns every rank's (JSON-able) payload in rank order once all have arrived."""
        if self._dog is None:
            return [payload]
        started = time.perf_counter()
        try:
            return self._dog.exchange(tag, payload)
        finally:
            self.timings["barrier_s"] += time.perf_counter() - started

    def progress(self) -> None:
        if self._dog is not None:
            self._dog.progress()

    def together(self, tag: str, fn: Callable[[], Any]) -> list:
        """fn() on every rank; its results in rank order. Bad input on any rank is raised on all of
        them, naming that rank (alone: fn's own error)."""
        if self._dog is None:
            return [fn()]
        try:
            outcome = [fn(), None]
        except BadInput as e:
            outcome = [None, [e.where, e.what]]
        outcomes = self.exchange(tag, outcome)
        for r, (_, error) in enumerate(outcomes):
            if error is not None:
                self.refuse(BadInput(f"rank {r}: {error[0]}", error[1]))
        return [result for result, _ in outcomes]

    def agree(self, record: dict) -> None:
        """Refuse on every rank (naming the first rank and key that differ) unless all records are equal."""
        if self._dog is None:
            return
        records = self.exchange("agree", json.loads(json.dumps(record, sort_keys=True, default=str)))
        for r, other in enumerate(records[1:], start=1):
            for key in sorted(set(records[0]) | set(other)):
                if records[0].get(key) != other.get(key):
                    self.refuse(BadInput(f"rank {r}", f"disagrees with rank 0 on {key}: rank 0 has "
                                                       f"{_short(records[0].get(key))}, rank {r} has "
                                                       f"{_short(other.get(key))} (start every rank the same way)"))

    def share(self, chunks: list[Chunk]) -> list[Chunk]:
        """This rank's chunks (renumbered from 0; `start` still orders them globally)."""
        if self._dog is None:
            return chunks
        mine = share_chunks([c.num_tokens for c in chunks], self.size)[self.rank]
        return [Chunk(j, chunks[i].tokens, chunks[i].start) for j, i in enumerate(mine)]

    def tokens_per_rank(self, chunks: list[Chunk]) -> list[int]:
        return [sum(chunks[i].num_tokens for i in s) for s in share_chunks([c.num_tokens for c in chunks], self.size)]

    def reduce(self, arrays: dict[str, np.ndarray], maxes: frozenset[str] | set[str] = frozenset()) -> dict[str, np.ndarray]:
        """Every array summed over the ranks in rank order in float64 (max for `maxes`); every
        rank gets the result. Alone: the arrays themselves."""
        if self._dog is None:
            return arrays
        names = sorted(arrays)
        flat = [np.ascontiguousarray(arrays[n], dtype=np.float64).reshape(-1) for n in names]
        layout = [[n, list(np.shape(arrays[n])), n in maxes] for n in names]
        for r, other in enumerate(self.exchange("reduce", layout)):
            if other != layout:
                self.refuse(BadInput(f"rank {r}", f"sent arrays {other} where rank {self.rank} has {layout}"))
        mx = mlx_core()

        def gather() -> np.ndarray:
            with mx.stream(mx.cpu):   # the bytes as uint32: nothing converts them
                out = mx.distributed.all_gather(mx.array(np.concatenate(flat).view(np.uint32)), group=self._mx)
                mx.eval(out)
            return np.array(out, copy=True).view(np.float64).reshape(self.size, -1)

        started = time.perf_counter()
        parts = self._dog.watch("all_gather", gather)
        gathered = time.perf_counter()
        is_max = np.concatenate([np.full(f.size, n in maxes) for n, f in zip(names, flat)])
        total = rank_order_reduce(parts, is_max)
        self.timings["gathers"] += 1
        self.timings["gather_bytes"] = int(parts[0].nbytes)
        self.timings["gather_s"] += gathered - started
        self.timings["reduce_s"] += time.perf_counter() - gathered
        out, at = {}, 0
        for n, f in zip(names, flat):
            out[n] = total[at:at + f.size].reshape(np.shape(arrays[n]))
            at += f.size
        return out

    def close(self) -> None:
        """The last step, on every rank: from here a rank that exits is no failure."""
        if self._dog is not None and not self._dog.closing:
            self.exchange("close")
            self._end()

    def refuse(self, error: BadInput) -> None:
        """Raise `error`, which every rank raises at this same step: the run ends here, quietly."""
        if self._dog is not None:
            self._end()
        raise error

    def _end(self) -> None:
        report_chunks_to(None)
        self._dog.end()


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def join_group(required: bool = False) -> Group:
    """The group this process was launched into; `required` (--distributed) refuses to run alone
    when no launcher started it."""
    where = world()
    if required and not where.launched:
        raise BadInput("--distributed", "no mlx.launch group found (MLX_RANK is not set); start the command "
                                        "with mlx.launch, or leave --distributed out")
    return Group(where, timeout_from_env() if where.size > 1 else DEFAULT_TIMEOUT)


@contextlib.contextmanager
def lead_exclusive(*targets: tuple[Path, str]) -> Iterator[None]:
    """The one-writer locks of `targets` (path, what), held by a lone process or by rank 0 of a
    launch: the other ranks write only their own rank dirs, and only after joining rank 0, so a
    second launch on the same output stops at its rank 0."""
    with contextlib.ExitStack() as stack:
        if world().rank == 0:
            for target, what in targets:
                stack.enter_context(exclusive(target, what))
        yield


def common_start(group: Group, runner: Any) -> int:
    """The layer every rank resumes at. Ranks pass a barrier after every layer, so a killed run
    leaves them at most one layer apart, and the ones behind already hold the next layer's input:
    they move up to the furthest rank (runner.resume_at)."""
    starts = group.exchange("start", runner.start_layer)
    first, last = min(starts), max(starts)
    if last - first > 1:
        group.refuse(BadInput(f"rank {starts.index(first)}", f"its work dir resumes at layer {first} but rank "
                                                      f"{starts.index(last)}'s at {last}: they are not from one run "
                                                      f"(delete the work dirs)"))
    group.together("resume", lambda: runner.resume_at(last) if runner.start_layer < last else None)
    return last
