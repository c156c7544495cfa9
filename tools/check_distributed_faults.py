"""Every fault point of a distributed collect, killed and hung, with 2 and 3 ranks on 127.0.0.1.

For each rank count: one uninterrupted run under mlx.launch; then for every point of
reap_stream.testing.ranks.KILL_POINTS whose rank exists, and each fault (SIGKILL, hang):
the ranks are started one by one (as mlx.launch starts them), the victim misbehaves, and every
other rank must exit 2 with exactly one stderr line naming the victim (a hung victim too, told by
rank 0); then the same command is relaunched with mlx.launch and must end byte-identical to the
uninterrupted run, its work dir gone. The table gives what happened and how long after the fault
the last rank had exited (the hang timeout is --timeout seconds).

    python tools/check_distributed_faults.py              # 54 runs, about 45 minutes on a busy 2-core VM
    python tools/check_distributed_faults.py --ranks 2 --faults kill
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CALIB = ["--dataset-file", str(REPO / "fixtures" / "calibration" / "licence.jsonl"), "--pack-samples",
         "--window-tokens", "64", "--chunk-tokens", "128"]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,3")
    ap.add_argument("--faults", default="kill,hang")
    ap.add_argument("--model", default="qwen3_moe")
    ap.add_argument("--timeout", type=float, default=5.0, help="REAP_STREAM_DIST_TIMEOUT for the hung runs")
    args = ap.parse_args()

    from reap_stream.testing import synth
    from reap_stream.testing.ranks import KILL_POINTS, blamed, fault, launch, spawn, stop_problems

    model = synth.cached_fixture(args.model, "fp32", Path(os.environ.get("REAP_STREAM_FIXTURES",
                                                                         REPO / "fixtures" / "generated")))
    rows, failed = [], 0
    with tempfile.TemporaryDirectory(prefix="dist-faults-") as tmp:
        tmp = Path(tmp)
        for n in (int(x) for x in args.ranks.split(",")):
            calib = [*CALIB, "--max-tokens", str(256 * n)]   # 2 chunks per rank
            command = lambda out, work: ["collect", model, *calib, "--out", out, "--work-dir", work, "--json"]  # noqa: E731
            whole = tmp / f"whole-{n}.zarr"
            launch(n, command(whole, tmp / f"whole-{n}.work"))
            reference = tree(whole)
            for point, (victim, _) in KILL_POINTS.items():
                if victim >= n:
                    continue
                for then in args.faults.split(","):
                    out, work, stamp = tmp / "t.zarr", tmp / "w", tmp / "stamp"
                    env = {"REAP_FAULT_STAMP": str(stamp), "REAP_STREAM_DIST_TIMEOUT": str(args.timeout)}
                    ranks = spawn(n, command(out, work), misbehave=fault(point, then), env=env)
                    ended = time.time()
                    stopped = f"{ended - float(stamp.read_text()):.1f}" if stamp.exists() else "no fault"
                    named, needles = blamed(point, then)
                    verdict = "; ".join(stop_problems(ranks, named, *needles)) or "ok"
                    relaunch = launch(n, command(out, work))
                    summary = [json.loads(x) for x in relaunch.stdout.splitlines() if x.startswith("{")]
                    resumed = summary[0].get("layers_run") if summary else None
                    same = out.is_dir() and tree(out) == reference and not work.exists()
                    failed += verdict != "ok" or not same
                    rows.append((n, point, then, stopped, verdict, resumed, same))
                    print(f"  {n} ranks, {point}, {then}: {verdict}; stopped within {stopped}s; "
                          f"layers rerun {resumed}; identical {same}", file=sys.stderr, flush=True)
                    for p in (out, work):
                        if p.exists():
                            shutil.rmtree(p)
                    stamp.unlink(missing_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end; hang timeout {args.timeout:.0f}s\n")
    print("| ranks | fault point | fault | all ranks exited within (s) | every other rank: exit 2 + one line naming "
          "the victim (a hang inside MLX: rank 0, 'every rank has been inside') | layers rerun on relaunch | "
          "relaunch byte-identical to an uninterrupted run |")
    print("|---|---|---|---|---|---|---|")
    for n, point, then, stopped, verdict, resumed, same in rows:
        print(f"| {n} | {point} | {then} | {stopped} | {verdict} | {resumed} | {'yes' if same else 'NO'} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
