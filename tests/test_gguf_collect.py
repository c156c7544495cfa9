"""collect, plan, apply and eval straight from a GGUF: the same telemetry as from the MLX form of the
same model, the same tokens from the GGUF's own tokenizer metadata, one layer read at a time.

The GGUF fixtures are the MLX fixtures converted (testing/gguf_convert), so the MLX form is the
reference: in F32 the two must agree on every criterion (they run the same mlx_lm code on the same
values), in F16 and Q8_0 on the prune sets of the trained model (whose experts differ for real
reasons, unlike a random model's near-ties).
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from cli_helpers import run, tree_bytes
from collect_helpers import token_set
from conftest import REPO
from reap_stream.families.model import open_model
from reap_stream.io.gguf_write import verify
from reap_stream.planning.criteria import CRITERIA, scores
from reap_stream.runner import RunOptions
from reap_stream.telemetry.calibration import CalibrationOptions
from reap_stream.telemetry.collect import collect
from reap_stream.telemetry.gguf_tokenizer import gguf_tokenizer
from reap_stream.telemetry.store import TelemetryStore
from reap_stream.telemetry.tokenizer import load_tokenizer, tokenise
from reap_stream.testing.gguf_convert import convert_mlx_to_gguf

FAMILIES = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "gpt_oss", "deepseek_v3", "glm4_moe")
TRAINED = REPO / "fixtures" / "trained"
CALIB = REPO / "fixtures" / "calibration" / "licence.jsonl"
CRITERIA_COMPARED = [c for c in CRITERIA if c != "random"]


def collect_to(model_path: Path, calib, out: Path) -> TelemetryStore:
    collect(open_model(model_path), calib, out, RunOptions("stream", 4096), progress=False)
    return TelemetryStore.open(out)


def prune_set(values: np.ndarray, ratio: float) -> set[int]:
    return set(np.argsort(values, kind="stable")[: int(len(values) * ratio)].tolist())


def compare(a: TelemetryStore, b: TelemetryStore, criteria=CRITERIA_COMPARED) -> tuple[dict, list]:
    """(largest relative difference per criterion, [(criterion, layer, ratio) whose prune sets differ])."""
    worst, differ = {}, []
    assert a.layers() == b.layers()
    for layer in a.layers():
        sa, sb = a.read(layer), b.read(layer)
        for c in criteria:
            va, vb = scores(c, sa), scores(c, sb)
            finite = np.isfinite(va)
            assert np.array_equal(finite, np.isfinite(vb)), (c, layer)
            rel = np.abs(va[finite] - vb[finite]) / np.maximum(np.abs(va[finite]), 1e-30)
            worst[c] = max(worst.get(c, 0.0), float(rel.max(initial=0.0)))
            differ += [(c, layer, r) for r in (0.25, 0.5) if prune_set(va, r) != prune_set(vb, r)]
    return worst, differ


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_telemetry_equals_the_mlx_forms_on_every_criterion(family, fixture_model, gguf_model, tmp_path):
    calib = token_set(4, 48, seed=7)
    mlx = collect_to(fixture_model(family), calib, tmp_path / "mlx.zarr")
    from_gguf = collect_to(gguf_model(family, "f32"), calib, tmp_path / "gguf.zarr")
    worst, differ = compare(mlx, from_gguf)
    assert differ == [] and max(worst.values()) <= 1e-4, worst
    assert from_gguf.attrs["model"]["fingerprint"].startswith("gguf-sha256:")
    assert {k: v for k, v in from_gguf.attrs["model"].items() if k != "fingerprint"} == \
           {k: v for k, v in mlx.attrs["model"].items() if k != "fingerprint"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained model's MLX telemetry on 4096 calibration tokens, and a maker of its GGUF forms."""
    root = tmp_path_factory.mktemp("trained")
    options = CalibrationOptions(dataset_file=TRAINED / "data" / "calib.txt", max_tokens=4096)
    calib = tokenise(open_model(TRAINED), options)
    mlx = collect_to(TRAINED, calib, root / "mlx.zarr")

    def form(qtype: str) -> tuple[Path, TelemetryStore]:
        path = convert_mlx_to_gguf(TRAINED, root / f"{qtype}.gguf", qtype=qtype)[0]
        gm = open_model(path)
        assert tokenise(gm, options).fingerprint == calib.fingerprint   # the GGUF's own tokenizer
        return path, collect_to(path, calib, root / f"{qtype}.zarr")

    return mlx, form


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_gguf_forms_of_the_trained_model_prune_the_same_experts(qtype, trained):
    mlx, form = trained
    _, from_gguf = form(qtype)
    if qtype == "f32":
        worst, differ = compare(mlx, from_gguf)
        assert differ == [] and max(worst.values()) <= 1e-4, worst
    else:   # quantisation moves the scores by ~1e-2 (docs/gguf.md has the figures per criterion)
        _, differ = compare(mlx, from_gguf, ["reap"])
        assert differ == []


def test_the_gguf_tokenizer_gives_the_models_own_ids(fixture_model, gguf_model, calib_text):
    ours = gguf_tokenizer(open_model(gguf_model("qwen3_moe")).gguf_parts[0])
    ref = load_tokenizer(fixture_model("qwen3_moe"))
    for text in (calib_text(3000), "  two  spaces\n\n\tx=1234567 ünïcödé", "<|im_start|>user\nhi<|im_end|>"):
        assert ours.encode(text) == ref.encode(text)
        assert ours.decode(ours.encode(text)) == text
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == ref.apply_chat_template(chat, tokenize=False)
    assert ours.eos_token_id == ref.eos_token_id


def test_full_on_a_split_gguf_writes_a_pruned_gguf_equal_to_the_masked_original(gguf_model, tmp_path):
    """The issue's user: only a split GGUF, one command, a pruned GGUF out; rerunning changes nothing."""
    src = gguf_model("qwen3_moe", "q8_0", split=20)
    assert src.name == "model-00001-of-00003.gguf"
    out = tmp_path / "pruned.gguf"
    args = ["full", src, "--dataset-file", CALIB, "--max-tokens", "1024", "--ratio", "0.5", "--out", out, "--json"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    parts = [tmp_path / f"pruned-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert summary["apply"]["out"] == [str(p) for p in parts] and all(verify(p).ok for p in parts)
    assert gguf.GGUFReader(parts[0]).fields["qwen3moe.expert_count"].contents() == 4
    plan = json.loads(Path(summary["plan"]).read_text())
    assert plan["model"]["fingerprint"] == open_model(src).fingerprint

    before = tree_bytes(tmp_path)
    again = run(*args)
    assert again.exit_code == 0 and json.loads(again.output)["apply"] == "already complete"
    assert tree_bytes(tmp_path) == before

    # the pruned GGUF computes what the original computes with the pruned experts masked
    ppl = [json.loads(run("eval", m, "--dataset-file", CALIB, "--max-tokens", "512", "--json", *extra).output)
           for m, extra in ((parts[0], ()), (src, ("--mask-plan", summary["plan"])))]
    assert ppl[0]["nll_sum"] == pytest.approx(ppl[1]["nll_sum"], rel=1e-7)


def test_eval_of_the_f32_gguf_equals_eval_of_the_mlx_form(fixture_model, gguf_model):
    got = [json.loads(run("eval", m, "--dataset-file", CALIB, "--max-tokens", "512", "--json").output)["nll_sum"]
           for m in (fixture_model("mixtral"), gguf_model("mixtral", "f32"))]
    assert got[0] == pytest.approx(got[1], rel=1e-6)


def test_a_plan_made_on_one_quantisation_applies_to_another(gguf_model, tmp_path):
    """The GGUF fingerprint leaves types out: a Q8_0-made plan fits the F16 file, not another model."""
    q8, f16 = open_model(gguf_model("qwen2_moe", "q8_0")), open_model(gguf_model("qwen2_moe", "f16"))
    assert q8.fingerprint == f16.fingerprint != open_model(gguf_model("qwen3_moe", "q8_0")).fingerprint
    store = tmp_path / "t.zarr"
    collect(q8, token_set(2, 32), store, RunOptions("stream", 4096), progress=False)
    plan = tmp_path / "plan.json"
    assert run("plan", store, "--ratio", "0.25", "--out", plan).exit_code == 0
    result = run("apply", f16.path, plan, "--out", tmp_path / "o.gguf", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["fingerprint"] == "compared"


def test_stream_mode_reads_one_layer_at_a_time_and_experts_by_range(gguf_model, monkeypatch, tmp_path):
    import reap_stream.families.gguf_source as source

    read, real = [], source.read_tensor
    monkeypatch.setattr(source, "read_tensor", lambda t: read.append(t.name) or real(t))
    done: list[int] = []
    from reap_stream.runner.stream import StreamRunner

    runner = StreamRunner(open_model(gguf_model("deepseek_v3", "q8_0")), tmp_path / "w")
    chunks = runner.chunks(token_set(2, 16).sequences)
    for layer in runner.run(chunks):
        blocks = {int(n.split(".")[1]) for n in read if n.startswith("blk.")}
        assert blocks == {layer}, (layer, blocks)   # only this layer's tensors were read for it
        done.append(layer)
        read.clear()
    assert done == [0, 1, 2, 3]

    src = runner.weights.source
    name = "model.layers.2.mlp.switch_mlp.down_proj.weight"
    np.testing.assert_array_equal(src.experts(name, 3, 2), src.array(name)[3:5])


def test_fused_gate_up_experts_are_split_back_into_gate_and_up(gguf_model):
    """deepseek4-like file: ffn_gate_up_exps holds gate then up rows; the source serves each half,
    whole or by expert range."""
    from reap_stream.families.gguf_source import GGUFSource
    from reap_stream.families.table import FAMILIES

    gm = open_model(gguf_model("deepseek4", "f32"))
    ref = open_model(gguf_model("deepseek_v3", "f32"))
    tensors = {t.name: t for p in gm.gguf_parts for t in p.tensors}
    reference = {t.name: t for p in ref.gguf_parts for t in p.tensors}
    params = {f"model.layers.2.mlp.switch_mlp.{p}_proj.weight": tuple(reversed(reference[f"blk.2.ffn_{p}_exps.weight"].ne))
              for p in ("gate", "up")}
    src = GGUFSource("deepseek2", FAMILIES["deepseek_v3"], ref.config, tensors, params, 4, "t")
    ref_src = GGUFSource("deepseek2", FAMILIES["deepseek_v3"], ref.config, reference, params, 4, "t")
    for name in params:
        assert src.sources[name].tensor.name == "blk.2.ffn_gate_up_exps.weight"
        np.testing.assert_array_equal(src.array(name), ref_src.array(name))
        np.testing.assert_array_equal(src.experts(name, 5, 3), ref_src.array(name)[5:8])


def test_collect_from_a_gguf_resumes_after_sigkill_byte_identical(gguf_model, tmp_path):
    from test_collect_resume import ARGS, killed_collect

    model = gguf_model("glm4_moe", "q8_0")
    whole = tmp_path / "whole.zarr"
    assert run("collect", model, *ARGS, "--out", whole).exit_code == 0
    out, work = tmp_path / "t.zarr", tmp_path / "work"
    command = killed_collect("inside layer 2", model, out, work)
    assert not out.exists() and work.exists()
    result = run(*command)
    assert result.exit_code == 0, result.output
    assert tree_bytes(out) == tree_bytes(whole)
