"""Every OS error is one line naming the path, with exit code 2: a full disk (checked before the first
byte, and for real when it fills during the run), permissions, read-only file systems, names too
long, link loops, directories and FIFOs where files belong. Nothing half-written is left; collect's
work dir is kept and resumes.

The disk-full and read-only cases mount a small tmpfs (root only); the permission cases run the CLI
in a child without the capabilities that let root ignore file modes. Each skips, saying why, where
that cannot be done."""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import error_line, run, tree_bytes
from reap_stream.families.model import open_model
from reap_stream.io.lock import PAUSE_ENV
from reap_stream.planning.planner import PlanOptions, make_plan
from reap_stream.telemetry.store import TelemetryStore
from reap_stream.telemetry.synthetic import write_synthetic_telemetry
from reap_stream.testing.gguf_convert import cached_gguf

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "fixtures" / "calibration" / "licence.jsonl"


@pytest.fixture(scope="module")
def work(fixture_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("oserr")
    src = fixture_model("qwen3_moe")
    store = write_synthetic_telemetry(root / "t.zarr", tokens=64, hidden=8, model=open_model(src).model_block())
    make_plan(store, PlanOptions("reap", ratio=0.5)).save(root / "plan.json")
    gguf = cached_gguf("qwen3_moe", "q8_0", root / "gguf", src)[0]
    return {"src": src, "gguf": gguf, "plan": root / "plan.json", "t": store.path}


@contextlib.contextmanager
def tmpfs(where: Path, size: str, readonly: bool = False):
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount_readonly(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reap_stream.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=600, **kw)


def one_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reap-stream: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def fill(directory: Path) -> Path:
    """Write until the file system is full; returns the filler (remove it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
    return filler


def run_until_paused(args, tmp_path: Path) -> subprocess.Popen:
    flag = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO), PAUSE_ENV: f"writing:{flag}"}
    child = subprocess.Popen([sys.executable, "-m", "reap_stream.cli", *map(str, args)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not Path(f"{flag}.waiting").exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return child


def resume(child: subprocess.Popen, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "go").touch()
    out, err = child.communicate(timeout=600)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


# ---------------------------------------------------------------- disk full

def test_apply_refuses_before_the_first_byte_when_the_output_cannot_fit(work, tmp_path):
    with tmpfs(tmp_path / "small", "512k") as mnt:
        r = run("apply", work["src"], work["plan"], "--out", mnt / "out", "--quiet")
        error_line(r, "not enough space for the output", "bytes needed", "free", where=mnt)
        assert os.listdir(mnt) == []


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_a_disk_that_fills_during_apply_is_one_line_and_leaves_nothing(work, tmp_path, kind):
    with tmpfs(tmp_path / "disk", "8m") as mnt:
        out = mnt / ("out.gguf" if kind == "gguf" else "out")
        child = run_until_paused(["apply", work["gguf" if kind == "gguf" else "src"], work["plan"], "--out", out,
                                  "--quiet"], tmp_path)
        filler = fill(mnt)  # the space check passed; now the disk is full
        line = one_line(resume(child, tmp_path), "no space left on device", "bytes needed", "0 free")
        assert line.startswith(f"reap-stream: error: {out}: cannot write the output")
        assert os.listdir(mnt) == ["filler"]  # no temporary, no output, no lock
        filler.unlink()
        assert cli("apply", work["gguf" if kind == "gguf" else "src"], work["plan"], "--out", out,
                   "--quiet").returncode == 0
        assert cli("verify", out).returncode == 0


def test_collect_on_a_full_disk_keeps_its_work_dir_and_resumes_to_the_same_store(work, tmp_path):
    args = ["collect", work["src"], "--dataset-file", CALIB, "--max-samples", 4, "--window-tokens", 64, "--json"]
    assert run(*args, "--out", tmp_path / "reference.zarr").exit_code == 0
    with tmpfs(tmp_path / "disk", "8m") as mnt:
        child = run_until_paused(args + ["--out", mnt / "t.zarr"], tmp_path)
        filler = fill(mnt)
        one_line(resume(child, tmp_path), "no space left on device", "the work dir is kept")
        assert (mnt / "t.zarr.work").is_dir() and not (mnt / "t.zarr").exists()
        filler.unlink()
        again = cli(*args, "--out", mnt / "t.zarr")
        assert again.returncode == 0, again.stderr
        assert TelemetryStore.open(mnt / "t.zarr").fingerprint() == \
            TelemetryStore.open(tmp_path / "reference.zarr").fingerprint()


def test_collect_refuses_when_the_spill_cannot_fit(work, tmp_path):
    with tmpfs(tmp_path / "small", "256k") as mnt:
        r = run("collect", work["src"], "--dataset-file", CALIB, "--out", mnt / "t.zarr", "--json")
        error_line(r, "not enough space for the work dir", "bytes needed")


# ---------------------------------------------------------------- read-only, names, loops, kinds of file

def test_an_output_on_a_read_only_file_system(work, tmp_path):
    with tmpfs(tmp_path / "ro", "1m") as mnt:
        remount_readonly(mnt)
        for args, out in ((["apply", work["src"], work["plan"]], mnt / "out"),
                          (["apply", work["gguf"], work["plan"]], mnt / "out.gguf"),
                          (["plan", work["t"], "--ratio", 0.5], mnt / "p.json"),
                          (["collect", work["src"], "--prompt", "hello there"], mnt / "t.zarr")):
            error_line(run(*args, "--out", out), "read-only file system", where=out)


def test_names_too_long_and_link_loops(work, tmp_path):
    long = tmp_path / ("n" * 300)
    error_line(run("apply", work["src"], work["plan"], "--out", long), "file name too long", where=long)
    os.symlink("loop", tmp_path / "loop")
    error_line(run("apply", work["src"], work["plan"], "--out", tmp_path / "loop" / "out"),
               "too many levels of symbolic links", where=tmp_path / "loop" / "out")
    error_line(run("apply", tmp_path / "loop", work["plan"], "--out", tmp_path / "o"),
               "too many levels of symbolic links", where=tmp_path / "loop")


def test_directories_and_fifos_where_files_belong(work, tmp_path):
    (tmp_path / "plan.json").mkdir()
    error_line(run("apply", work["src"], tmp_path / "plan.json", "--out", tmp_path / "o"), "is a directory")
    os.mkfifo(tmp_path / "fifo.json")
    error_line(run("apply", work["src"], tmp_path / "fifo.json", "--out", tmp_path / "o"), "is a FIFO")
    os.mkfifo(tmp_path / "model.gguf")
    error_line(run("apply", tmp_path / "model.gguf", work["plan"], "--out", tmp_path / "o.gguf"),
               "is a FIFO (named pipe), not a model directory or a GGUF file")
    (tmp_path / "o.gguf").mkdir()
    error_line(run("apply", work["gguf"], work["plan"], "--out", tmp_path / "o.gguf", "--overwrite"),
               "exists and is not a regular file")


# ---------------------------------------------------------------- permissions

def _without_root_file_access() -> None:
    """In the child before exec: drop the capabilities that let root ignore file modes
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) from the bounding set."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(97)


PERMISSION_CASES = """
import json, sys
from click.testing import CliRunner
from reap_stream.cli import cli
out = {}
for name, args in json.loads(sys.argv[1]).items():
    r = CliRunner().invoke(cli, args)
    out[name] = [r.exit_code, r.output]
print(json.dumps(out))
"""


def test_permission_denied_is_one_line_naming_the_file(work, tmp_path):
    import shutil

    locked = tmp_path / "locked"
    locked.mkdir()
    model = tmp_path / "model"
    shutil.copytree(work["src"], model)
    (model / "tokenizer_config.json").chmod(0)
    plan = tmp_path / "plan.json"
    shutil.copy(work["plan"], plan)
    unreadable_plan = tmp_path / "secret.json"
    shutil.copy(work["plan"], unreadable_plan)
    unreadable_plan.chmod(0)
    gguf = tmp_path / "m.gguf"
    shutil.copy(work["gguf"], gguf)
    gguf.chmod(0)
    config_model = tmp_path / "model2"
    shutil.copytree(work["src"], config_model)
    (config_model / "config.json").chmod(0)
    locked.chmod(0o555)
    cases = {
        "apply into a read-only directory": (["apply", str(work["src"]), str(plan), "--out", str(locked / "o")],
                                             locked / "o", "permission denied"),
        "gguf apply into a read-only directory": (["apply", str(work["gguf"]), str(plan), "--out",
                                                   str(locked / "o.gguf")], locked / "o.gguf", "permission denied"),
        "collect into a read-only directory": (["collect", str(work["src"]), "--prompt", "hello", "--out",
                                                str(locked / "t.zarr")], locked / "t.zarr", "permission denied"),
        "plan into a read-only directory": (["plan", str(work["t"]), "--ratio", "0.5", "--out", str(locked / "p.json")],
                                            locked / "p.json", "permission denied"),
        "unreadable plan": (["apply", str(work["src"]), str(unreadable_plan), "--out", str(tmp_path / "o1")],
                            unreadable_plan, "cannot read: permission denied"),
        "unreadable gguf": (["apply", str(gguf), str(plan), "--out", str(tmp_path / "o2.gguf")], gguf,
                            "cannot open: permission denied"),
        "unreadable tokenizer_config.json": (["apply", str(model), str(plan), "--out", str(tmp_path / "o3")],
                                             model / "tokenizer_config.json", "cannot read: permission denied"),
        "unreadable config.json": (["apply", str(config_model), str(plan), "--out", str(tmp_path / "o4")],
                                   config_model / "config.json", "cannot read: permission denied"),
    }
    try:
        r = subprocess.run([sys.executable, "-c", PERMISSION_CASES, json.dumps({k: v[0] for k, v in cases.items()})],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                           preexec_fn=_without_root_file_access if os.geteuid() == 0 else None, timeout=600)
    finally:
        locked.chmod(0o755)
    if r.returncode == 97:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here (no CAP_SETPCAP), so root reads every file")
    assert r.stdout, r.stderr
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for name, (_, where, needle) in cases.items():
        code, output = results[name]
        lines = output.strip().splitlines()
        assert code == 2 and len(lines) == 1, (name, output)
        assert lines[0].startswith(f"reap-stream: error: {where}") and needle in lines[0], (name, lines[0])
    assert sorted(os.listdir(locked)) == [] and not list(tmp_path.glob("o[0-9]*"))
    assert tree_bytes(model)  # the source is still there, untouched
