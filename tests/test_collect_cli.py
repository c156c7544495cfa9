"""`reap-stream collect` / `merge` on the command line: --json summary, and every bad input exits 2
with one line naming the file, leaving no output behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from reap_stream.cli import cli
from reap_stream.families import FAMILIES
from reap_stream.telemetry import TelemetryStore
from refusal import error_line

CALIB_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "calibration"
LICENCE = str(CALIB_DIR / "licence.jsonl")
SMALL = ["--dataset-file", LICENCE, "--max-samples", "4", "--chunk-tokens", "64"]


def _run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_error_line(result, where: str, what: str) -> None:
    error_line(result, what, where=where)


def _copy_model(src: Path, dst: Path, drop: tuple[str, ...] = (), config: dict | None = None) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_json_summary_names_the_store_the_layers_and_the_blas(fixture_model, tmp_path):
    out = tmp_path / "t.zarr"
    result = _run("collect", fixture_model("mixtral"), *SMALL, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["out"] == str(out) and summary["layers"] == [0, 1, 2, 3] and summary["mode"] == "stream"
    assert summary["num_tokens"] > 0 and summary["tokens_per_s"] > 0
    assert {"state", "kind"} <= set(summary["blas"])
    assert summary["routing"]["renorm_topk"] is True
    assert not (tmp_path / "t.zarr.work").exists()  # the work dir goes once the store is complete


def test_telemetry_attributes_record_model_calibration_and_options(fixture_model, tmp_path):
    from reap_stream.checkpoint import Checkpoint
    from reap_stream.structure import fingerprint

    model = fixture_model("glm4_moe")
    out = tmp_path / "t.zarr"
    assert _run("collect", model, *SMALL, "--layers", "2-3", "--no-renorm-topk", "--out", out).exit_code == 0
    attrs = TelemetryStore.open(out).attrs
    assert attrs["model"]["fingerprint"] == fingerprint(Checkpoint.open(model))
    assert attrs["model"]["moe_layers"] == [1, 2, 3] and attrs["model"]["n_group"] == 2
    assert attrs["calibration"]["fingerprint"].startswith("sha256:")
    assert attrs["options"] == {"layers": [2, 3], "renorm_topk": False, "chunk_tokens": 64, "sample_batch_size": None}
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
    result = _run("collect", fixture_model("qwen3_moe"), *args(tmp_path), "--out", out)
    _one_error_line(result, where if where.startswith("-") else "", what)
    assert where in result.output
    assert not out.exists()


def test_unknown_model_type_lists_the_supported_ones(fixture_model, tmp_path):
    model = _copy_model(fixture_model("qwen3_moe"), tmp_path / "m", config={"model_type": "llama4_moe"})
    result = _run("collect", model, *SMALL, "--out", tmp_path / "t.zarr")
    _one_error_line(result, str(model / "config.json"), "unsupported model_type 'llama4_moe'")
    assert all(name in result.output for name in FAMILIES)


def test_missing_tokenizer(fixture_model, tmp_path):
    model = _copy_model(fixture_model("qwen3_moe"), tmp_path / "m", drop=("tokenizer*",))
    result = _run("collect", model, *SMALL, "--out", tmp_path / "t.zarr")
    _one_error_line(result, str(model / "tokenizer.json"), "missing tokenizer")


def test_missing_model_directory(tmp_path):
    result = _run("collect", tmp_path / "nope", *SMALL, "--out", tmp_path / "t.zarr")
    _one_error_line(result, str(tmp_path / "nope"), "not a model directory")


def test_sample_batch_size_caps_the_sequences_per_forward_chunk(fixture_model, tmp_path, monkeypatch):
    from reap_stream import runner

    shapes: list[tuple] = []
    real = runner.StreamRunner.run

    def spy(self, chunks, *args, **kwargs):
        shapes.extend(c.tokens.shape for c in chunks)
        return real(self, chunks, *args, **kwargs)

    monkeypatch.setattr(runner.StreamRunner, "run", spy)
    model, windows = fixture_model("qwen3_moe"), [*SMALL, "--pack-samples", "--window-tokens", "16"]
    capped = _run("collect", model, *windows, "--sample-batch-size", "3", "--out", tmp_path / "a.zarr")
    assert capped.exit_code == 0, capped.output
    assert shapes and max(batch for batch, _ in shapes) == 3
    shapes.clear()
    assert _run("collect", model, *windows, "--out", tmp_path / "b.zarr").exit_code == 0
    assert max(batch for batch, _ in shapes) == 4  # without it, a chunk holds what --chunk-tokens allows
    assert TelemetryStore.open(tmp_path / "a.zarr").attrs["options"]["sample_batch_size"] == 3


def test_sample_batch_size_below_one_is_refused(fixture_model, tmp_path):
    result = _run("collect", fixture_model("qwen3_moe"), *SMALL, "--sample-batch-size", "0", "--out", tmp_path / "t.zarr")
    _one_error_line(result, "--sample-batch-size", "must be at least 1")


def test_work_dir_of_a_run_with_other_options_is_refused(fixture_model, tmp_path, monkeypatch):
    from reap_stream import runner

    model, out, work = fixture_model("qwen3_moe"), tmp_path / "t.zarr", tmp_path / "w"
    real = runner.StreamRunner._set_next_layer

    def stop_after_layer_1(self, n):
        real(self, n)
        if n == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.StreamRunner, "_set_next_layer", stop_after_layer_1)
    first = _run("collect", model, *SMALL, "--out", out, "--work-dir", work)
    assert first.exit_code != 0 and (work / "run.json").exists() and not out.exists()
    monkeypatch.undo()

    result = _run("collect", model, *SMALL, "--no-renorm-topk", "--out", out, "--work-dir", work)
    _one_error_line(result, str(work / "run.json"), "other renorm_topk")
    result = _run("collect", model, *SMALL[:-1], "32", "--out", out, "--work-dir", work)
    _one_error_line(result, str(work / "run.json"), "other chunk_tokens")
    result = _run("collect", model, *SMALL, "--sample-batch-size", "1", "--out", out, "--work-dir", work)
    _one_error_line(result, str(work / "run.json"), "other sample_batch_size")
    other_text = ["--dataset-file", LICENCE, "--max-samples", "5", "--chunk-tokens", "64"]
    result = _run("collect", model, *other_text, "--out", out, "--work-dir", work)
    _one_error_line(result, str(work / "run.json"), "other calibration_fingerprint")
    assert not out.exists()
    assert _run("collect", model, *SMALL, "--out", out, "--work-dir", work).exit_code == 0  # same options resume


def test_existing_output_of_another_run_is_refused(fixture_model, tmp_path):
    out = tmp_path / "t.zarr"
    assert _run("collect", fixture_model("olmoe"), *SMALL, "--out", out).exit_code == 0
    result = _run("collect", fixture_model("olmoe"), *SMALL, "--no-renorm-topk", "--out", out)
    _one_error_line(result, str(out), "another run's telemetry")


@pytest.mark.parametrize("layers,what", [("0", "layer 0 is not an MoE layer"), ("1-x", "cannot read")])
def test_bad_layers_option(layers, what, fixture_model, tmp_path):
    result = _run("collect", fixture_model("deepseek_v3"), *SMALL, "--layers", layers, "--out", tmp_path / "t.zarr")
    _one_error_line(result, "--layers", what)


def test_merge_refuses_other_models_double_counting_and_non_stores(fixture_model, tmp_path):
    a, b, c = tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "c.zarr"
    assert _run("collect", fixture_model("mixtral"), *SMALL, "--out", a).exit_code == 0
    assert _run("collect", fixture_model("olmoe"), *SMALL, "--out", b).exit_code == 0
    _one_error_line(_run("merge", a, b, "--out", c), str(b), "model differs")
    _one_error_line(_run("merge", a, a, "--out", c), str(a), "same calibration tokens")
    _one_error_line(_run("merge", a, tmp_path, "--out", c), str(tmp_path), "not a telemetry store")
    _one_error_line(_run("merge", a, b, "--out", a), str(a), "already exists")
    assert not c.exists()
