"""Apply a plan to a safetensors checkpoint (mlx_lm or Hugging Face layout), streaming.

The whole output (names, dtypes, shapes, shard assignment, headers) is laid out from the index and
the plan before any tensor byte is written. Kept experts are contiguous byte ranges of the source
(axis 0 of every stacked tensor), so writing is a sequence of range copies through one bounded
buffer. Output goes to a hidden temporary directory that is renamed into place when complete; the
index and the manifest are written last.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .. import __version__
from ..errors import BadInput, os_error
from ..families.model import Model
from ..families.table import (EXPERT_COUNT_KEYS, Family, classify, config_value, expert_rows, identity_rows,
                              set_config_value, text_config)
from ..io.files import (MANIFEST_HASHES, Flusher, bytes_digest, check_manifest_hash, check_space, copy_flushed,
                        file_digest, flushed_writes, fsync_tree, hash_ranges, new_hash, recover_dir, replace_dir,
                        write_all)
from ..io.lock import exclusive, test_pause
from ..io.reading import readable_file, resolved
from ..io.safetensors import INDEX_NAME, Checkpoint
from ..planning.plan import Plan, check_plan, kept_runs

MANIFEST_NAME = "reap_manifest.json"
PLAN_COPY_NAME = "reap_plan.json"
MANIFEST_FORMAT = "reap-stream-manifest"
DEFAULT_MAX_SHARD = 5 * 10**9
# Source files never copied: weights in any format (they would hold the unpruned experts), their
# indexes, and the source's own reap-stream records. Everything else (tokenizer, generation config,
# chat template, licence, custom code) is copied as is.
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|h5|msgpack|npz|onnx)$|.*\.index\.json$|^"
                         + re.escape(MANIFEST_NAME) + "$|^" + re.escape(PLAN_COPY_NAME) + r"$|^config\.json$")


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    ranges: list[tuple[Path, int, int]]  # source byte ranges, concatenated in order

    @property
    def nbytes(self) -> int:
        return sum(end - start for _, start, end in self.ranges)


@dataclass
class OutShard:
    name: str
    metadata: dict[str, str]
    tensors: list[OutTensor] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def header(self) -> bytes:
        """Safetensors header: u64 length + JSON padded with spaces to a multiple of 8."""
        entries: dict[str, object] = {}
        if self.metadata:
            entries["__metadata__"] = self.metadata
        offset = 0
        for t in self.tensors:
            entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        body = json.dumps(entries, separators=(",", ":")).encode()
        body += b" " * (-len(body) % 8)
        return len(body).to_bytes(8, "little") + body


@dataclass
class Layout:
    source: Checkpoint
    plan: Plan
    shards: list[OutShard]
    config: dict
    copied_files: list[str]

    @property
    def total_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    def summary(self) -> dict:
        counts = {str(layer): len(lp.kept) for layer, lp in sorted(self.plan.layers.items())}
        return {
            "source": str(self.source.root),
            "model_type": self.source.model_type,
            "uniform": self.plan.uniform,
            "kept_per_layer": counts,
            "shards": [{"name": s.name, "tensors": len(s.tensors), "bytes": s.data_bytes} for s in self.shards],
            "tensor_bytes": self.total_bytes,
            "source_tensor_bytes": sum(r.nbytes for r in self.source.tensors.values()),
            "copied_files": self.copied_files,
        }


def _row_ranges(ref_file: Path, start: int, nbytes: int, rows: int, keep: list[int]) -> list[tuple[Path, int, int]]:
    """Byte ranges of rows `keep` (ascending) along axis 0, consecutive rows merged."""
    stride = nbytes // rows
    return [(ref_file, start + first * stride, start + (first + n) * stride) for first, n in kept_runs(keep)]


def _renumbered(name: str, fam: Family, keep_index: dict[int, dict[int, int]]) -> str | None:
    """Output name of a tensor, None when it is dropped (a pruned per-expert tensor)."""
    rel = classify(name, fam)
    if rel is None or rel.kind != "per_expert" or rel.layer not in keep_index:
        return name
    new = keep_index[rel.layer].get(rel.expert)
    return None if new is None else f"{rel.prefix}{new}.{rel.suffix}" if rel.suffix else f"{rel.prefix}{new}"


def _out_tensors(ckpt: Checkpoint, plan: Plan, fam: Family, st_experts: dict[int, int]) -> list[OutTensor]:
    kept = plan.kept_map()
    identity = identity_rows(ckpt.config, fam)
    keep_index = {layer: {e: i for i, e in enumerate(ids)} for layer, ids in kept.items()}
    out = []
    for shard in ckpt.shards:
        for name, ref in shard.tensors.items():
            rel = classify(name, fam)
            if rel is None or rel.layer not in kept:
                out.append(OutTensor(name, ref.dtype, ref.shape, [(ref.file, ref.start, ref.end)]))
                continue
            if rel.kind == "per_expert":
                new_name = _renumbered(name, fam, keep_index)
                if new_name is not None:
                    out.append(OutTensor(new_name, ref.dtype, ref.shape, [(ref.file, ref.start, ref.end)]))
                continue
            n = st_experts[rel.layer] + (identity if rel.kind == "router" else 0)
            if not ref.shape or expert_rows(ref.shape) != n:
                raise BadInput(ref.file, f"tensor {name!r} has shape {list(ref.shape)}; expected {n} experts on axis 0")
            # identity experts sit past the routed ones in the router: kept, still last
            keep = kept[rel.layer] + list(range(st_experts[rel.layer], n))
            shape = (len(keep),) + tuple(ref.shape[1:]) if ref.shape[0] == n else (1, len(keep))
            out.append(OutTensor(name, ref.dtype, shape, _row_ranges(ref.file, ref.start, ref.nbytes, n, keep)))
    return out


def _shard(tensors: list[OutTensor], metadata: dict[str, str], max_bytes: int) -> list[OutShard]:
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [OutShard(name, metadata, g) for name, g in zip(names, groups)]


def _new_config(config: dict, plan: Plan, fam: Family, source_fp: str) -> dict:
    cfg = json.loads(json.dumps(config))
    counts = {layer: len(lp.kept) for layer, lp in plan.layers.items()}
    section = text_config(cfg, fam)
    original = config_value(section, fam.experts_key)
    # the family's key, and any other name the config gives the same count (transformers 5 writes
    # num_local_experts beside Qwen's num_experts, and reads that one)
    for key in EXPERT_COUNT_KEYS:
        if key == fam.experts_key or config_value(section, key) == original:
            set_config_value(section, key, max(counts.values()))
    keep_index = {layer: {e: i for i, e in enumerate(lp.kept)} for layer, lp in plan.layers.items()}
    for key in ("quantization", "quantization_config"):
        q = cfg.get(key)
        if isinstance(q, dict):
            renamed = {}
            for path, value in q.items():
                if isinstance(value, dict):  # a per-module entry: follows its module's new name
                    new = _renumbered(path + ".weight", fam, keep_index)
                    if new is None:
                        continue
                    path = new.removesuffix(".weight")
                renamed[path] = value
            cfg[key] = renamed
    cfg["reap_stream"] = {
        "plan_schema": 1,
        "tool_version": __version__,
        "method": plan.method,
        "ratio": plan.ratio,
        "uniform": plan.uniform,
        "original_experts": config_value(text_config(config, fam), fam.experts_key),
        "layer_experts": {str(k): v for k, v in sorted(counts.items())},
        "kept": {str(k): lp.kept for k, lp in sorted(plan.layers.items())},
        "source_fingerprint": source_fp,
        "telemetry_fingerprint": (plan.telemetry or {}).get("fingerprint"),
    }
    return cfg


def plan_layout(model: Model, plan: Plan, *, max_shard_bytes: int = DEFAULT_MAX_SHARD,
                plan_where: str = "plan", ignore_fingerprint: bool = False) -> Layout:
    """Check the plan against the model and lay out every output file."""
    ckpt, fam, st = model.require_checkpoint("a safetensors apply"), model.family, model.structure
    check_plan(plan, st, plan_where, model_fingerprint=None if ignore_fingerprint else model.fingerprint)
    tensors = _out_tensors(ckpt, plan, fam, st.layer_experts)
    metadata = ckpt.shards[0].metadata if ckpt.shards else {}
    shards = _shard(tensors, dict(metadata), max_shard_bytes)
    copied = sorted(p.name for p in ckpt.root.iterdir() if p.is_file() and not _NOT_COPIED.match(p.name))
    return Layout(ckpt, plan, shards, _new_config(ckpt.config, plan, fam, model.fingerprint), copied)


def check_output_path(source: Path, out: Path, overwrite: bool) -> None:
    src, dst = resolved(source), resolved(out)
    if dst == src or dst.is_relative_to(src):
        raise BadInput(out, f"output directory is the source or inside it ({source})")
    if src.is_relative_to(dst):
        raise BadInput(out, f"output directory contains the source ({source}); overwriting it would destroy the source")
    if out.exists() and not overwrite:
        raise BadInput(out, "output exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise BadInput(out, "output exists and is not a directory")


def _copy_shard(shard: OutShard, flusher: Flusher, buffer: memoryview, bar: tqdm) -> None:
    """Write `shard` into the file `flusher` holds, put on disk behind the copy."""
    handles: dict[Path, int] = {}
    try:
        write_all(flusher.fd, shard.header())
        for t in shard.tensors:
            for path, start, end in t.ranges:
                if path not in handles:
                    handles[path] = os.open(path, os.O_RDONLY)
                copy_flushed(handles[path], flusher, start, end, buffer, path, bar.update)
    finally:
        for fd in handles.values():
            os.close(fd)


def _digest(shard: OutShard, buffer_bytes: int, algo: str) -> str:
    """The manifest hash of the bytes `shard` is made of, read from the source ranges.

    Runs on a worker thread while the main thread copies the same ranges (both hashes release the
    GIL), so hashing costs no wall time beyond the copy's when there is a second core.
    """
    sha = new_hash(algo)
    sha.update(shard.header())
    buffer = memoryview(bytearray(buffer_bytes))
    handles: dict[Path, int] = {}
    try:
        for t in shard.tensors:
            for path, start, end in t.ranges:
                if path not in handles:
                    handles[path] = os.open(path, os.O_RDONLY)
                hash_ranges(sha, handles[path], [(start, end)], buffer, path)
    finally:
        for fd in handles.values():
            os.close(fd)
    return sha.hexdigest()


def _write_bytes(path: Path, raw: bytes, algo: str) -> dict:
    path.write_bytes(raw)
    return {algo: bytes_digest(raw, algo), "size": len(raw)}


def _write_json(path: Path, data: object, algo: str) -> dict:
    return _write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), algo)


def output_bytes(layout: Layout) -> int:
    """What the output will take on disk, near enough for a free-space check: shard headers and
    data, copied files, and 1 MiB for config, plan, index and manifest."""
    copied = sum(os.stat(layout.source.root / name).st_size for name in layout.copied_files)
    return sum(len(s.header()) + s.data_bytes for s in layout.shards) + copied + (1 << 20)


def write_layout(layout: Layout, out: Path, *, overwrite: bool = False, buffer_bytes: int = 8 << 20,
                 progress: bool = True, manifest_hash: str = MANIFEST_HASHES[0]) -> dict:
    """Stream the laid-out checkpoint into `out`: one writer at a time (io/lock), into a temporary
    directory, then swapped into place whole. The manifest records each file's size and
    `manifest_hash` digest (io.files.MANIFEST_HASHES)."""
    check_manifest_hash(manifest_hash)
    out = Path(out)
    with exclusive(out):
        recover_dir(out)  # a run killed mid-swap left the old output aside: it counts as there
        check_output_path(layout.source.root, out, overwrite)
        for name in layout.copied_files:  # unreadable or odd files refused before the first byte
            readable_file(layout.source.root / name, "file to copy")
        needed = output_bytes(layout)
        check_space(out.parent, needed, "output")
        test_pause("writing")
        tmp = out.parent / f".{out.name}.reap-tmp"
        if os.path.lexists(tmp):  # of a killed run: ours by name, and we hold the lock
            shutil.rmtree(tmp)
        try:
            tmp.mkdir()
            files = _write_into(layout, tmp, buffer_bytes, progress, manifest_hash)
            replace_dir(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written output behind
            if isinstance(e, OSError):
                ours = e.filename is None or str(e.filename).startswith(str(tmp))  # a temporary: name the output
                raise os_error(e, out if ours else e.filename, needed=needed, doing="cannot write the output") from None
            raise
    return files


def _write_into(layout: Layout, tmp: Path, buffer_bytes: int, progress: bool, algo: str) -> dict:
    buffer = memoryview(bytearray(buffer_bytes))
    files: dict[str, dict] = {}
    with flushed_writes() as create, ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=layout.total_bytes, unit="B", unit_scale=True, desc="apply", disable=not progress) as bar:
        for shard in layout.shards:
            digest = pool.submit(_digest, shard, buffer_bytes, algo)
            flusher = create(tmp / shard.name)
            _copy_shard(shard, flusher, buffer, bar)
            flusher.finish()   # its fsync overlaps the next shard's copy
            files[shard.name] = {algo: digest.result(), "size": (tmp / shard.name).stat().st_size}
    for name in layout.copied_files:
        shutil.copyfile(layout.source.root / name, tmp / name)
        files[name] = {algo: file_digest(tmp / name, algo), "size": (tmp / name).stat().st_size}
    files["config.json"] = _write_json(tmp / "config.json", layout.config, algo)
    files[PLAN_COPY_NAME] = _write_bytes(tmp / PLAN_COPY_NAME, layout.plan.dumps().encode(), algo)
    if len(layout.shards) > 1:
        index = {"metadata": {"total_size": layout.total_bytes},
                 "weight_map": {t.name: s.name for s in layout.shards for t in s.tensors}}
        files[INDEX_NAME] = _write_json(tmp / INDEX_NAME, index, algo)
    _write_json(tmp / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "tool_version": __version__, "hash": algo,
                                       "files": dict(sorted(files.items()))}, algo)
    # the small files too (the shards' flushers did theirs): none may come back empty after a crash
    fsync_tree(tmp, synced={shard.name for shard in layout.shards})
    _fsync_dir(tmp)
    return files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
