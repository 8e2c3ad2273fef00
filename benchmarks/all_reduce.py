"""All-reduce latency on 2 GPUs: NCCL vs the peer-memory one-shot kernel, at decode-step sizes.

    python benchmarks/all_reduce.py [--out DIR]     # needs 2 CUDA GPUs; on fewer it says so, exits 0

For each [rows, hidden] bf16 tensor, both ranks capture --ops back-to-back all-reduces in one CUDA graph
(as a decode step runs them) and replay it; rank 0 reports microseconds per all-reduce. NCCL's own
settings (NCCL_PROTO, NCCL_ALGO, ...) apply to the NCCL column as usual.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from nanovllm.benchmark.common import DEFAULT_OUT_DIR, graph_replay_ms, print_table, run_info, write_report  # noqa: E402
from nanovllm.kernels.all_reduce import NUM_PROGRAMS  # noqa: E402
from nanovllm.utils.distributed import connect_rendezvous, create_rendezvous, new_tp_group  # noqa: E402
from nanovllm.utils.peer_all_reduce import connect_peers  # noqa: E402

WORLD = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(DEFAULT_OUT_DIR)), help="folder for the JSON")
    p.add_argument("--rows", default="1,16,64,128,256")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ops", type=int, default=64, help="all-reduces per graph")
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--programs", default=str(NUM_PROGRAMS), help="peer kernel grid sizes to compare")
    return p.parse_args(argv)


def time_graph(reduce, x: torch.Tensor, ops: int, replays: int) -> float:
    """Microseconds per all-reduce: `ops` of them captured in one graph, replayed `replays` times."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        reduce(x)  # compile / warm up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(ops):
                reduce(x.mul_(0.5))  # keep the values bounded
    graph.replay()
    torch.cuda.synchronize()
    return graph_replay_ms(graph, replays) * 1000 / ops


def run_rank(rank: int, store, args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = new_tp_group(store, rank, WORLD, device, 60, custom_all_reduce=False)  # NCCL: the baseline
    peers = {
        f"peer{n}": connect_peers(dist.PrefixStore(f"peer{n}", store), rank, WORLD, device, num_programs=n)
        for n in (int(p) for p in args.programs.split(","))
    }
    if None in peers.values():
        raise RuntimeError("the GPUs cannot reach each other's memory (no NVLink/P2P): no peer all-reduce")

    def nccl(x: torch.Tensor) -> torch.Tensor:
        group.backend.allreduce([x]).wait()
        return x

    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, args.hidden, device=device, dtype=torch.bfloat16)
        r = {"rows": rows, "hidden": args.hidden, "bytes": x.numel() * x.element_size()}
        r["nccl_us"] = time_graph(nccl, x, args.ops, args.replays)
        for name, peer in peers.items():
            r[f"{name}_us"] = time_graph(peer, x, args.ops, args.replays)
        results.append(r)
        if rank == 0:
            print(
                f"rows {rows}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items() if k.endswith("_us")),
                flush=True,
            )
    torch.cuda.synchronize()
    group.destroy()
    return results


def worker(port: int, args: argparse.Namespace) -> None:
    run_rank(1, connect_rendezvous("127.0.0.1", port, WORLD, 60), args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpus < WORLD:
        print(f"all_reduce needs {WORLD} GPUs; torch sees {num_gpus}. Nothing measured.")
        return 0
    store = create_rendezvous(WORLD, 60)
    proc = mp.get_context("spawn").Process(target=worker, args=(store.port, args))
    proc.start()
    try:
        results = run_rank(0, store, args)
    except BaseException:
        proc.kill()  # it may be waiting in a kernel for rank 0's next all-reduce
        raise
    finally:
        proc.join(timeout=120)
    nccl_env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    report = {
        **run_info(),
        "num_gpus": num_gpus,
        "args": vars(args),
        "nccl_env": nccl_env,
        "results": results,
    }
    names = [f"peer{n}" for n in args.programs.split(",")]
    keys = ["rows", "nccl_us"] + [f"{name}_us" for name in names]
    print_table(
        f"all-reduce us, bf16, 2 GPUs (peerN: peer kernel, N programs), {nccl_env or 'NCCL'}",
        ["rows", "NCCL"] + names,
        [[r[k] for k in keys] for r in results],
    )
    path = write_report("all_reduce", report, args.out)
    print(f"\n{report['card']}  {report['date']}  commit {report.get('git_commit')}  -> {path}")
    return 0 if proc.exitcode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
