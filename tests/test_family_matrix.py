"""Every MoE family mlx_lm ships: a tiny seeded model built with mlx_lm's own class goes through
collect (stream mode, with the self-check) -> REAP plan -> apply -> mlx_lm.load, and the output's
logits equal the original's with the pruned experts masked out of routing (the conformance matrix
of tools/family_matrix.py, one case per family here; 4-bit, non-uniform, stream == memory and the
HF layout on a slice). A model_type the installed mlx_lm has and the family table does not list
fails here."""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURE_ROOT
from reap_stream import eval as reap_eval
from reap_stream.blas import ensure_blas
from reap_stream.errors import BadInput
from reap_stream.families import masking
from reap_stream.families.model import open_model
from reap_stream.families.table import FAMILIES, FAMILY_ROWS, MODEL_TYPES
from reap_stream.io.safetensors import Checkpoint, read_array
from reap_stream.runner import RunOptions
from reap_stream.surgery.safetensors import plan_layout, write_layout
from reap_stream.telemetry.collect import collect
from reap_stream.testing import conformance, synth

ensure_blas()
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx_lm  # noqa: E402
from mlx_lm.utils import MODEL_ARCHITECTURE_REMAPPING, MODEL_REMAPPING, load_model  # noqa: E402

# linear attention (Gated DeltaNet, GLA, KDA), Mamba / Mamba2, short convolutions, cross-layer K/V
HYBRID = ("qwen3_next", "qwen3_5_moe", "nemotron_h", "jamba", "lfm2_moe", "granitemoehybrid", "kimi_linear",
          "bailing_moe_linear", "bailing_moe_v3", "hunyuan", "longcat_flash_ngram")
STREAM_EQUALS_MEMORY = HYBRID + ("longcat_flash", "gemma4_text", "dbrx")
QUANTISED = ("qwen3_5_moe", "minimax", "llama4", "nemotron_h", "longcat_flash", "step3p5", "gemma4_text", "dbrx")
NON_UNIFORM = ("qwen3_next", "glm_moe_dsa", "longcat_flash", "hunyuan", "bailing_moe_v3", "dbrx")
# families whose transformers class mlx_lm agrees with (tools/family_matrix.py tries all)
TRANSFORMERS = ("qwen3_next", "minimax", "nemotron_h", "granitemoe", "exaone_moe", "qwen3_moe")


@pytest.fixture(scope="module")
def fixtures() -> Path:
    return FIXTURE_ROOT


@pytest.mark.parametrize("family", synth.FAMILIES)
def test_pruned_output_equals_the_masked_original(family, fixtures, tmp_path):
    result = conformance.check_family(family, fixtures, compare_memory=family in STREAM_EQUALS_MEMORY,
                                      work=tmp_path)
    assert result.changed > 1e-3, "the prune changes the output (else the comparison would prove nothing)"
    assert result.max_abs_diff <= conformance.TOLERANCE, result
    assert result.verify == [], "reap-stream verify finds the output consistent"
    assert len(set(result.modes.values())) <= 1, f"stream and memory telemetry differ: {result.modes}"
    assert set(result.kept.values()) == {4}


@pytest.mark.parametrize("family", QUANTISED)
def test_4bit_pruned_output_equals_the_masked_original(family, fixtures, tmp_path):
    result = conformance.check_family(family, fixtures, variant="q4", work=tmp_path)
    assert result.ok, result


@pytest.mark.parametrize("family", NON_UNIFORM)
def test_non_uniform_prune_loads_through_load_pruned(family, fixtures, tmp_path):
    result = conformance.check_family(family, fixtures, variant="non-uniform", work=tmp_path)
    assert len(set(result.kept.values())) == 2 and result.ok, result


def _moe_modules() -> set[str]:
    """mlx_lm model files that build an expert stack, or build on a file that does (the issue's
    `grep -l -E "SwitchGLU|SwitchMLP"` plus what imports those)."""
    import mlx_lm.models

    files = {p.stem: p.read_text() for p in Path(mlx_lm.models.__file__).parent.glob("*.py")}
    moe = {n for n, src in files.items() if re.search(r"SwitchGLU|SwitchMLP", src)} - {"switch_layers"}
    grew = True
    while grew:
        grew = False
        for name, src in files.items():
            deps = set(re.findall(r"^from \.(\w+) import", src, re.M))
            for group in re.findall(r"^from \. import ([\w, ]+)", src, re.M):
                deps |= {d.strip() for d in group.split(",")}
            if name not in moe and name != "switch_layers" and deps & moe:
                moe.add(name)
                grew = True
    return moe


def test_every_moe_model_type_of_the_installed_mlx_lm_is_a_row():
    known = {f.model_type for f in FAMILY_ROWS}
    missing = sorted(_moe_modules() - known)
    assert not missing, (f"mlx_lm has MoE model types the family table does not list: {', '.join(missing)}; "
                         f"add a row (supported, or refused with the reason) to reap_stream/families")
    aliases = sorted(a for a, target in MODEL_REMAPPING.items() if target in known and a not in MODEL_TYPES)
    assert not aliases, f"mlx_lm loads {', '.join(aliases)} as a listed family: add them to that row's aliases"
    remapped = sorted(f"{t}:{a}" for (t, a), target in MODEL_ARCHITECTURE_REMAPPING.items() if target in known
                      and not any(f"{t}:{a}" in f.aliases for f in FAMILY_ROWS))
    assert not remapped, f"mlx_lm remaps {', '.join(remapped)} by architecture: add them to that row's aliases"


def test_the_fixtures_route_every_expert(fixtures):
    """The tiny models are informative: in every MoE layer each expert is chosen for some token."""
    tokens = conformance.eval_tokens(256)
    for family in synth.FAMILIES[len(synth.FIRST_FAMILIES):]:
        model, _ = mlx_lm.load(str(synth.cached_fixture(family, "fp32", fixtures)))
        for layer, counts in masking.routing_counts(model, tokens).items():
            assert (counts > 0).all(), f"{family} layer {layer}: an expert is never routed: {counts}"


def test_the_matrix_lists_every_row_with_a_verdict():
    """Each mlx row is either checked here or refused with its reason."""
    rows = [f for f in FAMILY_ROWS if f.mlx]
    assert {f.model_type for f in rows if not f.refused} == set(FAMILIES) == set(synth.FAMILIES)
    assert all(len(f.refused) > 20 for f in rows if f.refused)
    assert np.all([f.model_type in MODEL_TYPES for f in rows])


@pytest.mark.parametrize("family", HYBRID)
def test_streamed_perplexity_equals_mlx_lm_on_hybrid_layers(family, fixtures):
    """Stream mode runs each layer through mlx_lm's own module, one layer for every chunk before
    the next layer; a chunk holds whole sequences, so recurrent layers start each sequence from
    their zero state exactly as one pass does (several chunks, two sequences each)."""
    path = synth.cached_fixture(family, "fp32", fixtures)
    windows = conformance.eval_tokens(6 * 33).reshape(6, 33)
    got = reap_eval.perplexity(open_model(path), list(windows), RunOptions("stream", 66), progress=False)
    model, _ = load_model(path)
    x = mx.array(windows)
    logits = model(x[:, :-1]).astype(mx.float32)
    want = nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean").item()
    # mean NLL (random tiny models: ~20-35 nats) within float32 summation noise
    assert got.num_sequences == 6 and math.log(got.perplexity) == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("family", TRANSFORMERS)
def test_hf_layout_written_by_transformers_is_pruned_and_loads_in_transformers(family, fixtures, tmp_path):
    """Per-expert (Qwen3-Next, MiniMax w1/w2/w3, Nemotron-H up/down) and fused (Granite's
    input_linear) HF layouts, as transformers saves them: the pruned output loads in transformers
    and equals mlx_lm's masked original (qwen3_moe: transformers 5 writes num_local_experts beside
    num_experts and reads that one: both are rewritten)."""
    result = conformance.check_transformers(family, fixtures, work=tmp_path)
    assert result.unpruned_gap <= conformance.HF_TOLERANCE
    assert result.ok, result


def test_a_multimodal_wrapper_keeps_every_non_expert_tensor_byte_for_byte(fixtures, tmp_path):
    """Qwen3.5-MoE as a vision-language checkpoint: the vision tower's tensors (one with a
    `layers.N.` of its own) are copied untouched; the language model's experts are pruned; the
    output loads with mlx_lm (whose sanitize drops the tower) and collect runs over it."""
    src = tmp_path / "vl"
    shutil.copytree(synth.cached_fixture("qwen3_5_moe", "fp32", fixtures), src)
    rng = np.random.default_rng(3)
    vision = {"vision_tower.blocks.0.attn.qkv.weight": ("F32", rng.normal(size=(12, 4)).astype(np.float32)),
              "vision_tower.encoder.layers.0.mlp.fc1.weight": ("F32", rng.normal(size=(8, 4)).astype(np.float32))}
    synth.write_safetensors(src / "vision.safetensors", vision)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update(dict.fromkeys(vision, "vision.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps(index))

    model = open_model(src)
    collect(model, conformance.calibration(), tmp_path / "t.zarr",
            RunOptions("stream", 64, work_dir=tmp_path / "w"), progress=False)
    plan = conformance.random_plan(model)
    write_layout(plan_layout(model, plan), tmp_path / "out", progress=False)
    out = Checkpoint.open(tmp_path / "out")
    for name, (_, arr) in vision.items():
        assert np.array_equal(read_array(out.tensors[name]), arr)
    assert out.config["text_config"]["num_experts"] == 4
    pruned, _ = mlx_lm.load(str(tmp_path / "out"))
    tokens = conformance.eval_tokens()
    got = np.array(pruned(mx.array(tokens[None]))[0].astype(mx.float32))
    assert np.max(np.abs(got - masking.masked_logits(src, plan.pruned_map(), tokens))) <= conformance.TOLERANCE


@pytest.mark.parametrize("family,change", [
    ("minimax", {"renorm": None}),                    # MiniMax always renormalises
    ("step3p5", {"scale": None}),                     # Step-3.5 scales by moe_router_scaling_factor
    ("bailing_moe_v3", {"group_fill": 0.0, "bias": None}),  # selects with its bias, -inf-filled groups
    ("laguna", {"score": "softmax"}),                 # sigmoid scores
])
def test_a_route_that_differs_from_the_block_is_stopped_by_the_self_check(family, change, fixtures, tmp_path):
    """The routing parameters are data; data that does not describe the block is caught on the
    first chunk of the first MoE layer, before anything is written."""
    model = open_model(synth.cached_fixture(family, "fp32", fixtures))
    model.family = replace(model.family, route=replace(model.family.route, **change))
    with pytest.raises(BadInput, match="routing capture does not reproduce the MoE block"):
        collect(model, conformance.calibration(), tmp_path / "t.zarr", RunOptions("stream", 64, work_dir=tmp_path / "w"),
                progress=False)
    assert not (tmp_path / "t.zarr").exists()


@pytest.mark.parametrize("family", ["deepseek", "minimax", "longcat_flash", "gemma4_text", "llama4", "hunyuan"])
def test_streamed_perplexity_with_a_mask_plan_equals_mlx_lm_masked(family, fixtures):
    """`eval --mask-plan` runs the masked original layer by layer: -inf input column (DeepSeek's raw
    gate), block-level selection bias (MiniMax), both rules (LongCat), a decoder-layer router
    (Gemma-4), the input-scaling router (Llama-4), layers handing K/V on (Hunyuan)."""
    path = synth.cached_fixture(family, "fp32", fixtures)
    model = open_model(path)
    pruned = conformance.random_plan(model).pruned_map()
    windows = conformance.eval_tokens(4 * 33).reshape(4, 33)
    got = reap_eval.perplexity(model, list(windows), RunOptions("stream", 66), mask=pruned, progress=False)
    reference, _ = load_model(path)
    masking.mask_experts(reference, pruned)
    x = mx.array(windows)
    want = nn.losses.cross_entropy(reference(x[:, :-1]).astype(mx.float32), x[:, 1:], reduction="mean").item()
    assert math.log(got.perplexity) == pytest.approx(want, abs=1e-4)
