"""The side channel of a distributed run: a TCP star from every rank to rank 0 that MLX's own
collectives never see.

MLX's ring backend reports a peer that died ("connection to a peer was lost") but waits forever
for one that hangs, busy-spinning, and a group that saw an error cannot be used again. So every
MLX collective is entered only after an arrival barrier here (`exchange`), where a rank that is
gone (its socket closed), silent (no heartbeat) or late (no progress for `timeout` seconds) is
named. Then every rank writes one line `reap-stream: error: rank R: <why> (...)` on its stderr
and exits with code 2: the main thread by SystemExit when it is waiting here, else a timer.

Messages are JSON lines: hello/ready/refuse (handshake), arrive/go (barrier; `go` carries every
rank's payload), hb (heartbeat: progress since the last one, the MLX call the rank is in), abort
(rank 0 relays a failure). Rank 0 judges lateness; it can tell a rank that never joined an MLX
collective from the ones waiting inside it.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

EXIT_CODE = 2
PROTOCOL = 1
_real_stderr = 2   # the process's stderr once quiet_ring_logs() has put a filter on fd 2


class _Link:
    """One TCP connection carrying newline-delimited JSON."""

    def __init__(self, sock: socket.socket, read_timeout: float):
        sock.settimeout(read_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.file, self.lock = sock, sock.makefile("rb"), threading.Lock()

    def send(self, **msg: Any) -> None:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self.lock:
            self.sock.sendall(data)

    def recv(self) -> dict | None:
        line = self.file.readline()
        return json.loads(line) if line else None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def say(line: str) -> None:
    """One line on the process's real stderr (unfiltered, unbuffered)."""
    os.write(_real_stderr, (line.rstrip("\n") + "\n").encode())


class Watchdog:
    """Rank `rank` of `size` (> 1); rank 0 listens on `coord`. `timeout`: how long a rank may show
    no sign of progress (nor spend inside one MLX call) before the run is stopped."""

    def __init__(self, rank: int, size: int, coord: tuple[str, int], timeout: float):
        self.rank, self.size, self.timeout = rank, size, float(timeout)
        self.heartbeat = min(5.0, max(0.2, self.timeout / 10))
        self.silence = max(6 * self.heartbeat, 10.0)       # no heartbeat for this long: machine lost
        self._cv = threading.Condition(threading.RLock())
        self._links: dict[int, _Link] = {}
        self._arrived: dict[int, dict[int, tuple[str, Any]]] = {}   # rank 0: seq -> rank -> (tag, data)
        self._go: dict[int, list] = {}
        self._alive = [time.monotonic()] * size             # rank 0: last sign of progress per rank
        self._seq = 0
        self._progressed = False
        self._in_mlx: tuple[str, float] | None = None       # this rank: (MLX call, since)
        self._inside: list[tuple[str, float] | None] = [None] * size   # rank 0: the same, per rank
        self._calls = 0
        self._gone: set[int] = set()                        # ranks whose connection has ended
        self.failure: str | None = None
        self.closing = False
        self._connect(coord)
        for r, link in self._links.items():
            threading.Thread(target=self._read, args=(r, link), daemon=True, name=f"reap-watch-{r}").start()
        threading.Thread(target=self._tick, daemon=True, name="reap-heartbeat").start()

    # ------------------------------------------------------------------ used by the main thread

    def exchange(self, tag: str, payload: Any) -> list:
        """Wait until every rank has called exchange (the same tag); every rank's payload, in rank order."""
        self._seq += 1
        seq = self._seq
        if self.rank > 0:
            self._send(0, t="arrive", seq=seq, tag=tag, data=payload)
        with self._cv:
            if self.rank == 0:
                self._arrived.setdefault(seq, {})[0] = (tag, payload)
                self._alive[0] = time.monotonic()
                self._cv.wait_for(lambda: self.failure or len(self._arrived[seq]) == self.size)
                if not self.failure:
                    got = self._arrived.pop(seq)
                    odd = [r for r in range(self.size) if got[r][0] != tag]
                    if odd:
                        self.fail(odd[0], f"is at step {got[odd[0]][0]!r} while rank 0 is at {tag!r}")
                    else:
                        self._go[seq] = [got[r][1] for r in range(self.size)]
                        self.closing = self.closing or tag == "close"
                        for r in range(1, self.size):
                            self._send(r, t="go", seq=seq, tag=tag, data=self._go[seq])
            else:
                self._cv.wait_for(lambda: self.failure or seq in self._go)
            if self.failure:
                self._exit()
            return self._go.pop(seq)

    def progress(self) -> None:
        """Still working: sent with the next heartbeat; restarts this rank's lateness clock."""
        self._progressed = True

    def watch(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run an MLX collective; a ring error becomes the stop line naming the rank that caused it."""
        self._calls += 1
        self._in_mlx = (f"{name} (call {self._calls})", time.monotonic())
        try:
            return fn()
        except RuntimeError as e:
            with self._cv:   # the side channel usually names the lost rank within milliseconds
                self._cv.wait_for(lambda: self.failure is not None, timeout=max(2.0, 2 * self.heartbeat))
            self.fail(self.rank, f"lost its ring connection during MLX {name} ({e})")
            self._exit()
        finally:
            self._in_mlx = None

    def end(self) -> None:
        """Every rank ends here together (after a last exchange): closed sockets are no failure now."""
        self.closing = True
        for link in self._links.values():
            link.close()

    # ------------------------------------------------------------------ stopping

    def fail(self, rank: int, why: str, relay: bool = True) -> None:
        """The stop: one line naming `rank`, relayed by rank 0; exit 2 (SystemExit in the main
        thread where it waits here, else in 1 s from a timer)."""
        with self._cv:
            if self.failure is not None or self.closing:
                return
            self.failure = f"reap-stream: error: rank {rank}: {why} (distributed run stopped; seen by rank {self.rank})"
            say(self.failure)
            if relay and self.rank == 0:
                for link in self._links.values():   # the culprit too: a hung rank is told why it stops
                    try:
                        link.send(t="abort", rank=rank, why=why)
                    except OSError:
                        pass
            timer = threading.Timer(3.0 if self.rank == 0 else 1.0, os._exit, (EXIT_CODE,))
            timer.daemon = True
            timer.start()
            self._cv.notify_all()

    def _exit(self) -> None:
        """The main thread's way out once the line is out. Rank 0 first waits (up to 2 s) for the
        others to hang up: closing a socket with unread input resets it, which can drop the relay."""
        if self.rank == 0:
            with self._cv:
                self._cv.wait_for(lambda: self._gone >= set(self._links), timeout=2.0)
        raise SystemExit(EXIT_CODE)

    def _refuse(self, why: str) -> None:
        """Handshake failure (main thread): tell whoever is connected, one line, exit 2."""
        for link in self._links.values():
            try:
                link.send(t="refuse", why=why)
            except OSError:
                pass
        say(f"reap-stream: error: {why}")
        raise SystemExit(EXIT_CODE)

    # ------------------------------------------------------------------ threads

    def _send(self, r: int, **msg: Any) -> None:
        try:
            self._links[r].send(**msg)
        except OSError:
            self.fail(r, "exited or lost its connection")

    def _read(self, r: int, link: _Link) -> None:
        while True:
            why = "exited (its connection closed)"
            try:
                msg = link.recv()
            except socket.timeout:
                msg, why = None, f"sent no heartbeat for {self.silence:.0f}s (machine or network lost?)"
            except ConnectionResetError:
                msg, why = None, "exited (its connection was reset)"
            except (OSError, ValueError) as e:
                msg, why = None, f"lost its connection ({e})"
            if msg is None:
                with self._cv:
                    self._gone.add(r)
                    self._cv.notify_all()
                return self.fail(r, why)
            with self._cv:
                kind = msg.get("t")
                if kind == "abort":
                    self.fail(int(msg["rank"]), str(msg["why"]), relay=False)
                elif kind == "go":
                    self._go[msg["seq"]] = msg["data"]
                    self.closing = self.closing or msg["tag"] == "close"
                elif kind == "arrive":
                    self._arrived.setdefault(msg["seq"], {})[r] = (msg["tag"], msg["data"])
                if kind == "hb":
                    name = msg.get("mlx")
                    same = self._inside[r] is not None and self._inside[r][0] == name
                    self._inside[r] = self._inside[r] if same else (name, time.monotonic()) if name else None
                if kind == "arrive" or msg.get("progress"):
                    self._alive[r] = time.monotonic()
                self._cv.notify_all()

    def _tick(self) -> None:
        while self.failure is None and not self.closing:
            time.sleep(self.heartbeat)
            progressed, self._progressed = self._progressed, False
            now = time.monotonic()
            mine = self._in_mlx
            for r in list(self._links):
                self._send(r, t="hb", progress=progressed, mlx=mine[0] if mine else None)
            if self.rank == 0:
                self._judge(now, progressed, mine)

    def _judge(self, now: float, progressed: bool, mine: tuple[str, float] | None) -> None:
        """Rank 0: is a rank late at a barrier, or missing from an MLX call the others are stuck in?"""
        limit = f"{self.timeout:.0f}s"
        with self._cv:
            if progressed:
                self._alive[0] = now
            self._inside[0] = mine
            pending = self._arrived[min(self._arrived)] if self._arrived else None
            late = [r for r in range(self.size)
                    if pending is not None and r not in pending and now - self._alive[r] > self.timeout]
            inside = {r: v for r, v in enumerate(self._inside) if v is not None}
        if late:
            return self.fail(late[0], f"made no progress for {limit} while the others waited (hung?)")
        if inside:
            name, since = min(inside.values(), key=lambda v: v[1])
            outside = [r for r in range(self.size) if r not in inside]
            if now - since <= self.timeout:
                return
            if outside:
                return self.fail(outside[0], f"did not join MLX {name} for {limit} while the others waited in it (hung?)")
            self.fail(min(inside), f"every rank has been inside MLX {name} for over {limit} "
                                   "(are the ring ports reachable between the hosts?)")

    # ------------------------------------------------------------------ handshake

    def _connect(self, coord: tuple[str, int]) -> None:
        deadline = time.monotonic() + self.timeout
        where = f"{coord[0]}:{coord[1]}"
        if self.rank == 0:
            try:
                server = socket.create_server(coord, backlog=self.size)
            except OSError as e:
                self._refuse(f"rank 0: cannot listen on {where} for the other ranks ({e.strerror or e})")
            with server:
                while len(self._links) < self.size - 1:
                    server.settimeout(max(0.01, deadline - time.monotonic()))
                    try:
                        link = _Link(server.accept()[0], 10.0)
                    except OSError:
                        late = min(set(range(1, self.size)) - set(self._links))
                        self._refuse(f"rank {late}: did not join rank 0 at {where} within {self.timeout:.0f}s")
                    try:
                        hello = link.recv() or {}
                    except (OSError, ValueError):
                        hello = {}
                    r = hello.get("rank")
                    if hello.get("t") != "hello":
                        link.close()   # not one of ours: ignore it
                        continue
                    self._links[-1] = link   # to hear a refusal
                    if hello.get("size") != self.size:
                        self._refuse(f"rank {r}: was started as one of {hello.get('size')} ranks, rank 0 as one "
                                     f"of {self.size}")
                    if hello.get("protocol") != PROTOCOL:
                        self._refuse(f"rank {r}: speaks side-channel protocol {hello.get('protocol')}, rank 0 "
                                     f"speaks {PROTOCOL} (install the same reap-stream everywhere)")
                    if not isinstance(r, int) or not 0 < r < self.size or r in self._links:
                        self._refuse(f"rank {r}: joined twice, or is no rank of a group of {self.size}")
                    del self._links[-1]
                    self._links[r] = link
            for link in self._links.values():
                link.sock.settimeout(self.silence)
                link.send(t="ready")
            return
        while True:
            try:
                sock = socket.create_connection(coord, timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    say(f"reap-stream: error: rank 0: not reachable at {where} within {self.timeout:.0f}s "
                        f"(seen by rank {self.rank})")
                    raise SystemExit(EXIT_CODE) from None
                time.sleep(0.2)
        link = _Link(sock, self.timeout)
        link.send(t="hello", rank=self.rank, size=self.size, protocol=PROTOCOL)
        try:
            reply = link.recv() or {}
        except (OSError, ValueError):
            reply = {}
        if reply.get("t") != "ready":
            say(f"reap-stream: error: {reply.get('why') or 'rank 0: stopped before every rank had joined'}")
            raise SystemExit(EXIT_CODE)
        link.sock.settimeout(self.silence)
        self._links[0] = link


def quiet_ring_logs() -> None:
    """Drop the `[ring] ...` lines MLX's C++ ring backend writes to fd 2 (a dozen per lost
    socket) so that a stopped run shows one line; Python's own sys.stderr goes direct."""
    global _real_stderr
    if _real_stderr != 2:
        return
    sys.stderr.flush()
    _real_stderr = os.dup(2)
    sys.stderr = os.fdopen(os.dup(_real_stderr), "w", buffering=1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not line.startswith(b"[ring]"):
                    os.write(_real_stderr, line)

    threading.Thread(target=pump, daemon=True, name="reap-stderr").start()
