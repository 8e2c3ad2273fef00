"""A tensor-parallel worker: ranks 1..N-1, each in its own spawned process (see tp_executor.py).

The worker builds the same ModelRunner as rank 0 with its own shard of every weight, then mirrors
rank 0: for each step the driver sends, it runs the same forward (the same collectives in the same
order) and computes its shard of the logits; rank 0 gathers and samples, then broadcasts the sampled
ids, which every worker keeps for the next step's pending inputs (ModelRunner.mirror / keep_sampled).
The protocol, on one pipe per worker:

    worker -> driver   ("hello", pid)                device set, store reached; joining the group
    worker -> driver   ("ready", num_kvcache_blocks) once the model and KV cache are built
    driver -> worker   ("step", encoded ModelInput)  every step, in order
    driver -> worker   ("shutdown", None)            leave the loop, exit 0 (which releases the group)
    worker -> driver   ("error", traceback text)     then exit 1

EOF on the pipe means the driver is gone: the worker exits. So does a driver that dies while the
worker waits inside a collective (a thread watches the parent pid).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

import numpy as np
import torch

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.step_input import ModelInput
from nanovllm.utils.distributed import building_with, connect_rendezvous, new_tp_group

PARENT_POLL_S = 1.0


def encode_message(kind: str, inp: ModelInput | None = None) -> bytes:
    """A step's ModelInput as numpy arrays in a plain pickle (no shared-memory handles, no torch
    storage serialization): ~9 kB and ~45 us for a decode step of 64 sequences."""
    fields = None
    if inp is not None:
        fields = {
            f.name: (v.numpy() if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(inp)
            for v in [getattr(inp, f.name)]
        }
    return pickle.dumps((kind, fields), protocol=pickle.HIGHEST_PROTOCOL)


def decode_message(data: bytes) -> tuple[str, ModelInput | None]:
    kind, fields = pickle.loads(data)
    if fields is None:
        return kind, None
    return kind, ModelInput(
        **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in fields.items()}
    )


def worker_device(config: Config, rank: int) -> torch.device:
    return torch.device("cuda", rank) if config.torch_device.type == "cuda" else torch.device("cpu")


def exit_when_parent_dies(parent_pid: int) -> None:
    """Exit this process once its parent is gone (a TP worker; the server's engine process). A parent
    killed while this process waits (inside a collective, say) never closes the pipe the main thread
    would notice; re-parenting (the pid changes) is the sign."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="nanovllm-parent-watch", daemon=True).start()


def worker_main(
    config: Config, rank: int, host: str, port: int, conn: Connection, parent_pid: int, timeout_s: float
) -> None:
    """Entry point of a spawned worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it shuts us down
    exit_when_parent_dies(parent_pid)
    code = 0
    try:
        device = worker_device(config, rank)
        size = config.tensor_parallel_size
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # CPU ranks share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        store = connect_rendezvous(host, port, size, timeout_s)
        conn.send(("hello", os.getpid()))  # rank 0 joins the group only once every worker got here
        group = new_tp_group(
            store, rank, size, device, timeout_s, custom_all_reduce=not config.disable_custom_all_reduce
        )
        with building_with(group):
            runner = ModelRunner(config, device)
        conn.send(("ready", runner.num_kvcache_blocks))
        while True:
            kind, inp = decode_message(conn.recv_bytes())
            if kind == "step":
                runner.mirror(inp)
            elif kind == "shutdown":
                group.close_peer_memory()  # before os._exit, which would leave rank 0's buffer counted in use
                break
            else:
                raise RuntimeError(f"unknown message {kind!r} from the driver")
    except EOFError:  # the driver is gone
        code = 1
    except BaseException:
        code = 1
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:  # the driver is gone too
            pass
    finally:
        conn.close()
    # The process's exit releases its communicators, peer buffers and GPU memory. Skipped: the interpreter's
    # teardown (it collects every torch module: seconds on a small CPU) and the group's destroy (NCCL's abort
    # took ~10 s there on 2 H100s while rank 0 waited for the exit: its timeout, then SIGTERM).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
