"""collect survives SIGKILL at any instant: the same command finishes with byte-identical output.
merge of disjoint calibration shards equals one run over their union."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import error_line, run, tree_bytes
from collect_helpers import assert_stats_close, calib_of, run_collect, token_set
from reap_stream.telemetry.store import TelemetryStore

CALIB_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "calibration" / "licence.jsonl"
ARGS = ["--dataset-file", str(CALIB_FILE), "--pack-samples", "--window-tokens", "64", "--max-tokens", "512",
        "--chunk-tokens", "128"]

# Where the child kills itself (SIGKILL, no cleanup): a patch applied before the CLI runs.
KILL_POINTS = {
    "while embedding": ("reap_stream.runner.spill", "HiddenSpill", "write", "args[1] == 0 and args[2] == 1"),
    "inside layer 2": ("reap_stream.runner.spill", "HiddenSpill", "write", "args[1] == 3 and args[2] == 2"),
    "output spilled, telemetry not committed": ("reap_stream.telemetry.store", "TelemetryStore", "commit",
                                                "args[1].layer == 2"),
    "telemetry half committed": ("reap_stream.telemetry.store", "", "fsync_tree", "'layer_001' in str(args[0])"),
    "committed, progress not recorded": ("reap_stream.runner.stream", "StreamRunner", "_set_next_layer", "args[1] == 3"),
}

CHILD = """
import importlib, os, signal, sys
module, owner, name, cond = sys.argv[1:5]
mod = importlib.import_module(module)
target = getattr(mod, owner) if owner else mod
real = getattr(target, name)
def patched(*args, **kwargs):
    if eval(cond):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(target, name, patched)
from reap_stream.cli import cli
cli(sys.argv[5:])
"""


@pytest.fixture(scope="module")
def uninterrupted(fixture_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "t.zarr"
    result = run("collect", fixture_model("qwen3_moe"), *ARGS, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def killed_collect(point: str, model: Path, out: Path, work: Path) -> list[str]:
    """Run collect in a child that is SIGKILLed at `point`; returns the command, to rerun."""
    command = ["collect", str(model), *ARGS, "--out", str(out), "--work-dir", str(work)]
    child = subprocess.run([sys.executable, "-c", CHILD, *KILL_POINTS[point], *command],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    return command


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_rerun_after_sigkill_is_byte_identical(point, uninterrupted, fixture_model, tmp_path):
    out, work = tmp_path / "t.zarr", tmp_path / "work"
    command = killed_collect(point, fixture_model("qwen3_moe"), out, work)
    assert not out.exists() and work.exists()

    result = run(*command)
    assert result.exit_code == 0, result.output
    assert tree_bytes(out) == tree_bytes(uninterrupted)
    assert not work.exists()


def test_rerun_after_completion_changes_nothing(uninterrupted, fixture_model):
    before = tree_bytes(uninterrupted)
    result = run("collect", fixture_model("qwen3_moe"), *ARGS, "--out", uninterrupted, "--json")
    assert result.exit_code == 0, result.output
    assert '"already_complete": true' in result.output
    assert tree_bytes(uninterrupted) == before


def test_a_failed_run_resumes_from_its_last_committed_layer(fixture_model, tmp_path, monkeypatch):
    from reap_stream.telemetry import accumulate

    model, calib = fixture_model("olmoe"), token_set(4, 32, seed=3)
    whole = run_collect(model, calib, tmp_path / "whole.zarr", chunk_tokens=32)

    real_add, calls, failed = accumulate.Accumulator.add, [], []

    def failing_add(self, cap):
        calls.append(self.stats.layer)
        if not failed and calls.count(2) == 3:  # once, on layer 2's third chunk
            failed.append(True)
            raise RuntimeError("power cut")
        return real_add(self, cap)

    monkeypatch.setattr(accumulate.Accumulator, "add", failing_add)
    with pytest.raises(RuntimeError, match="power cut"):
        run_collect(model, calib, tmp_path / "t.zarr", tmp_path / "w", chunk_tokens=32)
    assert TelemetryStore.open(tmp_path / "w" / "telemetry.zarr").layers() == [0, 1]

    calls.clear()
    summary = run_collect(model, calib, tmp_path / "t.zarr", tmp_path / "w", chunk_tokens=32)
    assert sorted(set(calls)) == [2, 3]   # layers 0 and 1 were not run again
    assert summary["layers_run"] == 2
    assert tree_bytes(tmp_path / "t.zarr") == tree_bytes(Path(whole["out"]))


def _lose_the_tail_of_the_chunk(array: Path) -> None:
    chunk = next(p for p in (array / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-8])


def _garble_the_metadata(array: Path) -> None:
    (array / "zarr.json").write_text("[1, 2]")


@pytest.mark.parametrize("damage", [_lose_the_tail_of_the_chunk, _garble_the_metadata])
def test_a_damaged_hidden_state_spill_is_refused_on_resume(damage, fixture_model, tmp_path):
    out, work = tmp_path / "t.zarr", tmp_path / "work"
    command = killed_collect("inside layer 2", fixture_model("qwen3_moe"), out, work)
    array = work / "hidden_002" / "c000001"
    damage(array)

    result = run(*command)
    error_line(result, "unreadable hidden states", "delete the work dir", where=array)
    assert not out.exists()


def test_merge_of_disjoint_shards_equals_one_run_over_their_union(fixture_model, tmp_path):
    model = fixture_model("deepseek_v3")
    union = token_set(8, 32, seed=5)
    first, second = calib_of(union.sequences[:4]), calib_of(union.sequences[4:])
    for name, calib in (("a", first), ("b", second), ("all", union)):
        run_collect(model, calib, tmp_path / f"{name}.zarr", chunk_tokens=32)
    result = run("merge", tmp_path / "a.zarr", tmp_path / "b.zarr", "--out", tmp_path / "merged.zarr", "--json")
    assert result.exit_code == 0, result.output
    merged, whole = TelemetryStore.open(tmp_path / "merged.zarr"), TelemetryStore.open(tmp_path / "all.zarr")
    assert merged.layers() == whole.layers() == [1, 2, 3]
    for layer in whole.layers():
        m, w = merged.read(layer), whole.read(layer)
        assert np.array_equal(m.frequency, w.frequency) and np.array_equal(m.coactivation, w.coactivation)
        assert np.array_equal(m.max_activations, w.max_activations)
        assert_stats_close(m, w, rtol=1e-12)
    assert merged.attrs["calibration"]["num_tokens"] == union.num_tokens
