"""Quiet by default: on an install without torch (the README's), commands that load a tokenizer
print nothing on stderr that is not theirs (transformers announces "PyTorch was not found" on
every import), and the tokenizer loads without torch. torch is installed for the HF tests, so a
child process is made unable to import it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def without_torch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    shim = tmp_path / "no_torch"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None  # import torch -> ImportError\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    env["PYTHONPATH"] = f"{shim}{os.pathsep}{REPO}"
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)


def test_the_child_really_has_no_torch_and_transformers_would_say_so(tmp_path):
    r = without_torch(tmp_path, "-c", "import transformers, importlib.util; "
                                      "print(importlib.util.find_spec('torch') is None)")
    assert r.stdout.strip() == "True"
    assert "PyTorch was not found" in r.stderr  # what every command printed before


def test_commands_that_load_a_tokenizer_are_silent_without_torch(fixture_model, tmp_path):
    r = without_torch(tmp_path, "-m", "reap_stream.cli", "eval", str(fixture_model("qwen3_moe")), "--prompt",
                      "Licensed under the Apache License " * 4, "--mode", "memory", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert json.loads(r.stdout)["num_predictions"] > 0   # tokenised by the model's own tokenizer
