"""How many key ranges decode attention should cut each sequence into: kernel time vs num_splits.

    python benchmarks/decode_splits.py [--out DIR]     # needs a CUDA GPU; without one it says so, exits 0

For kv heads 8 (Qwen3-0.6B/8B) and 4 (Qwen3-8B at TP=2), head_dim 128, bf16, block size 16, and batches of
1-256 sequences whose lengths are all 320, all 1024, or uniform in [200, 2000], time `decode_attention`
at num_splits 1-8: calls captured in a CUDA graph (as a decode step runs it), median of 5 replays.
Prints each case's times next to `default_num_splits` (with max_seq_len 4096, as a graph captures it).

The KV cache is read cold, as in a model: between two attention calls of a step the other layers stream
their weights and caches through L2 (50 MB on an H100). Each case holds several disjoint copies of the
batch's blocks and the graph cycles through them, so that the calls between two reads of one copy move
at least COLD_BYTES. (Timed with the cache hot, as this script did until session 12, small cases read
from L2 and favour splitting: 4 kv heads x 64 sequences x 320 keys, 42 MB, took 15.9 us with two splits
hot and 25.0 us cold.)
"""

from __future__ import annotations

import argparse
import math
import os
import random
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
from nanovllm.kernels.decode_attention import decode_attention, default_num_splits  # noqa: E402

HEAD_DIM, BLOCK_SIZE, MAX_SEQ_LEN = 128, 16, 4096
SPLITS = (1, 2, 3, 4, 6, 8)
COLD_BYTES = 150e6  # K/V bytes other calls read between two reads of one copy: 3 x an H100's L2
MIN_CALLS = 20


def case(num_kv_heads: int, q_per_kv: int, batch: int, lengths: str, num_sms: int) -> dict:
    rng = random.Random(batch)
    lens = [rng.randint(200, 2000) if lengths == "200-2000" else int(lengths) for _ in range(batch)]
    blocks = [math.ceil(n / BLOCK_SIZE) for n in lens]
    kv_bytes = sum(lens) * num_kv_heads * HEAD_DIM * 2 * 2
    copies = 1 + math.ceil(COLD_BYTES / kv_bytes)  # disjoint block sets, cycled through (see the docstring)
    # [num_blocks, block_size, kv heads, head_dim], blocks handed out in a random order (block 0 unused)
    num_blocks = copies * sum(blocks)
    shape = (num_blocks + 1, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    order = (torch.randperm(num_blocks) + 1).to(torch.int32)
    all_tables, used = [], 0
    for _ in range(copies):
        tables = torch.zeros(batch, MAX_SEQ_LEN // BLOCK_SIZE, dtype=torch.int32)  # [batch, max_blocks]
        for i, n in enumerate(blocks):
            tables[i, :n] = order[used : used + n]
            used += n
        all_tables.append(tables.cuda())
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    # q: [batch, num_heads, head_dim]
    q = torch.randn(batch, num_kv_heads * q_per_kv, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    counters = torch.zeros(batch * num_kv_heads, dtype=torch.int32, device="cuda")  # as the model runner's
    default = default_num_splits(batch, num_kv_heads, MAX_SEQ_LEN, num_sms)

    def calls(s: int) -> list:
        return [
            lambda t=t: decode_attention(
                q,
                k_cache,
                v_cache,
                seq_lens,
                t,
                HEAD_DIM**-0.5,
                MAX_SEQ_LEN,
                num_splits=s,
                out=out,
                counters=counters,
            )
            for t in all_tables
        ]

    us = {s: median_graph_us(calls(s), MIN_CALLS) for s in sorted({*SPLITS, default})}
    best = min(us, key=us.get)
    return dict(
        num_kv_heads=num_kv_heads,
        batch=batch,
        lengths=lengths,
        kv_bytes=kv_bytes,
        copies=copies,
        us=us,
        best=best,
        best_gb_per_s=kv_bytes / us[best] / 1e3,
        default=default,
        default_us=us[default],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(DEFAULT_OUT_DIR)), help="folder for the JSON")
    p.add_argument("--batches", default="1,4,16,32,48,64,96,128,192,256")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_splits needs a CUDA GPU; nothing measured.")
        return 0
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = [
        case(kv_heads, q_per_kv, batch, lengths, num_sms)
        for kv_heads, q_per_kv in ((8, 2), (4, 4))
        for batch in (int(b) for b in args.batches.split(","))
        for lengths in ("320", "1024", "200-2000")
    ]
    report = {**run_info(), "args": vars(args), "num_sms": num_sms, "results": results}
    print_table(
        "decode attention, KV cold in L2, us per call (CUDA graph), by num_splits; "
        "default: default_num_splits at 4096",
        ["kv heads", "batch", "lengths", *(f"s={s}" for s in SPLITS), "default", "default us", "best"],
        [
            [
                r["num_kv_heads"],
                r["batch"],
                r["lengths"],
                *(r["us"][s] for s in SPLITS),
                r["default"],
                r["default_us"],
                r["best"],
            ]
            for r in results
        ],
    )
    path = write_report("decode_splits", report, args.out)
    print(f"\n{report['card']}  {report['date']}  commit {report.get('git_commit')}  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
