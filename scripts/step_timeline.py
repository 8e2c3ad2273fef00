"""Where the throughput benchmark's wall time goes, step by step: every engine step of the default
workload (nano-vllm bench.py, qwen3-0.6b preset) with its batch (sequences, new tokens, context read)
and its wall time, against that step's own floor (weights + KV bytes at the card's bandwidth, prefill
FLOPs at its matmul rate: nanovllm/benchmark/common.py CARD_PEAKS). Buckets the excess over the floor by
kind of step and batch size.

    PYTHONPATH=. python scripts/step_timeline.py --out DIR [--runs 2]

With overlapped scheduling the interval between two step() returns is the GPU time of the step
launched one call earlier (the host waits for it), so each interval is charged to that step.

--runs N runs the same workload N times on one engine (prefix cache emptied in between) and prints
each run's buckets: the first timed run of a process is slower than the next ones, in its prefill
steps (docs/performance.md, "Session 18"), and this shows by how much, step by step.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.benchmark.common import (
    Workload,
    card_peaks,
    make_workload,
    recording_triton_compiles,
    run_info,
    write_report,
)
from nanovllm.benchmark.latency import model_sizes
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.utils.heap import frozen_heap

BUCKETS = [(1, 16), (17, 64), (65, 128), (129, 192), (193, 256)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def recording_collections():
    """Yield a list that gets the ms of every generation-2 garbage collection while the block runs."""
    pauses: list[float] = []
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            pauses.append((time.perf_counter() - started.pop()) * 1e3)

    gc.callbacks.append(on_gc)
    try:
        yield pauses
    finally:
        gc.callbacks.remove(on_gc)


def device_allocations() -> tuple[int, int]:
    """(cudaMalloc calls, allocation retries: cache flushes after a failed cudaMalloc) of torch's caching
    allocator so far; (0, 0) without CUDA. Either one in a step stalls the host, and a retry the device."""
    if not torch.cuda.is_available():
        return 0, 0
    stats = torch.cuda.memory_stats()
    return stats.get("num_device_alloc", 0), stats.get("num_alloc_retries", 0)


def timeline(
    engine: LLMEngine, work: Workload, sizes: dict[str, Any], bandwidth: float, flops: float
) -> dict[str, Any]:
    """Run `work` through engine.step() to the end; each step's batch, floor and wall time, bucketed."""
    engine.scheduler.block_manager.reset_prefix_cache()  # no run reuses another's prompts
    for prompt, m in zip(work.prompts, work.max_tokens):
        engine.add_request(prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m))
    kv_bytes_per_token = sizes["kv_bytes_per_token"]
    steps, stamps, allocs = [], [], []
    sync()
    start = time.perf_counter()
    # The heap frozen as LLM.generate freezes it: without, a full collection of the engine's ~500k objects
    # lands in one step (~200 ms on an H200's host, session 30). Any left are recorded.
    with frozen_heap(), recording_triton_compiles() as compiles, recording_collections() as gc_ms:
        while engine.has_unfinished():
            seen = len(compiles)
            allocs_before = device_allocations()
            engine.step()
            stamps.append(time.perf_counter())
            allocs.append(tuple(b - a for a, b in zip(allocs_before, device_allocations())))
            if len(compiles) > seen:
                print(f"step {len(stamps) - 1}: compiled {compiles[seen:]}", flush=True)
            inflight = engine._inflight
            if inflight is None:
                steps.append(None)
                continue
            batch = inflight.batch
            num_new = batch.num_new_tokens
            prefill_tokens = sum(n for n in num_new if n > 1)
            context = sum(s + n for s, n in zip(inflight.starts, num_new))
            attn_flops = sum(4 * n * (s + n / 2) for s, n in zip(inflight.starts, num_new) if n > 1)
            attn_flops *= sizes["num_heads"] * sizes["head_dim"] * sizes["num_layers"]
            matmul_flops = 2 * sizes["matmul_params"] * batch.num_tokens
            weights_s = max(sizes["weight_bytes"] / bandwidth, matmul_flops / flops)
            floor_s = weights_s + context * kv_bytes_per_token / bandwidth + attn_flops / flops
            steps.append(
                dict(
                    seqs=len(num_new),
                    tokens=batch.num_tokens,
                    prefill_tokens=prefill_tokens,
                    context=context,
                    floor_ms=1e3 * floor_s,
                )
            )
        engine.sync()
        sync()
    total = time.perf_counter() - start
    # interval i (between returns i-1 and i) belongs to the step launched at call i-1
    records = []
    for i in range(1, len(stamps)):
        if steps[i - 1] is not None:
            mallocs, retries = allocs[i]  # made by call i, whose wait the interval is
            records.append({**steps[i - 1], "ms": (stamps[i] - stamps[i - 1]) * 1e3, "cuda_mallocs": mallocs,
                            "alloc_retries": retries})  # fmt: skip
    buckets: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in records:
        kind = "prefill+decode" if r["prefill_tokens"] else "decode"
        lo, hi = next(b for b in BUCKETS if b[0] <= r["seqs"] <= b[1]) if r["seqs"] <= 256 else (257, 10**9)
        key = f"{kind} seqs {lo}-{hi}"
        buckets[key]["steps"] += 1
        buckets[key]["ms"] += r["ms"]
        buckets[key]["floor_ms"] += r["floor_ms"]
    return {
        "total_s": total,
        "output_tokens": work.num_output_tokens,
        "tok_per_s": work.num_output_tokens / total,
        "first_step_s": (stamps[0] - start),
        "triton_compiles": compiles,
        "full_collections_ms": gc_ms,
        "sum_floor_s": sum(r["floor_ms"] for r in records) / 1e3,
        "buckets": {k: dict(v) for k, v in sorted(buckets.items())},
        "steps": records,
    }


def print_run(name: str, run: dict[str, Any]) -> None:
    tok_s, floor_s = run["tok_per_s"], run["sum_floor_s"]
    print(f"\n{name}: total {run['total_s']:.2f} s, {tok_s:.0f} tok/s; sum of step floors {floor_s:.2f} s")
    if run["full_collections_ms"]:
        print(f"full garbage collections during the run (ms): {run['full_collections_ms']}")
    print(f"{'bucket':28} {'steps':>6} {'s':>7} {'floor s':>8} {'excess s':>9} {'floor/time':>10}")
    for k, v in run["buckets"].items():
        secs, floor = v["ms"] / 1e3, v["floor_ms"] / 1e3
        print(f"{k:28} {v['steps']:6.0f} {secs:7.3f} {floor:8.3f} {secs - floor:9.3f} {floor / secs:10.0%}")
    slowest = sorted(run["steps"], key=lambda r: r["floor_ms"] - r["ms"])[:5]
    print("largest excess: " + "; ".join(
        f"{r['seqs']} seqs, {r['tokens']} tokens: {r['ms']:.1f} ms (floor {r['floor_ms']:.1f}), "
        f"{r['cuda_mallocs']} cudaMalloc, {r['alloc_retries']} retries" for r in slowest))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--runs", type=int, default=1, help="timed runs of the workload on one engine")
    p.add_argument("--out", default="out")
    args = p.parse_args()
    if args.runs < 1:
        p.error(f"--runs must be >= 1, got {args.runs}")
    info = run_info()
    peaks_key, peaks = card_peaks(info["card"])
    llm = LLM(args.model, max_model_len=4096)
    engine = llm.engine
    sizes = model_sizes(engine.config)
    vocab = min(10_000, engine.config.hf_config.vocab_size - 1)
    warm = make_workload(16, 100, 1024, 100, 300, max_token_id=vocab, seed=1)
    warm_params = [SamplingParams(temperature=0.6, max_tokens=m, ignore_eos=True) for m in warm.max_tokens]
    llm.generate(warm.prompts, warm_params, use_tqdm=False)  # the workload's sampler variants compile here
    work = make_workload(args.num_requests, 100, 1024, 100, 1024, max_token_id=vocab)
    rates = (peaks.bandwidth_bytes_per_s, peaks.bf16_flop_per_s)
    runs = [timeline(engine, work, sizes, *rates) for _ in range(args.runs)]
    llm.shutdown()
    # the first run at the top level (as before --runs), the later ones after it
    report = {"benchmark": "step_timeline", **info, "model": args.model, "floor_peaks": peaks_key}
    report.update(**runs[0], later_runs=runs[1:])
    path = write_report("step_timeline", report, args.out)
    for i, run in enumerate(runs):
        print_run(f"run {i + 1} of {len(runs)}", run)
    print(f"\n-> {path}")


if __name__ == "__main__":
    main()
