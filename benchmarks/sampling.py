"""The engine's sampling kernels (nanovllm/kernels/sampling.py) timed on a real vocabulary, beside the plain
PyTorch way to sample (fp32 softmax, then torch.multinomial).

    python benchmarks/sampling.py [--out DIR] [--batches 1,16,64,128,256]   # needs a CUDA GPU; without one it
                                                                            # says so, exits 0

bf16 logits [batch, 151936] (Qwen3's vocabulary), temperature 0.6, flat (randn * 0.5: the random-weight
benchmark's rows, every tile in play) and peaked (randn * 8: a trained model's), each call captured MIN_CALLS
times in one CUDA graph (as a decode step runs it), median of 5 replays. The logits stay hot in L2 where they
fit (up to batch ~128 on an H100). GB/s is the logits' bytes over the time: reading them once at the card's
bandwidth is the floor. On flat logits it also times the split kernel's grid at SPLIT_SWEEP column ranges per
row beside the default (`gumbel_argmax_triton`'s num_splits: at batch 256 the default, 3, makes 768 programs
for 528 slots, 1.45 waves). Prints tables and writes sampling-<card>-<date>.json.

Session 21 (H200, 87df15e) timed the two-level kernels against the kernel before them (Gumbel noise for every
logit): 45.7 vs 113.0 us at batch 256, 20.7 vs 57.6 at 128, 6.0 vs 5.2 at 1
(benchmarks/results/sampler_tiles-nvidia-h200-2026-11-28-160838.json).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from nanovllm.benchmark.common import (  # noqa: E402
    DEFAULT_OUT_DIR,
    median_graph_us,
    print_table,
    run_info,
    write_report,
)
from nanovllm.kernels.sampling import gumbel_argmax_triton  # noqa: E402

VOCAB_SIZE = 151_936
TEMPERATURE = 0.6
MIN_CALLS = 20
SPLIT_SWEEP = (1, 2, 3, 4, 6, 8, 16)
SPREAD = {"flat": 0.5, "peaked": 8.0}  # std of the logits


def torch_sample(logits: torch.Tensor, inv_t: torch.Tensor) -> torch.Tensor:  # [B] int64
    probs = torch.softmax(logits.float() * inv_t[:, None], dim=-1)
    return torch.multinomial(probs, 1).squeeze(1)


def timing_case(kind: str, batch: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(batch)
    # logits: [batch, VOCAB_SIZE] bf16
    logits = (torch.randn(batch, VOCAB_SIZE, generator=gen, device="cuda") * SPREAD[kind]).to(torch.bfloat16)
    inv_t = torch.full((batch,), 1 / TEMPERATURE, device="cuda")
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=gen, device="cuda")
    kernel_us = median_graph_us([lambda: gumbel_argmax_triton(logits, inv_t, seeds)], MIN_CALLS)
    try:
        torch_us = median_graph_us([lambda: torch_sample(logits, inv_t)], MIN_CALLS)
    except RuntimeError as exc:  # a torch whose multinomial cannot be captured: still time the kernels
        print(f"torch baseline not timed at batch {batch}: {exc!r}"[:300])
        torch_us = None
    logit_bytes = logits.numel() * logits.element_size()
    splits_us = {}
    if kind == "flat":
        for n in SPLIT_SWEEP:
            splits_us[n] = median_graph_us(
                [lambda n=n: gumbel_argmax_triton(logits, inv_t, seeds, num_splits=n)], MIN_CALLS
            )
    return dict(
        logits=kind,
        batch=batch,
        kernel_us=kernel_us,
        torch_us=torch_us,
        speedup=torch_us / kernel_us if torch_us else None,
        kernel_gb_per_s=logit_bytes / kernel_us / 1e3,
        splits_us=splits_us,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(DEFAULT_OUT_DIR)), help="folder for the JSON")
    p.add_argument("--batches", default="1,16,64,128,256")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("sampling needs a CUDA GPU; nothing measured.")
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    timings = [timing_case(kind, batch) for kind in SPREAD for batch in batches]
    report = {**run_info(), "args": vars(args), "vocab_size": VOCAB_SIZE, "temperature": TEMPERATURE}
    report["timings"] = timings
    print_table(
        f"sampling bf16 logits [batch, {VOCAB_SIZE}], temperature {TEMPERATURE}: us per call (CUDA graph, "
        "median); torch = fp32 softmax + multinomial",
        ["logits", "batch", "kernels us", "torch us", "speedup", "kernels GB/s"],
        [
            [t["logits"], t["batch"], t["kernel_us"], t["torch_us"], t["speedup"], t["kernel_gb_per_s"]]
            for t in timings
        ],  # fmt: skip
    )
    swept = [t for t in timings if t["splits_us"]]
    print_table(
        "flat logits: us per call at num_splits (column ranges per row; the default above)",
        ["batch", "default", *[str(n) for n in SPLIT_SWEEP]],
        [[t["batch"], t["kernel_us"], *t["splits_us"].values()] for t in swept],
    )
    path = write_report("sampling", report, args.out)
    print(f"\n{report['card']}  {report['date']}  commit {report.get('git_commit')}  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
