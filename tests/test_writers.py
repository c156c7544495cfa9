"""One writer per output: every command that writes takes a lock beside its output (and work dir)
before the first byte; a second run is refused with one line naming the holder; a lock left by a
dead process is taken over; a replaced output is swapped in whole. Two real processes race here
with an injected pause (REAP_STREAM_TEST_PAUSE); tools/check_concurrency.py runs the randomised
trials."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import error_line, run, tree_bytes
from reap_stream.families.model import open_model
from reap_stream.io import files
from reap_stream.io.lock import PAUSE_ENV, exclusive, lock_path
from reap_stream.planning.planner import PlanOptions, make_plan
from reap_stream.telemetry.synthetic import write_synthetic_telemetry
from reap_stream.testing.gguf_convert import cached_gguf

REPO = Path(__file__).resolve().parents[1]
HOLDER = b"pid 4242 on elsewhere: reap-stream apply big.gguf\n"


@contextlib.contextmanager
def held(target: Path):
    """The lock of `target` held as another process would hold it (its own open file)."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, HOLDER)
    try:
        yield
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def work(fixture_model, tmp_path_factory):
    """A model, its GGUF, two telemetry stores shaped like it and two different plans."""
    root = tmp_path_factory.mktemp("writers")
    src = fixture_model("qwen3_moe")
    model = open_model(src)
    stores = [write_synthetic_telemetry(root / f"t{i}.zarr", tokens=64, hidden=8, seed=i, model=model.model_block())
              for i in (1, 2)]
    for name, ratio in (("a", 0.25), ("b", 0.5)):
        make_plan(stores[0], PlanOptions("reap", ratio=ratio)).save(root / f"plan-{name}.json")
    gguf = cached_gguf("qwen3_moe", "q8_0", root / "gguf", src)[0]
    split = cached_gguf("qwen3_moe", "q8_0", root / "gguf", src, split=20)[0]
    return {"src": src, "gguf": gguf, "split": split, "t1": stores[0].path, "t2": stores[1].path,
            "a": root / "plan-a.json", "b": root / "plan-b.json"}


def commands(w: dict, out: Path) -> dict[str, tuple[list, list[Path]]]:
    """Every writing command: its arguments and the paths it locks (output, then work dir)."""
    prompt = ["--prompt", "the quick brown fox " * 20]
    return {
        "apply": (["apply", w["src"], w["a"], "--out", out, "--quiet"], [out]),
        "apply gguf": (["apply", w["gguf"], w["a"], "--out", out.with_suffix(".gguf"), "--quiet"],
                       [out.with_suffix(".gguf")]),
        "apply split gguf": (["apply", w["split"], w["a"], "--out", out.with_suffix(".gguf"), "--quiet"],
                             [out.with_suffix(".gguf")]),
        "collect": (["collect", w["src"], *prompt, "--out", out, "--json"], [out, out.with_name(out.name + ".work")]),
        "full": (["full", w["src"], *prompt, "--ratio", 0.5, "--out", out, "--json"],
                 [out, out.with_name(out.name + ".reap-work")]),
        "plan": (["plan", w["t1"], "--ratio", 0.5, "--out", out], [out]),
        "init": (["init", "--out", out, "--layers", 2], [out]),
        "merge": (["merge", w["t1"], w["t2"], "--out", out], [out]),
        "report": (["report", w["t1"], "--out", out], [out]),
        "parity": (["parity", w["t1"], w["t2"], "--ratio", 0.5, "--out", out], [out]),
    }


@pytest.mark.parametrize("kind", ["apply", "apply gguf", "apply split gguf", "collect", "full", "plan", "init",
                                  "merge", "report", "parity"])
def test_a_second_writer_is_refused_with_one_line_naming_the_holder(work, tmp_path, kind):
    args, locked = commands(work, tmp_path / "out")[kind]
    for target in locked:  # each lock alone refuses the run
        with held(target):
            line = error_line(run(*args), where=target)
            assert "another reap-stream run (pid 4242 on elsewhere: reap-stream apply big.gguf) is writing" in line
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".reap-lock")) == [], kind
    r = run(*args)  # free again: the same command works, and leaves no lock file behind
    assert r.exit_code == (1 if kind == "parity" else 0), r.output  # the two stores differ: parity says FAIL
    assert not list(tmp_path.glob(".*.reap-lock"))


def test_a_lock_left_by_a_dead_process_is_taken_over(work, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(out).write_text(f"pid {dead.stdout.strip()} on {os.uname().nodename}: reap-stream apply\n")
    r = run("apply", work["src"], work["a"], "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert not lock_path(out).exists() and run("verify", out).exit_code == 0


def test_locks_are_reentrant_within_a_process_and_exclusive_across_opens(tmp_path):
    with exclusive(tmp_path / "x"):
        with exclusive(tmp_path / "x"):  # full -> apply on the same output
            pass
        assert lock_path(tmp_path / "x").exists()
        fd = os.open(lock_path(tmp_path / "x"), os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    assert not lock_path(tmp_path / "x").exists()


def paused(args: list, point: str, flag: Path, **kw) -> subprocess.Popen:
    """`reap-stream ARGS` in a child that stops at `point` until `flag` exists."""
    env = {**os.environ, "PYTHONPATH": str(REPO), PAUSE_ENV: f"{point}:{flag}"}
    child = subprocess.Popen([sys.executable, "-m", "reap_stream.cli", *map(str, args)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    deadline = time.monotonic() + 300
    while not Path(f"{flag}.waiting").exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the child never reached its pause point"
        time.sleep(0.02)
    return child


@pytest.mark.parametrize("kind", ["apply", "apply split gguf", "collect"])
def test_two_processes_racing_on_one_output(work, tmp_path, kind):
    """A holds the lock (paused right after taking it); B, with the other plan and --overwrite,
    is refused naming A's pid; A then finishes, and its output is whole and verifies."""
    out = tmp_path / "out"
    args, locked = commands(work, out)[kind]
    a = paused(args, "locked", tmp_path / "go")
    other = [work["b"] if x == work["a"] else x for x in args] + (["--overwrite"] if "apply" in kind else [])
    line = error_line(run(*other), where=locked[0])
    assert f"pid {a.pid} on " in line
    (tmp_path / "go").touch()
    stdout, stderr = a.communicate(timeout=300)
    assert a.returncode == 0, stderr
    if kind != "collect":
        target = locked[0] if kind == "apply" else locked[0].with_name("out-00001-of-00003.gguf")
        assert run("verify", target).exit_code == 0
    assert not [p.name for p in tmp_path.iterdir() if ".reap-" in p.name or p.name.endswith((".partial", ".tmp"))]


def test_overwrite_swaps_the_whole_output_and_leaves_nothing_behind(work, tmp_path):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert run("apply", work["src"], work["a"], "--out", out, "--quiet").exit_code == 0
    assert run("apply", work["src"], work["b"], "--out", out, "--quiet", "--overwrite").exit_code == 0
    assert run("apply", work["src"], work["b"], "--out", fresh, "--quiet").exit_code == 0
    assert tree_bytes(out) == tree_bytes(fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "out"]


def test_without_an_atomic_swap_a_run_killed_between_renames_loses_nothing(work, tmp_path, monkeypatch):
    """Where the file system cannot exchange two names, the old output goes aside first; a run
    dying right then leaves it at .OUT.reap-old, and the next run puts it back before anything else."""
    out = tmp_path / "out"
    assert run("apply", work["src"], work["a"], "--out", out, "--quiet").exit_code == 0
    old = tree_bytes(out)
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def die_on_the_second_rename(src, dst):
        if Path(src).name == ".out.reap-tmp":
            raise KeyboardInterrupt  # killed between the two renames
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", die_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        files.replace_dir(_fake_new(tmp_path), out)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists() and (tmp_path / ".out.reap-old").is_dir()
    r = run("apply", work["src"], work["b"], "--out", out, "--quiet")   # no --overwrite: the old one is back
    error_line(r, "output exists; pass --overwrite")
    assert tree_bytes(out) == old and not (tmp_path / ".out.reap-old").exists()


class Killed(BaseException):
    """The process dying at this point (what a SIGKILL would leave behind)."""


def _fake_new(tmp_path: Path) -> Path:
    new = tmp_path / ".out.reap-tmp"
    new.mkdir()
    (new / "x").write_text("new")
    return new


def test_gguf_overwrite_drops_the_old_manifest_before_the_parts_change(work, tmp_path, monkeypatch):
    """Split parts cannot change in one step: the old sidecar manifest goes first, so a run dying
    among the renames leaves parts that verify refuses, never a mix that passes."""
    out = tmp_path / "out.gguf"
    assert run("apply", work["split"], work["a"], "--out", out, "--quiet").exit_code == 0
    first = tmp_path / "out-00001-of-00003.gguf"
    real_replace = os.replace

    def killed_before_the_first_part(src, dst):
        if str(dst).endswith("00001-of-00003.gguf"):
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_first_part)
    with pytest.raises(Killed):
        run("apply", work["split"], work["b"], "--out", out, "--quiet", "--overwrite", catch_exceptions=False)
    monkeypatch.setattr(os, "replace", real_replace)
    r = run("verify", first, "--json")
    assert r.exit_code == 1
    assert any(f["check"] == "manifest" and f["what"] == "missing" for f in json.loads(r.output)["findings"])


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    """Some network file systems have no flock (ENOLCK): a lock file naming a live process on this
    host is then held, one naming a dead process is taken over."""
    import errno
    import socket

    from reap_stream.errors import BadInput
    from reap_stream.io import lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    out = tmp_path / "out"
    lock_path(out).write_text(f"pid {os.getppid()} on {socket.gethostname()}: reap-stream apply\n")
    with pytest.raises(BadInput, match=f"another reap-stream run \\(pid {os.getppid()} on"):
        with exclusive(out):
            pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(out).write_text(f"pid {dead.stdout.strip()} on {socket.gethostname()}: reap-stream apply\n")
    with exclusive(out):
        assert lock_path(out).read_text().startswith(f"pid {os.getpid()} ")
    assert not lock_path(out).exists()
