"""Routed experts read by byte range and run a chunk of experts at a time: the telemetry bits of
whole layers; MLX's gather kernel (an accelerator's path, forced on the CPU here) gives the prune
sets of the CPU's loop; the self-check needs neither the whole stack nor its upcast."""
from __future__ import annotations

import numpy as np
import pytest

from collect_helpers import run_collect, token_set
from reap_stream.errors import BadInput
from reap_stream.families import experts, self_check
from reap_stream.families.model import open_model
from reap_stream.io import safetensors as st_io
from reap_stream.planning.planner import PlanOptions, make_plan
from reap_stream.runner import weights
from reap_stream.runner.budget import checkpoint_shapes
from reap_stream.telemetry.store import TelemetryStore

CALIB = token_set(num_seqs=6, length=32)
WHOLE = 1 << 40   # bytes of experts per chunk: every layer whole


def _collect(model, tmp_path, name, **run):
    run.setdefault("chunk_tokens", 64)
    return TelemetryStore.open(run_collect(model, CALIB, tmp_path / f"{name}.zarr", **run)["out"])


def _expert_bytes(model) -> int:
    m = open_model(model)
    return max(checkpoint_shapes(m.checkpoint, m.family, m.structure.top_k).expert_bytes.values())


@pytest.mark.parametrize("family,variant", [("qwen3_moe", "fp32"), ("deepseek_v3", "fp32"), ("gpt_oss", "fp32"),
                                            ("qwen3_moe", "bf16"), ("qwen3_moe", "q4"), ("gpt_oss", "q4"),
                                            ("mixtral", "hf")])
def test_experts_in_chunks_give_the_telemetry_bits_of_whole_layers(family, variant, fixture_model, tmp_path):
    model = fixture_model(family, variant)
    assert_chunks_give_whole_layers(model, _expert_bytes(model), tmp_path)


def assert_chunks_give_whole_layers(model, one: int, tmp_path) -> None:
    """Experts one at a time and three at a time (`one`: bytes of an expert) give the telemetry
    bits of whole layers, and so does memory mode."""
    whole = _collect(model, tmp_path, "whole", expert_chunk_bytes=WHOLE)
    for name, chunk in (("one", 1), ("three", 3 * one)):   # one expert at a time; uneven ranges of three
        chunked = _collect(model, tmp_path, name, expert_chunk_bytes=chunk)
        assert chunked.layers() == whole.layers()
        for layer in whole.layers():
            assert chunked.read(layer).equal(whole.read(layer)), (name, layer)
    memory = _collect(model, tmp_path, "memory", mode="memory")
    assert all(memory.read(layer).equal(whole.read(layer)) for layer in whole.layers())


def test_stream_mode_reads_routed_experts_by_range_a_chunk_at_a_time(fixture_model, tmp_path, monkeypatch):
    model = fixture_model("qwen3_moe", "bf16")
    reads: list[tuple[str, int, int]] = []
    whole: list[str] = []
    real_rows, real_to_mx = st_io.read_rows, weights.to_mx

    def rows(ref, lo, hi, out=None):
        reads.append((ref.name, lo, hi))
        return real_rows(ref, lo, hi, out)

    def to_mx(ref):
        whole.append(ref.name)
        return real_to_mx(ref)

    monkeypatch.setattr("reap_stream.families.expert_source.read_rows", rows)
    monkeypatch.setattr(weights, "to_mx", to_mx)
    _collect(model, tmp_path, "t", expert_chunk_bytes=3 * _expert_bytes(model))
    stacked = [r for r in reads if ".switch_mlp." in r[0]]
    assert stacked and all(hi - lo <= 3 for _, lo, hi in stacked)
    for layer in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.switch_mlp.{proj}.weight"
            # each of the 3 chunks of tokens reads the layer's experts again, 3 at a time
            assert sorted((lo, hi) for n, lo, hi in stacked if n == name) == [(0, 3)] * 3 + [(3, 6)] * 3 + [(6, 8)] * 3
    assert not any(".switch_mlp." in n for n in whole)   # never read whole
    reads.clear()
    _collect(model, tmp_path, "w", expert_chunk_bytes=WHOLE)
    # a layer whose experts fit one chunk is read once for all chunks of tokens
    assert sorted(r for r in reads if r[0] == "model.layers.0.mlp.switch_mlp.up_proj.weight") == \
        [("model.layers.0.mlp.switch_mlp.up_proj.weight", 0, 8)]


@pytest.mark.parametrize("variant", ["bf16", "q4", "hf"])
def test_slabs_are_read_into_two_buffer_sets_kept_from_layer_to_layer(variant, fixture_model):
    import mlx.core as mx

    from reap_stream.families.expert_source import _pool, ready, release_slab_buffers, slabs
    from reap_stream.runner.skeleton import open_skeleton

    family = "mixtral" if variant == "hf" else "qwen3_moe"
    _, w = open_skeleton(open_model(fixture_model(family, variant)))
    kept = None
    for layer in (0, 1):
        source = w.experts(layer)
        ranges = [(0, 3), (3, 6), (6, source.num_experts)]
        for (lo, hi), slab in zip(ranges, slabs(source, ranges)):
            fresh = ready(type(source)(source.refs).read(lo, hi))   # a new source: fresh arrays
            assert [bytes(memoryview(a.view(mx.uint8))) for a in slab.arrays_list()] == \
                [bytes(memoryview(a.view(mx.uint8))) for a in fresh.arrays_list()], (layer, lo)
        sets = [id(a) for _, arrays in _pool["sets"] for p in arrays.values() for a in p.values()]
        assert len(_pool["sets"]) == 2 and (kept is None or sets == kept)   # the next layer reuses them
        kept = sets
    release_slab_buffers()
    assert _pool["sets"] == []


def _layer_source(fixture_model, variant="bf16", layer=0):
    from reap_stream.runner.skeleton import open_skeleton
    _, w = open_skeleton(open_model(fixture_model("qwen3_moe", variant)))
    return w.experts(layer)


def _bits(slab) -> list[bytes]:
    import mlx.core as mx
    return [bytes(memoryview(a.view(mx.uint8))) for a in slab.arrays_list()]


def _logged_reads(monkeypatch, fail: bool = False) -> list[tuple[int, int, str]]:
    """(lo, hi, thread name) of each range of experts read; with `fail`, the first read fails."""
    import threading
    log: list[tuple[int, int, str]] = []
    real = st_io.read_rows

    def rows(ref, lo, hi, out=None):
        if ref.name.endswith("switch_mlp.up_proj.weight"):
            log.append((lo, hi, threading.current_thread().name))
            if fail and len(log) == 1:
                raise BadInput(ref.file, "cannot read: Input/output error")
        return real(ref, lo, hi, out)

    monkeypatch.setattr("reap_stream.families.expert_source.read_rows", rows)
    return log


@pytest.mark.parametrize("variant", ["bf16", "q4"])
def test_a_layers_first_chunk_is_read_ahead_and_served_to_its_experts(variant, fixture_model, monkeypatch):
    from reap_stream.families.expert_source import _first, read_first, ready, release_slab_buffers, slabs

    source = _layer_source(fixture_model, variant)
    ranges = [(0, 3), (3, 6), (6, source.num_experts)]
    expected = [_bits(ready(type(source)(source.refs).read(lo, hi))) for lo, hi in ranges]
    log = _logged_reads(monkeypatch)
    read_first(source, 3 * source.expert_bytes)
    _first[0][-1].result()
    assert [r[:2] for r in log] == [(0, 3)]   # read before the experts are asked for
    assert [_bits(slab) for slab in slabs(source, ranges)] == expected
    assert [r[:2] for r in log] == ranges   # the first chunk read once, ahead
    assert all(name.startswith("reap-read") for _, _, name in log)
    release_slab_buffers()


def test_a_first_chunk_read_ahead_that_is_not_needed_is_dropped(fixture_model, monkeypatch):
    from reap_stream.families.expert_source import read_first, ready, release_slab_buffers, slabs

    source = _layer_source(fixture_model)
    expected = _bits(ready(type(source)(source.refs).read(3, 6)))
    log = _logged_reads(monkeypatch)
    read_first(source, 3 * source.expert_bytes)
    # experts 0-2 had no rows: the range asked for is another, read into the same buffers
    [slab] = list(slabs(source, [(3, 6)]))
    assert _bits(slab) == expected
    assert [r[:2] for r in log] == [(0, 3), (3, 6)]
    release_slab_buffers()


def test_a_failed_read_ahead_fails_the_layer_with_its_own_error(fixture_model, monkeypatch):
    from reap_stream.families.expert_source import read_first, release_slab_buffers, slabs

    source = _layer_source(fixture_model)
    _logged_reads(monkeypatch, fail=True)
    read_first(source, None)
    with pytest.raises(BadInput, match="Input/output error"):
        list(slabs(source, [(0, source.num_experts)]))
    release_slab_buffers()


@pytest.mark.parametrize("family,variant", [("qwen3_moe", "fp32"), ("deepseek_v3", "fp32"), ("gpt_oss", "fp32"),
                                            ("mixtral", "fp32"), ("qwen3_moe", "q4"), ("deepseek_v3", "q4")])
def test_the_gather_kernel_gives_the_prune_sets_of_the_loop(family, variant, fixture_model, tmp_path):
    model = fixture_model(family, variant)
    loop = _collect(model, tmp_path, "loop", expert_kernel="loop")
    gather = _collect(model, tmp_path, "gather", expert_kernel="gather", expert_chunk_bytes=3 * _expert_bytes(model))
    assert gather.attrs["options"]["expert_kernel"] == "gather" and loop.attrs["options"]["expert_kernel"] == "loop"
    for layer in loop.layers():
        a, b = loop.read(layer), gather.read(layer)
        assert np.array_equal(a.frequency, b.frequency) and np.array_equal(a.coactivation, b.coactivation)
        for name in ("weighted_frequency_sum", "ean_sum", "weighted_ean_sum", "expert_output_sum"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-4, atol=1e-5, err_msg=name)
    for ratio in (0.25, 0.5):
        options = PlanOptions("reap", ratio=ratio)
        assert make_plan(loop, options).kept_map() == make_plan(gather, options).kept_map()


def test_an_expert_computed_wrongly_is_stopped_by_the_self_check(fixture_model, tmp_path, monkeypatch):
    def swapped(switch, e, x, linear, activation=None):   # gate and up exchanged
        act = activation or switch.activation
        return linear(switch.down_proj, e, act(linear(switch.gate_proj, e, x), linear(switch.up_proj, e, x)))

    monkeypatch.setattr(experts, "expert_forward", swapped)
    with pytest.raises(BadInput, match="layer 0: expert outputs differ from mlx_lm's own expert stack"):
        _collect(fixture_model("qwen3_moe"), tmp_path, "t")
    assert not (tmp_path / "t.zarr").exists()


def test_the_self_check_upcasts_only_the_experts_of_its_tokens(fixture_model, tmp_path, monkeypatch):
    seen: list[int] = []
    real = self_check._reference_dtype

    def counting(a, cpu):
        seen.append(a.shape[0])
        return real(a, cpu)

    monkeypatch.setattr(self_check, "_reference_dtype", counting)
    model = fixture_model("qwen3_moe", "bf16")
    _collect(model, tmp_path, "t", expert_chunk_bytes=WHOLE)
    k = open_model(model).structure.top_k
    per_layer = len(seen) // 4   # four layers, each checked once
    assert 0 < max(seen) <= self_check.SELF_CHECK_EXPERT_TOKENS * k < 8   # never the whole stack of 8
    assert per_layer == 3        # gate, up and down weights, once (one chunk)


@pytest.mark.parametrize("family,variant", [("granitemoe", "transformers"), ("qwen3_moe", "transformers"),
                                            ("mixtral", "hf"), ("qwen3_moe", "q4"), ("llama4", "fp32")])
def test_memory_plans_chunks_of_experts_exactly_where_the_runner_reads_them_by_range(family, variant, fixture_model):
    """--max-memory and estimate decide from the checkpoint's names what the runner decides with its
    skeleton: granitemoe may be read by range, but not from transformers' fused input_linear."""
    from reap_stream.families.expert_source import by_range, read_by_range
    from reap_stream.runner import RunOptions, fit_memory
    from reap_stream.runner.skeleton import open_skeleton

    model = open_model(fixture_model(family, variant))
    skeleton, w = open_skeleton(model)
    runner_reads_by_range = any(w.experts(i) is not None for i in range(len(skeleton.layers)))
    assert read_by_range(model) == runner_reads_by_range
    if (family, variant) == ("granitemoe", "transformers"):
        assert by_range(model.family) and not runner_reads_by_range
    seqs = [np.arange(32) % 50] * 4
    fitted = fit_memory(model, RunOptions(max_memory=4 << 30), seqs)
    assert (fitted.expert_chunk_bytes is not None) == runner_reads_by_range
