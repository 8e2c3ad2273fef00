"""The decode-sized matmul (kernels/decode_linear.py) against cuBLAS, in a chain of 28 layers' matmuls.

    python benchmarks/decode_linear_chain.py [--rows 4,16,64,128,256] [--sweep] [--out DIR]

Per layer, Qwen3-0.6B shapes: rmsnorm -> qkv (1024 -> 4096) -> o (2048 of qkv's columns -> 1024) ->
rmsnorm -> gate_up (1024 -> 2 x 3072) -> SiLU-and-mul -> down (3072 -> 1024), 28 layers of distinct random
weights (so they come from HBM), captured in one CUDA graph; the fastest of 3 x 20 replays. "cublas" is
F.linear with the SiLU kernel; "decode_linear" is the Triton matmul with the SiLU in gate_up's epilogue, with
the default tiles (`decode_linear_config`), and with --sweep also a coordinate sweep of the tiles of each
matmul in turn.
Needs a CUDA GPU; without one it says so and exits 0. The model's own A/B is
`NANOVLLM_DECODE_LINEAR_ROWS=0|N NANOVLLM_DECODE_LINEAR_SMALL_ROWS=0|N python scripts/decode_breakdown.py`
(the first for weights over 12 MiB, the second for smaller ones).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nanovllm.benchmark.common import DEFAULT_OUT_DIR, graph_replay_ms, print_table, run_info, write_report  # noqa: E402
from nanovllm.kernels.activation import silu_and_mul  # noqa: E402
from nanovllm.kernels.decode_linear import decode_linear, decode_linear_config  # noqa: E402
from nanovllm.kernels.rmsnorm import rms_norm  # noqa: E402

HIDDEN, INTERMEDIATE, QKV, O_IN, LAYERS = 1024, 3072, 4096, 2048, 28
# (n_out, k, silu_mul) of each matmul
SHAPES = {"qkv": (QKV, HIDDEN, False), "o": (HIDDEN, O_IN, False), "gate_up": (INTERMEDIATE, HIDDEN, True),
          "down": (HIDDEN, INTERMEDIATE, False)}  # fmt: skip


def make_layers() -> list[dict[str, torch.Tensor]]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02

    ones = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    return [
        {
            "qkv": randn(QKV, HIDDEN),
            "o": randn(HIDDEN, O_IN),
            "gate_up": randn(2 * INTERMEDIATE, HIDDEN),
            "down": randn(HIDDEN, INTERMEDIATE),
            "norm": ones,
        }  # fmt: skip
        for _ in range(LAYERS)
    ]


def chain_cublas(x: torch.Tensor, layers: list, configs: dict) -> torch.Tensor:
    for w in layers:
        qkv = F.linear(rms_norm(x, w["norm"], 1e-6), w["qkv"])  # [M, 4096]
        h = rms_norm(F.linear(qkv[:, :O_IN], w["o"]), w["norm"], 1e-6)  # [M, 1024]
        x = F.linear(silu_and_mul(F.linear(h, w["gate_up"])), w["down"])  # [M, 1024]
    return x


def chain_decode_linear(x: torch.Tensor, layers: list, configs: dict) -> torch.Tensor:
    for w in layers:
        qkv = decode_linear(rms_norm(x, w["norm"], 1e-6), w["qkv"], config=configs.get("qkv"))
        h = rms_norm(decode_linear(qkv[:, :O_IN], w["o"], config=configs.get("o")), w["norm"], 1e-6)
        act = decode_linear(h, w["gate_up"], silu_mul=True, config=configs.get("gate_up"))  # [M, 3072]
        x = decode_linear(act, w["down"], config=configs.get("down"))
    return x


def chain_ms(chain, x: torch.Tensor, layers: list, configs: dict) -> float:
    chain(x, layers, configs)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(x, layers, configs)
    for _ in range(5):
        graph.replay()
    return min(graph_replay_ms(graph, 20) for _ in range(3))


def tile_candidates(rows: int) -> list[tuple[int, int, int, int, int]]:
    top = max(16, 1 << (rows - 1).bit_length())
    return [
        (bm, bn, bk, 4, 4 if bk == 64 else 3)
        for bm, bn, bk in itertools.product((16, 32, 64, 128, 256), (32, 64, 128), (64, 128))
        if bm <= top and bm * bn <= 128 * 128
    ]


def sweep(x: torch.Tensor, layers: list) -> tuple[dict, float]:
    """Each matmul's tiles in turn, the others at their best so far (or default)."""
    best: dict = {}
    for name in SHAPES:
        times = {
            c: chain_ms(chain_decode_linear, x, layers, {**best, name: c}) for c in tile_candidates(len(x))
        }
        best[name] = min(times, key=times.get)
    return best, chain_ms(chain_decode_linear, x, layers, best)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="4,16,64,128,256")
    p.add_argument("--sweep", action="store_true", help="also sweep each matmul's tiles (minutes)")
    p.add_argument("--out", default=DEFAULT_OUT_DIR)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("decode_linear_chain needs a CUDA GPU")
        return
    torch.manual_seed(0)
    layers = make_layers()
    results, table = [], []
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16)
        rec = {
            "rows": rows,
            "cublas_ms": chain_ms(chain_cublas, x, layers, {}),
            "decode_linear_ms": chain_ms(chain_decode_linear, x, layers, {}),
            "default_tiles": {name: decode_linear_config(rows, *shape) for name, shape in SHAPES.items()},
        }
        if args.sweep:
            rec["swept_tiles"], rec["swept_ms"] = sweep(x, layers)
        results.append(rec)
        table.append([rows, f"{rec['cublas_ms']:.3f}", f"{rec['decode_linear_ms']:.3f}",
                      f"{rec['swept_ms']:.3f}" if args.sweep else "-"])  # fmt: skip
    print_table("28 layers' matmuls, ms per chain", ["rows", "cuBLAS", "decode_linear", "swept tiles"], table)
    path = write_report("decode_linear_chain", {**run_info(), "layers": LAYERS, "results": results}, args.out)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
