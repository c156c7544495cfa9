#!/usr/bin/env python
"""Fuzz every parser reap-stream applies to user files, and classify what each mutated input does.

    python tools/fuzz.py --inputs 2000 --seed 0          # CI's round: 2,000 inputs per parser
    python tools/fuzz.py --inputs 10000 --seed 1 --jobs 2 --json fuzz.json
    python tools/fuzz.py --only gguf --case 1234 --seed 0 # re-run one input in this process

For each parser (safetensors header and index, config.json, plan, GGUF, the telemetry store, the
token store, the run record, the manifests verify reads, calibration files in every format, chat
rows) valid seed files are built from the tiny fixtures, then mutated: bit flips, interesting
bytes and integers (counts of 2**64-8, 2**31, ...), truncation, splices, JSON values swapped for
other types, deep nesting, huge numbers, odd unicode (lone surrogates, NULs, superscript digits,
300-character names), whole lines replaced. Each input is parsed in a worker process (one per
job, with an address-space rlimit), through the same library calls the commands make.

Outcomes: `refused` (BadInput, the one clean error), `accepted` (parsed; fine when the mutation
kept the file valid), and the findings: `crash` (any other exception, or the worker killed by a
signal), `hang` (longer than --case-timeout), `memory` (MemoryError, or the case's peak RSS grew
by more than --max-case-mib). Findings are written to --findings-dir with the input and the
traceback; the exit status is 1 when there is any.

Input i of parser P under --seed S is always the same bytes, so `--only P --case i --seed S`
reproduces a finding.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import resource
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FINDINGS = ("crash", "hang", "memory")

# ---------------------------------------------------------------- mutations

_U32 = (0, 1, 2, 7, 63, 64, 65, 255, 4096, 2**16, 2**31 - 1, 2**31, 2**32 - 1)
_U64 = (0, 1, 2, 2**31, 2**32, 2**32 - 1, 2**62, 2**63, 2**63 - 1, 2**64 - 8, 2**64 - 1)
_JSON_VALUES = (
    "null", "true", "false", "[]", "{}", '""', '"x"', "-1", "0", "1", "1.5", "-0.0", "1e999", "-1e999",
    "NaN", "Infinity", "18446744073709551616", "9" * 4400, "-" + "9" * 300, '"\\ud800"', '"\\udfff x"',
    '"a\\u0000b"', '"\u00b2"', '"\u0663"', '"\u2028"', '"\ufeff"', '"' + "n" * 300 + '"', '"../../../etc/passwd"',
    '"/abs/path"', '"a\\nb"', '{"a": [1, {"b": null}]}', "[" * 3000 + "]" * 3000, '{"k":' * 2000 + "0" + "}" * 2000,
    "[" * 63 + "1" + "]" * 63, '[1, "x", null, {}]', '{"__proto__": 1}', '"%s%n"',
)
_TOKEN = re.compile(rb'"(?:[^"\\\n]|\\.){0,200}"|-?\d{1,40}(?:\.\d+)?(?:[eE][-+]?\d+)?|\btrue\b|\bfalse\b|\bnull\b|[\[{]')
_LINES = (b"null", b"[]", b"1", b'"x"', b"{}", b'{"text": {"a": 1}}', b'{"text": null}', b'{"text": ["a"]}',
          b'{"text": "\\ud800"}', b'{"text": "' + b"w " * 40000 + b'"}', b"\xff\xfe", b"{", b",,,", b"\x00" * 8)


def _flip(rng, data, region):
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(region)
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _bytes(rng, data, region):
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        b[rng.randrange(region)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, 0x22, 0x5C, 0x5B, 0x7B, 0x0A))
    return bytes(b)


def _integer(rng, data, region):
    """An interesting u32/u64 over a field: counts and lengths are where hangs and huge
    allocations hide. Positions holding a small value (likely a count) are preferred."""
    b = bytearray(data)
    width, values = rng.choice(((4, _U32), (8, _U64)))
    if region <= width:
        return bytes(b)
    small = [p for p in rng.sample(range(region - width), min(256, region - width))
             if int.from_bytes(b[p:p + width], "little") < 2**20]
    p = rng.choice(small) if small and rng.random() < 0.8 else rng.randrange(region - width)
    b[p:p + width] = rng.choice(values).to_bytes(width, "little")
    return bytes(b)


def _truncate(rng, data, region):
    return data[:rng.randrange(max(1, min(len(data), region + 64)))]


def _splice(rng, data, region, other):
    i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
    k = rng.randrange(len(other) + 1)
    return data[:i] + other[k:k + rng.randint(1, 512)] + data[j if rng.random() < 0.5 else i:]


def _json_value(rng, data, region):
    spots = [m for m in _TOKEN.finditer(data[:region])]
    if not spots:
        return data
    m = rng.choice(spots)
    value = rng.choice(_JSON_VALUES).encode("utf-8", "surrogatepass")
    if m.group() in (b"[", b"{"):  # wrap what follows in more nesting, or replace the opener
        return data[:m.start()] + (value if rng.random() < 0.3 else b"[" * rng.choice((2, 70, 5000)) + m.group()) + \
            data[m.end():]
    if rng.random() < 0.2:  # as a key instead of a value
        return data[:m.start()] + value + b": " + m.group() + data[m.end():]
    return data[:m.start()] + value + data[m.end():]


def _unicode(rng, data, region):
    quotes = [m.start() for m in re.finditer(rb'"', data[:region])]
    at = rng.choice(quotes) + 1 if quotes else rng.randrange(len(data) + 1)
    odd = rng.choice(("\\ud800", "\\u0000", "\u00b2", "\u00b9", "\u0663", "\u2028", "\u202e", "\U0001F600",
                      "\ufeff", "\x7f", "é" * 3, "\\udc80"))
    return data[:at] + odd.encode("utf-8", "surrogatepass") + data[at:]


def _lines(rng, data, region):
    lines = data.split(b"\n")
    i = rng.randrange(len(lines))
    action = rng.random()
    if action < 0.5:
        lines[i] = rng.choice(_LINES)
    elif action < 0.7:
        lines.insert(i, lines[rng.randrange(len(lines))])
    elif action < 0.85:
        del lines[i]
    else:
        lines[i] = lines[i].replace(b",", b",,", 1) if rng.random() < 0.5 else lines[i] + b"\r"
    return b"\n".join(lines)


_BINARY = (_flip, _bytes, _integer, _integer, _truncate, _splice)
_TEXT = (_flip, _bytes, _truncate, _splice, _json_value, _json_value, _json_value, _unicode, _lines)


def mutate(rng: random.Random, seeds: list[bytes], binary: bool, region_of) -> bytes:
    """1-3 stacked mutations of a seed; `region_of(data)`: the bytes worth mutating most (a
    header), used nine times in ten."""
    data = rng.choice(seeds)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not data:
            break
        region = max(1, min(len(data), region_of(data) if rng.random() < 0.9 else len(data)))
        op = rng.choice(_BINARY if binary else _TEXT)
        data = op(rng, data, region, rng.choice(seeds)) if op is _splice else op(rng, data, region)
    return data


# ---------------------------------------------------------------- parsers under test

@dataclass
class Target:
    """A parser: `file` (a path inside the base directory of valid files) is what gets mutated;
    the case directory holds a copy of the base entry it belongs to."""
    name: str
    file: str
    binary: bool = False


def _region(target: Target, data: bytes) -> int:
    """Where a mutation matters most: a GGUF's header, a safetensors file's JSON header."""
    if data[:4] == b"GGUF":
        return min(len(data), 8192)
    if target.name == "safetensors_header" and len(data) >= 8:
        return min(len(data), 8 + int.from_bytes(data[:8], "little"))
    return len(data)


TARGETS = {t.name: t for t in (
    Target("safetensors_header", "model/model-00001-of-00002.safetensors", binary=True),
    Target("safetensors_index", "model/model.safetensors.index.json"),
    Target("config", "model/config.json"),
    Target("plan", "plan.json"),
    Target("gguf", "model.gguf", binary=True),
    Target("gguf_runnable", "model.gguf", binary=True),
    Target("telemetry_store", "telemetry.zarr/zarr.json"),
    Target("telemetry_layer", "telemetry.zarr/layer_001/zarr.json"),
    Target("telemetry_array", "telemetry.zarr/layer_001/expert_output_sum/zarr.json"),
    Target("token_store", "tokens.zarr/offsets/zarr.json"),
    Target("run_record", "run.json"),
    Target("manifest", "pruned/reap_manifest.json"),
    Target("gguf_manifest", "pruned.gguf.reap.json"),
    Target("gguf_split", "split/model-00002-of-00003.gguf", binary=True),
    Target("calibration_jsonl", "rows.jsonl"),
    Target("calibration_json", "rows.json"),
    Target("calibration_csv", "rows.csv"),
    Target("calibration_text", "rows.txt"),
    Target("calibration_parquet", "rows.parquet", binary=True),
    Target("chat_rows", "chat.jsonl"),
)}
# inputs that must come out as each outcome: `--selftest` checks the classification itself
SELFTESTS = {name: Target(name, "selftest.bin", binary=True) for name in
             ("selftest_refused", "selftest_accepted", "selftest_crash", "selftest_segfault", "selftest_hang",
              "selftest_memory_error", "selftest_memory_growth")}


def selftest(name: str) -> None:
    import ctypes

    from reap_stream.errors import BadInput

    if name == "selftest_refused":
        raise BadInput("selftest", "refused")
    if name == "selftest_crash":
        raise ZeroDivisionError("selftest")
    if name == "selftest_segfault":
        ctypes.string_at(0)
    if name == "selftest_hang":
        time.sleep(3600)
    if name == "selftest_memory_error":
        bytearray(1 << 40)
    if name == "selftest_memory_growth":
        held = [b"\x01" * (768 << 20)]
        held.clear()


# each parquet input costs a child process (the isolated reader): fewer of them per round
COST = {"calibration_parquet": 10}


class Parsers:
    """The library calls a command makes on each kind of file (imported in the worker)."""

    def __init__(self, base: Path):
        from transformers import AutoTokenizer

        from reap_stream.families.model import open_model
        from reap_stream.planning.plan import Plan

        self.base = base
        self.tok = AutoTokenizer.from_pretrained(str(base / "model"))
        self.model = open_model(base / "model")
        self.gguf_model = open_model(base / "model.gguf")
        self.record = json.loads((base / "run.json").read_text())
        self.Plan = Plan

    def run(self, name: str, case: Path, path: Path) -> None:
        getattr(self, name if not name.startswith("calibration_") else "calibration")(case, path, name)

    def safetensors_header(self, case, path, _):
        from reap_stream.io.safetensors import read_shard_header
        read_shard_header(path)

    def safetensors_index(self, case, path, _):
        from reap_stream.families.model import open_model
        open_model(case / "model")

    config = safetensors_index

    def gguf_runnable(self, case, path, _):
        """What collect and eval read of a GGUF beyond its layout: the mlx_lm config rebuilt from
        the metadata, and the tokenizer rebuilt from tokenizer.ggml.*."""
        from reap_stream.families.model import open_model
        from reap_stream.telemetry.gguf_tokenizer import gguf_tokenizer

        model = open_model(path)
        model.config
        gguf_tokenizer(model.gguf_parts[0]).encode("Licensed under the Apache License")

    def gguf_split(self, case, path, _):
        from reap_stream.families.model import open_model
        open_model(case / "split" / "model-00001-of-00003.gguf")

    def plan(self, case, path, _):
        from reap_stream.planning.plan import check_plan
        from reap_stream.surgery import gguf, safetensors

        plan = self.Plan.load(path)
        check_plan(plan, self.model.structure, str(path))
        safetensors.plan_layout(self.model, plan, plan_where=str(path))
        gguf.apply_gguf(self.gguf_model, plan, case / "out.gguf", overwrite=False, dry_run=True, plan_where=path)

    def gguf(self, case, path, _):
        from reap_stream.families.model import open_model
        from reap_stream.surgery.verify import verify_output
        open_model(path)
        verify_output(path)

    def telemetry_store(self, case, path, _):
        from reap_stream.planning.planner import PlanOptions, check_store_model, make_plan
        from reap_stream.telemetry.collect import merge
        from reap_stream.telemetry.store import TelemetryStore

        store = TelemetryStore.open(case / "telemetry.zarr")
        check_store_model(store, self.model)
        make_plan(store, PlanOptions("reap", ratio=0.5))
        store.fingerprint()
        merge([case / "telemetry.zarr", self.base / "telemetry2.zarr"], case / "merged.zarr")

    telemetry_layer = telemetry_array = telemetry_store

    def token_store(self, case, path, _):
        from reap_stream.telemetry.tokens import load_tokens
        load_tokens(case / "tokens.zarr")

    def run_record(self, case, path, _):
        from reap_stream.telemetry.collect import _check_run_record
        _check_run_record(case, self.record)

    def manifest(self, case, path, _):
        from reap_stream.surgery.verify import verify_output
        verify_output(case / "pruned")

    def gguf_manifest(self, case, path, _):
        from reap_stream.surgery.verify import verify_output
        os.link(self.base / "pruned.gguf", case / "pruned.gguf")
        verify_output(case / "pruned.gguf")

    def calibration(self, case, path, name):
        from reap_stream.telemetry.calibration import CalibrationOptions, build_calibration

        rng = random.Random(path.read_bytes()[:64])
        build_calibration(CalibrationOptions(dataset_file=str(path), dataset_format=name.split("_")[1],
                                             pack_samples=rng.random() < 0.5, window_tokens=rng.choice((2, 16, 512)),
                                             seed=rng.choice((None, 3)), max_samples=rng.choice((None, 5))), self.tok)

    def chat_rows(self, case, path, _):
        from reap_stream.telemetry.calibration import CalibrationOptions, build_calibration
        build_calibration(CalibrationOptions(dataset_file=str(path), dataset_messages_field="messages"), self.tok)


# ---------------------------------------------------------------- seeds

def build_base(root: Path) -> Path:
    """A directory of valid files, one of each kind the parsers read (from the tiny fixtures)."""
    from reap_stream.blas import ensure_blas

    ensure_blas()
    from reap_stream.families.model import open_model
    from reap_stream.planning.planner import PlanOptions, make_plan
    from reap_stream.surgery.gguf import apply_gguf
    from reap_stream.surgery.safetensors import plan_layout, write_layout
    from reap_stream.telemetry.calibration import CalibrationOptions, build_calibration
    from reap_stream.telemetry.store import TelemetryStore
    from reap_stream.telemetry.synthetic import write_synthetic_telemetry
    from reap_stream.telemetry.tokenizer import load_tokenizer
    from reap_stream.telemetry.tokens import save_tokens
    from reap_stream.testing import synth
    from reap_stream.testing.gguf_convert import cached_gguf

    fixtures = Path(os.environ.get("REAP_STREAM_FIXTURES", REPO / "fixtures" / "generated"))
    base = root / "base"
    src = synth.cached_fixture("qwen3_moe", "fp32", fixtures)
    shutil.copytree(src, base / "model")
    shutil.copy(cached_gguf("qwen3_moe", "q4_0", fixtures / "gguf", src)[0], base / "model.gguf")
    (base / "split").mkdir()
    for part in cached_gguf("qwen3_moe", "q4_0", fixtures / "gguf", src, split=20):
        shutil.copy(part, base / "split" / part.name)
    model = open_model(base / "model")
    for name in ("telemetry.zarr", "telemetry2.zarr"):
        write_synthetic_telemetry(base / name, tokens=64, hidden=8, seed=len(name), model=model.model_block())
    plan = make_plan(TelemetryStore.open(base / "telemetry.zarr"), PlanOptions("reap", ratio=0.5))
    plan.save(base / "plan.json")
    write_layout(plan_layout(model, plan), base / "pruned", progress=False)
    apply_gguf(open_model(base / "model.gguf"), plan, base / "pruned.gguf", overwrite=False, dry_run=False,
               progress=False)
    calib = REPO / "fixtures" / "calibration"
    for name, src_name in (("rows.jsonl", "licence.jsonl"), ("rows.json", "licence.json"), ("rows.csv", "licence.csv"),
                           ("rows.txt", "licence.txt"), ("chat.jsonl", "chat.jsonl")):
        data = (calib / src_name).read_bytes()
        (base / name).write_bytes(data if name == "rows.json" else b"\n".join(data.split(b"\n")[:16]) + b"\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in (calib / "licence.jsonl").read_text().splitlines()[:8]]
    pq.write_table(pa.table({"text": [r["text"] for r in rows], "n": list(range(len(rows)))}), base / "rows.parquet")
    tok = load_tokenizer(base / "model")
    save_tokens(build_calibration(CalibrationOptions(dataset_file=str(base / "rows.jsonl"), max_samples=4), tok),
                base / "tokens.zarr")
    (base / "run.json").write_text(json.dumps({"model_fingerprint": model.fingerprint, "chunk_tokens": 4096,
                                               "layers": None, "renorm_topk": True}, indent=2))
    return base


def _case_dir(base: Path, case: Path, mutated: str) -> Path:
    """case/ holding a copy of the base entry `mutated` belongs to. Returns the mutated file's path."""
    top = mutated.split("/")[0]
    case.mkdir(exist_ok=True)
    if (base / top).is_dir() and not (case / top).exists():
        shutil.copytree(base / top, case / top)
    return case / mutated


class Case:
    """A worker's directory for one parser, set up once: each input replaces the mutated file, and
    afterwards the file is restored and whatever the parser wrote beside it is removed."""

    def __init__(self, base: Path, scratch: Path, target: Target):
        self.dir = scratch / target.name
        self.path = _case_dir(base, self.dir, target.file)
        self.original = (base / target.file).read_bytes()
        self.entries = set(os.listdir(self.dir))

    def write(self, data: bytes) -> None:
        self.path.write_bytes(data)

    def reset(self) -> None:
        self.path.write_bytes(self.original)
        for name in set(os.listdir(self.dir)) - self.entries:
            p = self.dir / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


# ---------------------------------------------------------------- the worker

def worker(base: Path, scratch: Path, max_as: int) -> None:
    sys.modules["torch"] = None  # tokenizers need no torch; as on a default install
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from reap_stream.errors import BadInput

    parsers = None

    resource.setrlimit(resource.RLIMIT_AS, (max_as, max_as))
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # keep stdout for replies
    cases: dict[str, Case] = {}
    while header := inp.read(4):
        name, case_id, data = pickle.loads(inp.read(struct.unpack("<I", header)[0]))
        if name not in cases:
            cases[name] = Case(base, scratch, {**TARGETS, **SELFTESTS}[name])
        if parsers is None and name in TARGETS:
            parsers = Parsers(base)
        case = cases[name]
        case.write(data)
        before = _status("VmRSS")
        _reset_peak()
        started = time.perf_counter()
        outcome, detail = "accepted", ""
        try:
            selftest(name) if name in SELFTESTS else parsers.run(name, case.dir, case.path)
        except BadInput as e:
            outcome, detail = "refused", str(e)[:300]
        except MemoryError:
            outcome, detail = "memory", "MemoryError"
        except BaseException as e:  # noqa: BLE001 - the point is to see everything else
            outcome, detail = "crash", "".join(traceback.format_exception(e))[-4000:]
        seconds = time.perf_counter() - started
        grown = _status("VmHWM") - before
        case.reset()
        reply = pickle.dumps((case_id, outcome, detail, seconds, grown))
        out.write(struct.pack("<I", len(reply)) + reply)
        out.flush()


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def _status(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- the parent

class Pool:
    """Worker processes fed one case at a time; a worker that dies or overstays is replaced."""

    def __init__(self, jobs: int, base: Path, scratch: Path, max_as: int):
        self.args = [sys.executable, __file__, "--worker", "--base", str(base), "--max-as", str(max_as)]
        self.scratch = scratch
        self.procs: list[subprocess.Popen | None] = [None] * jobs
        self.sel = selectors.DefaultSelector()

    def spawn(self, slot: int) -> subprocess.Popen:
        work = self.scratch / f"w{slot}-{time.monotonic_ns()}"
        work.mkdir()
        p = subprocess.Popen(self.args + ["--scratch", str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, cwd=REPO)
        self.procs[slot] = p
        return p

    def kill(self, slot: int) -> None:
        p = self.procs[slot]
        if p is not None:
            p.kill()
            p.wait()
            self.procs[slot] = None

    def run(self, cases, timeout: float, report) -> None:
        """cases: iterator of (name, case_id, bytes); report(case_id, outcome, detail, seconds, grown)."""
        busy: dict[int, tuple] = {}
        cases = iter(cases)
        pending = True
        while pending or busy:
            for slot in range(len(self.procs)):
                if slot in busy or not pending:
                    continue
                item = next(cases, None)
                if item is None:
                    pending = False
                    break
                p = self.procs[slot] or self.spawn(slot)
                msg = pickle.dumps(item)
                try:
                    p.stdin.write(struct.pack("<I", len(msg)) + msg)
                    p.stdin.flush()
                except BrokenPipeError:
                    self.kill(slot)
                    report(item[1], "crash", "worker died before reading the case", 0.0, 0)
                    continue
                busy[slot] = (item, time.monotonic())
            for slot, (item, started) in list(busy.items()):
                p = self.procs[slot]
                reply = _read_reply(p, deadline=started + timeout)
                if reply is None or reply == "eof":  # overstayed, or died
                    code = p.wait() if reply == "eof" else p.poll()
                    self.kill(slot)
                    if code is None:
                        report(item[1], "hang", f"no answer within {timeout} s", timeout, 0)
                    else:
                        report(item[1], "crash", f"worker exited with {code} (signal {-code})" if code < 0
                               else f"worker exited with {code}", time.monotonic() - started, 0)
                else:
                    report(*reply)
                del busy[slot]

    def close(self) -> None:
        for slot in range(len(self.procs)):
            self.kill(slot)


def _read_reply(p: subprocess.Popen, deadline: float):
    import select

    fd = p.stdout.fileno()
    buf = b""
    need = 4
    size = None
    while len(buf) < need:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, need - len(buf))
        if not chunk:
            return "eof"
        buf += chunk
        if size is None and len(buf) == 4:
            size = struct.unpack("<I", buf)[0]
            need = 4 + size
    return pickle.loads(buf[4:])


def case_bytes(name: str, index: int, seed: int, seeds: dict[str, list[bytes]]) -> bytes:
    rng = random.Random(f"{seed}/{name}/{index}")
    target = {**TARGETS, **SELFTESTS}[name]
    return mutate(rng, seeds[name], target.binary, lambda d: _region(target, d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=2000, help="Mutated inputs per parser (default 2000).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--only", action="append", help="Fuzz only these parsers (repeatable).")
    ap.add_argument("--case", type=int, help="With one --only: run just this input, in this process.")
    ap.add_argument("--case-timeout", type=float, default=20.0, help="Seconds before an input counts as a hang.")
    ap.add_argument("--max-case-mib", type=int, default=1024, help="Peak-RSS growth that counts as a memory blow-up.")
    ap.add_argument("--max-as-gib", type=float, default=8.0, help="Address-space limit of a worker.")
    ap.add_argument("--findings-dir", type=Path, default=Path("fuzz-findings"))
    ap.add_argument("--json", type=Path, help="Write the summary here.")
    ap.add_argument("--selftest", action="store_true",
                    help="Fuzz stand-ins that refuse, accept, crash, segfault, hang and blow up memory, to check "
                         "that each is classified as such (exit 1, since there are findings).")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--max-as", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.base, a.scratch, a.max_as)
        return
    names = list(SELFTESTS) if a.selftest else a.only or list(TARGETS)
    unknown = sorted(set(names) - set(TARGETS) - set(SELFTESTS))
    if unknown:
        ap.error(f"unknown parser(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="reap-fuzz-", dir=shm) as tmp:  # in memory: fsync is free
        if a.selftest:
            base = Path(tmp) / "base"
            base.mkdir()
            (base / "selftest.bin").write_bytes(b"selftest input")
        else:
            base = build_base(Path(tmp))
        seeds = {n: [(base / {**TARGETS, **SELFTESTS}[n].file).read_bytes()] for n in names}
        if a.case is not None:
            _one(names[0], a.case, a.seed, seeds, base, Path(tmp))
            return
        summary = _round(a, names, seeds, base, Path(tmp))
    _print(summary)
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    sys.exit(1 if any(summary["totals"][k] for k in FINDINGS) else 0)


def _one(name: str, index: int, seed: int, seeds, base: Path, tmp: Path) -> None:
    from reap_stream.errors import BadInput

    data = case_bytes(name, index, seed, seeds)
    case = tmp / "case"
    path = _case_dir(base, case, TARGETS[name].file)
    path.write_bytes(data)
    print(f"{name} #{index}: {len(data)} bytes: {data[:200]!r}")
    try:
        Parsers(base).run(name, case, path)
        print("accepted")
    except BadInput as e:
        print(f"refused: {e}")


def _round(a, names, seeds, base: Path, tmp: Path) -> dict:
    counts = {n: dict.fromkeys(("refused", "accepted", *FINDINGS), 0) for n in names}
    slowest = {n: 0.0 for n in names}
    biggest = {n: 0 for n in names}
    findings = []

    def report(case_id, outcome, detail, seconds, grown):
        name, index = case_id
        if outcome not in FINDINGS and grown > a.max_case_mib << 20:
            outcome, detail = "memory", f"peak RSS grew by {grown >> 20} MiB"
        counts[name][outcome] += 1
        slowest[name] = max(slowest[name], seconds)
        biggest[name] = max(biggest[name], grown)
        if outcome in FINDINGS:
            findings.append({"parser": name, "case": index, "outcome": outcome, "detail": detail})
            a.findings_dir.mkdir(parents=True, exist_ok=True)
            stem = a.findings_dir / f"{name}-{a.seed}-{index}"
            stem.with_suffix(".bin").write_bytes(case_bytes(name, index, a.seed, seeds))
            stem.with_suffix(".txt").write_text(f"{outcome}\n{detail}\n")

    def cases():
        for n in names:
            for i in range(max(1, a.inputs // COST.get(n, 1))):
                yield n, (n, i), case_bytes(n, i, a.seed, seeds)

    started = time.perf_counter()
    pool = Pool(a.jobs, base, tmp, int(a.max_as_gib * 2**30))
    try:
        pool.run(cases(), a.case_timeout, report)
    finally:
        pool.close()
    totals = {k: sum(c[k] for c in counts.values()) for k in counts[names[0]]}
    return {"seed": a.seed, "inputs_per_parser": a.inputs, "jobs": a.jobs, "seconds": round(time.perf_counter() - started, 1),
            "parsers": counts, "totals": totals, "inputs": sum(totals.values()),
            "slowest_case_s": {n: round(s, 3) for n, s in slowest.items()},
            "largest_rss_growth_mib": {n: round(b / 2**20, 1) for n, b in biggest.items()}, "findings": findings}


def _print(s: dict) -> None:
    print(f"{'parser':22} {'inputs':>7} {'refused':>8} {'accepted':>9} {'crash':>6} {'hang':>5} {'memory':>7} "
          f"{'slowest s':>10} {'max RSS+ MiB':>13}")
    for n, c in s["parsers"].items():
        print(f"{n:22} {sum(c.values()):7} {c['refused']:8} {c['accepted']:9} {c['crash']:6} {c['hang']:5} "
              f"{c['memory']:7} {s['slowest_case_s'][n]:10} {s['largest_rss_growth_mib'][n]:13}")
    t = s["totals"]
    print(f"{'total':22} {s['inputs']:7} {t['refused']:8} {t['accepted']:9} {t['crash']:6} {t['hang']:5} {t['memory']:7}"
          f"   ({s['seconds']} s, {s['jobs']} jobs, seed {s['seed']})")
    for f in s["findings"][:20]:
        print(f"FINDING {f['parser']} #{f['case']}: {f['outcome']}: {f['detail'].strip().splitlines()[-1][:200]}")


if __name__ == "__main__":
    main()
