"""`reap-stream apply` on safetensors checkpoints: the pruned model computes exactly what the
original computes with the pruned experts masked out of routing."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import run as _run
from reap_stream.families.model import open_model
from reap_stream.families.table import classify, family_of
from reap_stream.io.safetensors import Checkpoint, read_array
from reap_stream.planning.plan import LayerPlan, Plan
from reap_stream.testing import synth

run = partial(_run, catch_exceptions=False)  # a crash in apply shows its traceback


def make_plan(model_dir: Path, n_prune: int = 3, seed: int = 0, per_layer: dict[int, int] | None = None) -> Plan:
    """Prune n_prune experts per MoE layer (equal drop per group), chosen pseudo-randomly."""
    model = open_model(model_dir)
    st = model.structure
    rng = np.random.default_rng(seed)
    layers = {}
    for layer, n in st.layer_experts.items():
        k = (per_layer or {}).get(layer, n_prune)
        size = n // st.n_group
        pruned: list[int] = []
        for g in range(st.n_group):
            pruned += sorted(int(e) + g * size for e in rng.choice(size, k // st.n_group, replace=False))
        layers[layer] = LayerPlan(sorted(set(range(n)) - set(pruned)), sorted(pruned))
    return Plan(layers=layers, method="random", ratio=None, model=model.model_block())


def tokens(n: int = 48) -> np.ndarray:
    return (np.arange(n) * 37 + 11) % synth.VOCAB_SIZE


CASES = [(f, "fp32") for f in synth.FIRST_FAMILIES] + [(f, "q4") for f in synth.QUANTIZED_FAMILIES]


@pytest.mark.parametrize("family,variant", CASES)
def test_pruned_output_equals_masked_original(family, variant, fixture_model, tmp_path):
    from reap_stream.families.masking import masked_logits

    src = fixture_model(family, variant)
    n_prune = 4 if family in ("deepseek_v3", "glm4_moe") else 3
    plan = make_plan(src, n_prune=n_prune)
    plan.save(tmp_path / "plan.json")
    res = run("apply", src, tmp_path / "plan.json", "--out", tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.output

    toks = tokens()
    want = masked_logits(src, plan.pruned_map(), toks)
    got = masked_logits(tmp_path / "out", {}, toks)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-5

    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    fam = family_of(cfg)
    n = json.loads((src / "config.json").read_text())[fam.experts_key]
    assert cfg[fam.experts_key] == n - n_prune
    assert cfg["reap_stream"]["kept"] == {str(k): v for k, v in plan.kept_map().items()}
    if variant == "q4":
        assert cfg["quantization"] == json.loads((src / "config.json").read_text())["quantization"]


def test_masking_is_not_a_no_op(fixture_model):
    """The equality above means something only if pruning changes the output."""
    from reap_stream.families.masking import masked_logits

    src = fixture_model("qwen3_moe")
    plan = make_plan(src, n_prune=3)
    toks = tokens()
    assert np.max(np.abs(masked_logits(src, plan.pruned_map(), toks) - masked_logits(src, {}, toks))) > 1e-3


@pytest.mark.parametrize("family", synth.HF_FAMILIES)
def test_hf_layout_loads_in_transformers_and_equals_masked_original(family, fixture_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from reap_stream.families.masking import masked_logits

    src = fixture_model(family, "hf")
    plan = make_plan(src, n_prune=3, seed=1)
    plan.save(tmp_path / "plan.json")
    res = run("apply", src, tmp_path / "plan.json", "--out", tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.output
    out = Checkpoint.open(tmp_path / "out")
    fam = family_of(out.config)
    # per-expert tensors renumbered 0..k-1
    for layer, lp in plan.layers.items():
        ids = {classify(n, fam).expert for n in out.tensors
               if classify(n, fam) and classify(n, fam).layer == layer and classify(n, fam).kind == "per_expert"}
        assert ids == set(range(len(lp.kept)))

    toks = tokens()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    with torch.no_grad():
        got = model(torch.tensor(toks[None], dtype=torch.long)).logits[0].numpy()
    want = masked_logits(src, plan.pruned_map(), toks)
    assert np.max(np.abs(got - want)) <= 1e-4


@pytest.mark.parametrize("variant", ["bf16", "fp16"])
def test_half_precision_kept_experts_are_the_source_bytes(variant, fixture_model, tmp_path):
    src = fixture_model("qwen3_moe", variant)
    plan = make_plan(src, n_prune=2)
    plan.save(tmp_path / "plan.json")
    assert run("apply", src, tmp_path / "plan.json", "--out", tmp_path / "out", "--quiet").exit_code == 0
    a, b = Checkpoint.open(src), Checkpoint.open(tmp_path / "out")
    fam = family_of(a.config)
    checked = 0
    for name, ref in a.tensors.items():
        rel = classify(name, fam)
        src_arr = read_array(ref)
        out_arr = read_array(b.tensors[name])
        if rel is None:
            assert np.array_equal(src_arr, out_arr)
        else:
            assert np.array_equal(src_arr[plan.layers[rel.layer].kept], out_arr)
            checked += 1
    assert checked > 0
    assert all(b.tensors[n].dtype == ref.dtype for n, ref in a.tensors.items())
    assert ("BF16" if variant == "bf16" else "F16") in {ref.dtype for ref in b.tensors.values()}


def test_same_inputs_give_byte_identical_outputs(fixture_model, tmp_path):
    src = fixture_model("deepseek_v3")
    make_plan(src, n_prune=2).save(tmp_path / "plan.json")
    for out in ("a", "b"):
        assert run("apply", src, tmp_path / "plan.json", "--out", tmp_path / out, "--quiet",
                   "--max-shard-size", "400KB").exit_code == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "model.safetensors.index.json" in names  # several shards were written
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_small_shards_load_and_manifest_matches(fixture_model, tmp_path):
    from blake3 import blake3

    from reap_stream.families.masking import masked_logits

    src = fixture_model("mixtral")
    plan = make_plan(src, n_prune=2)
    plan.save(tmp_path / "plan.json")
    assert run("apply", src, tmp_path / "plan.json", "--out", tmp_path / "out", "--quiet",
               "--max-shard-size", "300KB").exit_code == 0
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    manifest = json.loads((out / "reap_manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"reap_manifest.json"}
    for name, entry in manifest["files"].items():   # the blake3 package's own digest of each file
        assert blake3((out / name).read_bytes()).hexdigest() == entry["blake3"]
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    toks = tokens()
    assert np.max(np.abs(masked_logits(out, {}, toks) - masked_logits(src, plan.pruned_map(), toks))) <= 1e-5


def test_non_uniform_plan_loads_through_the_reap_stream_loader(fixture_model, tmp_path):
    import mlx.core as mx

    from reap_stream.families.loader import load_pruned
    from reap_stream.families.masking import masked_logits

    src = fixture_model("qwen3_moe")
    st = open_model(src).structure
    per_layer = {layer: i % 3 + 1 for i, layer in enumerate(st.moe_layers)}
    plan = make_plan(src, per_layer=per_layer)
    assert not plan.uniform
    plan.save(tmp_path / "plan.json")
    assert run("apply", src, tmp_path / "plan.json", "--out", tmp_path / "out", "--quiet").exit_code == 0

    from mlx_lm import load
    with pytest.raises(ValueError, match="shape"):
        load(str(tmp_path / "out"))  # mlx_lm alone cannot build per-layer counts
    model, _ = load_pruned(tmp_path / "out")
    toks = tokens()
    got = np.array(model(mx.array(toks[None]))[0].astype(mx.float32))
    assert np.max(np.abs(got - masked_logits(src, plan.pruned_map(), toks))) <= 1e-5


def test_dry_run_validates_and_writes_nothing(fixture_model, tmp_path):
    src = fixture_model("olmoe")
    make_plan(src).save(tmp_path / "plan.json")
    res = run("apply", src, tmp_path / "plan.json", "--out", tmp_path / "out", "--dry-run", "--json")
    assert res.exit_code == 0
    summary = json.loads(res.output)
    assert summary["dry_run"] and summary["tensor_bytes"] < summary["source_tensor_bytes"]
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_peak_memory_stays_far_below_the_model_size(tmp_path):
    """A 400 MB checkpoint prunes in a process whose peak RSS is a fraction of the data moved."""
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("bench_apply", Path(__file__).parents[1] / "tools" / "bench_apply.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.make_checkpoint(tmp_path / "model", 0.4)
    plan = bench.make_plan(model, 0.25)
    report = tmp_path / "peak.json"
    subprocess.run([sys.executable, "-m", "reap_stream.procstats", str(report), "reap_stream.cli", "apply",
                    str(model), str(plan), "--out", str(tmp_path / "out"), "--quiet"], check=True)
    out_bytes = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert out_bytes > 250e6
    assert json.loads(report.read_text())["peak_rss"] < 160 * 2**20
