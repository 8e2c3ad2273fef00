"""The peer-memory all-reduce on 2 GPUs: exact sums on both ranks, back-to-back calls of changing sizes,
replays of a CUDA graph that captured it, and those replays mixed with narrow reductions and NCCL
collectives as a TP engine's steps mix them (run by scripts/gpu_suite.py on a 2-GPU machine)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.multiprocessing as mp

from nanovllm.kernels.all_reduce import all_reduce_reference
from nanovllm.utils.distributed import connect_rendezvous, create_rendezvous, new_tp_group
from nanovllm.utils.peer_all_reduce import MAX_SLOT_BYTES

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]

if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)

WORLD = 2
WORKER_EXIT_S = 60  # the worker's whole exit, once both ranks are done
# (3, 1004): bf16 rows of 2,008 bytes, not 16-byte aligned, go element by element (fp32 ones are aligned)
SHAPES = [(1, 1024), (3, 1000), (3, 1004), (64, 4096), (128, 4096), (256, 4096), (7, 5120)]


def _parts(shape, dtype, call: int, device) -> list[torch.Tensor]:
    """Every rank's input of one call, the same on every rank (so each can check the sum itself)."""
    gen = torch.Generator().manual_seed(call)
    return [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(WORLD)]


def _rank(rank: int, store, groups: list) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = new_tp_group(store, rank, WORLD, device, 60)
    groups.append(group)
    if group.peer_all_reduce is None:
        raise AssertionError("the GPUs cannot reach each other's memory: no peer all-reduce to test")
    call = 0
    for dtype in (torch.bfloat16, torch.float32):
        for _ in range(10):  # back-to-back calls of changing sizes
            for shape in SHAPES:
                call += 1
                parts = _parts(shape, dtype, call, device)
                x = parts[rank].clone()
                if group.peer_all_reduce.fits(x) != (x.numel() * x.element_size() <= MAX_SLOT_BYTES):
                    raise AssertionError(f"{shape} {dtype}: wrong choice between peer memory and NCCL")
                group.all_reduce(x)
                torch.testing.assert_close(x, all_reduce_reference(parts), rtol=0, atol=0)

    # A captured graph of three reductions (the all-reduce's epoch lives on the device), replayed.
    static = [torch.zeros(s, device=device, dtype=torch.bfloat16) for s in SHAPES[:3]]
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        for x in static:  # warm up (compiles) outside the capture
            group.all_reduce(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for x in static:
                group.all_reduce(x)
    for _ in range(10):
        call += 1
        wanted = []
        for x, shape in zip(static, SHAPES[:3], strict=True):
            parts = _parts(shape, torch.bfloat16, call, device)
            x.copy_(parts[rank])
            wanted.append(all_reduce_reference(parts))
        graph.replay()
        for x, want in zip(static, wanted, strict=True):
            torch.testing.assert_close(x, want, rtol=0, atol=0)

    # A TP engine's steps, many times over: a graph of reductions, a narrow fp32 reduction (rows of 8, fewer
    # elements than a program has threads: this hung both ranks until the launcher widened such row blocks,
    # see MIN_BLOCK_H in kernels/all_reduce.py), and every third step the NCCL collectives of a sampling
    # step (the logits gather to rank 0, the sampled ids' broadcast).
    ids = torch.zeros(8, dtype=torch.int64, device=device)
    for step in range(300):
        call += 1
        for x in static:
            x.zero_()
        graph.replay()
        small = _parts((4, 8), torch.float32, call, device)
        x = small[rank].clone()
        group.all_reduce(x)
        torch.testing.assert_close(x, all_reduce_reference(small), rtol=0, atol=0)
        if step % 3 == 0:  # a sampling step: gather to rank 0, broadcast from it
            parts = group.gather(x, dst=0)
            if rank == 0:
                torch.testing.assert_close(parts[1], x, rtol=0, atol=0)
            ids.fill_(step if rank == 0 else -1)
            group.broadcast(ids, src=0)
            if ids.tolist() != [step] * 8:
                raise AssertionError(f"step {step}: broadcast gave {ids.tolist()}")
    torch.cuda.synchronize(device)
    group.destroy()


def _worker(port: int) -> None:
    _rank(1, connect_rendezvous("127.0.0.1", port, WORLD, 60), [])


def test_peer_all_reduce_is_exact_on_both_ranks_and_under_cuda_graphs():
    store = create_rendezvous(WORLD, 60)
    worker = mp.get_context("spawn").Process(target=_worker, args=(store.port,))
    worker.start()
    groups: list = []

    # The watcher is the only thread that joins (reaps) the worker: had the main thread joined too, the
    # one that lost the race would read exit code None from a worker that exited fine.
    def abort_if_worker_fails() -> None:  # or rank 0 would wait for its rows forever
        worker.join()
        if worker.exitcode != 0 and groups:
            groups[0].abort()

    watcher = threading.Thread(target=abort_if_worker_fails, daemon=True)
    watcher.start()
    try:
        _rank(0, store, groups)
    except BaseException:
        worker.kill()  # it may be waiting in a kernel for rank 0's next all-reduce
        raise
    finally:
        watcher.join(timeout=WORKER_EXIT_S)
        if watcher.is_alive():  # the worker is still running: stop it, or pytest could not exit
            worker.kill()
            watcher.join()
    assert worker.exitcode == 0, f"worker exit code {worker.exitcode} (-9: it did not exit by itself)"
