#!/usr/bin/env python
"""Randomised trials of concurrent writers on one output: never a mix, never a loss.

    python tools/check_concurrency.py --trials 20 --seed 0
    python tools/check_concurrency.py --trials 5 --only apply --only "apply gguf split"

For each writer kind (apply to a safetensors directory and to a GGUF file, both of --size-mb
synthetic models so that writes take long enough to overlap, apply to split GGUF parts, collect,
full, plan, merge, init) every trial starts two or three real `reap-stream`
processes on the same output at random moments (0-150 ms apart), with randomly different inputs
(two plans, two calibration texts, two seeds), with or without --overwrite, sometimes on an output
that already exists, and sometimes SIGKILLs one of them at a random moment. Afterwards:

- every process exited 0, or 2 with one line (`reap-stream: error: ...`), or was the one killed;
- the output is byte-identical to the reference output of one of the inputs (a whole output,
  never a mix of two), and present whenever it was present before or a run succeeded (no loss);
- outputs with checksums pass `reap-stream verify`;
- nothing is left beside it: no temporary, no `.reap-old`, no `.partial`, no lock file (a killed
  run's leftovers must be cleared by the next run: the trial then reruns the command once).

Prints a table per kind and exits 1 on any violation.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LEFTOVER = (".reap-tmp", ".reap-old", ".partial", ".reap-lock", ".tmp")


def tree(path: Path) -> dict[str, bytes] | None:
    """{relative name: bytes} of a file or a directory; None when absent."""
    if path.is_file():
        return {"": path.read_bytes()}
    if not path.is_dir():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def gguf_tree(first: Path) -> dict[str, bytes] | None:
    """Every part of a GGUF output (and its manifest) found beside `first`'s name."""
    stem = first.name.removesuffix(".gguf")
    names = sorted(p.name for p in first.parent.iterdir()
                   if p.name.startswith(stem) and not p.name.startswith("."))
    return {n: (first.parent / n).read_bytes() for n in names} or None


class Kind:
    """One writer kind: how to build the command for input `i` on output `out`, and what to compare."""

    def __init__(self, name: str, make, inputs: int = 2, overwrite: bool = False, verify: bool = False,
                 gguf: bool = False):
        self.name, self.make, self.inputs, self.overwrite, self.verify, self.gguf = \
            name, make, inputs, overwrite, verify, gguf

    def snapshot(self, out: Path):
        return gguf_tree(out) if self.gguf else tree(out)

    def verify_target(self, out: Path) -> Path:
        if self.gguf and not out.exists():
            return out.with_name(out.name.removesuffix(".gguf") + "-00001-of-00003.gguf")
        return out


def kinds(fx: dict) -> dict[str, Kind]:
    prompts = ["the quick brown fox jumps over the lazy dog " * 30, "lorem ipsum dolor sit amet consectetur " * 30]
    return {k.name: k for k in (
        Kind("apply", lambda i, out: ["apply", fx["big"], fx["big_plans"][i], "--out", out, "--quiet"],
             overwrite=True, verify=True),
        Kind("apply gguf", lambda i, out: ["apply", fx["big_gguf"], fx["big_gguf_plans"][i], "--out", out, "--quiet"],
             overwrite=True, verify=True, gguf=True),
        Kind("apply gguf split", lambda i, out: ["apply", fx["split"], fx["plans"][i], "--out", out, "--quiet"],
             overwrite=True, verify=True, gguf=True),
        Kind("collect", lambda i, out: ["collect", fx["src"], "--prompt", prompts[i], "--out", out, "--json"]),
        Kind("full", lambda i, out: ["full", fx["src"], "--prompt", prompts[i], "--ratio", "0.5", "--out", out,
                                     "--json"], overwrite=True, verify=True),
        Kind("plan", lambda i, out: ["plan", fx["t"][0], "--ratio", ("0.25", "0.5")[i], "--out", out]),
        Kind("merge", lambda i, out: ["merge", fx["t"][i], fx["t"][1 - i], fx["t"][2], "--out", out]),
        Kind("init", lambda i, out: ["init", "--out", out, "--layers", "3", "--seed", str(i)], overwrite=True),
    )}


def random_plans(model: Path, root: Path, tag: str) -> list[Path]:
    """Two different plans for a model: random halves and quarters of each layer's experts."""
    import numpy as np

    from reap_stream.families.model import open_model
    from reap_stream.planning.plan import LayerPlan, Plan

    st = open_model(model).structure
    paths = []
    for i, keep in enumerate((0.5, 0.75)):
        rng = np.random.default_rng(i)
        layers = {}
        for layer, n in st.layer_experts.items():
            kept = sorted(rng.choice(n, int(n * keep), replace=False).tolist())
            layers[layer] = LayerPlan(kept, sorted(set(range(n)) - set(kept)))
        paths.append(root / f"{tag}-plan{i}.json")
        Plan(layers, method="random", ratio=1 - keep).save(paths[-1])
    return paths


def fixtures(root: Path, size_mb: int) -> dict:
    from reap_stream.blas import ensure_blas

    ensure_blas()
    from reap_stream.families.model import open_model
    from reap_stream.planning.planner import PlanOptions, make_plan
    from reap_stream.telemetry.store import TelemetryStore
    from reap_stream.telemetry.synthetic import write_synthetic_telemetry
    from reap_stream.testing import synth
    from reap_stream.testing.gguf_convert import cached_gguf

    cache = Path(os.environ.get("REAP_STREAM_FIXTURES", REPO / "fixtures" / "generated"))
    src = synth.cached_fixture("qwen3_moe", "fp32", cache)
    block = open_model(src).model_block()
    stores = [write_synthetic_telemetry(root / f"t{i}.zarr", tokens=64, hidden=8, seed=i, model=block).path
              for i in range(3)]
    plans = []
    for i, ratio in enumerate((0.25, 0.5)):
        make_plan(TelemetryStore.open(stores[0]), PlanOptions("reap", ratio=ratio)).save(root / f"plan{i}.json")
        plans.append(root / f"plan{i}.json")
    from gguf.constants import GGMLQuantizationType as T

    from reap_stream.io.gguf import tensor_nbytes
    from reap_stream.testing.gguf_synth import write_moe_gguf

    from bench_apply import make_checkpoint

    # writers that take a while (large enough for the trials' start times to overlap them)
    big = make_checkpoint(root / "big", size_mb / 1000)
    big_gguf = root / "big.gguf"
    layer_bytes = 3 * tensor_nbytes((1024, 512, 64), T.Q8_0)
    write_moe_gguf(big_gguf, "qwen3moe", layers=max(1, (size_mb << 20) // layer_bytes), experts=64, top_k=8,
                   hidden=1024, ff=512)
    return {"big": big, "big_plans": random_plans(big, root, "big"), "big_gguf": big_gguf,
            "big_gguf_plans": random_plans(big_gguf, root, "big-gguf"),
            "src": src,
            "split": cached_gguf("qwen3_moe", "q8_0", cache / "gguf", src, split=20)[0], "t": stores, "plans": plans}


def cli(args: list, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reap_stream.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def references(kind: Kind, root: Path) -> list:
    refs = []
    for i in range(kind.inputs):
        out = root / f"ref-{kind.name.replace(' ', '-')}-{i}" / ("out.gguf" if kind.gguf else "out")
        out.parent.mkdir(parents=True)
        p = cli(kind.make(i, out))
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"reference run of {kind.name} failed: {err}")
        refs.append(_normal(kind, out, kind.snapshot(out)))
    return refs


def _normal(kind: Kind, out: Path, snap):
    """A snapshot comparable across directories: the output's own name taken out of file names
    and of what collect/full record about their work dir."""
    if snap is None:
        return None
    return {k.replace(out.name.removesuffix(".gguf"), "OUT"): v.replace(str(out.parent).encode(), b"DIR")
            for k, v in snap.items()}


def trial(kind: Kind, refs: list, rng: random.Random, root: Path, seen: dict) -> list[str]:
    """One trial; returns the violations found and counts what happened in `seen` (processes that
    wrote, were refused by another's lock, refused otherwise, were killed)."""
    d = root / "trial"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    out = d / ("out.gguf" if kind.gguf else "out")
    existed = rng.random() < 0.3
    if existed:  # an output already there (reference input 0), to be kept or replaced whole
        p = cli(kind.make(0, out) + (["--overwrite"] if kind.overwrite else []))
        p.communicate()
    n = rng.choice((2, 2, 3))
    inputs = [rng.randrange(kind.inputs) for _ in range(n)]
    overwrite = [kind.overwrite and rng.random() < 0.6 for _ in range(n)]
    procs = []
    for i, ow in zip(inputs, overwrite):
        time.sleep(rng.uniform(0, 0.15))
        procs.append(cli(kind.make(i, out) + (["--overwrite"] if ow else [])))
    victim = rng.randrange(n) if rng.random() < 0.3 else None
    if victim is not None:
        time.sleep(rng.uniform(0, 1.5))
        procs[victim].send_signal(signal.SIGKILL)
    problems, ok = [], 0
    for k, p in enumerate(procs):
        _, err = p.communicate(timeout=600)
        if k == victim and p.returncode == -signal.SIGKILL:
            seen["killed"] += 1
            continue
        lines = err.strip().splitlines()
        outcome = "wrote" if p.returncode == 0 else "locked out" if "another reap-stream run" in err else "refused"
        seen[outcome] += 1
        if p.returncode == 0:
            ok += 1
        elif p.returncode != 2 or len(lines) != 1 or not lines[0].startswith("reap-stream: error: "):
            problems.append(f"process {k} exited {p.returncode}: {err.strip()[-300:]}")
    if victim is not None:  # the next run clears a killed run's leftovers (and finishes a resumable one)
        again = cli(kind.make(inputs[victim], out) + (["--overwrite"] if kind.overwrite else []))
        _, err = again.communicate()
        if again.returncode not in (0, 2):
            problems.append(f"the run after a kill exited {again.returncode}: {err.strip()[-300:]}")
        ok += again.returncode == 0
    snap = _normal(kind, out, kind.snapshot(out))
    if snap is None and (existed or ok):
        problems.append("output missing after a successful run (a loss)")
    elif snap is not None and snap not in refs:
        problems.append("output equals no reference output (a mix or a damaged output)")
    if snap is not None and kind.verify:
        v = cli(["verify", kind.verify_target(out)])
        v.communicate()
        if v.returncode != 0:
            problems.append("verify failed")
    left = sorted(p.name for p in d.iterdir() if any(s in p.name for s in LEFTOVER))
    if left:
        problems.append(f"left behind: {left}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", action="append", help="Writer kinds to try (repeatable).")
    ap.add_argument("--size-mb", type=int, default=500, help="Size of the models the apply trials prune.")
    ap.add_argument("--json", type=Path, help="Write the results here.")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reap-concurrency-", dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        root = Path(tmp)
        fx = fixtures(root, a.size_mb)
        table = kinds(fx)
        names = a.only or list(table)
        results = {}
        for name in names:
            kind = table[name]
            started = time.perf_counter()
            refs = references(kind, root)
            rng = random.Random(f"{a.seed}/{name}")
            failures = []
            seen = dict.fromkeys(("wrote", "locked out", "refused", "killed"), 0)
            for t in range(a.trials):
                for problem in trial(kind, refs, rng, root, seen):
                    failures.append(f"trial {t}: {problem}")
            results[name] = {"trials": a.trials, "violations": failures, "processes": seen,
                             "seconds": round(time.perf_counter() - started, 1)}
            print(f"{name:18} {a.trials} trials, {len(failures)} violations; processes: "
                  + ", ".join(f"{v} {k}" for k, v in seen.items()) + f" ({results[name]['seconds']} s)", flush=True)
            for f in failures[:5]:
                print(f"    {f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    sys.exit(1 if any(r["violations"] for r in results.values()) else 0)


if __name__ == "__main__":
    main()
