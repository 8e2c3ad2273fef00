"""Decode-sized GEMMs: skinny_gemm (nanovllm/kernels/skinny_gemm.py) against F.linear (cuBLAS).

    python benchmarks/gemm_decode.py [--quick | --sweep] [--model 0.6b|8b|all] [--m 1,16] [--out DIR]

For each layer shape of Qwen3-0.6B (and of Qwen3-8B) and each batch M, y = x[M, K] @ W[N, K]^T in bf16 is
timed with F.linear, with skinny_gemm's default config (gemm_config) and, where a sweep runs, with other
configs. Times are medians of triton.testing.do_bench_cudagraph: many calls captured in one CUDA graph, so
launch overhead is excluded as in the CUDA-graph decode step. Successive calls read different copies of W
(together >= --rotate-mib), so W comes from HBM as in a real step, where 28+ layers' weights pass through
the 50 MB L2 between two uses of one; --rotate-mib 0 times one hot copy instead. Effective bandwidth is
N * K * 2 bytes / time, beside the floor at 3.0 TB/s (docs' measured H100 peak).

- default: every shape and M, torch vs default config, plus a modest sweep (BLOCK_N 32/64/128, BLOCK_K
  128/256, SPLIT_K 1/2/4/8, 4 warps, 4 stages) on the 0.6B shapes at M = 1, 16, 64, 256. ~2-4 min (H100).
- --quick: 0.6B shapes only, torch vs default, no sweep. < 1 min.
- --sweep: the full grid (BLOCK_N 32/64/128 x BLOCK_K 64/128/256 x SPLIT_K 1/2/4/8 x 4/8 warps x 3/4
  stages, BLOCK_M from the default or --block-m) at every selected shape and M. Long (compiles dominate):
  cut it into runs with --model and --m.
Configs that cannot help are skipped: a SPLIT_K that would leave a split empty (the launch caps it: a
duplicate), tiles larger than N or K, and shared memory beyond what one program may use.

Prints one table per model (us per call; per decode step, all layers) and writes every measurement as
JSON (write_report("gemm_decode", ...)) into --out. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanovllm.benchmark.common import (  # noqa: E402
    DEFAULT_OUT_DIR,
    PEAK_BANDWIDTH_BYTES_PER_S,
    fmt,
    print_table,
    run_info,
    write_report,
)
from nanovllm.kernels.skinny_gemm import (  # noqa: E402
    GemmConfig,
    effective_split_k,
    gemm_config,
    skinny_gemm,
    smem_bytes,
)

# (layer, N, K) of one decoder layer, and the number of layers (a decode step runs each once per layer).
MODELS = {
    "0.6b": dict(
        num_layers=28,
        shapes=[("qkv_proj", 4096, 1024), ("o_proj", 1024, 2048), ("gate_up_proj", 6144, 1024)]
        + [("down_proj", 1024, 3072)],
    ),
    "8b": dict(
        num_layers=36,
        shapes=[("qkv_proj", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 24576, 4096)]
        + [("down_proj", 4096, 12288)],
    ),
}
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
MODEST_SWEEP_BATCHES = [1, 16, 64, 256]
MODEST_GRID = dict(block_n=(32, 64, 128), block_k=(128, 256), split_k=(1, 2, 4, 8), warps=(4,), stages=(4,))
FULL_GRID = dict(
    block_n=(32, 64, 128), block_k=(64, 128, 256), split_k=(1, 2, 4, 8), warps=(4, 8), stages=(3, 4)
)
DEFAULT_SMEM_LIMIT_BYTES = 227 * 1024  # H100: the most shared memory one program may opt in to


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="0.6B shapes, torch vs default config only")
    mode.add_argument("--sweep", action="store_true", help="the full config grid at every selected shape/M")
    p.add_argument(
        "--model",
        choices=[*MODELS, "all"],
        default=None,
        help="shapes to time (default: all; 0.6b if --quick)",
    )
    p.add_argument("--m", type=_int_list, default=BATCHES, help="batch sizes M (default: %(default)s)")
    p.add_argument(
        "--block-m", type=_int_list, default=None, help="BLOCK_M values to sweep (default: gemm_config's)"
    )
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--rep-ms", type=int, default=10, help="do_bench_cudagraph's rep: ms of calls per graph")
    p.add_argument(
        "--rotate-mib",
        type=int,
        default=256,
        help="copies of W rotate to cover this many MiB (0: one, hot in L2)",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT_DIR), help="directory for the JSON report")
    return p.parse_args(argv)


def config_name(config: GemmConfig | None) -> str:
    if config is None:
        return "-"
    c = GemmConfig(*config)
    return f"{c.block_m}x{c.block_n}x{c.block_k} sk{c.split_k} w{c.num_warps} s{c.num_stages}"


def sweep_configs(
    M: int,
    N: int,
    K: int,
    grid: dict,
    block_ms: list[int] | None,
    default: GemmConfig,
    smem_limit: int,
    elt: int,
) -> list[GemmConfig]:
    """The grid's configs at this shape, minus the ones that cannot run or would repeat another."""
    configs = []
    for block_m, block_n, block_k, split_k, warps, stages in itertools.product(
        block_ms or [default.block_m],
        grid["block_n"],
        grid["block_k"],
        grid["split_k"],
        grid["warps"],
        grid["stages"],
    ):
        config = GemmConfig(block_m, block_n, block_k, split_k, warps, stages)
        if block_n > max(16, 2 ** math.ceil(math.log2(N))) or block_k > max(16, 2 ** math.ceil(math.log2(K))):
            continue  # a tile past the whole matrix: the same work as a smaller one, more masking
        if block_m > max(16, 2 ** math.ceil(math.log2(M))):
            continue
        if effective_split_k(K, block_k, split_k) != split_k:
            continue  # the launch would use fewer splits: a duplicate of a smaller SPLIT_K
        if smem_bytes(config, elt) > smem_limit:
            continue
        if config != default:
            configs.append(config)
    return configs


class Timer:
    """Median us per call in a CUDA graph; each call takes the next copy of W."""

    def __init__(self, rep_ms: int):
        from triton.testing import do_bench_cudagraph

        self.bench = do_bench_cudagraph
        self.rep_ms = rep_ms

    def us(self, fn, weights: list[torch.Tensor]) -> float:
        cycle = itertools.cycle(weights)
        call = lambda: fn(next(cycle))
        call()  # compile (Triton) or pick the algorithm (cuBLAS) before the capture
        torch.cuda.synchronize()
        return self.bench(call, rep=self.rep_ms, return_mode="median") * 1e3


def time_config(timer: Timer, x, weights, config) -> dict[str, Any]:
    try:
        return dict(config=list(config), us=timer.us(lambda w: skinny_gemm(x, w, config=config), weights))
    except Exception as exc:  # e.g. out of resources for this tile: record it and go on
        return dict(config=list(config), error=f"{type(exc).__name__}: {exc}"[:300])


def bench_shape(
    timer: Timer, args, model: str, layer: str, N: int, K: int, dtype, num_sms: int, smem_limit: int
) -> list[dict[str, Any]]:
    elt = torch.empty(0, dtype=dtype).element_size()
    weight_bytes = N * K * elt
    num_copies = max(1, math.ceil(args.rotate_mib * 2**20 / weight_bytes))
    base = (torch.randn(N, K, device="cuda") * K**-0.5).to(dtype)
    weights = [base] + [base.clone() for _ in range(num_copies - 1)]
    sweeping = args.sweep or (not args.quick and model == "0.6b")
    grid = FULL_GRID if args.sweep else MODEST_GRID
    rows = []
    for M in args.m:
        x = torch.randn(M, K, device="cuda").to(dtype)
        default = gemm_config(M, N, K, num_sms)
        torch_us = timer.us(functools.partial(F.linear, x), weights)
        timed = time_config(timer, x, weights, default)
        expected = F.linear(x.float(), base.float())
        max_abs_diff = (skinny_gemm(x, base).float() - expected).abs().max().item()
        sweep = []
        if sweeping and (args.sweep or M in MODEST_SWEEP_BATCHES):
            for config in sweep_configs(M, N, K, grid, args.block_m, default, smem_limit, elt):
                sweep.append(time_config(timer, x, weights, config))
        best = min([timed, *sweep], key=lambda r: r.get("us", math.inf))
        default_us = timed.get("us")
        best_us = best.get("us")
        rows.append(
            dict(
                model=model,
                layer=layer,
                N=N,
                K=K,
                M=M,
                weight_bytes=weight_bytes,
                floor_us=weight_bytes / PEAK_BANDWIDTH_BYTES_PER_S * 1e6,
                torch_us=torch_us,
                torch_gb_per_s=weight_bytes / torch_us / 1e3,
                default_config=list(default),
                default_us=default_us,
                default_error=timed.get("error"),
                default_gb_per_s=weight_bytes / default_us / 1e3 if default_us else None,
                max_abs_diff_vs_fp32=max_abs_diff,
                best_config=best["config"] if best_us else None,
                best_us=best_us,
                best_gb_per_s=weight_bytes / best_us / 1e3 if best_us else None,
                torch_over_best=torch_us / best_us if best_us else None,
                num_swept=len(sweep),
                sweep=sweep,
            )
        )
        print(
            f"  {model} {layer:<12} M={M:<3} torch {torch_us:6.1f} us  default {default_us or math.nan:6.1f} "
            f"us  best {best_us or math.nan:6.1f} us  ({len(sweep)} swept)",
            flush=True,
        )
    del weights, base
    torch.cuda.empty_cache()
    return rows


def _step_ms(group: list[dict[str, Any]], key: str, num_layers: int) -> float | None:
    if any(r[key] is None for r in group):
        return None
    return num_layers * sum(r[key] for r in group) / 1e3


def step_totals(rows: list[dict[str, Any]], model: str, num_layers: int) -> list[dict[str, Any]]:
    """Per M: the sum over one layer's GEMMs, times the number of layers (a decode step's GEMM time)."""
    totals = []
    for M in sorted({r["M"] for r in rows if r["model"] == model}):
        group = [r for r in rows if r["model"] == model and r["M"] == M]
        if len(group) != len(MODELS[model]["shapes"]):
            continue
        totals.append(
            dict(
                model=model,
                M=M,
                num_layers=num_layers,
                torch_ms=_step_ms(group, "torch_us", num_layers),
                default_ms=_step_ms(group, "default_us", num_layers),
                best_ms=_step_ms(group, "best_us", num_layers),
                floor_ms=_step_ms(group, "floor_us", num_layers),
            )
        )
    return totals


def print_tables(rows: list[dict[str, Any]], totals: list[dict[str, Any]]) -> None:
    for model in MODELS:
        model_rows = [r for r in rows if r["model"] == model]
        if not model_rows:
            continue
        print_table(
            f"Qwen3-{model.upper()} layer GEMMs: us per call (CUDA graph, W from HBM), GB/s of weight read",
            [
                "layer",
                "M",
                "floor",
                "torch",
                "default",
                "best",
                "torch GB/s",
                "best GB/s",
                "torch/best",
                "best config",
            ],
            [
                [
                    f"{r['layer']} {r['N']}x{r['K']}",
                    r["M"],
                    r["floor_us"],
                    r["torch_us"],
                    r["default_us"],
                    r["best_us"],
                    r["torch_gb_per_s"],
                    r["best_gb_per_s"],
                    f"{r['torch_over_best']:.2f}x" if r["torch_over_best"] else "-",
                    config_name(r["best_config"]),
                ]
                for r in model_rows
            ],
        )
        model_totals = [t for t in totals if t["model"] == model]
        if model_totals:
            print_table(
                f"Qwen3-{model.upper()} per decode step ({model_totals[0]['num_layers']} layers), ms",
                ["M", "floor", "torch", "default", "best"],
                [
                    [t["M"], *(fmt(t[key], 3) for key in ("floor_ms", "torch_ms", "default_ms", "best_ms"))]
                    for t in model_totals
                ],
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "no CUDA: benchmarks/gemm_decode.py times GPU kernels and needs an NVIDIA GPU; nothing measured"
        )
        return 0
    start = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    props = torch.cuda.get_device_properties(0)
    num_sms = props.multi_processor_count
    smem_limit = getattr(props, "shared_memory_per_block_optin", DEFAULT_SMEM_LIMIT_BYTES)
    model_choice = args.model or ("0.6b" if args.quick else "all")
    models = list(MODELS) if model_choice == "all" else [model_choice]
    mode = "quick" if args.quick else "sweep" if args.sweep else "default"
    timer = Timer(args.rep_ms)
    rows = []
    for model in models:
        for layer, N, K in MODELS[model]["shapes"]:
            rows += bench_shape(timer, args, model, layer, N, K, dtype, num_sms, smem_limit)
    totals = [t for model in models for t in step_totals(rows, model, MODELS[model]["num_layers"])]
    report = dict(
        **run_info(),
        benchmark="gemm_decode",
        settings=dict(
            mode=mode,
            models=models,
            batches=args.m,
            block_m=args.block_m,
            dtype=args.dtype,
            rep_ms=args.rep_ms,
            rotate_mib=args.rotate_mib,
            num_sms=num_sms,
            smem_limit_bytes=smem_limit,
            peak_bandwidth_bytes_per_s=PEAK_BANDWIDTH_BYTES_PER_S,
            timing="triton.testing.do_bench_cudagraph, median; us per call",
        ),
        results=rows,
        step_totals=totals,
        seconds=time.perf_counter() - start,
    )
    path = write_report("gemm_decode", report, args.out)
    print_tables(rows, totals)
    print(f"\nwrote {path} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
