"""Steady-state decode steps at a given batch: host phase times (with and without a sync after the
launch) and a chrome trace of a few steps, to see GPU idle gaps and what the host blocks on.

    PYTHONPATH=. python scripts/trace_decode.py --out DIR [--batch 256] [--prompt-len 512]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    llm = LLM(args.model)
    engine, runner = llm.engine, llm.engine.runner
    for _ in range(args.batch):
        prompt = [rng.randint(0, 10000) for _ in range(args.prompt_len)]
        engine.add_request(prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=10_000 // 10))
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()
    for _ in range(3):
        engine.step()
    engine.sync()
    torch.cuda.synchronize()
    report = {"card": torch.cuda.get_device_name(), "batch": args.batch, "prompt_len": args.prompt_len}

    # Wall time per step, nothing else.
    t = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    engine.sync()
    torch.cuda.synchronize()
    report["step_ms"] = (time.perf_counter() - t) * 1e3 / args.steps
    engine.overlap = False  # the same steps, each waited for
    t = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    report["step_ms_no_overlap"] = (time.perf_counter() - t) * 1e3 / args.steps

    # Phases: schedule, prepare, execute (launch only), wait for tokens, update.
    phases = {k: 0.0 for k in ("schedule", "prepare", "sampling_requests", "execute", "sync", "update")}
    sched = engine.scheduler
    for _ in range(args.steps):
        t0 = time.perf_counter()
        batch = sched.schedule()
        t1 = time.perf_counter()
        inp = runner.prepare(batch)
        t2 = time.perf_counter()
        reqs = runner.sampling_requests(batch)
        t3 = time.perf_counter()
        out_, _ = runner.execute(inp, reqs)
        t4 = time.perf_counter()
        tokens = out_.token_ids.tolist()
        t5 = time.perf_counter()
        sched.update(batch, tokens)
        t6 = time.perf_counter()
        for k, a, b in zip(phases, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6)):
            phases[k] += (b - a) * 1e3 / args.steps
    report["phases_ms"] = phases

    # GPU time of the forward+sampler alone (events).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu = 0.0
    for _ in range(10):
        batch = sched.schedule()
        inp = runner.prepare(batch)
        reqs = runner.sampling_requests(batch)
        torch.cuda.synchronize()
        start.record()
        out_, _ = runner.execute(inp, reqs)
        end.record()
        tokens = out_.token_ids.tolist()
        gpu += start.elapsed_time(end) / 10
        sched.update(batch, tokens)
    report["execute_gpu_ms"] = gpu

    engine.overlap = True
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            engine.step()
        engine.sync()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(out / f"trace-b{args.batch}.json"))
    (out / f"trace_decode-b{args.batch}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
