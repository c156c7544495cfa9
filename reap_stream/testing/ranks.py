"""Running `reap-stream` as the ranks of a group on 127.0.0.1 (never another address): through
`mlx.launch` (ring backend), or rank by rank as mlx.launch starts them (MLX_RANK + MLX_HOSTFILE)
where a check needs every rank's own exit code and stderr — mlx.launch exits 0 whatever its ranks
did. A rank can be made to die (SIGKILL) or hang at a chosen point (KILL_POINTS).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]

# Run on one rank before the CLI: `when(args, calls)` decides at each call of the patched function.
_CHILD = """
import importlib, os, signal, sys, time
from reap_stream.blas import ensure_blas
ensure_blas()

def patch(module, owner, name, when, then):
    mod = importlib.import_module(module)
    target = getattr(mod, owner) if owner else mod
    real, calls = getattr(target, name), [0]
    def patched(*args, **kwargs):
        calls[0] += 1
        if when(args, calls[0]):
            then()
        return real(*args, **kwargs)
    setattr(target, name, patched)

def stamp():
    if os.environ.get("REAP_FAULT_STAMP"):
        with open(os.environ["REAP_FAULT_STAMP"], "w") as f:
            f.write(repr(time.time()))

def kill():
    stamp()
    os.kill(os.getpid(), signal.SIGKILL)

def hang():
    stamp()
    time.sleep(3600)

rank, snippet = sys.argv[1:3]
if os.environ["MLX_RANK"] == rank:
    exec(snippet)
from reap_stream.cli import cli
cli(sys.argv[3:], prog_name="reap-stream")
"""

# where a rank misbehaves: (rank, snippet for _CHILD); `then` is kill or hang
KILL_POINTS = {
    "rank 1 while embedding":
        (1, "patch('reap_stream.runner.spill', 'HiddenSpill', 'write', lambda a, n: a[1] == 0 and a[2] == 1, {then})"),
    "rank 0 with layer 2 gathered, before its commit":
        (0, "patch('reap_stream.telemetry.store', 'TelemetryStore', 'commit', lambda a, n: a[1].layer == 2, {then})"),
    "rank 0 half-way through committing layer 1":
        (0, "patch('reap_stream.telemetry.store', '', 'fsync_tree', lambda a, n: 'layer_001' in str(a[0]), {then})"),
    "rank 1 after layer 1 was committed, before recording it":
        (1, "patch('reap_stream.runner.stream', 'StreamRunner', '_set_next_layer', lambda a, n: a[1] == 2, {then})"),
    "rank 1 entering MLX's all_gather of layer 2 (rank 0 inside it)":
        (1, "patch('mlx.core', 'distributed', 'all_gather', lambda a, n: n == 3, {then})"),
    "rank 1 inside layer 2":
        (1, "patch('reap_stream.runner.spill', 'HiddenSpill', 'write', lambda a, n: a[1] == 3, {then})"),
    "rank 2 handing in its sums a second time":
        (2, "patch('reap_stream.runner.distributed', 'Group', 'reduce', lambda a, n: n == 2, {then})"),
}


# a hang there is a hang inside MLX's collective, where nobody can tell the hung rank from the ones
# waiting for it: rank 0 stops the run naming the call ("every rank has been inside MLX ...")
INSIDE_MLX = {"rank 1 entering MLX's all_gather of layer 2 (rank 0 inside it)"}


def fault(point: str, then: str) -> tuple[int, str]:
    """(rank, snippet) making that rank `then` ("kill" or "hang") at `point`: spawn's `misbehave`."""
    rank, snippet = KILL_POINTS[point]
    return rank, snippet.format(then=then)


def blamed(point: str, then: str) -> tuple[int, tuple[str, ...]]:
    """The rank the stop line must name after that fault, and what the line must hold."""
    if then == "hang" and point in INSIDE_MLX:
        return 0, ("every rank has been inside MLX",)
    return KILL_POINTS[point][0], ("exited",) if then == "kill" else ()


@dataclass
class Rank:
    code: int
    stdout: str
    stderr: str

    def lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


def finished(ranks: list[Rank]) -> dict:
    """Rank 0's JSON summary of a run that every rank finished (exit 0), the others silent."""
    problems = [f"rank {r}: exit {done.code}, stderr {done.stderr!r}" for r, done in enumerate(ranks)
                if done.code != 0 or (r > 0 and done.stdout.strip())]
    if problems or not ranks[0].stdout.startswith("{"):
        raise AssertionError("; ".join(problems) or f"rank 0 printed {ranks[0].stdout!r}")
    return json.loads(ranks[0].stdout)   # --json: one document


def stop_problems(ranks: list[Rank], victim: int, *needles: str) -> list[str]:
    """What is wrong with how a run stopped: every rank but a SIGKILLed victim must exit 2 with
    exactly one stderr line naming the victim (and holding every needle)."""
    problems = []
    for r, done in enumerate(ranks):
        if r == victim and done.code == -signal.SIGKILL:
            continue
        line = done.lines()[0] if len(done.lines()) == 1 else None
        if done.code != 2 or line is None or not line.startswith(f"reap-stream: error: rank {victim}: ") \
                or not all(n in line for n in needles):
            problems.append(f"rank {r}: exit {done.code}, stderr {done.stderr!r}")
    return problems


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a rank: this one, with this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def free_ports(count: int) -> int:
    """P such that P .. P+count-1 are free on 127.0.0.1; a random start (below Linux's ephemeral
    range) so that test runs side by side rarely pick the same ports."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind((HOST, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range on 127.0.0.1")


def mlx_launch() -> str:
    found = Path(sys.executable).parent / "mlx.launch"
    return str(found) if found.exists() else (shutil.which("mlx.launch") or "mlx.launch")


def launch(ranks: int, args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300) -> Rank:
    """`mlx.launch -n RANKS --backend ring -- python -m reap_stream.cli ARGS`: its exit code (always
    0) and the output of every rank, interleaved."""
    base = free_ports(ranks + 1)   # the ring's ports, then the side channel's
    command = [mlx_launch(), "-n", str(ranks), "--backend", "ring", "--starting-port", str(base), "--",
               sys.executable, "-m", "reap_stream.cli", *map(str, args)]
    return _run([command], [child_env(env)], timeout)[0]


def spawn(ranks: int, args: list[str] | list[list[str]], *, misbehave: tuple[int, str] | None = None,
          env: dict[str, str] | None = None, hostfile_ranks: dict[int, int] | None = None,
          program: list[str] | None = None, timeout: float = 300) -> list[Rank]:
    """Every rank as its own process, the way mlx.launch starts them on 127.0.0.1 (without its
    launcher, which keeps a core busy polling). `args`: the CLI arguments, one list for all or one
    per rank; `misbehave`: (rank, snippet) run there first (KILL_POINTS); `hostfile_ranks`: {rank:
    group size its hostfile claims} (a rank started for another group); `program`: run this
    instead of the CLI."""
    per_rank = args if args and isinstance(args[0], list) else [args] * ranks
    base = free_ports(ranks + 1)
    rank, snippet = misbehave or (-1, "")
    with tempfile.TemporaryDirectory(prefix="reap-ranks-") as tmp:
        envs = []
        for r in range(ranks):
            size = (hostfile_ranks or {}).get(r, ranks)
            hostfile = Path(tmp) / f"hosts-{r}.json"
            hostfile.write_text(json.dumps([[f"{HOST}:{base + i}"] for i in range(size)]))
            extra = {"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile), **(env or {})}
            if size != ranks:
                extra["REAP_STREAM_DIST_COORD"] = f"{HOST}:{base + ranks}"
            envs.append(child_env(extra))
        program = program or [sys.executable, "-c", _CHILD, str(rank), snippet]
        commands = [[*program, *map(str, per_rank[r])] for r in range(ranks)]
        return _run(commands, envs, timeout)


def _run(commands: list[list[str]], envs: list[dict], timeout: float) -> list[Rank]:
    """Start every command (own session, output to files, an open empty stdin: mlx.launch polls
    its stdin), wait for all; past `timeout`, kill them all and raise TimeoutError."""
    with tempfile.TemporaryDirectory(prefix="reap-out-") as tmp:
        stdin_read, stdin_write = os.pipe()
        procs, files = [], []
        try:
            for i, (command, env) in enumerate(zip(commands, envs)):
                out, err = open(Path(tmp) / f"{i}.out", "w+"), open(Path(tmp) / f"{i}.err", "w+")
                files.append((out, err))
                procs.append(subprocess.Popen(command, stdin=stdin_read, stdout=out, stderr=err, env=env,
                                              start_new_session=True))
            deadline = time.monotonic() + timeout
            for p in procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"ranks still running after {timeout:.0f}s: {commands[0][-8:]}") from None
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            os.close(stdin_read)
            os.close(stdin_write)
        results = []
        for p, (out, err) in zip(procs, files):
            out.seek(0)
            err.seek(0)
            results.append(Rank(p.returncode, out.read(), err.read()))
            out.close()
            err.close()
        return results
