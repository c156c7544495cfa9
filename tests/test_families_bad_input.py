"""Bad input about a model's family: exit code 2, one line naming config.json (or the model) and
the fault, nothing written. A family whose config or tensors do not fit its row is never pruned."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import error_line, run
from reap_stream.errors import BadInput
from reap_stream.testing import synth
from test_apply import make_plan


def _refused(tmp_path: Path, model: Path, *needles: str, where=None) -> str:
    """apply MODEL (with a plan made before the model was broken) refuses with one line."""
    res = run("apply", model, tmp_path / "plan.json", "--out", tmp_path / "out", "--quiet")
    line = error_line(res, *needles, where=where)
    assert not (tmp_path / "out").exists()
    return line


def _broken(fixture_model, tmp_path: Path, family: str, edit) -> Path:
    """A private copy of a family's fixture, a plan for it, then its config.json edited."""
    model = tmp_path / family
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(fixture_model(family), model)
    make_plan(model, n_prune=2).save(tmp_path / "plan.json")
    cfg = json.loads((model / "config.json").read_text())
    edit(cfg)
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def test_a_config_missing_the_familys_top_k_key(fixture_model, tmp_path):
    model = _broken(fixture_model, tmp_path, "step3p5", lambda cfg: cfg.pop("moe_top_k"))
    _refused(tmp_path, model, "moe_top_k is missing: step3p5 reads its top-k from it", where=model / "config.json")


@pytest.mark.parametrize("archs", [[[]], [{"a": 1}], "Qwen3MoeForCausalLM", 7])
def test_architectures_that_are_not_a_list_of_class_names(fixture_model, tmp_path, archs):
    model = _broken(fixture_model, tmp_path, "qwen3_moe", lambda cfg: cfg.update(architectures=archs))
    _refused(tmp_path, model, "architectures must be a list of class names", where=model / "config.json")


def test_a_wrapper_config_missing_the_expert_count_in_its_text_config(fixture_model, tmp_path):
    model = _broken(fixture_model, tmp_path, "qwen3_5_moe", lambda cfg: cfg["text_config"].pop("num_experts"))
    _refused(tmp_path, model, "text_config.num_experts is missing: qwen3_5_moe reads its routed expert count")


def test_an_expert_count_that_disagrees_with_the_tensors(fixture_model, tmp_path):
    model = _broken(fixture_model, tmp_path, "glm_moe_dsa", lambda cfg: cfg.update(n_routed_experts=6))
    _refused(tmp_path, model, "n_routed_experts is 6 but layer 1 holds 8 experts", where=model / "config.json")


def test_an_alias_over_another_familys_tensors(fixture_model, tmp_path):
    # minimax_m2 is mlx_lm's minimax: its block is block_sparse_moe, which a qwen3_moe checkpoint lacks
    model = _broken(fixture_model, tmp_path, "qwen3_moe", lambda cfg: cfg.update(model_type="minimax_m2"))
    _refused(tmp_path, model, "no MoE router tensors found for model_type 'minimax_m2' (loaded as minimax)")
    # kimi_k2 is deepseek_v3, whose mlp.gate / mlp.switch_mlp names a qwen3_moe checkpoint shares:
    # its selection bias is what is missing
    model = _broken(fixture_model, tmp_path, "qwen3_moe",
                    lambda cfg: cfg.update(model_type="kimi_k2", n_routed_experts=8))
    _refused(tmp_path, model, "has no e_score_correction_bias tensor, which a deepseek_v3 router selects with")


def test_a_family_that_cannot_be_pruned_exactly(fixture_model, tmp_path):
    model = _broken(fixture_model, tmp_path, "qwen3_moe", lambda cfg: cfg.update(model_type="deepseek_v41"))
    _refused(tmp_path, model, "model_type 'deepseek_v41' (deepseek_v41) cannot be pruned exactly: its decoder layers")


def test_an_expert_tensor_whose_axis_0_disagrees_with_the_router(fixture_model, tmp_path):
    from reap_stream.io.safetensors import Checkpoint, read_array

    model = _broken(fixture_model, tmp_path, "minimax", lambda cfg: None)
    ckpt = Checkpoint.open(model)
    name = "model.layers.2.block_sparse_moe.switch_mlp.up_proj.weight"
    shard = ckpt.tensors[name].file
    tensors = {n: ("F32", read_array(r)) for n, r in ckpt.tensors.items() if r.file == shard}
    tensors[name] = ("F32", tensors[name][1][:6])
    synth.write_safetensors(shard, tensors, {"format": "mlx"})
    _refused(tmp_path, model, f"tensor '{name}' has shape [6, 32, 64]; layer 2's router has 8 experts")


@pytest.mark.parametrize("layers", [1, 4])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_layers_returning_a_tuple_the_row_does_not_declare_are_refused_not_misread(tmp_path, batch, layers):
    """Hunyuan's layers return (h, K/V). Traced as if they returned h, a batch of 2 sequences
    unpacks along the batch axis without an error (h = the first sequence); the runner refuses
    instead, at every batch size, also where no later layer would trip over the wrong shape."""
    from reap_stream.families.model import open_model
    from reap_stream.runner.skeleton import build_skeleton
    from reap_stream.runner.trace import trace_layers

    path = synth.make_mlx_fixture("hunyuan", tmp_path / "m", config_overrides={"num_hidden_layers": layers})
    model = open_model(path)
    skeleton = build_skeleton(model.checkpoint)
    tokens = np.zeros((batch, 8), np.int32)
    for final in (None, skeleton.model.embed_tokens(mx_array(tokens))):
        assert len(trace_layers(skeleton, tokens, final, family=model.family)) == layers  # as the row says
        with pytest.raises(BadInput, match="hunyuan: .*a layer-by-layer run cannot reproduce this model") as e:
            trace_layers(skeleton, tokens, final, family=replace(model.family, layer_outputs=1))
        assert "\n" not in str(e.value)


def mx_array(a):
    import mlx.core as mx
    return mx.array(a)


def test_kimi_k3_with_attention_residuals_is_refused_when_its_layers_hand_on_state(tmp_path):
    """Without attention residuals a Kimi-K3 layer hands None to the next one; with them, a state
    of every earlier block, which a layer-by-layer run cannot carry."""
    from reap_stream.families.model import open_model
    from reap_stream.runner import RunOptions, open_runner

    text = {**synth.tiny_config("kimi_k3")["text_config"], "attn_res_block_size": 2}
    model = synth.make_mlx_fixture("kimi_k3", tmp_path / "k3", config_overrides={"text_config": text})
    resolved = open_model(model)
    runner = open_runner(resolved, RunOptions(mode="stream"), tmp_path / "work", progress=False)
    with pytest.raises(BadInput, match="kimi_k3: .*cannot"):
        list(runner.run(runner.chunks([np.zeros(8, np.int32)])))


def test_gemma4_with_kv_sharing_layers_is_refused(tmp_path):
    """Gemma-4's KV-sharing layers reuse the K/V of a layer further back than their predecessor,
    which a layer-by-layer run does not carry: refused with one line (without sharing: supported)."""
    from reap_stream.families.model import open_model
    from reap_stream.runner import RunOptions, open_runner

    model = synth.make_mlx_fixture("gemma4_text", tmp_path / "g4", config_overrides={"num_kv_shared_layers": 2})
    runner = open_runner(open_model(model), RunOptions(mode="stream"), tmp_path / "work", progress=False)
    with pytest.raises(BadInput, match="gemma4_text: decoder layer 2 takes state from a layer before layer 1"):
        list(runner.run(runner.chunks([np.zeros(8, np.int32)])))
