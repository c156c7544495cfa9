"""`reap-stream collect` / `merge` on the command line: --json summary, and every bad input exits 2
with one line naming the file, leaving no output behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reap_stream.families.table import FAMILIES
from reap_stream.telemetry.store import TelemetryStore
from cli_helpers import error_line, run

CALIB_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "calibration"
LICENCE = str(CALIB_DIR / "licence.jsonl")
SMALL = ["--dataset-file", LICENCE, "--max-samples", "4", "--chunk-tokens", "64"]


def _copy_model(src: Path, dst: Path, drop: tuple[str, ...] = (), config: dict | None = None) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_json_summary_names_the_store_the_layers_and_the_blas(fixture_model, tmp_path):
    out = tmp_path / "t.zarr"
    result = run("collect", fixture_model("mixtral"), *SMALL, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["layers"] == [0, 1, 2, 3] and summary["mode"] == "stream"
    assert summary["num_tokens"] > 0 and summary["tokens_per_s"] > 0
    assert {"state", "kind"} <= set(summary["blas"])
    assert summary["routing"]["renorm_topk"] is True
    assert not (tmp_path / "t.zarr.work").exists()  # the work dir goes once the store is complete


def test_telemetry_attributes_record_model_calibration_and_options(fixture_model, tmp_path):
    from reap_stream.families.model import open_model

    model = fixture_model("glm4_moe")
    out = tmp_path / "t.zarr"
    assert run("collect", model, *SMALL, "--layers", "2-3", "--no-renorm-topk", "--out", out).exit_code == 0
    attrs = TelemetryStore.open(out).attrs
    assert attrs["model"]["fingerprint"] == open_model(model).fingerprint
    assert attrs["model"]["moe_layers"] == [1, 2, 3] and attrs["model"]["n_group"] == 2
    assert attrs["calibration"]["fingerprint"].startswith("sha256:")
    assert attrs["options"] == {"layers": [2, 3], "renorm_topk": False, "chunk_tokens": 64, "sample_batch_size": None,
                                "max_memory": None, "expert_kernel": "loop"}
    assert attrs["routing"]["routing"] == "sigmoid_group" and attrs["tool_version"]


def _empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    return p


BAD_CALIBRATION = {
    # case: (extra args, where, what)
    "empty dataset": (lambda t: ["--dataset-file", _empty_file(t)], "empty.jsonl", ""),
    "missing field": (lambda t: ["--dataset-file", LICENCE, "--dataset-text-field", "body"], "licence.jsonl", "body"),
    "min-samples unmet": (lambda t: ["--dataset-file", LICENCE, "--min-samples", "100000"], "licence.jsonl",
                          "fewer than --min-samples"),
    "two input sources": (lambda t: ["--dataset-file", LICENCE, "--prompt", "hello"], "--prompt", "exactly one"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALIBRATION))
def test_bad_calibration_exits_2_with_one_line(case, fixture_model, tmp_path):
    args, where, what = BAD_CALIBRATION[case]
    out = tmp_path / "t.zarr"
    result = run("collect", fixture_model("qwen3_moe"), *args(tmp_path), "--out", out)
    error_line(result, what, where=where if where.startswith("-") else "")
    assert where in result.output
    assert not out.exists()


def test_unknown_model_type_lists_the_supported_ones(fixture_model, tmp_path):
    model = _copy_model(fixture_model("qwen3_moe"), tmp_path / "m", config={"model_type": "llama4_moe"})
    result = run("collect", model, *SMALL, "--out", tmp_path / "t.zarr")
    error_line(result, "unsupported model_type 'llama4_moe'", where=str(model / "config.json"))
    assert all(name in result.output for name in FAMILIES)


def test_missing_tokenizer(fixture_model, tmp_path):
    model = _copy_model(fixture_model("qwen3_moe"), tmp_path / "m", drop=("tokenizer*",))
    result = run("collect", model, *SMALL, "--out", tmp_path / "t.zarr")
    error_line(result, "missing tokenizer", where=str(model / "tokenizer.json"))


def test_missing_model_directory(tmp_path):
    result = run("collect", tmp_path / "nope", *SMALL, "--out", tmp_path / "t.zarr")
    error_line(result, "not found (give a model directory, a .gguf file or a cached hub id org/name)",
               where=str(tmp_path / "nope"))


def test_sample_batch_size_caps_the_sequences_per_forward_chunk(fixture_model, tmp_path, monkeypatch):
    from reap_stream.runner import stream as runner

    shapes: list[tuple] = []
    real = runner.StreamRunner.run

    def spy(self, chunks, *args, **kwargs):
        shapes.extend(c.tokens.shape for c in chunks)
        return real(self, chunks, *args, **kwargs)

    monkeypatch.setattr(runner.StreamRunner, "run", spy)
    model, windows = fixture_model("qwen3_moe"), [*SMALL, "--pack-samples", "--window-tokens", "16"]
    capped = run("collect", model, *windows, "--sample-batch-size", "3", "--out", tmp_path / "a.zarr")
    assert capped.exit_code == 0, capped.output
    assert shapes and max(batch for batch, _ in shapes) == 3
    shapes.clear()
    assert run("collect", model, *windows, "--out", tmp_path / "b.zarr").exit_code == 0
    assert max(batch for batch, _ in shapes) == 4  # without it, a chunk holds what --chunk-tokens allows
    assert TelemetryStore.open(tmp_path / "a.zarr").attrs["options"]["sample_batch_size"] == 3


def test_sample_batch_size_below_one_is_refused(fixture_model, tmp_path):
    result = run("collect", fixture_model("qwen3_moe"), *SMALL, "--sample-batch-size", "0", "--out", tmp_path / "t.zarr")
    error_line(result, "must be at least 1", where="--sample-batch-size")


def test_work_dir_of_a_run_with_other_options_is_refused(fixture_model, tmp_path, monkeypatch):
    from reap_stream.runner import stream as runner

    model, out, work = fixture_model("qwen3_moe"), tmp_path / "t.zarr", tmp_path / "w"
    real = runner.StreamRunner._set_next_layer

    def stop_after_layer_1(self, n):
        real(self, n)
        if n == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.StreamRunner, "_set_next_layer", stop_after_layer_1)
    first = run("collect", model, *SMALL, "--out", out, "--work-dir", work)
    assert first.exit_code != 0 and (work / "run.json").exists() and not out.exists()
    monkeypatch.undo()

    result = run("collect", model, *SMALL, "--no-renorm-topk", "--out", out, "--work-dir", work)
    error_line(result, "other renorm_topk", where=str(work / "run.json"))
    result = run("collect", model, *SMALL[:-1], "32", "--out", out, "--work-dir", work)
    error_line(result, "other chunk_tokens", where=str(work / "run.json"))
    result = run("collect", model, *SMALL, "--sample-batch-size", "1", "--out", out, "--work-dir", work)
    error_line(result, "other sample_batch_size", where=str(work / "run.json"))
    other_text = ["--dataset-file", LICENCE, "--max-samples", "5", "--chunk-tokens", "64"]
    result = run("collect", model, *other_text, "--out", out, "--work-dir", work)
    error_line(result, "other calibration_fingerprint", where=str(work / "run.json"))
    assert not out.exists()
    assert run("collect", model, *SMALL, "--out", out, "--work-dir", work).exit_code == 0  # same options resume


def test_existing_output_of_another_run_is_refused(fixture_model, tmp_path):
    out = tmp_path / "t.zarr"
    assert run("collect", fixture_model("olmoe"), *SMALL, "--out", out).exit_code == 0
    result = run("collect", fixture_model("olmoe"), *SMALL, "--no-renorm-topk", "--out", out)
    error_line(result, "another run's telemetry", where=str(out))


@pytest.mark.parametrize("layers,what", [("0", "layer 0 is not an MoE layer"), ("1-x", "cannot read")])
def test_bad_layers_option(layers, what, fixture_model, tmp_path):
    result = run("collect", fixture_model("deepseek_v3"), *SMALL, "--layers", layers, "--out", tmp_path / "t.zarr")
    error_line(result, what, where="--layers")


def test_merge_refuses_other_models_double_counting_and_non_stores(fixture_model, tmp_path):
    a, b, c = tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "c.zarr"
    assert run("collect", fixture_model("mixtral"), *SMALL, "--out", a).exit_code == 0
    assert run("collect", fixture_model("olmoe"), *SMALL, "--out", b).exit_code == 0
    error_line(run("merge", a, b, "--out", c), "model differs", where=str(b))
    error_line(run("merge", a, a, "--out", c), "same calibration tokens", where=str(a))
    error_line(run("merge", a, tmp_path, "--out", c), "not a telemetry store", where=str(tmp_path))
    error_line(run("merge", a, b, "--out", a), "already exists", where=str(a))
    assert not c.exists()
