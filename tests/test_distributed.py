"""collect, eval and full as ranks of a group on 127.0.0.1 only: under `mlx.launch -n 2` and
`mlx.launch -n 3 --backend ring`, and started rank by rank exactly as mlx.launch starts them
(MLX_RANK + MLX_HOSTFILE) where each rank's exit code and output matter, or to spare the launcher's
busy-polling core. Each rank runs a share of whole calibration chunks, the sums are added in rank
order, and the answer is the one-process answer: counts, co-occurrences and maxima equal, float64
sums within 1e-12 relative, the same plan. Faults: SIGKILL a rank at a chosen point and relaunch
the same command, and it resumes and ends byte-identical to an uninterrupted run of as many ranks;
the survivors stop with exit code 2 and one line naming the rank that died or hung; ranks started
differently refuse before any work. mlx.launch exits 0 whatever its ranks did, so the tests check
what each rank did and left behind. `tools/check_distributed_faults.py` runs every fault point."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import error_line, run, tree_bytes
from reap_stream.errors import BadInput
from reap_stream.planning.plan import Plan
from reap_stream.runner.chunks import Chunk
from reap_stream.runner.distributed import (COORD_ENV, TIMEOUT_ENV, Group, World, rank_order_reduce,
                                            share_chunks, timeout_from_env, world)
from reap_stream.telemetry.store import TelemetryStore
from reap_stream.testing.ranks import fault, finished, launch, spawn, stop_problems

CALIB_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "calibration" / "licence.jsonl"
# 8 windows of 64 tokens in chunks of 2: 4 chunks, two per rank of 2
CALIB = ["--dataset-file", CALIB_FILE, "--pack-samples", "--window-tokens", "64", "--max-tokens", "512",
         "--chunk-tokens", "128"]
# 2 chunks for 3 ranks: rank 2 has no token and still hands in (zero) sums
CALIB_2_CHUNKS = [*CALIB[:-3], "256", "--chunk-tokens", "128"]
EXACT = ("frequency", "coactivation", "max_activations")
SUMS = ("weighted_frequency_sum", "ean_sum", "weighted_ean_sum", "expert_output_sum")


def assert_same_answer(single: Path, ranks: Path) -> None:
    """The distributed store holds the one-process answer (up to the order of float64 additions)."""
    one, many = TelemetryStore.open(single), TelemetryStore.open(ranks)
    assert one.layers() == many.layers()
    for layer in one.layers():
        a, b = one.read(layer), many.read(layer)
        assert a.tokens == b.tokens
        for name in EXACT:
            assert np.array_equal(getattr(a, name), getattr(b, name)), (layer, name)
        for name in SUMS:
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-12, atol=0, err_msg=name)


def pruned(store: Path, tmp: Path) -> dict:
    plan = tmp / f"{store.name}.plan.json"
    assert run("plan", store, "--ratio", "0.5", "--out", plan).exit_code == 0
    return Plan.load(plan).pruned_map()


def rank0_summary(stdout: str) -> dict:
    """The one JSON line of a launch: rank 0 reports for the group, the other ranks print nothing."""
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


# ------------------------------------------------------------------ pieces, in one process

def test_shares_are_whole_chunks_balanced_by_tokens_and_the_same_everywhere():
    sizes = [128, 64, 128, 192, 64, 64, 128, 32]
    for ranks in (1, 2, 3, 5):
        shares = share_chunks(sizes, ranks)
        assert shares == share_chunks(sizes, ranks)
        assert sorted(i for s in shares for i in s) == list(range(len(sizes)))
        assert all(s == sorted(s) for s in shares)
        loads = [sum(sizes[i] for i in s) for s in shares]
        assert max(loads) - min(loads) <= max(sizes)
    assert share_chunks([100, 100], 3)[2] == []   # more ranks than chunks: a rank with nothing


def test_a_group_of_one_is_this_process_alone():
    g = Group(World())
    chunks = [Chunk(0, np.zeros((1, 4), np.int32), 0)]
    arrays = {"x": np.arange(3.0)}
    assert not g.distributed and g.share(chunks) is chunks and g.reduce(arrays) is arrays
    assert g.exchange("step", 7) == [7] and g.together("step", lambda: 8) == [8]
    g.agree({"anything": 1})
    g.close()


def test_sums_are_added_in_rank_order_and_maxima_taken():
    rng = np.random.default_rng(0)
    parts = rng.standard_normal((3, 1000)) * 10.0 ** rng.uniform(-8, 8, (3, 1000))  # order shows in the bits
    is_max = np.zeros(1000, bool)
    is_max[-10:] = True
    parts[1, -10:-5] = -np.inf                     # a rank on which those experts were never routed
    got = rank_order_reduce(parts, is_max)
    want = (parts[0] + parts[1]) + parts[2]
    assert np.array_equal(got[:-10], want[:-10])
    assert np.array_equal(got[-10:], parts[:, -10:].max(axis=0))


def test_the_group_is_read_from_what_mlx_launch_sets(tmp_path):
    assert world({}) == World()
    empty = tmp_path / "one.json"
    empty.write_text("\n")                          # `mlx.launch -n 1` writes an empty hostfile
    assert world({"MLX_RANK": "0", "MLX_HOSTFILE": str(empty)}) == World(launched=True)
    ring = tmp_path / "ring.json"
    ring.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]]))
    assert world({"MLX_RANK": "2", "MLX_HOSTFILE": str(ring)}) == World(2, 3, ("127.0.0.1", 5003), "ring", True)
    moved = world({"MLX_RANK": "1", "MLX_HOSTFILE": str(ring), COORD_ENV: "127.0.0.1:6000"})
    assert moved.coord == ("127.0.0.1", 6000)
    devices = tmp_path / "ibv.json"
    devices.write_text(json.dumps([[None, "rdma_en5"], ["rdma_en5", None]]))
    jaccl = world({"MLX_RANK": "1", "MLX_JACCL_COORDINATOR": "127.0.0.1:7000", "MLX_IBV_DEVICES": str(devices)})
    assert jaccl == World(1, 2, ("127.0.0.1", 7001), "jaccl", True)


@pytest.mark.parametrize("env, where", [
    ({"MLX_RANK": "5", "MLX_HOSTFILE": "RING"}, "MLX_RANK"),
    ({"MLX_RANK": "x", "MLX_HOSTFILE": "RING"}, "MLX_RANK"),
    ({"MLX_RANK": "0", "MLX_HOSTFILE": "BAD"}, "BAD"),
    ({"MLX_RANK": "0", "MLX_HOSTFILE": "MISSING"}, "MISSING"),
    ({"MLX_RANK": "0", "MLX_HOSTFILE": "RING", COORD_ENV: "127.0.0.1"}, COORD_ENV),
    ({"MLX_RANK": "1", "MLX_WORLD_SIZE": "2"}, "MLX_RANK"),   # another backend (nccl): not ours to join
])
def test_a_broken_launch_environment_is_named(env, where, tmp_path):
    files = {"RING": '[["127.0.0.1:5000"], ["127.0.0.1:5001"]]', "BAD": '{"not": "a ring"}'}
    for key, text in files.items():
        (tmp_path / key).write_text(text)
    env = {k: str(tmp_path / v) if v in (*files, "MISSING") else v for k, v in env.items()}
    where = str(tmp_path / where) if where in (*files, "MISSING") else where
    with pytest.raises(BadInput) as e:
        world(env)
    assert e.value.where == where


def test_the_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert timeout_from_env() == 12.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(BadInput) as e:
            timeout_from_env()
        assert e.value.where == TIMEOUT_ENV


def test_distributed_without_a_launcher_is_refused(fixture_model, tmp_path, monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    out, work = tmp_path / "t.zarr", tmp_path / "w"
    result = run("collect", fixture_model("qwen3_moe"), *CALIB, "--out", out, "--work-dir", work, "--distributed")
    error_line(result, "no mlx.launch group", where="--distributed")
    assert not out.exists() and not work.exists()
    result = run("compare", fixture_model("qwen3_moe"), fixture_model("qwen3_moe"), *CALIB, "--distributed")
    error_line(result, "runs in one process", where="--distributed")


# ------------------------------------------------------------------ ranks under mlx.launch

def collect_args(model: Path, calib: list, out: Path, work: Path) -> list:
    return ["collect", model, *calib, "--out", out, "--work-dir", work, "--json"]


def one_and_ranks(tmp: Path, ranks: int, model: Path, calib: list) -> tuple[Path, Path, dict]:
    """The same collect in one process and as `ranks` ranks: (one, ranks, rank 0's summary)."""
    single, out = tmp / "single.zarr", tmp / "ranks.zarr"
    assert run("collect", model, *calib, "--out", single).exit_code == 0
    done = launch(ranks, collect_args(model, calib, out, tmp / "w"))
    assert out.is_dir(), done.stdout + done.stderr
    assert not (tmp / "w").exists()   # every rank cleaned up its own work dir, the last one WORK
    return single, out, rank0_summary(done.stdout)


@pytest.fixture(scope="module")
def two_ranks(fixture_model, tmp_path_factory) -> tuple[Path, Path, dict]:
    return one_and_ranks(tmp_path_factory.mktemp("two"), 2, fixture_model("qwen3_moe"), CALIB)


@pytest.fixture(scope="module")
def three_ranks(fixture_model, tmp_path_factory) -> tuple[Path, Path, dict]:
    """deepseek_v3 (a dense first layer, sigmoid routing) as 3 ring ranks on 2 chunks."""
    return one_and_ranks(tmp_path_factory.mktemp("three"), 3, fixture_model("deepseek_v3"), CALIB_2_CHUNKS)


def test_two_ranks_give_the_one_process_answer(two_ranks, tmp_path):
    single, ranks, summary = two_ranks
    assert_same_answer(single, ranks)
    assert pruned(ranks, tmp_path) == pruned(single, tmp_path)
    assert summary["distributed"]["ranks"] == 2
    assert summary["distributed"]["tokens_per_rank"] == [256, 256]
    assert TelemetryStore.open(ranks).attrs["distributed"]["ranks"] == 2


def test_a_rerun_after_completion_changes_nothing(two_ranks, fixture_model, tmp_path):
    _, a, _ = two_ranks
    before = tree_bytes(a)
    assert finished(spawn(2, collect_args(fixture_model("qwen3_moe"), CALIB, a, tmp_path / "w")))["already_complete"]
    assert tree_bytes(a) == before and not (tmp_path / "w").exists()


def test_three_ring_ranks_one_without_tokens_give_the_one_process_answer(three_ranks, tmp_path):
    single, ranks, summary = three_ranks
    assert summary["distributed"]["tokens_per_rank"] == [128, 128, 0]
    assert_same_answer(single, ranks)
    assert pruned(ranks, tmp_path) == pruned(single, tmp_path)


def test_eval_on_three_ranks_is_the_one_process_perplexity_to_the_bit(fixture_model):
    model = fixture_model("qwen3_moe")
    alone = run("eval", model, *CALIB_2_CHUNKS, "--json")
    assert alone.exit_code == 0, alone.output
    done = launch(3, ["eval", model, *CALIB_2_CHUNKS, "--json"])
    want, got = json.loads(alone.output), rank0_summary(done.stdout)
    assert got["nll_sum"] == want["nll_sum"] and got["perplexity"] == want["perplexity"]
    assert got["num_predictions"] == want["num_predictions"]


def test_full_on_two_ranks_prunes_as_one_process(fixture_model, tmp_path):
    model = fixture_model("qwen3_moe")
    alone = run("full", model, *CALIB, "--ratio", "0.5", "--out", tmp_path / "one", "--json")
    assert alone.exit_code == 0, alone.output
    finished(spawn(2, ["full", model, *CALIB, "--ratio", "0.5", "--out", tmp_path / "two", "--json"]))
    plans = [Plan.load(tmp_path / f"{n}.reap-work" / "plan.json") for n in ("one", "two")]
    assert plans[0].pruned_map() == plans[1].pruned_map()
    weights = [{k: v for k, v in tree_bytes(tmp_path / n).items() if k.endswith(".safetensors")} for n in ("one", "two")]
    assert weights[0] == weights[1] and weights[0]
    assert sorted(os.listdir(tmp_path / "two.reap-work")) == sorted(os.listdir(tmp_path / "one.reap-work"))


# ------------------------------------------------------------------ faults

# kill point -> the layer the relaunch resumes at (the tool runs the other points too)
N2_POINTS = {"rank 1 after layer 1 was committed, before recording it": 2,   # the ranks stopped a layer apart
             "rank 1 entering MLX's all_gather of layer 2 (rank 0 inside it)": 2}


@pytest.mark.parametrize("point", sorted(N2_POINTS))
def test_two_ranks_resume_after_a_sigkill_byte_identical(point, two_ranks, fixture_model, tmp_path):
    out, work = tmp_path / "t.zarr", tmp_path / "w"
    args = collect_args(fixture_model("qwen3_moe"), CALIB, out, work)
    victim = fault(point, "kill")[0]
    ranks = spawn(2, args, misbehave=fault(point, "kill"))
    assert ranks[victim].code == -9
    assert stop_problems(ranks, victim, "exited") == []
    assert not out.exists() and (work / f"rank-{victim:02d}").is_dir()
    progress = work / "rank-01" / "progress.json"
    kept = progress.read_text()
    progress.write_text('{"next_layer": 0}')   # as if rank 1's work dir were another run's
    assert stop_problems(spawn(2, args), 1, "resumes at layer 0 but rank 0's at 2", "not from one run") == []
    progress.write_text(kept)

    assert finished(spawn(2, args))["layers_run"] == 4 - N2_POINTS[point]
    assert tree_bytes(out) == tree_bytes(two_ranks[1])
    assert not work.exists()


def test_three_ranks_resume_after_the_rank_without_tokens_is_killed(three_ranks, fixture_model, tmp_path):
    out, work = tmp_path / "t.zarr", tmp_path / "w"
    args = collect_args(fixture_model("deepseek_v3"), CALIB_2_CHUNKS, out, work)
    victim, snippet = fault("rank 2 handing in its sums a second time", "kill")   # layer 2: layer 0 is dense
    ranks = spawn(3, args, misbehave=(victim, snippet))
    assert stop_problems(ranks, victim, "exited") == []
    assert stop_problems(spawn(2, args), 0, "work dir belongs to a run with other ranks") == []   # relaunched wrong

    assert finished(spawn(3, args))["layers_run"] == 2
    assert tree_bytes(out) == tree_bytes(three_ranks[1])


def test_a_hung_rank_stops_every_rank_naming_it(fixture_model, tmp_path):
    out, work = tmp_path / "t.zarr", tmp_path / "w"
    victim, snippet = fault("rank 1 inside layer 2", "hang")
    ranks = spawn(2, collect_args(fixture_model("qwen3_moe"), CALIB, out, work),
                  misbehave=(victim, snippet), env={"REAP_STREAM_DIST_TIMEOUT": "5"})
    assert stop_problems(ranks, victim, "made no progress for 5s") == []   # the hung rank too, told by rank 0
    assert not out.exists()


def test_ranks_started_differently_refuse_before_any_work(fixture_model, tmp_path):
    model, out, work = fixture_model("qwen3_moe"), tmp_path / "t.zarr", tmp_path / "w"
    args = collect_args(model, CALIB, out, work)
    other_text = collect_args(model, [*CALIB[:-3], "448", *CALIB[-2:]], out, work)

    newer = (1, "import reap_stream; reap_stream.__version__ = '99.0'")
    for ranks, needles in ((spawn(2, [args, other_text]), ["disagrees with rank 0 on calibration_fingerprint"]),
                           (spawn(2, args, misbehave=newer), ["disagrees with rank 0 on tool_version", '"99.0"']),
                           (spawn(2, args, hostfile_ranks={1: 3}), ["started as one of 3 ranks, rank 0 as one of 2"])):
        assert stop_problems(ranks, 1, *needles) == []
    assert not out.exists() and not work.exists()


def test_a_work_dir_of_one_process_and_one_of_ranks_are_not_mixed(fixture_model, tmp_path):
    model, out, work = fixture_model("qwen3_moe"), tmp_path / "t.zarr", tmp_path / "w"
    (work / "rank-00").mkdir(parents=True)
    result = run("collect", model, *CALIB, "--out", out, "--work-dir", work)
    error_line(result, "holds a distributed run's state", where=work)
    (work / "rank-00").rmdir()
    (work / "run.json").write_text("{}")
    ranks = spawn(2, collect_args(model, CALIB, out, work))
    assert stop_problems(ranks, 0, "work dir belongs to a run in one process") == []
    assert sorted(p.name for p in work.iterdir()) == ["run.json"] and not out.exists()
