"""The card's ceilings, measured: device-to-device copy and read-only bandwidth, and the bf16 matmul rate.

These are the peaks the benchmarks' floors are computed from (nanovllm/benchmark/common.py CARD_PEAKS,
shared/GPU.md for the H100). Each number is the median of CUDA-event timings after warm-up; the buffers
are far larger than the L2, the matrices random.

    PYTHONPATH=. python scripts/card_peaks.py --out DIR      (~10 s)
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from nanovllm.benchmark.common import run_info, write_report


def time_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of one call of fn, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bandwidth_ms(n_bytes: int) -> tuple[float, float]:
    """(copy, read-only) milliseconds for a buffer of n_bytes; the read is a sum (one number written)."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src)), time_ms(lambda: torch.sum(src, dtype=torch.float32))


def matmul_bf16_ms(n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return time_ms(lambda: a @ b, reps=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--copy-gib", type=float, default=4.0, help="size of the copied buffer")
    parser.add_argument("--matmul-n", type=int, default=8192, help="n of the n x n x n bf16 matmul")
    args = parser.parse_args()

    n_bytes = int(args.copy_gib * 2**30) // 16 * 16
    copy_ms, read_ms = bandwidth_ms(n_bytes)
    n = args.matmul_n
    matmul_ms = matmul_bf16_ms(n)

    report = {
        "benchmark": "card_peaks",
        **run_info(),
        "copy_bytes": n_bytes,
        "copy_ms": copy_ms,
        "copy_tb_per_s": 2 * n_bytes / copy_ms / 1e9,  # read + write counted
        "read_ms": read_ms,
        "read_tb_per_s": n_bytes / read_ms / 1e9,
        "matmul_n": n,
        "matmul_ms": matmul_ms,
        "matmul_bf16_tflop_per_s": 2 * n**3 / matmul_ms / 1e9,
    }
    write_report("card_peaks", report, args.out)
    print(
        f"{report['card']}: copy {report['copy_tb_per_s']:.2f} TB/s (read + write), read "
        f"{report['read_tb_per_s']:.2f} TB/s, bf16 matmul {report['matmul_bf16_tflop_per_s']:.0f} TFLOP/s"
    )


if __name__ == "__main__":
    main()
