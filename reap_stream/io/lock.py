"""One writer per output: an advisory lock on a small file beside the output (or work dir).

`exclusive(target)` takes an `fcntl.flock` lock on `.NAME.reap-lock` in the target's directory
before anything of the target is written, and writes the holder (pid, host, command) into it. A
second run on the same target is refused with one line naming the holder. The kernel releases the
lock when its process dies, however it dies, so a lock file left by a killed run is simply taken
over. The holder removes the file when it is done (while still holding the lock; a run that
opened the file just before then sees that the name points elsewhere and retries).

Locks are re-entrant within a process (`full` locks its output, then `apply` inside it locks it
again). Where the file system has no flock (ENOLCK / EOPNOTSUPP, some network mounts), the lock
file's recorded pid is checked instead: alive on this host means held.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from ..errors import BadInput, os_error

LOCK_SUFFIX = ".reap-lock"
_HELD: dict[str, int] = {}   # lock file -> how many nested `exclusive` blocks hold it here


def lock_path(target: str | Path) -> Path:
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _holder_line() -> str:
    cmd = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    return f"pid {os.getpid()} on {socket.gethostname()}: {cmd}\n"


def _describe(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip().splitlines()
    return text[0] if text else "a process that has not yet written its pid"


def _pid_alive_here(raw: bytes) -> bool:
    parts = raw.decode("utf-8", "replace").split()
    if len(parts) < 4 or parts[0] != "pid" or not (parts[1].isascii() and parts[1].isdigit()) \
            or parts[3].rstrip(":") != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _refuse(target: Path, what: str, raw: bytes) -> BadInput:
    return BadInput(target, f"another reap-stream run ({_describe(raw)}) is writing this {what}; "
                            f"wait for it to finish or stop it")


def _acquire(path: Path, target: Path, what: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise os_error(e, target, doing=f"cannot write in {target.parent}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 4096, 0)
            os.close(fd)
            raise _refuse(target, what, raw) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise os_error(e, path, doing="cannot lock") from None
            raw = os.pread(fd, 4096, 0)
            if _pid_alive_here(raw) and not raw.startswith(f"pid {os.getpid()} ".encode()):
                os.close(fd)
                raise _refuse(target, what, raw) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_line().encode(), 0)
            return fd
        os.close(fd)  # the previous holder removed the file between our open and our lock


@contextlib.contextmanager
def exclusive(target: str | Path, what: str = "output") -> Iterator[None]:
    """Hold the one-writer lock of `target` (an output file or directory, a work dir) while the
    block runs; BadInput naming the holder when another run has it."""
    target = Path(target)
    path = lock_path(target)
    key = str(path)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a name that is not a directory, or a link that leads nowhere
        try:
            os.stat(path.parent)
        except OSError as e:
            raise os_error(e, target, doing=f"cannot use {path.parent}") from None
        raise BadInput(target, f"{path.parent} is not a directory") from None
    except OSError as e:
        raise os_error(e, target, doing="cannot create its directory") from None
    fd = _acquire(path, target, what)
    _HELD[key] = 1
    try:
        test_pause("locked")
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


# ---------------------------------------------------------------- a pause point for tests

PAUSE_ENV = "REAP_STREAM_TEST_PAUSE"


def test_pause(point: str) -> None:
    """Where the environment says `POINT:FLAG` for this point: write FLAG.waiting (our pid) and wait
    until FLAG exists. Lets tests race two real processes deterministically (a lock held, a disk
    filled between the space check and the first byte); a no-op otherwise."""
    spec = os.environ.get(PAUSE_ENV, "")
    name, _, flag = spec.partition(":")
    if name != point or not flag:
        return
    Path(flag + ".waiting").write_text(str(os.getpid()))
    deadline = time.monotonic() + 300
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.01)
