"""`eval` and `compare`: streaming perplexity equals mlx_lm's own in-memory forward; a masked
original evaluates exactly like its pruned output; bad input ends in exit 2 and one line."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import error_line, run
from reap_stream import eval as reap_eval
from reap_stream.blas import ensure_blas
from reap_stream.families.model import open_model
from reap_stream.planning.plan import Plan
from reap_stream.runner import RunOptions
from reap_stream.testing import synth
from test_apply import make_plan

ensure_blas()
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402


def tokens_of(model_dir: Path, text: str) -> np.ndarray:
    from transformers import AutoTokenizer

    return np.asarray(AutoTokenizer.from_pretrained(str(model_dir)).encode(text), dtype=np.int32)


def mlx_lm_perplexity(model_dir: Path, windows: np.ndarray, pruned: dict | None = None) -> float:
    """The reference: mlx_lm's whole model in memory, float32 cross-entropy over every window."""
    from mlx_lm.utils import load_model

    from reap_stream.families.masking import mask_experts

    model, _ = load_model(model_dir)
    if pruned:
        mask_experts(model, pruned)
    x = mx.array(windows)
    logits = model(x[:, :-1]).astype(mx.float32)
    return math.exp(nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean").item())


def perplexity(model_dir: Path, sequences, *, mode: str = "stream", chunk_tokens: int = 4096,
               mask: dict | None = None) -> reap_eval.PerplexityResult:
    """reap_stream.eval.perplexity of a model path, quiet."""
    return reap_eval.perplexity(open_model(model_dir), sequences, RunOptions(mode, chunk_tokens), mask=mask,
                                progress=False)


def run_json(*args: str) -> dict:
    res = run(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def text(calib_text) -> str:
    return calib_text(3000)


# ---------------------------------------------------------------- NLL and |diff| arithmetic

def test_token_nll_of_uniform_logits_is_log_vocab():
    nll = reap_eval.token_nll(np.zeros((2, 5, 8), np.float32), np.zeros((2, 5), np.int32))
    assert nll.shape == (2, 4) and nll.dtype == np.float64
    assert np.allclose(nll, math.log(8), rtol=1e-7)


@pytest.mark.parametrize("slice_values", [1 << 22, 7])   # one slice, and one row per slice
def test_token_nll_and_abs_diff_match_float64_over_any_slicing(monkeypatch, slice_values):
    monkeypatch.setattr(reap_eval, "_SLICE_VALUES", slice_values)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((2, 6, 11)) * 5).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 6))
    x = logits.astype(np.float64)[:, :-1]
    want = np.log(np.exp(x).sum(-1)) - np.take_along_axis(x, tokens[:, 1:, None], -1)[..., 0]
    assert np.allclose(reap_eval.token_nll(logits, tokens), want, rtol=1e-6)
    other = logits + np.float32(0.25) * np.arange(11, dtype=np.float32)
    top, total = reap_eval._abs_diff_stats(logits, other)
    assert top == pytest.approx(2.5) and total == pytest.approx(2 * 6 * 0.25 * sum(range(11)), rel=1e-6)


# ---------------------------------------------------------------- equals mlx_lm in memory

@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_streamed_perplexity_equals_mlx_lm_in_memory(fixture_model, text, family):
    model_dir = fixture_model(family)
    ids = tokens_of(model_dir, text)
    windows = ids[: len(ids) // 65 * 65].reshape(-1, 65)[:6]
    # 2 windows per chunk: three chunks spilled and read back layer by layer
    got = perplexity(model_dir, list(windows), chunk_tokens=130)
    want = mlx_lm_perplexity(model_dir, windows)
    assert got.num_sequences == 6 and got.num_predictions == 6 * 64
    assert got.perplexity == pytest.approx(want, rel=1e-5)


def test_memory_mode_equals_stream_mode(fixture_model, text):
    model_dir = fixture_model("qwen3_moe", "bf16")
    ids = tokens_of(model_dir, text)[:200]
    seqs = [ids[:120], ids[120:200]]  # unequal lengths: one chunk each
    stream = perplexity(model_dir, seqs, mode="stream")
    memory = perplexity(model_dir, seqs, mode="memory")
    assert stream.num_predictions == 119 + 79
    assert stream.perplexity == pytest.approx(memory.perplexity, rel=1e-6)


def test_bf16_checkpoint_matches_its_float32_upcast_reference(fixture_model, text, tmp_path):
    """The CPU backend runs experts in float32; the result stays within bf16 rounding of a float32
    forward of the same bf16 weights."""
    from mlx_lm.utils import load_model

    model_dir = fixture_model("qwen3_moe", "bf16")
    ids = tokens_of(model_dir, text)[:129][None]
    model, _ = load_model(model_dir)
    model.set_dtype(mx.float32)
    x = mx.array(ids)
    want = math.exp(nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:], reduction="mean").item())
    got = perplexity(model_dir, list(ids))
    assert got.perplexity == pytest.approx(want, rel=2e-2)


def test_eval_command_on_a_prompt_matches_mlx_lm(fixture_model, text):
    model_dir = fixture_model("qwen3_moe")
    prompt = text[:1200]
    out = run_json("eval", model_dir, "--prompt", prompt)
    ids = tokens_of(model_dir, prompt)
    assert out["num_predictions"] == len(ids) - 1
    assert out["perplexity"] == pytest.approx(mlx_lm_perplexity(model_dir, ids[None]), rel=1e-5)
    assert out["mean_nll"] == pytest.approx(math.log(out["perplexity"]), rel=1e-12)


# ---------------------------------------------------------------- masked original == pruned

@pytest.fixture(scope="module")
def pruned_pair(fixture_model, tmp_path_factory):
    """(original, plan path, pruned output written by `apply`)."""
    src = fixture_model("qwen3_moe")
    root = tmp_path_factory.mktemp("pruned")
    plan_path = root / "plan.json"
    make_plan(src, n_prune=4).save(plan_path)
    res = run("apply", src, plan_path, "--out", root / "out", "--quiet")
    assert res.exit_code == 0, res.output
    return src, plan_path, root / "out"


def test_mask_plan_on_the_original_equals_eval_of_the_pruned_output(pruned_pair, text):
    src, plan_path, pruned = pruned_pair
    prompt = text[:1500]
    masked = run_json("eval", src, "--prompt", prompt, "--mask-plan", plan_path)
    direct = run_json("eval", pruned, "--prompt", prompt)
    plain = run_json("eval", src, "--prompt", prompt)
    assert masked["num_predictions"] == direct["num_predictions"]
    assert masked["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert abs(masked["perplexity"] - plain["perplexity"]) > 1e-3 * plain["perplexity"]
    assert sum(len(v) for v in masked["masked_experts"].values()) == 4 * 4


def test_masked_perplexity_equals_mlx_lm_with_masked_routing(pruned_pair, text):
    src, plan_path, _ = pruned_pair
    pruned = Plan.load(plan_path).pruned_map()
    ids = tokens_of(src, text)[:257][None]
    got = perplexity(src, list(ids), mask=pruned)
    assert got.perplexity == pytest.approx(mlx_lm_perplexity(src, ids, pruned), rel=1e-5)


def test_compare_masked_original_with_pruned_output(pruned_pair, text):
    src, plan_path, pruned = pruned_pair
    prompt = text[:800]
    same = run_json("compare", src, pruned, "--prompt", prompt, "--mask-plan", plan_path)
    assert same["max_abs_diff"] < 1e-4 and same["top1_agreement"] == 1.0
    differ = run_json("compare", src, pruned, "--prompt", prompt)
    assert differ["max_abs_diff"] > 1e-2
    assert 0 < differ["mean_abs_diff"] <= differ["max_abs_diff"]
    assert differ["num_tokens"] == same["num_tokens"] == len(tokens_of(src, prompt))


def test_compare_a_model_with_itself_is_zero(fixture_model):
    model_dir = fixture_model("mixtral")
    out = run_json("compare", model_dir, model_dir, "--prompt", "import os\nprint(os.getcwd())\n")
    assert out["max_abs_diff"] == 0.0 and out["mean_abs_diff"] == 0.0 and out["top1_agreement"] == 1.0


# ---------------------------------------------------------------- bad input

def refused(*args: str) -> str:
    return error_line(run(*args))


def test_eval_of_a_missing_model_dir(tmp_path):
    line = refused("eval", tmp_path / "nope", "--prompt", "x = 1")
    assert str(tmp_path / "nope") in line


def test_eval_without_text_or_with_nothing_to_predict(fixture_model):
    model_dir = fixture_model("qwen3_moe")
    assert "calibration source" in refused("eval", model_dir)
    assert "nothing to predict" in refused("eval", model_dir, "--prompt", "x")


def test_eval_with_bad_chunk_tokens(fixture_model):
    assert "--chunk-tokens" in refused("eval", fixture_model("qwen3_moe"), "--prompt", "a = 1", "--chunk-tokens", "0")


def test_eval_with_a_missing_dataset_file(fixture_model, tmp_path):
    line = refused("eval", fixture_model("qwen3_moe"), "--dataset-file", tmp_path / "held.txt")
    assert "held.txt" in line


@pytest.mark.parametrize("fault, needle", [
    ("missing", "plan file not found"),
    ("not_json", "invalid JSON"),
    ("other_model", "another model"),
    ("below_top_k", "fewer than top_k"),
    ("not_moe_layer", "not an MoE layer"),
])
def test_eval_with_a_bad_mask_plan(fixture_model, tmp_path, fault, needle):
    model_dir = fixture_model("qwen3_moe")
    path = tmp_path / "plan.json"
    plan = make_plan(model_dir, n_prune=2)
    if fault == "not_json":
        path.write_text("{ not json")
    elif fault != "missing":
        if fault == "other_model":
            plan.model["fingerprint"] = "sha256:" + "0" * 64
        elif fault == "below_top_k":
            plan = make_plan(model_dir, n_prune=7)
        elif fault == "not_moe_layer":
            plan.layers[99] = plan.layers[0]
        plan.save(path)
    line = refused("eval", model_dir, "--prompt", "def f(): pass", "--mask-plan", path)
    assert str(path) in line and needle in line


def test_compare_with_a_missing_or_mismatched_model(fixture_model, tmp_path):
    a = fixture_model("qwen3_moe")
    assert str(tmp_path / "b") in refused("compare", a, tmp_path / "b", "--prompt", "y = 2")
    b = tmp_path / "wider"
    shutil.copytree(fixture_model("mixtral"), b)
    cfg = json.loads((b / "config.json").read_text())
    cfg["vocab_size"] = cfg["vocab_size"] * 2
    (b / "config.json").write_text(json.dumps(cfg))
    line = refused("compare", a, b, "--prompt", "y = 2")
    assert str(b / "config.json") in line and "vocab_size" in line


# ---------------------------------------------------------------- the trainer (tools/train_tiny_moe.py)

@pytest.fixture(scope="module")
def trainer():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "train_tiny_moe.py"
    spec = importlib.util.spec_from_file_location("train_tiny_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_splits_are_by_file_and_decided_by_the_path_alone(trainer, tmp_path):
    for rel in ("a.py", "pkg/b.py", "pkg/c.py", "test/test_a.py", "site-packages/x.py", "z.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    splits = trainer.build_splits(tmp_path)
    files = [rel for s in trainer.SPLITS for rel, _ in splits[s]]
    assert sorted(files) == ["a.py", "pkg/b.py", "pkg/c.py"]  # tests, site-packages, non-.py left out
    for s in trainer.SPLITS:
        assert all(trainer.split_of(rel) == s for rel, _ in splits[s])
    names = [f"m{i}.py" for i in range(2000)]
    share = {s: sum(trainer.split_of(n) == s for n in names) / len(names) for s in trainer.SPLITS}
    assert 0.03 < share["heldout"] < 0.07 and 0.07 < share["calib"] < 0.13


def test_training_forward_is_mlx_lm_forward(trainer):
    """The exact training forward equals mlx_lm's; the capacity-limited one equals it when no
    expert overflows."""
    from mlx_lm.models.qwen3_moe import Model, ModelArgs

    mx.random.seed(3)
    cfg = {**trainer.MODEL_CONFIG, "num_hidden_layers": 2, "hidden_size": 64, "num_experts": 8}
    model = Model(ModelArgs.from_dict(cfg))
    x = mx.array(np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 24)).astype(np.int32))
    dense, aux = trainer.forward(model, x, mx, nn)
    roomy, _ = trainer.forward(model, x, mx, nn, capacity_factor=float(cfg["num_experts"]))
    assert mx.abs(dense - model(x)).max().item() < 1e-4
    assert mx.abs(roomy - dense).max().item() < 1e-5
    assert aux.item() >= 1.0 - 1e-5  # E * sum(f * P) is 1 at perfect balance, more otherwise


def test_the_committed_trained_model_is_a_valid_mlx_lm_checkpoint(trainer):
    root = Path(__file__).resolve().parents[1] / "fixtures" / "trained"
    model = open_model(root)
    st, ckpt = model.structure, model.checkpoint
    assert st.model_type == "qwen3_moe" and st.moe_layers == [0, 1, 2, 3]
    assert set(st.layer_experts.values()) == {32} and st.top_k == 2
    assert ckpt.config == json.loads(json.dumps(trainer.MODEL_CONFIG))
    for split in ("calib", "heldout"):
        assert (root / "data" / f"{split}.txt").stat().st_size > 100_000


def test_eval_streams_a_non_uniform_prune_like_its_masked_original(fixture_model, tmp_path):
    """mlx_lm cannot build per-layer expert counts; the streaming runner reads them from the shapes."""
    src = fixture_model("qwen3_moe")
    plan = make_plan(src, per_layer={0: 1, 1: 3, 2: 2, 3: 4})
    assert not plan.uniform
    plan.save(tmp_path / "plan.json")
    res = run("apply", src, tmp_path / "plan.json", "--out", tmp_path / "out", "--quiet")
    assert res.exit_code == 0, res.output
    seqs = [np.arange(1, 65, dtype=np.int32) * 7 % 500, np.arange(3, 67, dtype=np.int32) * 11 % 500]
    pruned = perplexity(tmp_path / "out", seqs)
    masked = perplexity(src, seqs, mask=plan.pruned_map())
    assert pruned.perplexity == pytest.approx(masked.perplexity, rel=1e-6)


def test_a_head_tied_to_the_embedding_reads_the_embedding_and_an_untied_one_does_not(tmp_path, monkeypatch):
    """Stream mode reads only what the logits need: the token embedding as its calibration rows,
    and whole only where the head is the embedding (tied); perplexity as in memory mode."""
    from reap_stream.runner import weights

    read: list[str] = []
    real = weights.to_mx
    monkeypatch.setattr(weights, "to_mx", lambda ref: read.append(ref.name) or real(ref))
    for tied in (True, False):
        model = synth.make_mlx_fixture("qwen3_moe", tmp_path / str(tied), config_overrides={"tie_word_embeddings": tied})
        read.clear()
        stream = json.loads(run("eval", model, "--prompt", "def f(x):\n    return x * 2\n", "--json").output)
        memory = json.loads(run("eval", model, "--prompt", "def f(x):\n    return x * 2\n", "--mode", "memory",
                                "--json").output)
        assert ("model.embed_tokens.weight" in read) == tied and ("lm_head.weight" in read) == (not tied)
        assert abs(stream["perplexity"] - memory["perplexity"]) <= 1e-5 * memory["perplexity"]
