"""Stream mode on two CPU lanes: a chunk split into two half-batches gives the bytes of one call."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from collect_helpers import run_collect, stream_runner, token_set
from reap_stream.blas import mlx_core
from reap_stream.errors import BadInput
from reap_stream.families import experts, self_check
from reap_stream.runner import stream as runner_stream
from reap_stream.runner.lanes import Lanes, SplitCheck
from reap_stream.runner.stream import StreamRunner
from reap_stream.testing import synth

# Wide enough that every projection of a half-batch (4 x 64 rows) is a full-size BLAS call.
WIDE = {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32,
        "num_hidden_layers": 2, "moe_intermediate_size": 64}
CALIB = token_set(num_seqs=8, length=64)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    return synth.make_mlx_fixture("qwen3_moe", tmp_path_factory.mktemp("wide") / "m", config_overrides=WIDE)


@pytest.fixture(scope="module")
def splits_here(wide_model, tmp_path_factory) -> bool:
    """Whether this BLAS lets the wide model's layers run as two half-batches (SplitCheck)."""
    return SplitCheck().ok(stream_runner(wide_model, tmp_path_factory.mktemp("probe") / "w").fwd, 0, 4, 64)


@pytest.fixture
def split_calls(monkeypatch):
    """Counts the layer calls that took the two-lane path."""
    calls = []
    real = runner_stream.split_layer_forward

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_stream, "split_layer_forward", spy)
    return calls


def _stream(model, tmp_path, name, parallel, monkeypatch, chunk_tokens=512):
    real_init = StreamRunner.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **{**kwargs, "parallel": parallel})

    monkeypatch.setattr(StreamRunner, "__init__", init)
    summary = run_collect(model, CALIB, tmp_path / f"{name}.zarr", chunk_tokens=chunk_tokens)
    monkeypatch.setattr(StreamRunner, "__init__", real_init)
    return summary["telemetry_fingerprint"]


def test_two_lanes_give_the_bytes_of_one_lane_and_of_memory_mode(wide_model, tmp_path, monkeypatch, split_calls,
                                                                  splits_here):
    if not splits_here:
        pytest.skip("this BLAS computes a half-batch projection in another order: the split is never used")
    one_lane = _stream(wide_model, tmp_path, "serial", False, monkeypatch)
    assert split_calls == []
    two_lanes = _stream(wide_model, tmp_path, "parallel", True, monkeypatch)
    assert split_calls == [0, 1]                       # every layer of the one 512-token chunk
    memory = run_collect(wide_model, CALIB, tmp_path / "memory.zarr", mode="memory", chunk_tokens=512)
    assert two_lanes == one_lane == memory["telemetry_fingerprint"]


def test_several_chunks_and_an_odd_batch_split_exactly(wide_model, tmp_path, monkeypatch):
    # 8 sequences in chunks of 3 + 3 + 2: halves of 1 + 2 rows and 1 + 1
    one_lane = _stream(wide_model, tmp_path, "serial", False, monkeypatch, chunk_tokens=192)
    two_lanes = _stream(wide_model, tmp_path, "parallel", True, monkeypatch, chunk_tokens=192)
    assert two_lanes == one_lane


def test_a_projection_is_split_only_if_its_half_batches_give_the_same_bits(fixture_model, tmp_path):
    # OpenBLAS sums small matrices with another kernel whose order depends on the row count: the
    # tiny fixture's k_proj differs in the last bit between 2 x 32 rows and 1 x 32 + 1 x 32 here.
    import mlx.core as mx

    fwd = stream_runner(fixture_model("qwen3_moe"), tmp_path / "w").fwd
    k_proj = fwd.model.layers[0].self_attn.k_proj
    x = mx.array(np.random.default_rng(0).standard_normal((2, 32, k_proj.weight.shape[1])).astype(np.float32))
    same_bits = np.array_equal(np.array(k_proj(x)), np.concatenate([np.array(k_proj(x[:1])), np.array(k_proj(x[1:]))]))
    check = SplitCheck()
    assert check._probe(k_proj, 2, 32) is same_bits
    if not same_bits:
        assert check.ok(fwd, 0, 2, 32) is False


def test_an_error_in_the_shared_moe_step_surfaces_as_itself(wide_model, tmp_path, monkeypatch, split_calls):
    def broken(block, fam, cap, layer, where):
        raise BadInput(where, f"layer {layer}: routing capture does not reproduce the MoE block")

    monkeypatch.setattr(self_check, "self_check", broken)
    with pytest.raises(BadInput, match="layer 0: routing capture"):
        run_collect(wide_model, CALIB, tmp_path / "t.zarr", chunk_tokens=512)
    assert split_calls == [0]
    assert not (tmp_path / "t.zarr").exists()


@pytest.mark.parametrize("mode", ["stream", "memory"])
def test_an_error_in_the_experts_of_the_other_lane_surfaces_as_itself(mode, wide_model, tmp_path, monkeypatch,
                                                                    split_calls, splits_here):
    real = experts._expert_linear

    def failing(lin, arrays, j, x):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("expert failed on the other lane")
        return real(lin, arrays, j, x)

    monkeypatch.setattr(experts, "_expert_linear", failing)
    with pytest.raises(RuntimeError, match="expert failed on the other lane"):
        run_collect(wide_model, CALIB, tmp_path / "t.zarr", mode=mode, chunk_tokens=512)
    if mode == "stream" and splits_here:
        assert split_calls == [0]  # the experts were shared out from inside the two-lane layer call
    assert not (tmp_path / "t.zarr").exists()


def test_an_error_on_the_worker_lane_surfaces_as_itself():
    lanes = Lanes()
    barrier = threading.Barrier(2)

    def worker():
        raise ValueError("worker failed")

    try:
        with pytest.raises(ValueError, match="worker failed"):
            lanes.both(barrier.wait, worker, barrier)
    finally:
        lanes.close()


def test_the_worker_lane_releases_its_mlx_state_itself_on_close(monkeypatch):
    """MLX's per-thread compile cache drops Python objects when its OS thread ends; if that falls
    into interpreter finalization the process aborts. So the worker clears its own streams (and
    that cache) before it ends, and a closed pair of lanes refuses work."""
    mx = mlx_core()
    if not hasattr(mx, "clear_streams"):
        pytest.skip("this MLX keeps no per-thread stream state to release (clear_streams came with MLX 0.31.2)")
    cleared_on: list[str] = []
    real = mx.clear_streams
    monkeypatch.setattr(mx, "clear_streams", lambda: (cleared_on.append(threading.current_thread().name), real()))
    lanes = Lanes()
    assert lanes.both(lambda: 1, lambda: 2) == (1, 2)
    lanes.close()
    lanes.close()  # idempotent
    assert cleared_on == ["reap-lane"] and not lanes._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        lanes.both(lambda: 1, lambda: 2)


def test_the_shared_worker_has_ended_before_the_interpreter_finalizes():
    """atexit handlers run before finalization, last registered first: one registered before the
    lanes existed sees the lanes' own handler's result."""
    script = "\n".join([
        "import atexit",
        "from reap_stream.runner import lanes as runner",
        "lanes = []",
        "atexit.register(lambda: print('alive at exit:', lanes[0]._thread.is_alive()))",
        "lanes.append(runner.shared_lanes())",
        "lanes[0].both(lambda: None, lambda: None)",
    ])
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "alive at exit: False"


def test_a_rope_with_lazy_frequencies_runs_on_both_lanes(tmp_path, monkeypatch, split_calls):
    """Llama-3 RoPE scaling: mlx_lm keeps the scaled frequencies as a lazy array outside the
    parameters; the worker lane must get them evaluated (MLX streams belong to their thread)."""
    scaled = {**WIDE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
    model = synth.make_mlx_fixture("olmoe", tmp_path / "m", config_overrides=scaled)
    if not SplitCheck().ok(stream_runner(model, tmp_path / "probe").fwd, 0, 4, 64):
        pytest.skip("this BLAS computes a half-batch projection in another order: the split is never used")
    one_lane = _stream(model, tmp_path, "serial", False, monkeypatch)
    two_lanes = _stream(model, tmp_path, "parallel", True, monkeypatch)
    assert split_calls and two_lanes == one_lane
