"""apply's outputs reach the disk while they are written (io.files.Flusher): write-back requested
behind the copy, each file fsynced before the output is renamed into place (a safetensors
directory or a GGUF's parts), a write-back error a
failed run with one line and nothing left behind; and apply starts without importing what only
other commands need."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from functools import partial

import pytest

import reap_stream.io.files as files
from cli_helpers import error_line, run as _run, tree_bytes
from reap_stream.io.files import Flusher
from test_apply import make_plan

run = partial(_run, catch_exceptions=False)


@pytest.fixture
def syncs(monkeypatch):
    """Every fdatasync and fsync, in order: (kind, fd, path of the file; Linux names it)."""
    calls: list[tuple[str, int, str]] = []
    real_datasync, real_fsync = files._DATASYNC, os.fsync

    def recorded(kind, real):
        def sync(fd):
            link = f"/proc/self/fd/{fd}"
            calls.append((kind, fd, os.readlink(link) if os.path.exists(link) else ""))
            real(fd)
        return sync

    monkeypatch.setattr(files, "_DATASYNC", recorded("datasync", real_datasync))
    monkeypatch.setattr(files.os, "fsync", recorded("fsync", real_fsync))
    return calls


@pytest.fixture
def small_steps(monkeypatch):
    """Write-back asked for every 4 KiB, so that a tiny fixture sees it many times."""
    monkeypatch.setattr(files, "FLUSH_STEP", 4096)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


def test_a_flusher_writes_back_behind_the_writer_then_fsyncs_and_closes(tmp_path, syncs, small_steps):
    path = tmp_path / "f"
    flusher = Flusher(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
    data = bytes(range(256)) * 64
    for _ in range(8):
        files.write_all(flusher.fd, data)
        flusher.written(len(data))
        if _ == 0:  # the helper writes back while the writer goes on
            deadline = time.monotonic() + 10
            while not any(kind == "datasync" for kind, *_ in syncs) and time.monotonic() < deadline:
                time.sleep(0.001)
    flusher.finish()
    flusher.wait()
    assert path.read_bytes() == data * 8
    kinds = [kind for kind, fd, _ in syncs if fd == flusher.fd]
    assert "datasync" in kinds and kinds[-1] == "fsync" and kinds.count("fsync") == 1
    with pytest.raises(OSError) as e:  # closed by the flusher once it is done
        os.fstat(flusher.fd)
    assert e.value.errno == errno.EBADF


def test_an_abandoned_file_is_closed_without_an_fsync(tmp_path, syncs):
    before = open_fds()
    flusher = Flusher(os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644))
    flusher.finish()
    flusher.finish(sync=False)  # the run failed after all: the file is about to be deleted
    flusher.wait()
    assert open_fds() == before


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc")
def test_every_output_file_is_fsynced_before_the_output_appears(fixture_model, tmp_path, syncs, small_steps,
                                                                 monkeypatch):
    src = fixture_model("qwen3_moe")
    make_plan(src).save(tmp_path / "plan.json")
    out = tmp_path / "out"
    at_rename: list[tuple[str, int, str]] = []
    real_rename = os.rename

    def rename(a, b):
        if str(b) == str(out):  # the finished output moving into place
            at_rename.extend(syncs)
        return real_rename(a, b)

    monkeypatch.setattr(files.os, "rename", rename)
    assert run("apply", src, tmp_path / "plan.json", "--out", out, "--quiet", "--max-shard-size", "300KB").exit_code == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    every_file = sorted(p.name for p in out.iterdir())
    assert len(shards) > 1 and len(every_file) > len(shards) + 2
    fsynced = {os.path.basename(path) for kind, _, path in at_rename if kind == "fsync"}
    assert set(every_file) <= fsynced and ".out.reap-tmp" in fsynced  # the files, then their directory


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names descriptors through /proc")
def test_every_gguf_part_is_fsynced_by_its_flusher_before_its_rename(gguf_model, tmp_path, monkeypatch):
    import threading

    from test_gguf_apply import apply, mlx_plan

    src = gguf_model("qwen3_moe", "f32", split=20)
    synced: list[tuple[str, str]] = []   # (file, thread)
    at_rename: dict[str, list] = {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), threading.current_thread().name))
        real_fsync(fd)

    def replace(a, b):
        at_rename[os.path.basename(b)] = list(synced)
        return real_replace(a, b)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    apply(src, mlx_plan("qwen3_moe"), tmp_path / "pruned.gguf", overwrite=False, dry_run=False)
    parts = sorted(p.name for p in tmp_path.glob("pruned-*.gguf"))
    assert len(parts) == 3
    for name in parts:   # put on disk behind the copy, by the part's flusher, before it appears
        assert at_rename[name].count((f".{name}.partial", "flusher")) == 1


def test_a_failed_write_back_is_raised_by_wait_and_the_file_still_closed(tmp_path, monkeypatch, small_steps):
    attempts = []

    def broken(fd):
        attempts.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files, "_DATASYNC", broken)
    before = open_fds()
    flusher = Flusher(os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644))
    files.write_all(flusher.fd, bytes(8192))
    flusher.written(8192)
    deadline = time.monotonic() + 10
    while not attempts and time.monotonic() < deadline:
        time.sleep(0.001)
    files.write_all(flusher.fd, bytes(8192))  # the writer's descriptor stays open until finish()
    flusher.finish()
    with pytest.raises(OSError, match="nput/output error"):
        flusher.wait()
    assert attempts and open_fds() == before


def test_a_failed_fsync_fails_apply_with_one_line_and_leaves_nothing(fixture_model, tmp_path, monkeypatch):
    src = fixture_model("qwen3_moe")
    make_plan(src).save(tmp_path / "plan.json")
    source = tree_bytes(src)
    before = open_fds()

    def broken(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files.os, "fsync", broken)
    out = tmp_path / "out"
    error_line(_run("apply", src, tmp_path / "plan.json", "--out", out, "--quiet", "--max-shard-size", "300KB"),
               "cannot write the output", "input/output error", where=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    assert tree_bytes(src) == source and open_fds() == before


def test_apply_starts_without_the_planner_the_runner_or_gguf_py(fixture_model, tmp_path):
    src = fixture_model("qwen3_moe")
    make_plan(src).save(tmp_path / "plan.json")
    probe = ("import sys\nfrom reap_stream.cli import cli\n"
             "try:\n    cli(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "heavy = ('gguf', 'reap_stream.planning.planner', 'reap_stream.runner.chunks', "
             "'reap_stream.telemetry.calibration', 'mlx', 'torch', 'transformers', 'datasets', 'zarr')\n"
             "print(sorted(m for m in heavy if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, "apply", str(src), str(tmp_path / "plan.json"), "--out",
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "reap_manifest.json").is_file()
