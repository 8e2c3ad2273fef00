"""Where a step's time goes: host phases (schedule, prepare, sampling build, update, detokenize) vs
the GPU, on the throughput workload. Prints a breakdown; writes JSON to --out.

    PYTHONPATH=. python scripts/profile_step.py --out DIR [--num-requests 256]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

from nanovllm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-0.6b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--out", default="out")
    parser.add_argument("--sync", action="store_true", help="synchronize after the forward to time the GPU")
    args = parser.parse_args()

    rng = random.Random(0)
    n = args.num_requests
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, 1024)) for _ in prompts
    ]
    llm = LLM(args.model)
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)
    engine, runner = llm.engine, llm.engine.runner
    timings: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    def timed(obj, name: str, key: str, sync: bool = False):
        fn = getattr(obj, name)

        def wrapper(*a, **kw):
            t = time.perf_counter()
            result = fn(*a, **kw)
            if sync:
                torch.cuda.synchronize()
            timings[key] += time.perf_counter() - t
            counts[key] += 1
            return result

        setattr(obj, name, wrapper)

    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.scheduler, "advance", "advance")
    timed(engine.scheduler, "resolve", "resolve")
    timed(runner, "prepare", "prepare")
    timed(runner, "sampling_requests", "sampling_requests")
    timed(runner, "execute", "execute (launch + sampler + build)", sync=args.sync)
    timed(runner, "launch", "runner.launch total")
    timed(engine, "_complete", "wait for the step + apply its tokens (engine._complete)")
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - start
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "card": torch.cuda.get_device_name(),
        "num_requests": args.num_requests,
        "output_tokens": num_tokens,
        "seconds": total,
        "tok_per_s": num_tokens / total,
        "phases_s": dict(timings),
        "calls": dict(counts),
    }
    # One decode step under torch.profiler: kernel time vs wall.
    from torch.profiler import ProfilerActivity, profile

    rng2 = random.Random(1)
    batch = [[rng2.randint(0, 10000) for _ in range(512)] for _ in range(256)]
    for p in batch:
        engine.add_request(p, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=64))
    for _ in range(8):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    while engine.has_unfinished():
        engine.step()
    # Batch 1: one prefill step (128 tokens) and decode steps, host time by op (what TTFT/TPOT pay).
    small = []
    for label, steps in (("prefill-128", 1), ("decode-b1", 16)):
        engine.add_request([rng2.randint(0, 10000) for _ in range(128)], SamplingParams(max_tokens=64))
        if label == "decode-b1":
            engine.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof1:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t) * 1e3 / steps
        small.append(f"=== {label}: {ms:.2f} ms/step (under the profiler)\n")
        small.append(prof1.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        while engine.has_unfinished():
            engine.step()
    t = time.perf_counter()
    engine.add_request([rng2.randint(0, 10000) for _ in range(128)], SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    small.append(f"=== unprofiled batch-1 prefill of 128 tokens: {(time.perf_counter() - t) * 1e3:.2f} ms\n")
    table += "\n" + "\n".join(small)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile.json").write_text(json.dumps(result, indent=1))
    (Path(args.out) / "profile_table.txt").write_text(table)
    print(table)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
