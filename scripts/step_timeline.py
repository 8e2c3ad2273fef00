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
import time
from collections import defaultdict
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

BUCKETS = [(1, 16), (17, 64), (65, 128), (129, 192), (193, 256)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeline(
    engine: LLMEngine, work: Workload, sizes: dict[str, Any], bandwidth: float, flops: float
) -> dict[str, Any]:
    """Run `work` through engine.step() to the end; each step's batch, floor and wall time, bucketed."""
    engine.scheduler.block_manager.reset_prefix_cache()  # no run reuses another's prompts
    for prompt, m in zip(work.prompts, work.max_tokens):
        engine.add_request(prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m))
    kv_bytes_per_token = sizes["kv_bytes_per_token"]
    steps, stamps = [], []
    sync()
    start = time.perf_counter()
    with recording_triton_compiles() as compiles:  # new specializations during the timed run
        while engine.has_unfinished():
            seen = len(compiles)
            engine.step()
            stamps.append(time.perf_counter())
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
            records.append({**steps[i - 1], "ms": (stamps[i] - stamps[i - 1]) * 1e3})
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
        "sum_floor_s": sum(r["floor_ms"] for r in records) / 1e3,
        "buckets": {k: dict(v) for k, v in sorted(buckets.items())},
        "steps": records,
    }


def print_run(name: str, run: dict[str, Any]) -> None:
    tok_s, floor_s = run["tok_per_s"], run["sum_floor_s"]
    print(f"\n{name}: total {run['total_s']:.2f} s, {tok_s:.0f} tok/s; sum of step floors {floor_s:.2f} s")
    print(f"{'bucket':28} {'steps':>6} {'s':>7} {'floor s':>8} {'excess s':>9} {'floor/time':>10}")
    for k, v in run["buckets"].items():
        secs, floor = v["ms"] / 1e3, v["floor_ms"] / 1e3
        print(f"{k:28} {v['steps']:6.0f} {secs:7.3f} {floor:8.3f} {secs - floor:9.3f} {floor / secs:10.0%}")


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
    llm.generate(
        warm.prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in warm.max_tokens], use_tqdm=False
    )
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
