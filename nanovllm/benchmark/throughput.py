"""Offline throughput: nanovllm against Hugging Face transformers on the same weights and workload.

    python benchmarks/throughput.py [--model qwen3-0.6b] [--out benchmarks/results]   # or: nanovllm bench

The default workload is nano-vllm's bench.py: random.seed(0); 256 requests; prompt lengths
randint(100, 1024) of token ids randint(0, 10000); max_tokens randint(100, 1024); temperature 0.6;
ignore_eos: 133,966 output tokens. Order of one run:

1. nanovllm: build the engine (KV-cache profiling, CUDA-graph capture), warm up on a few requests of
   a different seed, then time `LLM.generate` on the full workload --repeats times (the run of median
   throughput is the result; every run is recorded: one run of a few seconds moves by a few percent
   from one to the next), then on each subset that transformers runs (its first N requests; the
   prefix cache is emptied before each timed run, so no run reuses another's prompts). Tokens are
   counted from the outputs.
2. The engine is shut down and its memory released; transformers' model gets the same weights.
3. transformers on the first --hf-num-requests requests (its continuous batching runs at a few hundred
   tok/s on an H100, too slow for the full workload in our budget): continuous batching with default
   settings; plain `generate` (static, left-padded batching) on the first --hf-static-subset
   requests; continuous batching with each tuned candidate (the fastest that finishes every request
   is reported as "tuned", all are recorded). Each run is capped at
   --hf-time-cap-s, all of them together by --hf-budget-s (tuned candidates run last and get what
   is left); a failure, a timeout or a skip is recorded, never extrapolated.

Throughput = output tokens / wall seconds of the timed call (host clock after a device sync).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from nanovllm.benchmark import hf_baseline
from nanovllm.benchmark.common import (
    DEFAULT_OUT_DIR,
    Workload,
    card_peaks,
    fmt,
    free_device_memory,
    gib,
    guarded,
    make_workload,
    memory_stats,
    now,
    print_table,
    recording_triton_compiles,
    reset_peak_memory,
    run_info,
    throughput_floor_tok_per_s,
    write_report,
)
from nanovllm.config import DEFAULT_MODEL, preset_names

NANO_VLLM_BENCH = dict(
    num_requests=256, min_input_len=100, max_input_len=1024, min_output_len=100, max_output_len=1024
)
NANO_VLLM_BENCH_OUTPUT_TOKENS = 133_966
DEFAULT_MAX_MODEL_LEN = 4096  # nano-vllm's bench.py uses the same


def build_parser() -> argparse.ArgumentParser:
    from nanovllm.cli import add_engine_args

    p = argparse.ArgumentParser(
        prog="nanovllm bench throughput",
        description="Offline throughput, nanovllm vs Hugging Face transformers (nano-vllm's bench.py).",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint dir or preset {preset_names()}")
    p.add_argument("--num-requests", type=int, default=NANO_VLLM_BENCH["num_requests"])
    p.add_argument("--min-input-len", type=int, default=None, help="default: min(100, --max-input-len)")
    p.add_argument("--max-input-len", type=int, default=NANO_VLLM_BENCH["max_input_len"])
    p.add_argument("--min-output-len", type=int, default=None, help="default: min(100, --max-output-len)")
    p.add_argument("--max-output-len", type=int, default=NANO_VLLM_BENCH["max_output_len"])
    p.add_argument("--max-token-id", type=int, default=10_000, help="prompt ids are drawn in [0, this]")
    p.add_argument("--workload-seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument(
        "--warmup-requests", type=int, default=16, help="requests of another seed run before timing"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs of the full workload; the median one is reported"
    )
    p.add_argument(
        "--hf-mode",
        choices=["default", "tuned", "both", "none"],
        default="both",
        help="transformers' continuous batching: default settings, tuned candidates, or both (its static "
        "generate runs with each of them, unless --hf-static-subset 0); none: no transformers at all",
    )
    p.add_argument("--hf-num-requests", type=int, default=64, help="transformers runs the first N requests")
    p.add_argument(
        "--hf-static-subset", type=int, default=32, help="model.generate on the first N requests (0: skip)"
    )
    p.add_argument(
        "--hf-time-cap-s", type=float, default=90.0, help="wall-clock cap of each transformers run"
    )
    p.add_argument(
        "--hf-budget-s", type=float, default=240.0, help="wall-clock budget of all transformers runs together"
    )
    p.add_argument(
        "--hf-tuned",
        default=",".join(hf_baseline.TUNED_CANDIDATES),
        help=f"comma-separated tuned candidates to try, from {list(hf_baseline.TUNED_CANDIDATES)}, or one "
        'JSON object of ContinuousBatchingConfig fields (+ "attn_implementation")',
    )
    p.add_argument("--out", default=str(DEFAULT_OUT_DIR), help="directory for the JSON report")
    add_engine_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value, low in (
        ("--num-requests", args.num_requests, 1),
        ("--warmup-requests", args.warmup_requests, 1),  # (the warm-up also compiles; one always runs)
        ("--repeats", args.repeats, 1),
        ("--max-token-id", args.max_token_id, 0),
        ("--hf-num-requests", args.hf_num_requests, 0),
        ("--hf-static-subset", args.hf_static_subset, 0),
    ):
        if value < low:
            print(f"error: {flag} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    for flag, value in (("--hf-time-cap-s", args.hf_time_cap_s), ("--hf-budget-s", args.hf_budget_s)):
        if not value > 0:
            print(f"error: {flag} must be > 0, got {value:g}", file=sys.stderr)
            return 2
    try:
        tuned = _tuned_candidates(args.hf_tuned)
        report = run(args, tuned)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_report("throughput", report, args.out)
    print(f"\nwrote {path}")
    print_summary(report)
    return 0


def _tuned_candidates(spec: str) -> dict[str, dict[str, Any]]:
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            return {"custom": json.loads(spec)}
        except json.JSONDecodeError as e:
            raise ValueError(f"--hf-tuned is not valid JSON: {e}") from None
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in hf_baseline.TUNED_CANDIDATES]
    if unknown:
        raise ValueError(
            f"unknown --hf-tuned candidate(s) {unknown}; known: {list(hf_baseline.TUNED_CANDIDATES)}"
        )
    return {n: hf_baseline.TUNED_CANDIDATES[n] for n in names}


def _engine_kwargs(args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    from nanovllm.cli import engine_kwargs

    kwargs = engine_kwargs(args)
    if "max_model_len" not in kwargs:
        kwargs["max_model_len"] = max(DEFAULT_MAX_MODEL_LEN, workload.max_seq_len)
    return kwargs


def run(args: argparse.Namespace, tuned: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from nanovllm import LLM
    from nanovllm.config import Config

    lens = dict(
        min_input_len=args.min_input_len if args.min_input_len is not None else min(100, args.max_input_len),
        max_input_len=args.max_input_len,
        min_output_len=args.min_output_len
        if args.min_output_len is not None
        else min(100, args.max_output_len),
        max_output_len=args.max_output_len,
    )
    probe = Config.from_kwargs(args.model, device=args.device or "auto")  # vocabulary size, before the engine
    max_token_id = min(args.max_token_id, probe.hf_config.vocab_size - 1)
    workload = make_workload(args.num_requests, **lens, max_token_id=max_token_id, seed=args.workload_seed)
    warmup = make_workload(
        min(args.warmup_requests, args.num_requests),
        **{**lens, "max_output_len": min(16, lens["max_output_len"]), "min_output_len": 1},
        max_token_id=max_token_id,
        seed=args.workload_seed + 1,
    )
    with_hf = args.hf_mode != "none"
    hf_n = min(args.hf_num_requests, workload.num_requests) if with_hf else 0
    static_n = min(args.hf_static_subset, workload.num_requests) if with_hf else 0
    subsets = sorted({n for n in (hf_n, static_n) if n > 0})
    is_nano_vllm_bench = (
        args.num_requests == NANO_VLLM_BENCH["num_requests"]
        and all(lens[k] == NANO_VLLM_BENCH[k] for k in lens)
        and max_token_id == 10_000  # a vocabulary of 10,000 ids or fewer draws other prompts
        and args.workload_seed == 0
    )
    if is_nano_vllm_bench and workload.num_output_tokens != NANO_VLLM_BENCH_OUTPUT_TOKENS:
        raise RuntimeError(f"workload drew {workload.num_output_tokens} output tokens, expected 133,966")

    report: dict[str, Any] = {
        "benchmark": "throughput",
        **run_info(),
        "model": args.model,
        "workload": {
            "kind": "nano-vllm bench.py" if is_nano_vllm_bench else "custom",
            "num_requests": workload.num_requests,
            **lens,
            "max_token_id": max_token_id,
            "seed": args.workload_seed,
            "temperature": args.temperature,
            "ignore_eos": True,
            "num_prompt_tokens": workload.num_prompt_tokens,
            "num_output_tokens": workload.num_output_tokens,
            "hf_num_requests": hf_n,
            "hf_static_subset": static_n,
            "subset_output_tokens": {str(n): workload.head(n).num_output_tokens for n in subsets},
        },
    }

    # ---- nanovllm ----
    kwargs = _engine_kwargs(args, workload)
    report["engine_args"] = kwargs
    reset_peak_memory()
    start = time.perf_counter()
    llm = LLM(args.model, **kwargs)
    nano: dict[str, Any] = {"init_seconds": time.perf_counter() - start}
    config = llm.config
    try:
        start = now()
        _generate(llm, warmup, args.temperature)
        nano["warmup_seconds"] = now() - start
        with recording_triton_compiles() as compiled:
            runs = [_timed_generate(llm, workload, args.temperature) for _ in range(args.repeats)]
        nano["triton_compiles_in_timed_runs"] = compiled
        nano["full_runs"] = runs
        nano["full"] = median_run(runs)
        nano["subsets"] = {str(n): _timed_generate(llm, workload.head(n), args.temperature) for n in subsets}
        nano["kv_cache_blocks"] = llm.engine.num_kvcache_blocks
        nano["block_size"] = config.block_size
        nano["kv_cache_tokens"] = llm.engine.num_kvcache_blocks * config.block_size
        nano["num_preemptions"] = llm.engine.stats()["num_preemptions"]
        nano.update(memory_stats())  # peak over init (profiling, graphs) and all runs
        floor = workload_floor(report["card"], config)
        if floor is not None and is_nano_vllm_bench and args.model == DEFAULT_MODEL:
            nano["floor"] = floor
            nano["pct_of_floor"] = 100 * nano["full"]["tok_per_s"] / nano["floor"]["tok_per_s"]
            nano["pct_of_floor_runs"] = [100 * r["tok_per_s"] / nano["floor"]["tok_per_s"] for r in runs]
    finally:
        llm.shutdown()
        del llm
        free_device_memory()
    nano["memory_left_after_shutdown_bytes"] = memory_stats()["memory_allocated_bytes"]
    report["nanovllm"] = nano
    print(f"nanovllm: {fmt(nano['full']['tok_per_s'])} tok/s on the full workload")

    # ---- Hugging Face transformers ----
    hf: dict[str, Any] = {}
    report["hf"] = hf
    if with_hf and (hf_n or static_n):
        model_box: dict[str, Any] = {}

        def build() -> dict[str, Any]:
            start = time.perf_counter()
            model_box["model"] = hf_baseline.build_hf_model(config)
            return {"seconds": time.perf_counter() - start}

        hf["build"] = guarded("hf build", build)
        model = model_box.pop("model", None)
        if model is not None:
            _run_hf(model, workload, warmup, hf_n, static_n, tuned, args, hf)
            del model
            free_device_memory()
    report["ratios"] = _ratios(report)
    return report


def workload_floor(card: str, config) -> dict[str, Any] | None:
    """The default workload's floor on `card` (common.throughput_floor_tok_per_s) where it holds: its bytes
    and FLOPs are those of the qwen3-0.6b preset on one GPU in 16-bit weights. None on several GPUs or in
    float32."""
    if config.tensor_parallel_size != 1 or config.torch_dtype.itemsize != 2:
        return None
    key, peaks = card_peaks(card)
    return {"card": key, **asdict(peaks), "tok_per_s": throughput_floor_tok_per_s(peaks)}


def _generate(llm, workload: Workload, temperature: float) -> int:
    from nanovllm import SamplingParams

    params = [
        SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=m) for m in workload.max_tokens
    ]
    outputs = llm.generate(workload.prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median throughput (the slower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r["tok_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def _timed_generate(llm, workload: Workload, temperature: float) -> dict[str, Any]:
    llm.engine.scheduler.block_manager.reset_prefix_cache()  # no run reuses an earlier run's prompts
    start = now()
    num_tokens = _generate(llm, workload, temperature)
    elapsed = now() - start
    if num_tokens != workload.num_output_tokens:
        raise RuntimeError(
            f"nanovllm generated {num_tokens} tokens, the workload asks {workload.num_output_tokens}"
        )
    return {
        "num_requests": workload.num_requests,
        "output_tokens": num_tokens,
        "seconds": elapsed,
        "tok_per_s": num_tokens / elapsed,
    }


def _run_hf(model, workload, warmup, hf_n, static_n, tuned, args, hf: dict[str, Any]) -> None:
    """Default settings, then static generate, then the tuned candidates, all within --hf-budget-s;
    each timed run capped at --hf-time-cap-s (or what is left of the budget)."""
    deadline = time.perf_counter() + args.hf_budget_s
    subset, hf_warmup = workload.head(hf_n), warmup.head(2)

    def capped(name: str, fn) -> dict[str, Any]:
        left = deadline - time.perf_counter()
        if left < min(10, args.hf_time_cap_s):  # (a run needs a few seconds to get going)
            result = {"skipped": f"--hf-budget-s ({args.hf_budget_s:.0f} s) used up"}
        else:
            result = guarded(name, lambda: fn(min(args.hf_time_cap_s, left)))
        _print_hf(name, result)
        return result

    temp = args.temperature
    if hf_n and args.hf_mode in ("default", "both"):
        hf["default"] = capped(
            "default",
            lambda cap: hf_baseline.run_continuous_batching(model, subset, {}, temp, cap, hf_warmup),
        )
    if static_n:
        hf["static"] = capped(
            "static", lambda cap: hf_baseline.run_static_generate(model, workload.head(static_n), temp, cap)
        )
    if hf_n and args.hf_mode in ("tuned", "both"):
        hf["tuned_candidates"] = {
            name: capped(
                f"tuned {name}",
                lambda cap, s=settings: hf_baseline.run_continuous_batching(
                    model, subset, s, temp, cap, hf_warmup
                ),
            )
            for name, settings in tuned.items()
        }
        hf["tuned"] = _best(hf["tuned_candidates"])


def _best(candidates: dict[str, Any]) -> dict[str, Any]:
    """The fastest candidate that finished every request; else the fastest at all (marked timed_out)."""
    ok = {n: r for n, r in candidates.items() if "tok_per_s" in r}
    if not ok:
        return {"error": "no tuned candidate ran", "candidates": list(candidates)}
    finished = {n: r for n, r in ok.items() if not r["timed_out"] and not r["num_failed"]}
    pool = finished or ok
    name = max(pool, key=lambda n: pool[n]["tok_per_s"])
    return {"candidate": name, **pool[name]}


def _print_hf(name: str, result: dict[str, Any]) -> None:
    if "tok_per_s" in result:
        note = " (TIMED OUT: finished requests only)" if result.get("timed_out") else ""
        print(f"hf {name}: {fmt(result['tok_per_s'])} tok/s{note}")
    else:
        print(f"hf {name}: {result.get('error') or result.get('skipped')}")


def _ratios(report: dict[str, Any]) -> dict[str, Any]:
    """nanovllm tok/s over transformers tok/s, each on the same requests."""
    nano, hf, wl = report["nanovllm"], report["hf"], report["workload"]
    ratios: dict[str, Any] = {}
    for key, n in (
        ("default", wl["hf_num_requests"]),
        ("tuned", wl["hf_num_requests"]),
        ("static", wl["hf_static_subset"]),
    ):
        ours = nano.get("subsets", {}).get(str(n))
        theirs = hf.get(key, {})
        if ours and theirs.get("tok_per_s"):
            ratios[f"nanovllm_over_hf_{key}"] = ours["tok_per_s"] / theirs["tok_per_s"]
    return ratios


HF_LABELS = {
    "default": "HF continuous batching, default",
    "tuned": "HF continuous batching, tuned",
    "static": "HF generate (static batch)",
}


def print_summary(report: dict[str, Any]) -> None:
    nano, hf, wl = report["nanovllm"], report["hf"], report["workload"]
    row = lambda label, r, extra="": [  # noqa: E731
        label,
        fmt(r["num_requests"]),
        fmt(r.get("output_tokens", r.get("useful_tokens"))),
        f"{r['seconds']:.2f}",
        fmt(r["tok_per_s"]),
        extra,
    ]
    runs = nano.get("full_runs", [nano["full"]])
    label = f"nanovllm, all {wl['num_requests']} requests"
    if len(runs) > 1:
        label += f" (median of {len(runs)})"
    rows = [row(label, nano["full"])]
    for n, r in nano.get("subsets", {}).items():
        rows.append(row(f"nanovllm, first {n}", r))
    for key, label in HF_LABELS.items():
        r = hf.get(key)
        if r is None:
            continue
        n = wl["hf_static_subset"] if key == "static" else wl["hf_num_requests"]
        if r.get("candidate"):
            label += f" [{r['candidate']}]"
        label += f", first {n}"
        if "tok_per_s" in r:
            ratio = report["ratios"].get(f"nanovllm_over_hf_{key}")
            note = f"{ratio:.1f}x" if ratio else "-"
            rows.append(row(label + (" (TIMED OUT)" if r.get("timed_out") else ""), r, note))
        else:
            rows.append([label, fmt(n), "-", "-", "-", (r.get("error") or r.get("skipped") or "")[:70]])
    print_table(
        f"Throughput on {report['card']} ({report['model']}, {wl['kind']} workload, "
        f"commit {report['git_commit']})",
        ["run", "requests", "output tokens", "seconds", "tok/s", "nanovllm / HF (same requests)"],
        rows,
    )
    mem = [["nanovllm", fmt(gib(nano.get("peak_memory_allocated_bytes")), 2), fmt(nano["kv_cache_tokens"])]]
    for key in HF_LABELS:
        r = hf.get(key, {})
        if "tok_per_s" in r:
            mem.append(
                [
                    f"HF {key}",
                    fmt(gib(r.get("peak_memory_allocated_bytes")), 2),
                    fmt(r.get("kv_cache_tokens")),
                ]
            )
    print_table("Memory", ["engine", "peak allocated GiB", "KV-cache tokens"], mem)
    if nano.get("triton_compiles_in_timed_runs"):
        print(f"\nWARNING: Triton compiled inside the timed runs: {nano['triton_compiles_in_timed_runs']}")
    if len(runs) > 1:
        print(f"\nnanovllm runs of the full workload, tok/s: {', '.join(fmt(r['tok_per_s']) for r in runs)}")
    if nano.get("pct_of_floor") is not None:
        each = ", ".join(f"{p:.1f}" for p in nano["pct_of_floor_runs"])
        print(
            f"\nnanovllm: {nano['pct_of_floor']:.1f}% of the {nano['floor']['tok_per_s']:,.0f} tok/s floor "
            f"({nano['floor']['card']} peaks, this workload; runs: {each}%)."
        )
