"""Where the throughput benchmark's wall time goes, step by step: every engine step of the default
workload (nano-vllm bench.py, qwen3-0.6b preset) with its batch (sequences, new tokens, context read)
and its wall time, against that step's own floor (weights + KV bytes at 3.0 TB/s, prefill FLOPs at
804 TFLOP/s). Buckets the excess over the floor by kind of step and batch size.

    PYTHONPATH=. python scripts/step_timeline.py --out DIR

With overlapped scheduling the interval between two step() returns is the GPU time of the step
launched one call earlier (the host waits for it), so each interval is charged to that step.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.benchmark.common import make_workload, recording_triton_compiles
from nanovllm.benchmark.latency import model_sizes

BANDWIDTH, FLOPS = 3.0e12, 804e12
BUCKETS = [(1, 16), (17, 64), (65, 128), (129, 192), (193, 256)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--out", default="out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(args.model, max_model_len=4096)
    engine = llm.engine
    sizes = model_sizes(engine.config)
    kv_bytes_per_token = sizes["kv_bytes_per_token"]
    vocab = min(10_000, engine.config.hf_config.vocab_size - 1)
    warm = make_workload(16, 100, 1024, 100, 300, max_token_id=vocab, seed=1)
    llm.generate(
        warm.prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in warm.max_tokens], use_tqdm=False
    )
    engine.scheduler.block_manager.reset_prefix_cache()

    work = make_workload(args.num_requests, 100, 1024, 100, 1024, max_token_id=vocab)
    for prompt, m in zip(work.prompts, work.max_tokens):
        engine.add_request(prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m))
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
            steps.append(
                dict(
                    seqs=len(num_new),
                    tokens=batch.num_tokens,
                    prefill_tokens=prefill_tokens,
                    context=context,
                    floor_ms=1e3
                    * (
                        max(
                            sizes["weight_bytes"] / BANDWIDTH,
                            2 * sizes["matmul_params"] * batch.num_tokens / FLOPS,
                        )
                        + context * kv_bytes_per_token / BANDWIDTH
                        + attn_flops * sizes["num_heads"] * sizes["head_dim"] * sizes["num_layers"] / FLOPS
                    ),
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
    report = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "total_s": total,
        "output_tokens": work.num_output_tokens,
        "tok_per_s": work.num_output_tokens / total,
        "first_step_s": (stamps[0] - start),
        "triton_compiles": compiles,
        "sum_floor_s": sum(r["floor_ms"] for r in records) / 1e3,
        "buckets": {k: dict(v) for k, v in sorted(buckets.items())},
        "steps": records,
    }
    (out / "step_timeline.json").write_text(json.dumps(report, indent=1))
    tok_s, floor_s = report["tok_per_s"], report["sum_floor_s"]
    print(f"total {total:.2f} s, {tok_s:.0f} tok/s; sum of step floors {floor_s:.2f} s")
    print(f"{'bucket':28} {'steps':>6} {'s':>7} {'floor s':>8} {'excess s':>9} {'floor/time':>10}")
    for k, v in report["buckets"].items():
        secs, floor = v["ms"] / 1e3, v["floor_ms"] / 1e3
        print(f"{k:28} {v['steps']:6.0f} {secs:7.3f} {floor:8.3f} {secs - floor:9.3f} {floor / secs:10.0%}")


if __name__ == "__main__":
    main()
