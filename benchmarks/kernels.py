"""GPU micro-benchmarks for the attention kernels, against PyTorch's FlashAttention-2 (varlen_attn).

  python benchmarks/kernels.py --out DIR

(a) decode_attention: effective bandwidth (bytes of K and V read / median time) for batch 1/16/64/256 x
    context 512/1024/4096 with Qwen3-0.6B heads (16 query heads, 8 kv heads, head_dim 128, bf16), block
    size 16 and 256; varlen_attn on the same decode with contiguous K/V; a small sweep of tile shapes and
    of num_splits around the defaults.
(b) paged_prefill_attention vs varlen_attn on causal prefills: TFLOP/s, ratio, and max |difference|.
(c) qk_norm_rope_store (q/k norm + rope + K/V store in one kernel) vs the unfused Triton ops it replaces,
    at 1, 256 and 4096 tokens, with and without the q/k norm: time in a CUDA graph (the decode step's
    case, no launch overhead) and eagerly.
Writes one JSON file into DIR and prints a table last. Without CUDA it says so and exits 0.
"""

import argparse
import datetime
import inspect
import json
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanovllm.benchmark.common import git_commit  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 8, 128  # Qwen3-0.6B
DTYPE = torch.bfloat16
DECODE_BATCHES = (1, 16, 64, 256)
DECODE_CONTEXTS = (512, 1024, 4096)
BLOCK_SIZES = (16, 256)
# (BLOCK_N, num_warps, num_stages) alternatives tried at the target point, batch 256 x context 1024.
DECODE_CONFIGS = [(32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 3)]
SPLIT_SWEEP = (1, 2, 4, 8, 16, 32)
QKV_TOKENS = (1, 256, 4096)


def load_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        return None, f"varlen_attn unavailable: {exc}"
    extra = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
    return (lambda *args, **kwargs: varlen_attn(*args, **kwargs, **extra)), None


def time_varlen(run, notes: list[str]):
    """varlen_attn's output and median ms, or (None, None) and a note if it cannot run this case."""
    try:
        expected = run()
        return expected, bench_ms(run)
    except Exception as exc:  # e.g. an older torch without GQA support: keep measuring our kernels
        note = f"varlen_attn failed: {exc!r}"[:300]
        if note not in notes:
            notes.append(note)
        return None, None


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def paged_cache(keys, values, seq_lens, block_size, gen):
    """Scatter contiguous per-token K/V into a cache whose blocks are handed out in shuffled order."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    slots, first = [], 0
    for i, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        block_tables[i, :nb] = order[first : first + nb]
        pos = torch.arange(n)
        slots.append(block_tables[i, pos // block_size].long() * block_size + pos % block_size)
        first += nb
    slots = torch.cat(slots).cuda()
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.empty(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.empty(shape, dtype=DTYPE, device="cuda")
    k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = keys
    v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)[slots] = values
    return k_cache, v_cache, block_tables.cuda()


def bench_decode(varlen_attn, notes):
    from nanovllm.kernels import decode_attention as dec

    scale = HEAD_DIM**-0.5
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator().manual_seed(0)
    rows, sweeps = [], []
    for batch in DECODE_BATCHES:
        for ctx in DECODE_CONTEXTS:
            q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
            keys = torch.randn(batch * ctx, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
            values = torch.randn_like(keys)
            kv_bytes = 2 * keys.numel() * keys.element_size()
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            expected, varlen_ms = None, None
            if varlen_attn is not None:
                cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
                cu_k = torch.arange(0, batch * ctx + 1, ctx, dtype=torch.int32, device="cuda")
                run = partial(
                    varlen_attn, q, keys, values, cu_q, cu_k, 1, ctx, scale=scale, window_size=(-1, 0)
                )
                expected, varlen_ms = time_varlen(run, notes)
            for block_size in BLOCK_SIZES:
                k_cache, v_cache, tables = paged_cache(keys, values, [ctx] * batch, block_size, gen)
                run = partial(dec.decode_attention, q, k_cache, v_cache, seq_lens, tables, scale, ctx)
                ms = bench_ms(run)
                rows.append(
                    dict(
                        batch=batch,
                        context=ctx,
                        block_size=block_size,
                        num_splits=dec.default_num_splits(batch, NUM_KV_HEADS, ctx, num_sms),
                        kv_bytes=kv_bytes,
                        ms=ms,
                        gb_per_s=kv_bytes / ms / 1e6,
                        varlen_ms=varlen_ms,
                        varlen_gb_per_s=kv_bytes / varlen_ms / 1e6 if varlen_ms else None,
                        max_abs_diff_vs_varlen=max_abs_diff(run(), expected),
                    )
                )
                if batch == 256 and ctx == 1024:
                    sweeps += sweep_decode_configs(dec, run, block_size, kv_bytes)
                if batch in (1, 16) and ctx == 4096:
                    for num_splits in SPLIT_SWEEP:
                        t = bench_ms(partial(run, num_splits=num_splits))
                        sweeps.append(
                            dict(
                                kind="num_splits",
                                batch=batch,
                                context=ctx,
                                block_size=block_size,
                                num_splits=num_splits,
                                ms=t,
                                gb_per_s=kv_bytes / t / 1e6,
                            )
                        )
    return rows, sweeps


def sweep_decode_configs(dec, run, block_size, kv_bytes):
    """Time `run` under other tile shapes by swapping the module's launch constants."""
    saved = dec.DECODE_BLOCK_N, dec.DECODE_NUM_WARPS, dec.DECODE_NUM_STAGES
    results = []
    try:
        for config in DECODE_CONFIGS:
            dec.DECODE_BLOCK_N, dec.DECODE_NUM_WARPS, dec.DECODE_NUM_STAGES = config
            result = dict(kind="config", batch=256, context=1024, block_size=block_size, config=list(config))
            try:
                ms = bench_ms(run)
                result.update(ms=ms, gb_per_s=kv_bytes / ms / 1e6)
            except Exception as exc:  # e.g. out of shared memory for this shape: record it and go on
                result.update(error=repr(exc)[:300])
            results.append(result)
    finally:
        dec.DECODE_BLOCK_N, dec.DECODE_NUM_WARPS, dec.DECODE_NUM_STAGES = saved
    return results


def bench_prefill(varlen_attn, notes):
    from nanovllm.kernels.paged_attention import (
        paged_prefill_attention,
        prefill_tile_tokens,
        prefill_work_items,
    )

    scale = HEAD_DIM**-0.5
    gen = torch.Generator().manual_seed(0)
    cases = {
        "16x1024": [1024] * 16,
        "4x4096": [4096] * 4,
        # Like the throughput benchmark's prefill: 256 prompts of 100..1024 tokens.
        "256x[100,1024]": torch.randint(100, 1025, (256,), generator=gen).tolist(),
    }
    rows = []
    for name, lens in cases.items():
        total, max_len = sum(lens), max(lens)
        q = torch.randn(total, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        keys = torch.randn(total, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        values = torch.randn_like(keys)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        flops = sum(4 * NUM_HEADS * HEAD_DIM * n * (n + 1) // 2 for n in lens)  # causal QK^T and PV
        expected, varlen_ms = None, None
        if varlen_attn is not None:
            run = partial(
                varlen_attn, q, keys, values, cu, cu, max_len, max_len, scale=scale, window_size=(-1, 0)
            )
            expected, varlen_ms = time_varlen(run, notes)
        # The work list, built on the host as the engine does with each step's inputs (not timed).
        items = prefill_work_items(np.array(lens), prefill_tile_tokens(NUM_HEADS, NUM_KV_HEADS))
        work = tuple(torch.from_numpy(a).cuda() for a in items)
        for block_size in BLOCK_SIZES:
            k_cache, v_cache, tables = paged_cache(keys, values, lens, block_size, gen)
            run = partial(
                paged_prefill_attention,
                q,
                k_cache,
                v_cache,
                cu,
                seq_lens,
                tables,
                max_len,
                max_len,
                scale,
                work=work,
            )
            ms = bench_ms(run)
            rows.append(
                dict(
                    case=name,
                    num_tokens=total,
                    block_size=block_size,
                    flops=flops,
                    ms=ms,
                    tflop_per_s=flops / ms / 1e9,
                    varlen_ms=varlen_ms,
                    varlen_tflop_per_s=flops / varlen_ms / 1e9 if varlen_ms else None,
                    ours_over_varlen=varlen_ms / ms if varlen_ms else None,
                    max_abs_diff_vs_varlen=max_abs_diff(run(), expected),
                )
            )
    return rows


def max_abs_diff(out, expected):
    return None if expected is None else (out.float() - expected.float()).abs().max().item()


def bench_store():
    from nanovllm.kernels.store_kvcache import store_kvcache

    num_tokens, block_size = 16384, 16
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    value = torch.randn_like(key)
    num_blocks = 2 * num_tokens // block_size
    k_cache = torch.empty(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    ms = bench_ms(lambda: store_kvcache(key, value, k_cache, v_cache, slots))
    moved = 4 * key.numel() * key.element_size()  # read K and V, write them
    return dict(num_tokens=num_tokens, ms=ms, gb_per_s=moved / ms / 1e6)


def unfused_norm_rope_store(
    qkv, positions, cos_sin_cache, k_cache, v_cache, slots, num_heads, q_norm_weight=None, k_norm_weight=None
):
    """What qk_norm_rope_store replaced on the Triton path: the split views, (the two strided-row copies and
    two rms_norm launches), rope, store_kvcache."""
    from nanovllm.kernels.rmsnorm import rms_norm_triton
    from nanovllm.kernels.rope import apply_rope_triton
    from nanovllm.kernels.store_kvcache import store_kvcache

    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(-1, num_heads, head_dim)
    k = k.view(-1, num_kv_heads, head_dim)
    v = v.view(-1, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q, k = rms_norm_triton(q, q_norm_weight, 1e-6), rms_norm_triton(k, k_norm_weight, 1e-6)
    q, k = apply_rope_triton(q, k, cos_sin_cache, positions)
    store_kvcache(k, v, k_cache, v_cache, slots)
    return q


def bench_qk_norm_rope_store():
    from triton.testing import do_bench_cudagraph

    from nanovllm.kernels.qk_norm_rope_store import qk_norm_rope_store
    from nanovllm.layers.rotary_embedding import get_rope

    width = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    cos_sin_cache = get_rope(HEAD_DIM, 8192, {"rope_type": "default", "rope_theta": 1e6}).cos_sin_cache.cuda()
    norm = dict(
        q_norm_weight=1 + 0.1 * torch.randn(HEAD_DIM, dtype=DTYPE, device="cuda"),
        k_norm_weight=1 + 0.1 * torch.randn(HEAD_DIM, dtype=DTYPE, device="cuda"),
    )
    rows = []
    for num_tokens in QKV_TOKENS:
        block_size, num_blocks = 16, 2 * num_tokens // 16 + 1
        k_cache = torch.empty(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        args = (
            torch.randn(num_tokens, width, dtype=DTYPE, device="cuda"),  # qkv
            torch.randint(0, 8192, (num_tokens,), device="cuda"),  # positions
            cos_sin_cache,
            k_cache,
            torch.empty_like(k_cache),  # v_cache
            torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens],  # slots
            NUM_HEADS,
        )
        moved = 2 * num_tokens * width * k_cache.element_size()  # read qkv, write q, k and v
        for qk_norm in (True, False):
            fused = partial(qk_norm_rope_store, *args, **(norm if qk_norm else {}))
            unfused = partial(unfused_norm_rope_store, *args, **(norm if qk_norm else {}))
            times = {}
            for name, fn in (("fused", fused), ("unfused", unfused)):
                fn()  # compile outside the graph capture
                times[name + "_graph_ms"] = do_bench_cudagraph(fn, rep=50, return_mode="median")
                times[name + "_eager_ms"] = bench_ms(fn)
            rows.append(
                dict(
                    num_tokens=num_tokens,
                    qk_norm=qk_norm,
                    bytes_moved=moved,
                    **times,
                    fused_graph_gb_per_s=moved / times["fused_graph_ms"] / 1e6,
                    speedup_graph=times["unfused_graph_ms"] / times["fused_graph_ms"],
                    max_abs_diff_q=max_abs_diff(fused(), unfused()),
                )
            )
    return rows


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_tables(result):
    print(f"\n{result['card']}  {result['date']}  commit {result['git_commit']}")
    print("\ndecode (bf16, 16/8 heads, head_dim 128): GB/s of K+V read")
    print("batch   ctx block splits       us    GB/s varlen GB/s  max diff")
    for r in result["decode"]:
        print(
            f"{r['batch']:>5} {r['context']:>5} {r['block_size']:>5} {r['num_splits']:>6} "
            f"{r['ms'] * 1e3:>8.1f} {r['gb_per_s']:>7.0f} {fmt(r['varlen_gb_per_s'], '.0f'):>11} "
            f"{fmt(r['max_abs_diff_vs_varlen'], '.4f'):>9}"
        )
    configs = [s for s in result["decode_sweeps"] if s["kind"] == "config" and "gb_per_s" in s]
    if configs:
        print("\ndecode tile sweep at batch 256 x ctx 1024 (BLOCK_N, num_warps, num_stages): GB/s")
        for s in configs:
            print(f"  block {s['block_size']:>3}  {tuple(s['config'])}  {s['gb_per_s']:.0f}")
    splits = [s for s in result["decode_sweeps"] if s["kind"] == "num_splits"]
    if splits:
        print("\ndecode num_splits sweep (batch, ctx, block): num_splits=GB/s")
        for key in sorted({(s["batch"], s["context"], s["block_size"]) for s in splits}):
            cells = [
                f"{s['num_splits']}={s['gb_per_s']:.0f}"
                for s in splits
                if (s["batch"], s["context"], s["block_size"]) == key
            ]
            print(f"  {key}: " + "  ".join(cells))
    print("\nprefill (causal, bf16): TFLOP/s")
    print("           case block      ms   ours varlen  ratio  max diff")
    for r in result["prefill"]:
        print(
            f"{r['case']:>15} {r['block_size']:>5} {r['ms']:>7.3f} {r['tflop_per_s']:>6.1f} "
            f"{fmt(r['varlen_tflop_per_s'], '.1f'):>6} {fmt(r['ours_over_varlen'], '.2f'):>6} "
            f"{fmt(r['max_abs_diff_vs_varlen'], '.4f'):>9}"
        )
    print(f"\nstore_kvcache: {result['store']['gb_per_s']:.0f} GB/s (read + write)")
    print("\nqk_norm_rope_store vs unfused norm/rope/store (bf16, block 16): us in a CUDA graph | eager")
    print("tokens qk_norm   fused unfused speedup | fused unfused  fused GB/s  max diff q")
    for r in result["qk_norm_rope_store"]:
        print(
            f"{r['num_tokens']:>6} {str(r['qk_norm']):>7} {r['fused_graph_ms'] * 1e3:>7.1f} "
            f"{r['unfused_graph_ms'] * 1e3:>7.1f} {r['speedup_graph']:>6.2f}x | "
            f"{r['fused_eager_ms'] * 1e3:>5.1f} {r['unfused_eager_ms'] * 1e3:>7.1f} "
            f"{r['fused_graph_gb_per_s']:>11.0f} {r['max_abs_diff_q']:>11.4f}"
        )
    if result["notes"]:
        print("notes: " + "; ".join(result["notes"]))


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    default_out = os.environ.get("OUT", "benchmarks/results")
    parser.add_argument(
        "--out", default=default_out, help="folder for the JSON (default $OUT or %(default)s)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA: the kernel benchmarks need an NVIDIA GPU; nothing was measured")
        return 0

    varlen_attn, note = load_varlen_attn()
    result = dict(
        benchmark="kernels",
        card=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        workload=dict(num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, dtype=str(DTYPE)),
        notes=[note] if note else [],
    )
    result["decode"], result["decode_sweeps"] = bench_decode(varlen_attn, result["notes"])
    result["prefill"] = bench_prefill(varlen_attn, result["notes"])
    result["store"] = bench_store()
    result["qk_norm_rope_store"] = bench_qk_norm_rope_store()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = "".join(c if c.isalnum() else "-" for c in result["card"]).strip("-")
    path = out_dir / f"kernels-{card}-{result['date'][:10]}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
