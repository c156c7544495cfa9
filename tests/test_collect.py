"""collect: exact routing capture, telemetry by definition, stream == memory, every family."""
from __future__ import annotations

import numpy as np
import pytest

from collect_helpers import assert_stats_close, reference_stats, run_collect, stream_runner, token_set
from reap_stream.errors import BadInput
from reap_stream.families import experts, routing
from reap_stream.families.table import Routing
from reap_stream.telemetry.collect import parse_layers
from reap_stream.telemetry.store import TelemetryStore
from reap_stream.testing import synth

CALIB = token_set(num_seqs=6, length=32)


def _collect(model_dir, tmp_path, name="t", calib=CALIB, **opts):
    opts.setdefault("chunk_tokens", 64)
    summary = run_collect(model_dir, calib, tmp_path / f"{name}.zarr", **opts)
    return TelemetryStore.open(summary["out"]), summary


@pytest.mark.parametrize("family", synth.FIRST_FAMILIES)
def test_stream_equals_memory_and_the_brute_force_reference(family, fixture_model, tmp_path):
    model = fixture_model(family)
    stream, summary = _collect(model, tmp_path, "stream", mode="stream")
    memory, _ = _collect(model, tmp_path, "memory", mode="memory")
    reference = reference_stats(model, CALIB)
    assert stream.layers() == memory.layers() == sorted(reference) == summary["layers"]
    for layer in stream.layers():
        assert_stats_close(stream.read(layer), memory.read(layer), rtol=1e-6)
        assert_stats_close(stream.read(layer), reference[layer], rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("family,variant", [("qwen3_moe", "bf16"), ("qwen3_moe", "fp16"), ("glm4_moe", "bf16"),
                                            ("qwen3_moe", "q4"), ("deepseek_v3", "q4"), ("gpt_oss", "q4"),
                                            ("qwen3_moe", "hf"), ("mixtral", "hf")])
def test_half_precision_quantised_and_hf_checkpoints_stream_like_memory(family, variant, fixture_model, tmp_path):
    # CPU gather_mm is float32-only: half experts are computed in float32, per expert slice;
    # 4-bit experts go through mx.quantized_matmul; HF layouts pass through the model's sanitize.
    model = fixture_model(family, variant)
    stream, _ = _collect(model, tmp_path, "stream", mode="stream")
    memory, _ = _collect(model, tmp_path, "memory", mode="memory")
    assert stream.layers() == memory.layers()
    for layer in stream.layers():
        assert stream.read(layer).equal(memory.read(layer))


def test_hf_layout_gives_the_telemetry_of_the_same_weights_in_mlx_layout(fixture_model, tmp_path):
    hf, _ = _collect(fixture_model("qwen3_moe", "hf"), tmp_path, "hf")
    mlx, _ = _collect(fixture_model("qwen3_moe"), tmp_path, "mlx")
    for layer in mlx.layers():
        assert_stats_close(hf.read(layer), mlx.read(layer), rtol=1e-6)


def test_counts_are_consistent_with_top_k(fixture_model, tmp_path):
    store, _ = _collect(fixture_model("qwen2_moe"), tmp_path)
    k = store.attrs["model"]["top_k"]
    for layer in store.layers():
        st = store.read(layer)
        assert st.tokens == CALIB.num_tokens
        assert st.frequency.sum() == k * st.tokens
        assert np.array_equal(np.diag(st.coactivation), st.frequency)
        assert np.array_equal(st.coactivation, st.coactivation.T)
        never = st.frequency == 0
        assert np.all(st.max_activations[never] == -np.inf) and np.all(st.ean_sum[never] == 0)


def test_renorm_topk_makes_each_tokens_weights_sum_to_one(fixture_model, tmp_path):
    # qwen2_moe does not renormalise its own weights; --renorm-topk only changes g in telemetry.
    model = fixture_model("qwen2_moe")
    on, _ = _collect(model, tmp_path, "on", renorm_topk=True)
    off, _ = _collect(model, tmp_path, "off", renorm_topk=False)
    reference_off = reference_stats(model, CALIB, renorm_topk=False)
    for layer in on.layers():
        a, b = on.read(layer), off.read(layer)
        assert a.weighted_frequency_sum.sum() == pytest.approx(a.tokens, rel=1e-12)
        assert b.weighted_frequency_sum.sum() < b.tokens
        assert np.array_equal(a.frequency, b.frequency) and np.array_equal(a.ean_sum, b.ean_sum)
        assert_stats_close(b, reference_off[layer], rtol=2e-4, atol=1e-5)
    assert on.attrs["routing"]["renorm_topk"] is True and off.attrs["routing"]["renorm_topk"] is False


def test_layers_option_records_only_those_layers(fixture_model, tmp_path):
    full, _ = _collect(fixture_model("qwen3_moe"), tmp_path, "full")
    some, _ = _collect(fixture_model("qwen3_moe"), tmp_path, "some", layers=parse_layers("1-2"))
    assert some.layers() == [1, 2]
    for layer in (1, 2):
        assert some.read(layer).equal(full.read(layer))


def test_layers_that_are_not_moe_are_refused(fixture_model, tmp_path):
    with pytest.raises(BadInput, match="layer 0 is not an MoE layer"):
        _collect(fixture_model("deepseek_v3"), tmp_path, layers=(0, 1))


def test_parse_layers():
    assert parse_layers("0-3,8") == (0, 1, 2, 3, 8)
    assert parse_layers("5, 2,2") == (2, 5)
    assert parse_layers(None) is None
    for bad in ("3-1", "x", "1,,2"):
        with pytest.raises(BadInput):
            parse_layers(bad)


def test_a_routing_function_that_misroutes_is_stopped_by_the_self_check(fixture_model, tmp_path, monkeypatch):
    def without_renorm(block, fam, x, k):
        r = routing.scored(block, fam, x, k)
        return routing.Routed(r.inds, mx_take(r.probs, r.inds), r.probs)

    def mx_take(p, i):
        import mlx.core as mx
        return mx.take_along_axis(p, i, axis=-1)

    monkeypatch.setitem(routing.ROUTERS, Routing.SOFTMAX_TOPK, without_renorm)
    with pytest.raises(BadInput, match="layer 0: routing capture does not reproduce the MoE block"):
        _collect(fixture_model("qwen3_moe"), tmp_path)  # qwen3 renormalises its top-k weights
    assert not (tmp_path / "t.zarr").exists()


def _routed_rows(model_dir, layer: int, switch_name: str, rows: int, k: int, seed: int):
    """A loaded expert stack with random inputs, routes (k distinct of 8 experts) and weights."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    rng = np.random.default_rng(seed)
    x = mx.array(rng.normal(size=(rows, synth.HIDDEN)).astype(np.float32))
    inds = np.stack([rng.permutation(8)[:k] for _ in range(rows)])
    weights = rng.uniform(size=(rows, k)).astype(np.float32)
    return getattr(model.layers[layer].mlp, switch_name), x, inds, weights


def test_grouped_experts_equal_the_gather_path(fixture_model):
    """run_experts (one dense matmul per expert) == mlx_lm's SwitchGLU (per-token gather_mm)."""
    import mlx.core as mx

    switch, x, inds, weights = _routed_rows(fixture_model("gpt_oss"), 1, "experts", rows=40, k=4, seed=1)
    batch, weighted_sum = experts.run_experts(switch, x, inds, 8, weights)
    grouped = batch.outputs[np.argsort(batch.order, kind="stable")].reshape(40, 4, -1)
    gathered = np.array(switch(x, mx.array(inds)))
    np.testing.assert_allclose(grouped, gathered, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(weighted_sum), (gathered * weights[..., None]).sum(1), rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.bincount(batch.experts, minlength=8), np.bincount(inds.reshape(-1), minlength=8))


def test_experts_shared_out_to_two_lanes_give_the_bits_of_one(fixture_model):
    """run_experts on two lanes == on one; Σ w·f(x) adds each token's terms in ascending expert order."""
    from reap_stream.runner.lanes import Lanes

    switch, x, inds, weights = _routed_rows(fixture_model("qwen3_moe"), 0, "switch_mlp", rows=96, k=2, seed=2)
    one, y_one = experts.run_experts(switch, x, inds, 8, weights)
    lanes = Lanes()
    try:
        two, y_two = experts.run_experts(switch, x, inds, 8, weights, pair=lanes.both)
    finally:
        lanes.close()
    assert np.array_equal(one.outputs, two.outputs) and np.array_equal(np.array(y_one), np.array(y_two))
    expected = np.zeros((96, synth.HIDDEN), np.float32)
    for e in range(8):
        token, slot = np.nonzero(inds == e)
        out = one.outputs[one.bounds[e]:one.bounds[e + 1]]   # tokens ascending within an expert
        expected[token] += out * weights[token, slot][:, None]
    assert np.array_equal(np.array(y_one), expected)


def test_stream_mode_reads_only_the_current_layers_tensors(fixture_model, tmp_path, monkeypatch):
    from reap_stream.runner import weights

    everything: list[str] = []
    since_last_layer: list[str] = []
    real = weights.to_mx

    def spy(ref):
        everything.append(ref.name)
        since_last_layer.append(ref.name)
        return real(ref)

    monkeypatch.setattr(weights, "to_mx", spy)
    r = stream_runner(fixture_model("mixtral"), tmp_path / "w", chunk_tokens=64)
    seen: dict[int, set[str]] = {}

    def on_moe(layer, chunk, cap):
        seen[layer] = {n for n in since_last_layer if ".layers." in n}

    for _ in r.run(r.chunks(CALIB.sequences), on_moe=on_moe):
        since_last_layer.clear()
    assert sorted(seen) == [0, 1, 2, 3]
    for layer, names in seen.items():
        assert names and all(n.startswith(f"model.layers.{layer}.") for n in names)
    assert not any(n.startswith("lm_head") for n in everything)  # the head is not needed to collect


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_runner_streams_to_the_logits_of_the_masked_original(family, fixture_model, tmp_path):
    """The runner API eval reuses: stream every layer with pruned experts masked, then the head."""
    import mlx.core as mx

    from reap_stream.families.masking import masked_logits

    model = fixture_model(family)
    r = stream_runner(model, tmp_path / "w", chunk_tokens=64)
    pruned = {layer: [0, 5] if family != "deepseek_v3" else [0, 4] for layer in r.moe_layers}
    chunks = r.chunks(CALIB.sequences[:2])
    assert list(r.run(chunks, mask=pruned)) == list(range(r.num_layers))
    for chunk in chunks:
        streamed = np.array(r.logits(chunk).astype(mx.float32))
        for b, seq in enumerate(chunk.tokens):
            np.testing.assert_allclose(streamed[b], masked_logits(model, pruned, seq), rtol=1e-4, atol=1e-4)
