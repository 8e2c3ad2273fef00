"""A decode-sized matmul in Gluon whose weight loads start before the PDL wait, against cuBLAS (H100).

    python benchmarks/gluon_decode_matmul.py [--quick] [--compile-only] [--out DIR]

An experimental kernel, NOT used by the engine: the next step for issue #8 (per-kernel matmul cost), asking
how much of a decode matmul's time a kernel can hide by streaming its weights while the previous kernel
finishes. y[M, N] = x[M, K] @ W[N, K]^T, swap-AB, Hopper only (TMA + mbarrier + async wgmma), launched with
programmatic dependent launch (PDL):

  each program (t, s) owns W rows [64 t, 64 t + 64) and K chunks [s NUM_K, (s + 1) NUM_K) of 64 columns.
  1. it issues TMA loads of its WHOLE weight slice (NUM_K chunks of [64, 64] bf16) into shared memory BEFORE
     griddepcontrol.wait: weights are never written by the kernel before, so their stream overlaps that
     kernel's tail;
  2. griddepcontrol.wait, then griddepcontrol.launch_dependents (the next kernel may start its own weights);
  3. x chunks [MP, 64] come by TMA (rows >= M zero-filled by TMA) through a ring of X_STAGES buffers;
  4. acc[64, MP] += W_chunk[64, 64] @ x_chunk[MP, 64]^T with async wgmma (B = transposed smem view of x);
  5. split_k == 1: store acc^T into y (masked). split_k > 1: fp32 partial to a workspace, CTA barrier, acq_rel
     atomic count per N tile; the last program to arrive sums all partials in split order (deterministic),
     writes bf16 y and resets the count to 0.

On a CUDA GPU (an H100): every config is compiled in --workers processes first (triton's on-disk cache), then
checked against an fp32 matmul (3 calls each, the split-K counts back to 0 after), then timed as chains of
every layer's matmuls (Qwen3-0.6B, 28 layers, and Qwen3-8B TP=2 shapes, 36 layers) captured in one CUDA
graph, fastest of 3 x 20 replays, per layer: cuBLAS (F.linear), this kernel with 112 KB of shared memory a
program with and without PDL, and with 220 KB; then each matmul alone with the split variants (--quick: the
automatic plan only). A watchdog writes what it has and exits 3 if a stage stalls 90 s (a hung mbarrier) or
the run passes --budget-s + 30 s; after --budget-s the remaining benchmarks are skipped. Exits 1 if any check
failed or was skipped. Without a GPU it says so and exits 0, writing nothing.
--compile-only needs no GPU: compiles every (shape, M, variant) for sm_90 on the CPU and reports split,
NUM_K, X_STAGES, shared memory, registers, stack and whether every weight TMA load precedes the PDL wait in
the SASS (needs TRITON_INTERPRET unset).

Session 14, H100 (benchmarks/results/gluon_decode_matmul-nvidia-h100-80gb-hbm3-2026-11-28-0428.json): per
Qwen3-0.6B layer (four matmuls, a 28-layer chain in a CUDA graph) cuBLAS takes 25.2 / 26.3 / 28.5 / 32.6 us at
16 / 64 / 128 / 256 rows; this kernel 22.8 / 34.5 / 46.8 / 84.2 us with 112 KB of shared memory a program and
20.7 / 30.5 / 36.7 / 58.9 us with 220 KB. On Qwen3-8B TP=2 shapes cuBLAS takes 81 / 81 / 84 / 97 us, the
kernel 90 / 131 / 198 / 284 us (best variant). The best config of each matmul alone at 64 rows on 0.6B sums
to ~23.6 us vs cuBLAS 27.1. One mbarrier per W chunk instead of one for the slice (DLIN_W_ONE_BAR=0) made no
difference. All 100 correctness checks passed.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

from nanovllm.benchmark.common import DEFAULT_OUT_DIR, print_table, run_info, write_report  # noqa: E402
from nanovllm.benchmark.common import graph_replay_ms as _graph_replay_ms  # noqa: E402
from nanovllm.benchmark.kernel_audit import cuda_tool, resource_usage  # noqa: E402

BLOCK_N = 64  # W rows per program = wgmma M of one warpgroup (4 warps)
BLOCK_K = 64  # K per chunk: 64 bf16 = 128 bytes = one 128B-swizzled TMA box row
NUM_WARPS = 4
NUM_SMS = 132  # H100 SXM
# Shared memory per program. 112 KB (default) leaves room on the SM (228 KB, 1 KB reserved per block) for a
# program of the NEXT kernel, which PDL lets start its weight stream while this one finishes; 220 KB (the H100
# per-block max is 227 KB) gives the largest W slices, one program per SM. DLIN_SMEM_KB overrides the default.
SMEM_KB = int(os.environ.get("DLIN_SMEM_KB", "112"))
SMEM_KB_BIG = 220
MAX_SMEM_PER_BLOCK_BYTES = 227 * 1024  # H100
W_CHUNK_BYTES = BLOCK_N * BLOCK_K * 2
W_ONE_BAR_DEFAULT = os.environ.get("DLIN_W_ONE_BAR", "1") == "1"  # one mbarrier for the whole W slice

# model -> (layers, {matmul: (N, K)})
SHAPES = {
    "qwen3-0.6b": (28, {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024),
                        "down": (1024, 3072)}),
    "qwen3-8b-tp2": (36, {"qkv": (3072, 4096), "o": (4096, 2048), "gate_up": (12288, 4096),
                          "down": (4096, 6144)}),
}  # fmt: skip
ROWS = (16, 64, 128, 256)
# extra M checked for correctness only: x rows past M come from TMA's zero fill
ODD_ROWS = {("qwen3-0.6b", "qkv"): (1, 100), ("qwen3-0.6b", "o"): (5,), ("qwen3-8b-tp2", "down"): (37,)}


# ---- PDL primitives (same PTX as triton.language.extra.cuda.gdc_wait / gdc_launch_dependents) --------------


@gluon.jit
def _gdc_wait():
    # waits until the previous grid has completed and its memory is visible; a no-op without PDL
    gl.inline_asm_elementwise(
        "griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
    )


@gluon.jit
def _gdc_launch_dependents():
    # lets the next grid (launched with PDL) start once every program of this grid got here (or exited)
    gl.inline_asm_elementwise(
        "griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1
    )


# ---- kernel ------------------------------------------------------------------------------------------------


@gluon.jit
def _dlin_kernel(
    w_desc,  # TMA descriptor on W [N, K] bf16, block [BLOCK_N, BLOCK_K]
    x_desc,  # TMA descriptor on x [M, K] bf16, block [MP, BLOCK_K] (rows >= M read as 0)
    y_ptr,  # y [M, N] bf16, contiguous
    part_ptr,  # fp32 workspace [n_tiles, SPLIT_K, MP, BLOCK_N] (unused when SPLIT_K == 1)
    count_ptr,  # int32 [n_tiles] arrival counts, all 0 between calls (unused when SPLIT_K == 1)
    M,
    N,
    SPLIT_K: gl.constexpr,
    NUM_K: gl.constexpr,
    X_STAGES: gl.constexpr,
    MP: gl.constexpr,
    RED_ROWS: gl.constexpr,
    USE_PDL: gl.constexpr,
    W_ONE_BAR: gl.constexpr,
):
    BN: gl.constexpr = w_desc.block_type.shape[0]  # 64
    BK: gl.constexpr = w_desc.block_type.shape[1]  # 64
    gl.static_assert(x_desc.block_type.shape[0] == MP)
    gl.static_assert(x_desc.block_type.shape[1] == BK)
    gl.static_assert(X_STAGES <= NUM_K)

    tile = gl.program_id(0)
    split = gl.program_id(1)
    n0 = tile * BN
    k0 = split * (NUM_K * BK)

    # shared memory: the whole W slice, a ring of x chunks, their mbarriers
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [NUM_K, BN, BK], w_desc.layout)  # NUM_K x [64, 64]
    x_smem = gl.allocate_shared_memory(x_desc.dtype, [X_STAGES, MP, BK], x_desc.layout)  # X_STAGES x [MP, 64]
    # W_ONE_BAR: one mbarrier (expect-tx of the whole slice) for all W chunks, else one per chunk. Gluon puts
    # a CTA barrier around every mbarrier init / expect / TMA issue, so fewer barriers = fewer bar.syncs.
    W_BARS: gl.constexpr = 1 if W_ONE_BAR else NUM_K
    w_bar = gl.allocate_shared_memory(gl.int64, [W_BARS, 1], mbarrier.MBarrierLayout())
    x_bar = gl.allocate_shared_memory(gl.int64, [X_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(W_BARS):
        mbarrier.init(w_bar.index(i), count=1)
    for i in gl.static_range(X_STAGES):
        mbarrier.init(x_bar.index(i), count=1)

    # 1. weights: all in flight before the PDL wait. A box partly past N or K is zero-filled by TMA and still
    #    counts its full bytes; plan() never makes a box wholly past K.
    if W_ONE_BAR:
        mbarrier.expect(w_bar.index(0), NUM_K * w_desc.block_type.nbytes)
        for i in gl.static_range(NUM_K):
            tma.async_copy_global_to_shared(w_desc, [n0, k0 + i * BK], w_bar.index(0), w_smem.index(i))
    else:
        for i in gl.static_range(NUM_K):
            mbarrier.expect(w_bar.index(i), w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc, [n0, k0 + i * BK], w_bar.index(i), w_smem.index(i))

    # 2. only now depend on the previous kernel (it may still be writing x)
    if USE_PDL:
        _gdc_wait()
        _gdc_launch_dependents()

    # 3. activations: prefetch the first X_STAGES chunks
    for i in gl.static_range(X_STAGES):
        mbarrier.expect(x_bar.index(i), x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [0, k0 + i * BK], x_bar.index(i), x_smem.index(i))

    # 4. acc[64, MP] = sum_i W_i[64, 64] @ x_i[MP, 64]^T
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, MP, 16]
    )
    acc = gl.zeros([BN, MP], gl.float32, layout=mma_layout)  # [64, MP]
    for i in gl.static_range(NUM_K):
        # (constexpr names can't be rebound inside static_range: index expressions are inlined)
        if W_ONE_BAR:
            if i == 0:
                mbarrier.wait(w_bar.index(0), 0)
        else:
            mbarrier.wait(w_bar.index(i), 0)
        mbarrier.wait(x_bar.index(i % X_STAGES), (i // X_STAGES) & 1)
        acc = warpgroup_mma(w_smem.index(i), x_smem.index(i % X_STAGES).permute((1, 0)), acc, is_async=True)
        if i >= 1 and i - 1 + X_STAGES < NUM_K:
            # wgmma i-1 is done with x buffer (i-1) % X_STAGES: refill it with chunk i-1+X_STAGES
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.expect(x_bar.index((i - 1) % X_STAGES), x_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                x_desc,
                [0, k0 + (i - 1 + X_STAGES) * BK],
                x_bar.index((i - 1) % X_STAGES),
                x_smem.index((i - 1) % X_STAGES),
            )
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(W_BARS):
        mbarrier.invalidate(w_bar.index(i))
    for i in gl.static_range(X_STAGES):
        mbarrier.invalidate(x_bar.index(i))

    # 5. epilogue: acc[i, j] is y[j, n0 + i]
    rows_i = gl.arange(0, BN, layout=gl.SliceLayout(1, mma_layout))  # [64]  W row in tile (y column)
    cols_j = gl.arange(0, MP, layout=gl.SliceLayout(0, mma_layout))  # [MP]  x row (y row)
    if SPLIT_K == 1:
        y_offs = cols_j[None, :] * N + (n0 + rows_i)[:, None]  # [64, MP]
        y_mask = (cols_j[None, :] < M) & ((n0 + rows_i)[:, None] < N)
        gl.store(y_ptr + y_offs, acc.to(gl.bfloat16), mask=y_mask)
    else:
        # partial [MP, 64] (transposed: contiguous along the W row) at part[tile, split]
        TILE: gl.constexpr = MP * BN
        part = part_ptr + tile * (SPLIT_K * TILE)
        gl.store(part + split * TILE + cols_j[None, :] * BN + rows_i[:, None], acc)
        gl.thread_barrier()
        done = gl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT_K - 1:
            # last program of this N tile: y[j, n0 + i] = sum_s part[s, j, i], in split order
            gl.store(count_ptr + tile, 0)
            red_layout: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])  # [RED_ROWS, 64]
            rj = gl.arange(0, RED_ROWS, layout=gl.SliceLayout(1, red_layout))
            ri = gl.arange(0, BN, layout=gl.SliceLayout(0, red_layout))
            for c in gl.static_range(MP // RED_ROWS):
                j = c * RED_ROWS + rj  # [RED_ROWS]
                loc = j[:, None] * BN + ri[None, :]  # [RED_ROWS, 64]
                total = gl.load(part + loc, volatile=True)  # [RED_ROWS, 64] fp32
                for sk in range(1, SPLIT_K):  # a loop, not unrolled (SPLIT_K can be 48)
                    total += gl.load(part + sk * TILE + loc, volatile=True)
                mask = (j[:, None] < M) & ((n0 + ri)[None, :] < N)
                gl.store(y_ptr + j[:, None] * N + (n0 + ri)[None, :], total.to(gl.bfloat16), mask=mask)


# ---- host side ---------------------------------------------------------------------------------------------

W_LAYOUT = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.bfloat16)


def x_layout(mp: int):
    return gl.NVMMASharedLayout.get_default_for([mp, BLOCK_K], gl.bfloat16)


def plan(n: int, k: int, m: int, split: int | None = None, smem_kb: int | None = None) -> dict[str, int]:
    """-> dict(mp, n_tiles, split, num_k, x_stages, smem_kb, smem_est). split=None: about NUM_SMS programs.
    split is always a divisor of the number of K chunks (so no program gets a TMA box wholly past K, which
    could leave an mbarrier's expect-tx unmet), raised to the next divisor until the W slice + x ring fit
    smem_kb (default SMEM_KB)."""
    budget = (smem_kb or SMEM_KB) * 1024
    mp = max(16, triton.next_power_of_2(m))
    assert mp <= 256, "wgmma N is at most 256: M <= 256"
    n_tiles = triton.cdiv(n, BLOCK_N)
    chunks = triton.cdiv(k, BLOCK_K)
    x_stage = mp * BLOCK_K * 2
    want = max(1, round(NUM_SMS / n_tiles)) if split is None else max(1, split)
    for s in range(min(want, chunks), chunks + 1):
        if chunks % s:
            continue
        num_k = chunks // s
        fit = (budget - num_k * W_CHUNK_BYTES - 1024) // x_stage  # x buffers that fit beside W
        if fit >= min(2, num_k):
            break
    # x chunks in flight after the PDL wait are the kernel's critical path: in one wave, take all the shared
    # memory that is left; with several waves keep programs small (more of them resident per SM)
    x_cap = fit if n_tiles * s <= NUM_SMS else max(2, 32768 // x_stage)
    x_stages = int(min(num_k, fit, x_cap))
    return dict(
        mp=mp,
        n_tiles=n_tiles,
        split=s,
        num_k=num_k,
        x_stages=x_stages,
        smem_kb=smem_kb or SMEM_KB,
        smem_est=num_k * W_CHUNK_BYTES + x_stages * x_stage,
    )


_WS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device, n_tiles: int, split: int, mp: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), n_tiles, split, mp)
    if key not in _WS:
        part = torch.empty(
            max(1, n_tiles * split * mp * BLOCK_N) if split > 1 else 1, dtype=torch.float32, device=device
        )
        _WS[key] = (part, torch.zeros(n_tiles, dtype=torch.int32, device=device))  # [n_tiles] arrival counts
    return _WS[key]


def kernel_args(w_desc, x_desc, y, part, count, m: int, n: int, p: dict, pdl: bool) -> tuple[tuple, dict]:
    args = (w_desc, x_desc, y, part, count, m, n)
    const = dict(
        SPLIT_K=p["split"],
        NUM_K=p["num_k"],
        X_STAGES=p["x_stages"],
        MP=p["mp"],
        RED_ROWS=min(p["mp"], 32),
        USE_PDL=pdl,
        W_ONE_BAR=W_ONE_BAR_DEFAULT,
    )
    return args, const


class GluonLinear:
    """y = x @ w.T for a fixed weight w [N, K] bf16 (nn.Linear layout); the W descriptor is built once."""

    def __init__(self, w: torch.Tensor):
        assert w.dtype == torch.bfloat16 and w.is_contiguous() and (w.shape[1] * 2) % 16 == 0
        self.w = w  # [N, K]
        self.n, self.k = w.shape
        self.w_desc = TensorDescriptor.from_tensor(w, [BLOCK_N, BLOCK_K], W_LAYOUT)

    def __call__(self, x, split=None, pdl=True, out=None, smem_kb=None) -> torch.Tensor:
        m, k = x.shape  # x: [M, K]
        assert k == self.k and x.dtype == torch.bfloat16 and x.stride(1) == 1
        p = plan(self.n, k, m, split, smem_kb)
        x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [p["mp"], BLOCK_K], x_layout(p["mp"]))
        y = torch.empty(m, self.n, dtype=torch.bfloat16, device=x.device) if out is None else out  # [M, N]
        part, count = _workspace(x.device, p["n_tiles"], p["split"], p["mp"])
        args, const = kernel_args(self.w_desc, x_desc, y, part, count, m, self.n, p, pdl)
        _dlin_kernel[(p["n_tiles"], p["split"])](*args, **const, num_warps=NUM_WARPS, launch_pdl=pdl)
        return y


# ---- compile only (CPU): sm_90 cubin for every config, shared memory and registers -------------------------


def compile_sm90(n, k, m, split=None, pdl=True, res_usage=True, smem_kb=None) -> tuple:
    """Compiles the kernel for (n, k, m) exactly as a launch would specialize it (same binder, options and
    GluonASTSource as JITFunction.run, so the result lands in triton's on-disk cache under the key a launch on
    an H100 looks up), but for GPUTarget cuda 90 without a GPU: CPU tensors stand in for the device ones (only
    their alignment matters). -> (plan, shared bytes, regs, stack, compile s, checks of the PTX/SASS).
    checks["sass_tma_before_wait"] counts the TMA loads issued before the PDL wait: num_k with PDL."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    p = plan(n, k, m, split, smem_kb)
    w = torch.empty(n, k, dtype=torch.bfloat16)
    x = torch.empty(m, k, dtype=torch.bfloat16)
    y = torch.empty(m, n, dtype=torch.bfloat16)
    part = torch.empty(16, dtype=torch.float32)
    count = torch.empty(16, dtype=torch.int32)
    w_desc = TensorDescriptor.from_tensor(w, [BLOCK_N, BLOCK_K], W_LAYOUT)
    x_desc = TensorDescriptor(x, [m, k], [k, 1], [p["mp"], BLOCK_K], x_layout(p["mp"]))
    args, const = kernel_args(w_desc, x_desc, y, part, count, m, n, p, pdl)
    fn = _dlin_kernel
    kwargs = dict(const, num_warps=NUM_WARPS, launch_pdl=pdl)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run does
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    src = GluonASTSource(fn, signature, constexprs, attrs)
    t0 = time.time()
    compiled = triton.compile(src, target=target, options=options.__dict__)
    secs = time.time() - t0
    ptx = compiled.asm.get("ptx", "")
    checks = dict(
        wait=ptx.count("griddepcontrol.wait"),
        launch=ptx.count("griddepcontrol.launch_dependents"),
        tma=ptx.count("cp.async.bulk.tensor"),
        wgmma=ptx.count("wgmma.mma_async"),
    )
    regs = stack = None
    if res_usage:
        try:
            with tempfile.TemporaryDirectory() as d:
                cubin = os.path.join(d, "k.cubin")
                Path(cubin).write_bytes(compiled.asm["cubin"])
                usage = resource_usage(cubin)
                sass = subprocess.run([cuda_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True,
                                      check=True).stdout  # fmt: skip
            regs, stack = usage["REG"], usage["STACK"]
            # griddepcontrol.wait is ACQBULK in SASS: every weight TMA (UTMALDG) must be issued before it
            pre = sass.split("ACQBULK")[0] if "ACQBULK" in sass else ""
            checks["sass_tma_before_wait"] = pre.count("UTMALDG")
            checks["sass_bar_sync"] = sass.count("BAR.SYNC")
        except Exception as e:
            checks["res_usage_error"] = repr(e)[:300]
    return p, compiled.metadata.shared, regs, stack, secs, checks


def sweep_splits(n: int, k: int, m: int) -> list[int]:
    """alternative splits to time besides the automatic one: half and double (distinct, valid)"""
    auto = plan(n, k, m)["split"]
    alts = []
    for s in (auto // 2, auto * 2):
        if s >= 1:
            q = plan(n, k, m, s)["split"]
            if q != auto and q not in alts:
                alts.append(q)
    return alts


def variants(n: int, k: int, m: int, quick: bool) -> list[tuple[int | None, int | None]]:
    """(split, smem_kb) to build/check/time for one shape: the automatic plan, the alternative splits (unless
    quick) and the automatic plan with the big shared-memory budget when that differs"""
    out = [(None, None)] + ([] if quick else [(sp, None) for sp in sweep_splits(n, k, m)])
    big = plan(n, k, m, None, SMEM_KB_BIG)
    if any(big[f] != plan(n, k, m)[f] for f in ("split", "num_k", "x_stages")):
        out.append((None, SMEM_KB_BIG))
    return out


def all_configs(quick: bool) -> list[tuple]:
    """(model, mat, n, k, m, split, smem_kb) for every shape, M and variant"""
    out = []
    for model, (_, shapes) in SHAPES.items():
        for name, (n, k) in shapes.items():
            for m in ROWS:
                for split, kb in variants(n, k, m, quick):
                    out.append((model, name, n, k, m, split, kb))
    return out


def _compile_job(job: tuple) -> tuple:
    model, name, n, k, m, split, kb, pdl, res_usage = job
    try:
        return job, compile_sm90(n, k, m, split, pdl, res_usage, kb), None
    except Exception as e:
        return job, None, repr(e)[:3000]


def compile_many(jobs: list[tuple], workers: int) -> Iterator[tuple]:
    """compiles in `workers` spawned processes (fills triton's on-disk cache); yields (job, result, error)"""
    if workers <= 1:
        for j in jobs:
            yield _compile_job(j)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    env_interp = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            yield from ex.map(_compile_job, jobs)
    finally:
        if env_interp is not None:
            os.environ["TRITON_INTERPRET"] = env_interp


def compile_only(args: argparse.Namespace) -> bool:
    rows, failures, table = [], [], []
    jobs = [c + (True, True) for c in all_configs(args.quick)]
    t0 = time.time()
    for (model, name, n, k, m, split, kb, _, _), res, err in compile_many(jobs, args.workers):
        if err is not None:
            failures.append((model, name, m, split, kb, err))
            print(f"{model} {name} N={n} K={k} M={m} split={split} kb={kb}: FAILED {err[:300]}", flush=True)
            continue
        p, smem, regs, stack, secs, ck = res
        print(f"{model} {name} M={m} split={p['split']} KB={p['smem_kb']}: {secs:.1f} s", flush=True)
        rows.append(dict(model=model, mat=name, n=n, k=k, m=m, split_arg=split, smem_kb_arg=kb, **p,
                         smem=smem, regs=regs, stack=stack, compile_s=secs, checks=ck))  # fmt: skip
        tma_before_wait = ck.get("sass_tma_before_wait", -1)
        if smem + 1024 > p["smem_kb"] * 1024 or (stack or 0) > 0 or tma_before_wait != p["num_k"]:
            failures.append((model, name, m, split, kb, f"suspicious: smem {smem} stack {stack} {ck}"))
        table.append([model, name, n, k, m, p["mp"], p["n_tiles"], p["split"], p["n_tiles"] * p["split"],
                      p["num_k"], p["x_stages"], p["smem_kb"], smem, str(regs), str(stack), tma_before_wait,
                      ck.get("sass_bar_sync", -1), ck["wgmma"]])  # fmt: skip
    headers = "model mat N K M MP tiles split progs NUM_K XST KB smem regs stack tma<wait bars wgmma".split()
    for f in failures:
        print("FAILURE", f if args.verbose_fail else str(f)[:500])
    report = {**run_info(), "args": vars(args), "rows": rows, "failures": failures}
    path = write_report("gluon_decode_matmul_compile", report, args.out)
    print_table(
        f"sm_90 compile of every config ({len(rows)} compiled, {len(failures)} failed/suspicious, "
        f"{time.time() - t0:.0f} s)",
        headers,
        table,
    )
    print(f"-> {path}")
    return not failures


# ---- GPU: correctness and CUDA-graph timing ----------------------------------------------------------------


def graph_ms(fn: Callable[[], Any], replays: int = 20) -> float:
    """GPU ms per call of fn captured in a CUDA graph: the fastest of 3 x `replays` replays."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    best = min(_graph_replay_ms(g, replays) for _ in range(3))
    del g
    return best


_STATE: dict[str, Any] = dict(stage="start", t=time.time(), result=None)


def stage(name: str) -> None:
    _STATE["stage"], _STATE["t"] = name, time.time()


def start_watchdog(t_start: float, out: str, total_s: float, stall_s: float) -> None:
    """A hung kernel (an mbarrier that never completes) would block forever: write what we have and exit 3 if
    one stage takes longer than stall_s or the whole run longer than total_s. faulthandler is the hard
    backstop (it needs no GIL)."""
    faulthandler.dump_traceback_later(total_s + 30, exit=True)

    def watch() -> None:
        while True:
            time.sleep(2)
            now = time.time()
            if now - _STATE["t"] > stall_s or now - t_start > total_s:
                msg = f"WATCHDOG: stage '{_STATE['stage']}' ran {now - _STATE['t']:.0f} s"
                msg += f" (run {now - t_start:.0f} s)"
                print(msg, flush=True)
                try:
                    write_report("gluon_decode_matmul", dict(_STATE["result"] or {}, watchdog=msg), out)
                finally:
                    os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def check_correctness(res: list, failures: list) -> None:
    torch.manual_seed(0)
    for model, (_, shapes) in SHAPES.items():
        for name, (n, k) in shapes.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02  # [N, K]
            lin = GluonLinear(w)
            cases = [(m, split, kb) for m in ROWS for split, kb in variants(n, k, m, False)]
            # and the odd M (x rows past M: TMA zero fill)
            cases += [(m, None, None) for m in ODD_ROWS.get((model, name), ())]
            for m, split, kb in cases:
                what = f"check {model} {name} m={m} split={split} kb={kb}"
                stage(what)
                try:
                    p = plan(n, k, m, split, kb)
                    errs = []
                    for rep in range(3):  # repeated calls: the split-K counts must come back to 0
                        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # [M, K]
                        ref = x.float() @ w.float().T  # [M, N]
                        # once without PDL (the automatic plans are compiled without PDL too)
                        nopdl = rep == 1 and split is None and kb is None
                        errs.append(rel_err(lin(x, split=split, pdl=not nopdl, smem_kb=kb), ref))
                    torch.cuda.synchronize()
                    _, count = _workspace(x.device, p["n_tiles"], p["split"], p["mp"])
                    counts_zero = bool((count == 0).all().item())
                    ok = max(errs) < 2e-2 and counts_zero
                    res.append(
                        dict(
                            model=model,
                            mat=name,
                            m=m,
                            split=p["split"],
                            num_k=p["num_k"],
                            smem_kb=p["smem_kb"],
                            x_stages=p["x_stages"],
                            max_rel_err=max(errs),
                            counts_zero=counts_zero,
                            ok=ok,
                        )
                    )
                    print(
                        f"check {model} {name} m={m} split={p['split']} num_k={p['num_k']} kb={p['smem_kb']}:"
                        f" rel err {max(errs):.2e} counts zero {counts_zero} {'ok' if ok else 'FAIL'}",
                        flush=True,
                    )
                    if not ok:
                        failures.append(f"{what}: {errs} {counts_zero}")
                except Exception as e:
                    failures.append(f"{what}: {e!r}"[:3000])
                    print("FAILED", failures[-1][:1500], flush=True)
                    traceback.print_exc()
            del w, lin


def cublas_chain(ws: list[dict], xs: dict, names: list[str]) -> list[torch.Tensor]:
    """F.linear of each layer's weights in turn (the listed matmuls of each layer)"""
    return [F.linear(xs[name], w[name]) for w in ws for name in names]


def gluon_chain(lins: list[dict], xs: dict, outs: dict, names: list[str], **kwargs) -> list[torch.Tensor]:
    """the same chain with GluonLinear, writing into outs (kwargs: split, pdl, smem_kb)"""
    return [lin[name](xs[name], out=outs[name], **kwargs) for lin in lins for name in names]


def bench(res: list, failures: list, quick: bool, t_start: float, budget_s: float) -> None:
    for model, (layers, shapes) in SHAPES.items():
        torch.manual_seed(1)
        ws = [
            {
                name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                for name, (n, k) in shapes.items()
            }
            for _ in range(layers)
        ]
        lins = [{name: GluonLinear(w[name]) for name in shapes} for w in ws]
        layer_bytes = sum(n * k * 2 for n, k in shapes.values())
        for m in ROWS:
            if time.time() - t_start > budget_s:
                failures.append(f"bench {model} m={m}: skipped, time budget")
                print(failures[-1], flush=True)
                continue
            stage(f"bench {model} m={m}")
            xs = {
                name: torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                for name, (n, k) in shapes.items()
            }
            outs = {
                name: torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                for name, (n, k) in shapes.items()
            }
            r = dict(
                model=model,
                rows=m,
                layers=layers,
                layer_mb=layer_bytes / 1e6,
                floor_us=layer_bytes / 3e12 * 1e6,
            )
            try:
                r["cublas_us"] = graph_ms(partial(cublas_chain, ws, xs, list(shapes))) * 1e3 / layers
            except Exception as e:
                failures.append(f"bench {model} m={m} cublas chain: {e!r}"[:2000])
            for key, pdl, kb in (
                ("gluon_us", True, None),
                ("gluon_nopdl_us", False, None),
                (f"gluon_{SMEM_KB_BIG}kb_us", True, SMEM_KB_BIG),
            ):
                try:
                    chain = partial(gluon_chain, lins, xs, outs, list(shapes), pdl=pdl, smem_kb=kb)
                    r[key] = graph_ms(chain) * 1e3 / layers
                except Exception as e:
                    failures.append(f"bench {model} m={m} gluon chain {key}: {e!r}"[:2000])
                    print("FAILED", failures[-1][:1500], flush=True)
            per = {}
            for name, (n, k) in shapes.items():  # each matmul alone, in a chain of its own
                stage(f"bench {model} m={m} {name}")
                one = dict(floor_us=n * k * 2 / 3e12 * 1e6)
                try:
                    one["cublas_us"] = graph_ms(partial(cublas_chain, ws, xs, [name])) * 1e3 / layers
                except Exception as e:
                    failures.append(f"bench {model} {name} m={m} cublas: {e!r}"[:2000])
                for split, kb in variants(n, k, m, quick):
                    p = plan(n, k, m, split, kb)
                    tag = f"gluon_s{p['split']}_{p['smem_kb']}kb" + ("_auto" if split is None else "")
                    try:
                        chain = partial(gluon_chain, lins, xs, outs, [name], split=split, smem_kb=kb)
                        one[tag + "_us"] = graph_ms(chain) * 1e3 / layers
                        one[tag + "_cfg"] = p
                    except Exception as e:
                        failures.append(f"bench {model} {name} m={m} split={split} kb={kb}: {e!r}"[:2000])
                        print("FAILED", failures[-1][:1500], flush=True)
                per[name] = one
                g = {kk: v for kk, v in one.items() if kk.startswith("gluon") and kk.endswith("_us")}
                best = min(g.items(), key=lambda kv: kv[1]) if g else ("-", float("nan"))
                print(
                    f"  {model} m={m:3} {name:8}: cublas {one.get('cublas_us', float('nan')):7.2f} us  "
                    + "  ".join(f"{kk[6:-3]} {v:6.2f}" for kk, v in g.items())
                    + f"  floor {one['floor_us']:6.2f}  best {best[0][6:-3]}",
                    flush=True,
                )
            r["per_matmul"] = per
            res.append(r)
            print(
                f"{model} m={m:3} per layer (us): "
                + ", ".join(f"{kk} {v:.2f}" for kk, v in r.items() if kk.endswith("_us")),
                flush=True,
            )
        ws = lins = None  # free this model's weights
        torch.cuda.empty_cache()


def gpu_main(args: argparse.Namespace) -> int:
    t_start = time.time()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    failures, checks, timings = [], [], []
    report = {
        **run_info(),
        "args": vars(args),
        "smem_kb": SMEM_KB,
        "smem_kb_big": SMEM_KB_BIG,
        "w_one_bar": W_ONE_BAR_DEFAULT,
        "checks": checks,
        "timings": timings,
        "failures": failures,
    }
    _STATE["result"] = report
    start_watchdog(t_start, args.out, total_s=args.budget_s + 30, stall_s=90)
    stage("precompile")
    # warm triton's on-disk cache in parallel: every config with PDL, the automatic ones also without
    jobs = [c + (True, False) for c in all_configs(args.quick)]
    jobs += [c + (False, False) for c in all_configs(True) if c[-1] is None]  # automatic plans without PDL
    jobs += [
        (mo, na, *SHAPES[mo][1][na], m, None, None, pdl, False)
        for (mo, na), ms in ODD_ROWS.items()
        for m in ms
        for pdl in (True, False)
    ]
    for i, (job, _, err) in enumerate(compile_many(jobs, args.workers)):
        stage(f"precompile {i + 1}/{len(jobs)}")
        if err is not None:
            failures.append(f"precompile {job}: {err}"[:3000])
            print("FAILED", failures[-1][:1500], flush=True)
    print(f"precompiled {len(jobs)} configs in {time.time() - t_start:.0f} s", flush=True)
    try:
        check_correctness(checks, failures)
    except Exception as e:
        failures.append(f"check: {e!r}"[:3000])
        traceback.print_exc()
    print(f"correctness done at {time.time() - t_start:.0f} s", flush=True)
    try:
        bench(timings, failures, args.quick, t_start, budget_s=args.budget_s)
    except Exception as e:
        failures.append(f"bench: {e!r}"[:3000])
        traceback.print_exc()
    stage("report")
    report["total_s"] = time.time() - t_start
    path = write_report("gluon_decode_matmul", report, args.out)
    print(f"\n{len(failures)} failures")
    for f in failures:
        print("  ", f[:800])
    nan = float("nan")
    print_table(
        f"per layer, us (chain of every layer's matmuls in one CUDA graph; {sum(c['ok'] for c in checks)}/"
        f"{len(checks)} checks ok; floor: weight bytes at 3 TB/s)",
        ["model", "rows", "cuBLAS", f"{SMEM_KB} KB", f"{SMEM_KB} KB no PDL", f"{SMEM_KB_BIG} KB", "floor"],
        [
            [
                r["model"],
                r["rows"],
                r.get("cublas_us", nan),
                r.get("gluon_us", nan),
                r.get("gluon_nopdl_us", nan),
                r.get(f"gluon_{SMEM_KB_BIG}kb_us", nan),
                r["floor_us"],
            ]
            for r in timings
        ],
    )
    print(f"\n{report['card']}  {report['date']}  commit {report.get('git_commit')}  -> {path}")
    return 0 if not failures else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(DEFAULT_OUT_DIR)), help="folder for the JSON")
    p.add_argument("--compile-only", action="store_true", help="no GPU: compile every config for sm_90")
    p.add_argument("--quick", action="store_true", help="automatic split only (no split sweep)")
    p.add_argument("--verbose-fail", action="store_true", help="print compile failures in full")
    p.add_argument(
        "--budget-s", type=float, default=200.0, help="skip remaining benchmarks after this many s"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(12, os.cpu_count() or 1),
        help="processes compiling in parallel (compile-only, and the GPU run's warm-up of the cache)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("--compile-only needs TRITON_INTERPRET unset", file=sys.stderr)
            return 2
        return 0 if compile_only(args) else 1
    if not torch.cuda.is_available():
        print("gluon_decode_matmul needs a CUDA GPU (or --compile-only). Nothing measured.")
        return 0
    return gpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
