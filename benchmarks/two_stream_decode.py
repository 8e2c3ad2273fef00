"""Decode CUDA graphs with the batch in one piece vs cut in two halves on two streams (what the model runner
does from TWO_STREAM_MIN_BATCH to TWO_STREAM_MAX_BATCH sequences for a model of at most
TWO_STREAM_MAX_WEIGHT_BYTES; any model can be measured here): GPU time per replay, embedding to LM head.

    PYTHONPATH=. python benchmarks/two_stream_decode.py [--batches 16,32,64] [--ctx 800,2000] [--out DIR]

Each batch gets random context lengths in --ctx on blocks of its own; both graphs are captured through
the engine's own `CudaGraphs.decode_forward` (engine/cuda_graphs.py; `DecodeStep.two_stream_sizes` set for
the one size) and replayed on the same inputs.
"""

from __future__ import annotations

import argparse
import random
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanovllm import LLM  # noqa: E402
from nanovllm.benchmark.common import graph_replay_ms, run_info, write_report  # noqa: E402
from nanovllm.engine.cuda_graphs import CudaGraphs, capture  # noqa: E402
from nanovllm.kernels.backend import kernel_backend  # noqa: E402


def stage(graphs: CudaGraphs, block_size: int, lens: list[int], rng: random.Random) -> None:
    """Sequence i of the batch at context lens[i] on blocks of its own; its new token is the last one."""
    b, bs, size = graphs.decode_bufs, block_size, len(lens)
    per_seq = -(-max(lens) // bs)
    tables = torch.arange(size * per_seq, dtype=torch.int32).view(size, per_seq)  # [size, per_seq]
    b["block_tables"][:size].zero_()
    b["block_tables"][:size, :per_seq] = tables
    last = torch.tensor(lens) - 1  # [size]
    b["slot_mapping"][:size] = tables[torch.arange(size), last // bs].long() * bs + last % bs
    b["seq_lens"][:size] = torch.tensor(lens, dtype=torch.int32)
    b["positions"][:size] = last
    b["input_ids"][:size] = torch.tensor([rng.randrange(10000) for _ in lens])


def capture_one(graphs: CudaGraphs, size: int, halves: bool) -> torch.cuda.CUDAGraph:
    """The decode graph of `size` sequences, cut in two halves or not, into its own memory pool."""
    step = graphs.decode_step
    saved = step.two_stream_sizes
    step.two_stream_sizes = range(size, size + 1) if halves else range(0)
    try:
        with kernel_backend(graphs.config.kernel_backend), torch.inference_mode():
            return capture(partial(graphs.decode_forward, size), None)
    finally:
        step.two_stream_sizes = saved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batches", default="16,32,48,64,80,96,112,128,192,256")
    p.add_argument("--ctx", default="800,2000", help="context lengths drawn from this range")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", default="out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("two_stream_decode needs a CUDA GPU (it times CUDA graphs)", file=sys.stderr)
        return 1
    sizes = [int(s) for s in args.batches.split(",")]
    if not all(2 <= s <= 512 for s in sizes):
        p.error(f"--batches must be in 2..512 (the most a decode graph holds), got {sizes}")
    lo, hi = map(int, args.ctx.split(","))
    llm = LLM(args.model, max_model_len=max(4096, hi), max_num_seqs=max(sizes), block_size=16,
              num_kvcache_blocks=max(sizes) * -(-hi // 16))  # fmt: skip
    runner, rng = llm.engine.runner, random.Random(0)
    graphs = runner.cuda_graphs
    if runner.decode.side_stream is None:  # the engine cuts no batch of this model (or the limit is off)
        runner.decode.side_stream = torch.cuda.Stream(runner.device)
    rows = {}
    for size in sizes:
        stage(graphs, runner.block_size, [rng.randint(lo, hi) for _ in range(size)], rng)
        row, argmax = {}, {}
        for name, halves in (("one_piece", False), ("two_halves", True)):
            graph = capture_one(graphs, size, halves)
            for _ in range(3):
                graph.replay()
            row[f"{name}_ms"] = graph_replay_ms(graph, args.replays)
            argmax[name] = graphs.decode_bufs["logits"][:size].argmax(-1)  # [size]
            del graph
        row["two_halves_vs_one_piece"] = row["two_halves_ms"] / row["one_piece_ms"]
        # (each half's matmuls have another shape: bf16 rounding differs, and on random weights near-tied
        # logits can swap)
        row["argmax_agreement"] = (argmax["one_piece"] == argmax["two_halves"]).float().mean().item()
        rows[size] = row
    llm.shutdown()
    report = {"benchmark": "two_stream_decode", **run_info(), "model": args.model, "ctx": [lo, hi]}
    report["batches"] = rows
    path = write_report(f"two_stream_decode-{args.model}", report, Path(args.out))
    print(f"{'batch':>5}  {'one piece ms':>12}  {'two halves ms':>13}  {'ratio':>6}  argmax agreement")
    for size, r in rows.items():
        print(f"{size:>5}  {r['one_piece_ms']:>12.3f}  {r['two_halves_ms']:>13.3f}  "
              f"{r['two_halves_vs_one_piece']:>6.3f}  {r['argmax_agreement']:.3f}")  # fmt: skip
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
