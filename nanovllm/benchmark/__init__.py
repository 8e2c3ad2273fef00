"""Benchmarks: offline throughput against Hugging Face transformers, and latency (TTFT / TPOT) against the
memory-bandwidth floor. `benchmarks/throughput.py`, `benchmarks/latency.py` and `nanovllm bench` run them:

    nanovllm bench [throughput] --out DIR ...     # nano-vllm's bench.py workload, nanovllm vs HF
    nanovllm bench latency --out DIR ...          # TTFT and TPOT at batch 1 / 16 / 64 / 256

Each writes one JSON file into DIR (card, date, git commit, workload, every number) and prints a table last.
"""

from __future__ import annotations

BENCHMARKS = ("throughput", "latency")


def main(argv: list[str] | None = None) -> int:
    """`nanovllm bench [throughput|latency] ARGS...` (throughput when the first word is a flag or absent)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv.pop(0) if argv and argv[0] in BENCHMARKS else "throughput"
    if name == "latency":
        from nanovllm.benchmark.latency import main as run
    else:
        from nanovllm.benchmark.throughput import main as run
    return run(argv)
