"""Check a pruned output: manifest checksums, shapes against config, plan consistency.

Safetensors directories get all three; a recompacted GGUF file gets llama.cpp's layout rules, its
expert-axis lengths against the metadata, and the checksums of its sidecar manifest
(`OUT.gguf.reap.json`: every part's digest and size, so a damaged or mixed set of parts is found).

Every problem found is a `Finding` naming the file and what is wrong; an output passes when there
are none. Reading is read-only and streams each file once (8 MiB blocks), checking whichever of
the manifest hashes (BLAKE3, written by default, or sha256) each entry records.
"""
from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .gguf import GGUF_MANIFEST_FORMAT, manifest_path
from .safetensors import MANIFEST_FORMAT, MANIFEST_NAME, PLAN_COPY_NAME
from ..io.files import MANIFEST_HASHES, file_digests
from ..io.gguf import is_gguf
from ..io.reading import is_index, read_json_object
from ..io.safetensors import Checkpoint
from ..errors import BadInput
from ..families.table import classify, config_value, expert_rows, family_of, identity_rows, text_config
from ..planning.plan import Plan


@dataclass(frozen=True)
class Finding:
    check: str   # "manifest" | "checksum" | "shape" | "config" | "plan"
    file: str
    what: str


def _load_json(path: Path, check: str, findings: list[Finding]) -> dict | None:
    try:
        return read_json_object(path, "JSON", missing="missing")
    except BadInput as e:
        findings.append(Finding(check, path.name, e.what))
        return None


def check_manifest(out: Path, findings: list[Finding], progress: bool = False, *, manifest_path: Path | None = None,
                   fmt: str = MANIFEST_FORMAT, expected: set[str] | None = None) -> int:
    """Every listed file present with its size and digests (whichever of MANIFEST_HASHES each entry records); nothing unlisted (`expected`: the files
    that must be listed, default every file in `out`). Returns files checked."""
    manifest_path = manifest_path or out / MANIFEST_NAME
    manifest = _load_json(manifest_path, "manifest", findings)
    if manifest is None:
        return 0
    files = manifest.get("files")
    if manifest.get("format") != fmt or not isinstance(files, dict):
        findings.append(Finding("manifest", manifest_path.name,
                                f"not a reap-stream manifest (format {manifest.get('format')!r:.60})"))
        return 0
    if expected is None:
        expected = {p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST_NAME}
    for name in sorted(expected - set(files)):
        findings.append(Finding("manifest", name, "present but not listed in the manifest"))
    entries = {}
    for name, entry in sorted(files.items()):
        # a tampered manifest is a finding, never a traceback
        hashes = tuple(a for a in MANIFEST_HASHES if isinstance(entry, dict) and a in entry)
        if not (isinstance(entry, dict) and _is_count(entry.get("size")) and hashes
                and all(isinstance(entry[a], str) for a in hashes)):
            findings.append(Finding("manifest", manifest_path.name, f"entry for {name!r} lacks a "
                                    f"{' or '.join(MANIFEST_HASHES)} string and an integer size"))
        elif "/" in name or name.startswith(".") or not _is_file(out / name):
            findings.append(Finding("checksum", name, "listed in the manifest but missing"))
        else:
            entries[name] = entry
    checked = 0
    with tqdm(total=sum(e["size"] for e in entries.values()), unit="B", unit_scale=True, desc="verify", leave=False,
              disable=None if progress else True) as bar:
        for name, entry in entries.items():
            path = out / name
            size = path.stat().st_size
            if size != entry["size"]:
                findings.append(Finding("checksum", name, f"size {size} bytes, manifest says {entry['size']}"))
            else:
                hashes = tuple(a for a in MANIFEST_HASHES if a in entry)
                got = file_digests(path, hashes)
                findings.extend(Finding("checksum", name, f"{a} differs from the manifest ({entry[a][:12]}…)")
                                for a in hashes if got[a] != entry[a])
            checked += 1
            bar.update(entry["size"])
    return checked


def _is_file(path: Path) -> bool:
    """A regular file there (False for a name the file system cannot even look up)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def expected_counts(config: dict, experts_key: str, moe_layers: list[int]) -> dict[int, int]:
    """Experts each MoE layer must hold according to config.json (and its reap_stream record).
    Raises BadInput("config.json", ...) for a malformed count."""
    rec = config.get("reap_stream")
    rec = rec if isinstance(rec, dict) else {}
    raw = rec.get("layer_experts") or {}
    if not isinstance(raw, dict) or not all(is_index(k) and _is_count(v) for k, v in raw.items()):
        raise BadInput("config.json", f"reap_stream.layer_experts is not a map of layer -> expert count ({raw!r:.80})")
    counts = {int(k): v for k, v in raw.items()}
    key, default = ("reap_stream.original_experts", rec["original_experts"]) if counts and "original_experts" in rec \
        else (experts_key, config_value(config, experts_key, 0))
    if not _is_count(default):
        raise BadInput("config.json", f"{key} is not an expert count ({default!r:.80})")
    return {layer: counts.get(layer, default) for layer in moe_layers}


def check_shapes(out: Path, findings: list[Finding]) -> Checkpoint | None:
    """Headers valid, and every expert-axis tensor as long as config says its layer is."""
    try:
        ckpt = Checkpoint.open(out)
        fam = family_of(ckpt.config, str(out / "config.json"))
    except BadInput as e:
        findings.append(Finding("shape", Path(e.where).name, e.what))
        return None
    axis: dict[int, dict[str, int]] = {}
    per_expert: dict[int, set[int]] = {}
    identity = identity_rows(ckpt.config, fam)
    for name, ref in sorted(ckpt.tensors.items()):
        rel = classify(name, fam)
        if rel is None:
            continue
        if rel.kind == "per_expert":
            per_expert.setdefault(rel.layer, set()).add(rel.expert)
        elif ref.shape:  # (router tensors also hold the identity experts' rows, never pruned)
            axis.setdefault(rel.layer, {})[name] = expert_rows(ref.shape) - (identity if rel.kind == "router" else 0)
    layers = sorted(set(axis) | set(per_expert))
    try:
        want = expected_counts({**text_config(ckpt.config, fam), "reap_stream": ckpt.config.get("reap_stream")},
                               fam.experts_key, layers)
    except BadInput as e:
        findings.append(Finding("config", e.where, e.what))
        return ckpt
    for layer in layers:
        n = want[layer]
        for name, rows in axis.get(layer, {}).items():
            if rows != n:
                findings.append(Finding("shape", ckpt.tensors[name].file.name,
                                        f"{name}: {rows} experts on axis 0, config says layer {layer} has {n}"))
        ids = per_expert.get(layer)
        if ids is not None and ids != set(range(n)):
            findings.append(Finding("shape", "config.json", f"layer {layer}: per-expert tensors for experts "
                                    f"{_span(sorted(ids))}, config says 0..{n - 1}"))
    k = config_value(text_config(ckpt.config, fam), fam.top_k_key)
    if k is not None and not _is_count(k):
        findings.append(Finding("config", "config.json", f"{fam.top_k_key} is not a count ({k!r:.80})"))
    elif k is not None and want and min(want.values()) < k:
        layer = min(want, key=want.get)
        findings.append(Finding("config", "config.json",
                                f"layer {layer} has {want[layer]} experts, fewer than {fam.top_k_key}={k}"))
    return ckpt


def check_plan_copy(out: Path, config: dict, findings: list[Finding]) -> None:
    """reap_plan.json agrees with config.json's reap_stream record (kept ids, counts, provenance)."""
    rec = config.get("reap_stream")
    if not isinstance(rec, dict):
        findings.append(Finding("config", "config.json", "no 'reap_stream' record (not written by reap-stream apply?)"))
        return
    try:
        plan = Plan.load(out / PLAN_COPY_NAME)
    except BadInput as e:
        findings.append(Finding("plan", PLAN_COPY_NAME, e.what))
        return
    kept, counts = rec.get("kept") or {}, rec.get("layer_experts") or {}
    if not (isinstance(kept, dict) and isinstance(counts, dict)
            and all(is_index(k) for k in (*kept, *counts))):
        findings.append(Finding("config", "config.json", "reap_stream.kept / layer_experts are not maps keyed by layer"))
        return
    kept, counts = {str(int(k)): v for k, v in kept.items()}, {str(int(k)): v for k, v in counts.items()}
    plan_kept = {str(k): lp.kept for k, lp in sorted(plan.layers.items())}
    for layer in sorted(set(kept) | set(plan_kept), key=int):
        if kept.get(layer) != plan_kept.get(layer):
            findings.append(Finding("plan", PLAN_COPY_NAME, f"layer {layer}: plan keeps {plan_kept.get(layer)}, "
                                    f"config.json records {kept.get(layer)}"))
        elif counts.get(layer) != len(plan_kept[layer]):
            findings.append(Finding("plan", "config.json", f"layer {layer}: layer_experts {counts.get(layer)} but "
                                    f"{len(plan_kept[layer])} kept"))
    if rec.get("method") != plan.method:
        findings.append(Finding("plan", PLAN_COPY_NAME, f"method {plan.method!r}, config.json records {rec.get('method')!r}"))
    source, recorded = (plan.model or {}).get("fingerprint"), rec.get("source_fingerprint")
    if source and recorded and source != recorded:
        findings.append(Finding("plan", PLAN_COPY_NAME, "plan was made for another model than the output's source "
                                f"({str(source)[:19]}… vs {str(recorded)[:19]}…)"))


def check_gguf(path: Path, findings: list[Finding]) -> list[Path]:
    """A recompacted GGUF (one file or the first of a split): llama.cpp's layout rules, and every
    expert-axis tensor as long as the metadata says its layer is. Returns the parts checked."""
    from ..families.gguf_arch import Role, Roles, known_arch
    from ..families.table import BY_GGUF_ARCH
    from ..io.gguf import BLOCK_TENSOR, read_model
    from ..io.gguf_write import layout_problems

    try:
        parts = read_model(path)
    except BadInput as e:
        findings.append(Finding("shape", Path(e.where).name, e.what))
        return []
    for part in parts:
        findings.extend(Finding("shape", part.path.name, p) for p in layout_problems(part))
    first = parts[0]
    arch = first.get("general.architecture")
    fam = BY_GGUF_ARCH.get(arch) if isinstance(arch, str) else None
    if fam is None and not (isinstance(arch, str) and known_arch(arch)):
        findings.append(Finding("config", path.name, f"architecture {arch!r} has no expert-tensor table"))
        return [p.path for p in parts]
    roles = Roles(arch, fam.gguf_extra_expert_tensors if fam else (), path.name)
    keep = first.get("reap.layer.keep_count")
    uniform = first.get(f"{arch}.expert_count")
    for part in parts:
        for t in part.tensors:
            m = BLOCK_TENSOR.match(t.name)
            try:
                role = roles.of(m.group(2)) if m else None
            except BadInput as e:
                findings.append(Finding("shape", part.path.name, e.what))
                continue
            if role is None or role is Role.CHUNK_EXPERTS:
                continue
            layer = int(m.group(1))
            want = keep[layer] if isinstance(keep, list) and layer < len(keep) else uniform
            if t.ne[-1] != want:
                findings.append(Finding("shape", part.path.name, f"{t.name}: {t.ne[-1]} experts, metadata says "
                                        f"layer {layer} has {want}"))
    return [p.path for p in parts]


def verify_output(out: str | Path, *, progress: bool = False) -> dict:
    """Run every check on a pruned output directory (or recompacted GGUF file); JSON-ready result
    with `ok` and `findings`."""
    out = Path(out)
    if out.is_file() and is_gguf(out):
        findings: list[Finding] = []
        parts = check_gguf(out, findings)
        check_manifest(out.parent, findings, progress, manifest_path=manifest_path(out), fmt=GGUF_MANIFEST_FORMAT,
                       expected={p.name for p in parts})
        return {"out": str(out), "format": "gguf", "files_checked": len(parts), "checksums": True,
                "ok": not findings, "findings": [asdict(f) for f in findings]}
    if not out.is_dir():
        raise BadInput(out, "not a directory or GGUF file (verify takes the output of apply)")
    findings: list[Finding] = []
    checked = check_manifest(out, findings, progress)
    ckpt = check_shapes(out, findings)
    if ckpt is not None:
        check_plan_copy(out, ckpt.config, findings)
    return {"out": str(out), "format": "safetensors", "files_checked": checked, "checksums": True,
            "ok": not findings, "findings": [asdict(f) for f in findings]}


def _span(ids: list[int]) -> str:
    return f"{ids[0]}..{ids[-1]}" if ids and ids == list(range(ids[0], ids[-1] + 1)) else ",".join(map(str, ids))
