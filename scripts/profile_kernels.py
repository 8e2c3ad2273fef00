"""Where a step's GPU time goes, by kernel kind: a 16 x 1024-token prefill step, batch-1 decode at 1k
context and batch-N decode ("decodeN", default decode256) at --decode-context (512), each under torch.profiler
(with --tensor-parallel-size, rank 0's kernels, NCCL included). Per scenario: wall ms per step,
GPU-busy ms per step (union of kernel intervals), and kernel ms per step grouped into kinds (GEMM,
attention, norm, rope/store, activation, sampling, copies, other) with the top kernels by name.

    PYTHONPATH=. python scripts/profile_kernels.py --out DIR [--scenarios prefill,decode1,decode256]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams

# (kind, regex on the kernel name), first match wins
KINDS = [
    ("communication", r"nccl|AllReduce|Broadcast|allreduce|all_reduce"),
    ("attention", r"decode_split|decode_reduce|paged_attention|paged_prefill|_attn|flash"),
    ("qk-norm/rope/kv-store", r"qk_norm|rope|store_kv|kvcache"),
    ("norm", r"rmsnorm|rms_norm|layer_norm"),
    ("activation", r"silu|act_and_mul|gelu"),
    ("sampling", r"gumbel|sampl|softmax|argmax|topk|top_k|penalt"),
    ("gemm", r"gemm|gemv|decode_linear|nvjet|xmma|cutlass|sm90|matmul|cublas"),
    ("copy", r"[Mm]emcpy|[Mm]emset|copy_|index_select|index_copy|gather|scatter"),
]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if re.search(pattern, name)), "other")


def summarize(trace_path: Path, steps: int, wall_ms: float) -> dict:
    events = json.loads(trace_path.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    count = 0
    for e in kernels:
        by_kind[kind_of(e["name"])] += e["dur"] / 1e3 / steps
        by_name[e["name"][:90]] += e["dur"] / 1e3 / steps
        count += e.get("cat") == "kernel"
    busy, end = 0.0, float("-inf")  # union of [ts, ts + dur) intervals
    for ts, dur in sorted((e["ts"], e["dur"]) for e in kernels):
        if ts + dur > end:
            busy += ts + dur - max(ts, end)
            end = ts + dur
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {
        "wall_ms_per_step": wall_ms,
        "gpu_busy_ms_per_step": busy / 1e3 / steps,
        "kernels_per_step": count / steps,
        "kernel_ms_per_step_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms_per_step": dict(top),
    }


def profiled(engine, steps: int, out: Path, name: str) -> dict:
    """Profile `steps` engine steps (a warm engine, overlap as configured)."""
    engine.sync()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    engine.sync()
    sync()
    wall_ms = (time.perf_counter() - t) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        engine.sync()
        sync()
    path = out / f"trace-{name}.json"
    prof.export_chrome_trace(str(path))
    return summarize(path, steps, wall_ms)


def host_profile(engine, steps: int, path: Path) -> None:
    """cProfile of `steps` steps: where the host's time per step goes (top functions by own time)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    engine.sync()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
    path.write_text(f"{steps} steps\n" + text.getvalue())


def add(engine, rng: random.Random, n: int, length: int, max_tokens: int) -> None:
    for _ in range(n):
        prompt = [rng.randint(0, 1000) for _ in range(length)]  # < every preset vocab
        engine.add_request(prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens))


def drain(engine) -> None:
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(seq.request_id)
    while engine.has_unfinished():
        engine.step()
    engine.sync()


def prefill_to_decode(engine) -> None:
    while engine.scheduler.waiting or any(
        s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running
    ):
        engine.step()
    for _ in range(3):
        engine.step()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--scenarios", default="prefill,decode1,decode256")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--decode-context", type=int, default=512)
    p.add_argument("--save-traces", action="store_true", help="keep the chrome traces in --out")
    p.add_argument("--host-profile", action="store_true", help="cProfile of the decode steps' host code")
    p.add_argument("--out", default="out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    traces = out if args.save_traces else Path(tempfile.mkdtemp(prefix="traces-"))
    rng = random.Random(0)
    llm = LLM(args.model, max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size)
    engine = llm.engine
    report = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": args.model,
        "scenarios": {},
    }
    for name in args.scenarios.split(","):
        if name == "prefill":  # one step that prefills 16 fresh 1024-token prompts (16k tokens)
            for _ in range(2):  # warm-up pass, then the profiled one (fresh prompts: no cache hits)
                add(engine, rng, 16, 1024, 1)
                engine.sync()
                sync()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    t = time.perf_counter()
                    engine.step()
                    engine.sync()
                    sync()
                    wall_ms = (time.perf_counter() - t) * 1e3
                drain(engine)
            path = traces / "trace-prefill.json"
            prof.export_chrome_trace(str(path))
            report["scenarios"][name] = summarize(path, 1, wall_ms)
        else:
            match = re.fullmatch(r"decode(\d+)", name)
            if match is None:
                raise SystemExit(f"unknown scenario {name!r}: prefill, decode1 or decodeN (batch N)")
            batch = int(match.group(1))
            context = 1024 if batch == 1 else args.decode_context
            add(engine, rng, batch, context, 1000)
            prefill_to_decode(engine)
            report["scenarios"][name] = profiled(engine, 20 if batch == 1 else 8, traces, name)
            if args.host_profile:
                host_profile(engine, 200 if batch == 1 else 30, out / f"host-{name}.txt")
            drain(engine)
        print(name, json.dumps(report["scenarios"][name], indent=1), flush=True)
    (out / "profile_kernels.json").write_text(json.dumps(report, indent=1))
    print("\nscenario    wall ms  GPU-busy ms  kernels  " + "  ".join(k for k, _ in KINDS) + "  other")
    for name, r in report["scenarios"].items():
        kinds = r["kernel_ms_per_step_by_kind"]
        cols = "  ".join(f"{kinds.get(k, 0.0):.3f}" for k, _ in KINDS + [("other", "")])
        wall, busy, count = r["wall_ms_per_step"], r["gpu_busy_ms_per_step"], r["kernels_per_step"]
        print(f"{name:10}  {wall:7.3f}  {busy:11.3f}  {count:7.0f}  {cols}")


if __name__ == "__main__":
    main()
