"""A distributed run survives faults: SIGKILL any rank at a chosen point, relaunch the same command
with mlx.launch, and it resumes and ends byte-identical to an uninterrupted run of as many ranks;
the survivors stop with exit code 2 and one line naming the rank that died or hung; ranks started
differently refuse before any work. The ranks are started one by one here, as mlx.launch starts
them on 127.0.0.1, to see each rank's exit code and stderr (`tools/check_distributed_faults.py`
runs every point, both faults, 2 and 3 ranks)."""
from __future__ import annotations

from pathlib import Path

import pytest

from cli_helpers import tree_bytes
from reap_stream.testing.ranks import KILL_POINTS, launch, spawn
from test_distributed import CALIB, CALIB_2_CHUNKS

N2_POINTS = ["rank 1 after layer 1 was committed, before recording it",   # ranks resume one layer apart
             "rank 0 half-way through committing layer 1",
             "rank 1 entering MLX's all_gather of layer 2 (rank 0 inside it)"]


def collect_args(model: Path, calib: list, out: Path, work: Path) -> list:
    return ["collect", model, *calib, "--out", out, "--work-dir", work, "--json"]


def stopped_with_one_line(ranks, victim: int, *needles: str) -> None:
    """Every rank but a SIGKILLed victim exited 2 with exactly one stderr line naming the victim."""
    for r, done in enumerate(ranks):
        if r == victim and done.code == -9:
            continue
        assert done.code == 2, (r, done)
        assert len(done.lines()) == 1, (r, done.stderr)
        assert done.lines()[0].startswith(f"reap-stream: error: rank {victim}: "), (r, done.stderr)
        for needle in needles:
            assert needle in done.lines()[0], (r, done.stderr)


@pytest.fixture(scope="module")
def uninterrupted(fixture_model, tmp_path_factory) -> dict[int, Path]:
    tmp = tmp_path_factory.mktemp("whole")
    outs = {2: tmp / "two.zarr", 3: tmp / "three.zarr"}
    for n, model, calib in ((2, "qwen3_moe", CALIB), (3, "deepseek_v3", CALIB_2_CHUNKS)):
        done = launch(n, collect_args(fixture_model(model), calib, outs[n], tmp / f"w{n}"))
        assert outs[n].is_dir(), done.stdout + done.stderr
    return outs


@pytest.mark.parametrize("point", N2_POINTS)
def test_two_ranks_resume_after_a_sigkill_byte_identical(point, uninterrupted, fixture_model, tmp_path):
    out, work = tmp_path / "t.zarr", tmp_path / "w"
    args = collect_args(fixture_model("qwen3_moe"), CALIB, out, work)
    victim, snippet = KILL_POINTS[point]
    ranks = spawn(2, args, misbehave=(victim, snippet.format(then="kill")))
    assert ranks[victim].code == -9
    stopped_with_one_line(ranks, victim, "exited")
    assert not out.exists() and (work / f"rank-{victim:02d}").is_dir()

    launch(2, args)
    assert tree_bytes(out) == tree_bytes(uninterrupted[2])
    assert not work.exists()


def test_three_ranks_resume_after_the_rank_without_tokens_is_killed(uninterrupted, fixture_model, tmp_path):
    out, work = tmp_path / "t.zarr", tmp_path / "w"
    args = collect_args(fixture_model("deepseek_v3"), CALIB_2_CHUNKS, out, work)
    victim, snippet = KILL_POINTS["rank 2 handing in its layer-1 sums"]
    ranks = spawn(3, args, misbehave=(victim, snippet.format(then="kill")))
    stopped_with_one_line(ranks, victim, "exited")

    launch(3, args)
    assert tree_bytes(out) == tree_bytes(uninterrupted[3])


def test_a_hung_rank_stops_every_rank_naming_it(fixture_model, tmp_path):
    out, work = tmp_path / "t.zarr", tmp_path / "w"
    victim, snippet = KILL_POINTS["rank 1 inside layer 2"]
    ranks = spawn(2, collect_args(fixture_model("qwen3_moe"), CALIB, out, work),
                  misbehave=(victim, snippet.format(then="hang")), env={"REAP_STREAM_DIST_TIMEOUT": "5"})
    stopped_with_one_line(ranks, victim, "made no progress for 5s")   # the hung rank too, told by rank 0
    assert not out.exists()


def test_ranks_started_differently_refuse_before_any_work(fixture_model, tmp_path):
    model, out, work = fixture_model("qwen3_moe"), tmp_path / "t.zarr", tmp_path / "w"
    args = collect_args(model, CALIB, out, work)
    other_text = collect_args(model, [*CALIB[:-3], "448", *CALIB[-2:]], out, work)

    stopped_with_one_line(spawn(2, [args, other_text]), 1, "disagrees with rank 0 on calibration_fingerprint")
    newer = (1, "import reap_stream; reap_stream.__version__ = '99.0'")
    stopped_with_one_line(spawn(2, args, misbehave=newer), 1, "disagrees with rank 0 on tool_version", '"99.0"')
    stopped_with_one_line(spawn(2, args, hostfile_ranks={1: 3}), 1, "started as one of 3 ranks, rank 0 as one of 2")
    assert not out.exists() and not work.exists()
