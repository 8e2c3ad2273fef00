"""Small-batch decode, split in two: the GPU time of the captured decode graphs alone, and where a step's
host time goes. Run it with NANOVLLM_PDL=0 / NANOVLLM_GEMV_MAX_ROWS=0 to see what each of those buys.

    PYTHONPATH=. python scripts/decode_breakdown.py [--model qwen3-0.6b] [--batches 1,2,4,8] [--out DIR]

- graph: every captured graph of the listed sizes replayed --replays times back to back between two CUDA
  events (embedding to LM head: no input copies, no sampling), and the host time of one replay call.
- host: one batch of 1024-token greedy requests decoding; the median time of each engine phase per step
  (scheduler, input building, forward launch, sampler launch, the wait for the previous step), measured
  by wrapping those methods with a host clock. With overlap, step = max(host work, GPU work).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.benchmark.common import graph_replay_ms, run_info, write_report  # noqa: E402
from nanovllm.engine import step_input  # noqa: E402


def time_graphs(runner, sizes: list[int], replays: int) -> dict:
    out = {}
    for size in sizes:
        graph = runner.cuda_graphs.decode[size]
        for _ in range(10):
            graph.replay()
        gpu_ms = graph_replay_ms(graph, replays)
        host = []
        for _ in range(20):  # the GPU is busy with the replays before: this is the launch alone
            t = time.perf_counter()
            graph.replay()
            host.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        out[size] = {"gpu_ms": gpu_ms, "host_ms_per_call": statistics.median(host) * 1e3}
    return out


def wrap(obj, name: str, key: str, times: dict) -> object:
    """Time every call of obj.<name> into times[key]; returns the original attribute (to put back)."""
    fn = getattr(obj, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[key].append(time.perf_counter() - t)

    setattr(obj, name, timed)
    return fn


def host_phases(engine, batch: int, steps: int, rng: random.Random) -> dict:
    times: dict[str, list[float]] = defaultdict(list)
    runner = engine.runner
    targets = [(engine.scheduler, "schedule"), (runner, "prepare"), (runner, "execute"),
               (runner.cuda_graphs, "replay_decode"), (runner, "sampler"), (runner, "launch")]  # fmt: skip
    originals = [(obj, name, wrap(obj, name, name.strip("_"), times)) for obj, name in targets]
    original_wait = step_input.LaunchedStep.wait

    def wait(self):
        t = time.perf_counter()
        try:
            return original_wait(self)
        finally:
            times["wait_for_previous_step"].append(time.perf_counter() - t)

    step_input.LaunchedStep.wait = wait
    params = SamplingParams(temperature=0, max_tokens=steps + 40, ignore_eos=True)
    ids = [engine.add_request([rng.randint(0, 9000) for _ in range(1024)], params) for _ in range(batch)]
    try:
        for _ in range(20):  # prefill and the first decode steps
            engine.step()
        times.clear()
        step_ms = []
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            step_ms.append((time.perf_counter() - t) * 1e3)
    finally:
        step_input.LaunchedStep.wait = original_wait
        for obj, name, original in originals:
            if getattr(type(obj), name, None) is not None and not isinstance(original, torch.nn.Module):
                delattr(obj, name)  # a method: the class's again
            else:
                setattr(obj, name, original)  # an attribute of the instance (the sampler module)
        for rid in ids:
            engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
    phases = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"step_ms_median": statistics.median(step_ms), "phase_ms_median": phases}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--replays", type=int, default=200)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("decode_breakdown needs a CUDA GPU (it times CUDA graphs)", file=sys.stderr)
        return 1
    sizes = [int(b) for b in args.batches.split(",")]
    llm = LLM(args.model, max_model_len=2048)
    engine, rng = llm.engine, random.Random(0)
    captured = engine.runner.cuda_graphs.decode if engine.runner.cuda_graphs else {}
    missing = sorted(set(sizes) - set(captured))
    if missing:
        print(f"--batches {missing}: no decode graph of that size; captured: {sorted(captured)}")
        return 2
    host = {b: host_phases(engine, b, args.steps, rng) for b in sizes}
    graphs = time_graphs(engine.runner, sizes, args.replays)
    report = {"benchmark": "decode_breakdown", **run_info(), "model": args.model}
    report.update(graphs=graphs, host=host)
    write_report(f"decode_breakdown-{args.model}", report, Path(args.out))
    header = f"{'batch':>5}  {'graph GPU ms':>12}  {'replay host ms':>14}  {'step ms':>8}"
    print(header + "  host phases (ms, median)")
    for b in sizes:
        phases = ", ".join(f"{k} {v:.3f}" for k, v in host[b]["phase_ms_median"].items())
        print(f"{b:>5}  {graphs[b]['gpu_ms']:>12.3f}  {graphs[b]['host_ms_per_call']:>14.4f}  "
              f"{host[b]['step_ms_median']:>8.3f}  {phases}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
