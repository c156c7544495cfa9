#!/usr/bin/env python3
"""Do two threads' multi-threaded BLAS GEMMs run side by side, or one at a time?

Decides how reap-stream's two CPU lanes share the BLAS (reap_stream.blas.lane_threads): the same
float32 GEMMs (2n of them) are timed as one lane at T threads, two lanes at T/2 threads each, and
two lanes at T each, for T = 2, 4, 8, 16 (capped by the BLAS at the core count). Uses numpy's own
BLAS and threadpoolctl (`pip install threadpoolctl`; neither is a reap-stream dependency), so it
runs on machines without MLX. Medians of 3.

    python tools/bench_blas_lanes.py
"""
from __future__ import annotations

import statistics
import threading
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

CASES = {"expert 256x2048x768": ((256, 2048), (2048, 768), 40),
         "projection 4096x2048x2048": ((4096, 2048), (2048, 2048), 6)}


def work(a: np.ndarray, b: np.ndarray, n: int) -> None:
    for _ in range(n):
        a @ b


def one_lane(a, b, n: int, threads: int) -> float:
    with threadpool_limits(threads):
        t = time.perf_counter()
        work(a, b, 2 * n)
        return time.perf_counter() - t


def two_lanes(a, b, n: int, threads: int) -> float:
    with threadpool_limits(threads):
        lanes = [threading.Thread(target=work, args=(a, b, n)) for _ in range(2)]
        t = time.perf_counter()
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.join()
        return time.perf_counter() - t


def main() -> None:
    print("BLAS:", [(i["internal_api"], i.get("version"), i["num_threads"]) for i in threadpool_info()])
    rng = np.random.default_rng(0)
    for name, (sa, sb, n) in CASES.items():
        a, b = rng.standard_normal(sa, np.float32), rng.standard_normal(sb, np.float32)
        work(a, b, 2)
        for total in (2, 4, 8, 16):
            half = max(1, total // 2)
            one = statistics.median(one_lane(a, b, n, total) for _ in range(3))
            split = statistics.median(two_lanes(a, b, n, half) for _ in range(3))
            both = statistics.median(two_lanes(a, b, n, total) for _ in range(3))
            print(f"{name}: one lane x{total} {one * 1e3:7.1f} ms | two lanes x{half} {split * 1e3:7.1f} ms | "
                  f"two lanes x{total} {both * 1e3:7.1f} ms", flush=True)


if __name__ == "__main__":
    main()
