"""Optimised BLAS under MLX: found, loaded before mlx, reported, and giving the same results.

Every case runs in a fresh interpreter: a BLAS only takes effect when loaded before `import mlx`,
and this test process may have imported mlx already.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reap_stream import blas

REPO = Path(__file__).resolve().parents[1]
OPENBLAS = blas.openblas_candidates()
needs_openblas = pytest.mark.skipif(
    not OPENBLAS or not sys.platform.startswith("linux"),
    reason=f"no system OpenBLAS (run tools/install_blas.sh: {blas.INSTALL_HINT})")

REPORT = "import json, sys; print(json.dumps(blas.blas_info()))"


def run_py(code: str, blas_env: str | None = None, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("REAP_STREAM_BLAS", "LD_PRELOAD")}
    if blas_env is not None:
        full_env["REAP_STREAM_BLAS"] = blas_env
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=120)


def info_of(code: str, blas_env: str | None = None, **env: str) -> tuple[dict, str]:
    """Run `code` (which must print blas_info() JSON as its last stdout line); return it and stderr."""
    r = run_py(code, blas_env, **env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@needs_openblas
def test_system_openblas_is_loaded_and_mlx_binds_to_it():
    info, err = info_of("import json; from reap_stream import blas; blas.ensure_blas(); import mlx.core; "
                        "print(json.dumps({**blas.blas_info(), 'provider': blas.global_sgemm_provider()}))")
    assert info["state"] == "loaded" and info["kind"] == "openblas" and info["source"] == "system"
    assert info["provider"] == info["path"] == os.path.realpath(OPENBLAS[0])
    assert info["version"].startswith("OpenBLAS") and info["threads"] >= 1
    assert err == ""


@needs_openblas
def test_thread_count_follows_openblas_num_threads():
    info, _ = info_of("from reap_stream import blas; blas.ensure_blas(); " + REPORT, OPENBLAS_NUM_THREADS="1")
    assert info["threads"] == 1 and info["threads_env"] == "OPENBLAS_NUM_THREADS"


@needs_openblas
def test_thread_count_is_lowered_for_a_block_and_restored():
    code = ("import json; from reap_stream import blas; blas.ensure_blas(); get = blas._controls()[0]; seen = []\n"
            "with blas.blas_threads(blas.lane_threads()):\n    seen.append(get())\n"
            "with blas.blas_threads(None):\n    seen.append(get())\n"
            "seen.append(get()); print(json.dumps(seen))")
    r = run_py(code, OPENBLAS_NUM_THREADS="2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [1, 2, 2]


@pytest.mark.parametrize("threads,lane", [(1, 1), (2, 1), (4, None), (16, None), (None, None)])
def test_lanes_go_single_threaded_only_at_two_threads_or_fewer(threads, lane, monkeypatch):
    # OpenBLAS runs multi-threaded GEMMs of two callers one at a time: halving would only slow them
    monkeypatch.setattr(blas, "_state", {"state": "loaded", "kind": "openblas", "threads": threads})
    assert blas.lane_threads() == lane


def test_thread_control_is_a_no_op_without_an_optimised_blas():
    r = run_py("from reap_stream import blas; blas.ensure_blas()\n"
               "with blas.blas_threads(1):\n    print('ran', blas.lane_threads())", "none")
    assert r.returncode == 0 and r.stdout.strip() == "ran None", r.stderr


def test_disabled_by_env_loads_nothing_and_warns_nothing():
    info, err = info_of("from reap_stream import blas; blas.ensure_blas(); import mlx.core; "
                        "assert blas.global_sgemm_provider() is None; " + REPORT, "none")
    assert info == {"state": "disabled", "source": "env", "kind": "reference", "path": None}
    assert err == ""


def test_missing_blas_warns_once_with_the_install_hint():
    code = ("from reap_stream import blas; blas.openblas_candidates = lambda: []; blas.mkl_candidates = lambda: []; "
            "blas.ensure_blas(); blas.ensure_blas(); " + REPORT)
    info, err = info_of(code)
    assert info["state"] == "missing" and info["kind"] == "reference"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reap-stream: warning: ")
    assert "apt-get install libopenblas0-pthread" in lines[0] and "REAP_STREAM_BLAS" in lines[0]


def test_importing_mlx_first_is_reported_as_too_late():
    info, err = info_of("import mlx.core; from reap_stream import blas; blas.ensure_blas(); " + REPORT)
    assert info["state"] == "too-late"
    assert len(err.strip().splitlines()) == 1 and "before reap_stream.blas.ensure_blas()" in err


def test_importing_the_pipeline_leaves_mlx_unloaded_for_the_blas_to_come_first():
    """The runner, collect, eval, full and estimate import mlx only when they run (after
    ensure_blas): a module that imported it at import time would bind MLX to its own BLAS, whose
    bits differ, in any process that imports it before the CLI."""
    modules = ("reap_stream.runner.stream", "reap_stream.runner.memory", "reap_stream.telemetry.collect",
               "reap_stream.eval", "reap_stream.pipeline", "reap_stream.estimate")
    r = run_py(f"import sys; import {', '.join(modules)}; print('mlx' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@needs_openblas
def test_explicit_path_in_env_wins():
    path = str(OPENBLAS[-1])
    info, _ = info_of("from reap_stream import blas; blas.ensure_blas(); " + REPORT, path)
    assert info["state"] == "loaded" and info["source"] == "env" and info["kind"] == "openblas"


@needs_openblas
def test_a_preloaded_openblas_is_recognised():
    info, _ = info_of("from reap_stream import blas; blas.ensure_blas(); " + REPORT,
                      LD_PRELOAD=os.path.realpath(OPENBLAS[0]))
    assert info["state"] == "preloaded" and info["kind"] == "openblas"


# ---------------------------------------------------------------- same results either way

NUMERICS = """
import sys, numpy as np
from reap_stream import blas
blas.ensure_blas()
import mlx.core as mx
from mlx_lm import load
rng = np.random.default_rng(0)
a = rng.standard_normal((512, 256), dtype=np.float32)
b = rng.standard_normal((256, 384), dtype=np.float32)
model, tok = load(sys.argv[1])
ids = mx.array(tok.encode("Licensed under the Apache License, Version 2.0 (the License); you may not use this file"))[None]
logits = model(ids)
np.savez(sys.argv[2], matmul=np.array(mx.array(a) @ mx.array(b)), logits=np.array(logits.astype(mx.float32)))
"""


@needs_openblas
def test_results_match_with_and_without_the_optimised_blas(fixture_model, tmp_path):
    model = fixture_model("qwen3_moe", "fp32")
    out = {}
    for mode in ("none", "auto"):
        path = tmp_path / f"{mode}.npz"
        r = subprocess.run([sys.executable, "-c", NUMERICS, str(model), str(path)], cwd=REPO, capture_output=True,
                           text=True, env={**os.environ, "REAP_STREAM_BLAS": mode}, timeout=120)
        assert r.returncode == 0, r.stderr
        out[mode] = np.load(path)
    for name in ("matmul", "logits"):
        ref, fast = out["none"][name], out["auto"][name]
        assert ref.shape == fast.shape and np.isfinite(ref).all()
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()), err_msg=name)


# ---------------------------------------------------------------- doctor and the install script

def doctor(*args: str, blas_env: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "REAP_STREAM_BLAS"}
    if blas_env is not None:
        env["REAP_STREAM_BLAS"] = blas_env
    code = f"import sys; sys.argv = ['reap-stream', 'doctor', *{list(args)!r}]; from reap_stream.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)


def test_doctor_json_reports_the_blas_and_a_matmul_probe():
    r = doctor("--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["blas"]["state"] in ("loaded", "preloaded", "missing", "native")
    assert report["matmul_probe"]["shape"] == [4096, 256, 512] and report["matmul_probe"]["median_ms"] > 0
    assert report["packages"]["mlx"] and report["memory"]["total_gib"] > 0
    if OPENBLAS:
        assert report["blas"]["kind"] == "openblas"
        single = report["blas"]["threads"] <= 2
        assert report["lanes"] == {"cpu_lanes": 2, "blas_threads_per_lane": 1 if single else report["blas"]["threads"],
                                   "experts_shared_out": single}


def test_doctor_text_names_a_disabled_blas_without_probe():
    r = doctor("--no-probe", blas_env="none")
    assert r.returncode == 0, r.stderr
    assert "disabled by REAP_STREAM_BLAS=none" in r.stdout and "matmul" not in r.stdout
    assert r.stderr == ""


def test_unloadable_explicit_path_is_bad_input_on_the_cli(tmp_path):
    bogus = tmp_path / "libnot-a-blas.so"
    bogus.write_text("not a shared object")
    r = doctor("--no-probe", blas_env=str(bogus))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"reap-stream: error: REAP_STREAM_BLAS: cannot load BLAS '{bogus}'")


def test_install_script_check_mode_reports_without_installing():
    r = subprocess.run(["bash", str(REPO / "tools" / "install_blas.sh"), "--check"], capture_output=True, text=True,
                       timeout=60)
    if OPENBLAS:
        assert r.returncode == 0 and "found" in r.stdout
    else:
        assert r.returncode == 1 and "missing" in r.stdout
