"""Tensor parallelism, driver side: rank 0 in this process, ranks 1..N-1 in spawned workers.

    driver (rank 0)                              worker (rank r), one process each
    scheduler -> batch -> prepare -> ModelInput
      send ("step", ModelInput) ------pipe------>  recv, stage in pinned buffers (mirror)
      execute: forward (all-reduces) <-collectives-> execute: forward (same all-reduces)
               LM head gather      <-----------     LM head shard
               sample (rank 0 only)
               broadcast sampled ids ----------->  keep them: the next step's pending inputs
      (launch returns without waiting; the engine reads the step back after launching the next)

Scheduling, the block manager and sampling stay on the driver; a worker only mirrors each step's
forward. Every rank binds one device (cuda:rank, or the CPU), loads only its shards of the weights
and keeps its own KV cache (its KV heads) at the same block ids. The protocol is in tp_worker.py.

Failure handling: the driver checks its workers are alive before every step, and a watcher thread
aborts the group when one dies mid-step (NCCL would wait forever for it), or when rank 0 has waited
COLLECTIVE_TIMEOUT_S for a step (a collective that never completes: the peer all-reduce has no timeout of
its own). Either way a RuntimeError naming the cause is raised — by the next launch, or when the step is
read back (`_CheckedStep.wait`) — and by every later step: the engine must be recreated. Workers are shut
down by `shutdown()`, when the executor is garbage-collected, and at interpreter exit (Ctrl-C too: a step
it interrupts stops the workers at once, since they may wait in a collective rank 0 has left); they exit
by themselves when the driver dies (SIGTERM, SIGKILL).
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import NoReturn

import torch

from nanovllm.config import Config
from nanovllm.engine.cuda_graphs import CudaGraphs
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.step_input import LaunchedStep, ModelInput
from nanovllm.engine.tp_worker import encode_message, worker_device, worker_main
from nanovllm.layers.sampler import PromptLogprobs, SamplerOutput
from nanovllm.layers.sampling_batch import SamplingRequest
from nanovllm.utils.distributed import (
    RENDEZVOUS_HOST,
    TensorParallelGroup,
    building_with,
    create_rendezvous,
    new_tp_group,
)

logger = logging.getLogger("nanovllm")

STARTUP_TIMEOUT_S = 600.0  # import + load + profile + capture of one worker, at most
COLLECTIVE_TIMEOUT_S = 1800.0  # one collective, at most (a slow first step compiles kernels)
SHUTDOWN_TIMEOUT_S = 10.0  # then SIGTERM, then SIGKILL
WATCH_INTERVAL_S = 0.5
UNUSABLE = "The tensor-parallel engine is unusable now; create a new LLM."


class WorkerSet:
    """The spawned workers, their pipes and the driver's group; shared with the watcher thread and
    the finalizer, never referring back to the executor (so the executor can be collected)."""

    def __init__(self):
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self.group: TensorParallelGroup | None = None
        # Rank 0's CUDA graphs, freed before the group is: NCCL's abort waits until every graph that captured
        # one of its calls is gone (2 x H200: shutdown hung in it while a reference cycle kept them alive).
        self.graphs: CudaGraphs | None = None
        self.failure: str | None = None  # why the engine is unusable, once it is
        self.closing = False
        self.aborted = False  # the watcher aborted the group
        self.step_sent = False  # whether the workers were sent the current step
        self.waiting_since: float | None = None  # when rank 0 began to wait for a step's result (monotonic)
        self.step_timeout_s = COLLECTIVE_TIMEOUT_S

    def dead(self) -> list[int]:
        """Indices of the workers that have exited."""
        ready = wait([p.sentinel for p in self.procs], timeout=0)
        return [i for i, p in enumerate(self.procs) if p.sentinel in ready]

    def describe_death(self, i: int) -> str:
        """Which worker died, how, and the traceback it sent if it had time to."""
        proc = self.procs[i]
        proc.join(timeout=1.0)
        code = proc.exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        msg = f"tensor-parallel worker rank {i + 1} (pid {proc.pid}) died ({how})"
        conn = self.conns[i]
        try:
            while conn.poll(0):
                kind, payload = conn.recv()
                if kind == "error":
                    return f"{msg}; its error:\n{payload}"
        except (EOFError, OSError):
            pass
        return msg

    def send_step(self, inp: ModelInput) -> None:
        self.step_sent = True
        data = encode_message("step", inp)
        for conn in self.conns:
            conn.send_bytes(data)

    def watch(self) -> None:
        """Watcher thread. A worker that exits while the engine runs may leave rank 0 waiting in a
        collective, and so may a collective that never completes: abort the group so the wait ends (the
        main thread then says why)."""
        sentinels = [p.sentinel for p in self.procs]
        while not self.closing:
            died = wait(sentinels, timeout=WATCH_INTERVAL_S)
            since = self.waiting_since
            stuck = since is not None and time.monotonic() - since > self.step_timeout_s
            if (died or stuck) and not self.closing:
                if not died:  # (a death is described by the main thread, which knows which worker)
                    self.failure = self.failure or (
                        f"a tensor-parallel step did not finish within {self.step_timeout_s:.0f} s: "
                        "a collective is stuck (every worker is alive)"
                    )
                self.aborted = True
                if self.group is not None:
                    self.group.abort()
                return

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S, release_group: bool = True) -> None:
        """Stop every worker (politely, then after timeout_s SIGTERM, then SIGKILL) and release the
        group (unless release_group is False: the process is exiting, which releases it). Idempotent."""
        self.closing = True
        stop = encode_message("shutdown")
        for proc, conn in zip(self.procs, self.conns):
            try:
                if proc.is_alive():
                    conn.send_bytes(stop)
            except OSError:  # already gone
                pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.pid is not None and proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        # The workers let rank 0's peer buffer go as they exited: now it can be freed (which waits for the
        # device). Releasing, NCCL's abort (destroy) comes first: it ends any collective of rank 0's that
        # waits for a worker killed above. Exiting, with the group kept, only if every worker left politely
        # (one killed kept its mapping: the buffer cannot be freed, and rank 0's device may wait for it).
        if self.group is not None and release_group:
            if self.graphs is not None:
                self.graphs.release()
            self.group.destroy()
        elif self.group is not None and all(proc.exitcode == 0 for proc in self.procs):
            self.group.close_peer_memory()
        self.group = None  # (unreleased at exit: the process tears NCCL down; a GPU test covers that path)


class _Rank0Runner(ModelRunner):
    """Rank 0's ModelRunner: every step it runs is first sent to the workers, so every rank runs
    the same forwards in the same order. (Steps inside __init__ — the memory profile — are not:
    each rank runs its own, in the same order.)"""

    send = None  # set by the executor once every rank is built

    def execute(
        self, inp: ModelInput, requests: list[SamplingRequest]
    ) -> tuple[SamplerOutput | None, PromptLogprobs | None, torch.Tensor | None]:
        if self.send is not None:
            self.send(inp)
        return super().execute(inp, requests)


@dataclass
class _CheckedStep(LaunchedStep):
    """Rank 0's launched step; reading it back also checks that no worker died while it ran (the
    watcher aborts the group then, and the collectives return garbage)."""

    executor: TensorParallelExecutor

    def wait(self) -> tuple[list[int], SamplerOutput | None]:
        workers = self.executor.workers
        try:
            workers.waiting_since = time.monotonic()  # (the watcher ends a wait that never would)
            try:
                result = super().wait()
            finally:
                workers.waiting_since = None
            if workers.aborted or workers.failure:
                raise RuntimeError(workers.failure or "a worker left the group during the step")
            return result
        except BaseException as e:
            self.executor._fail_group(e)


class TensorParallelExecutor:
    """Runs a model over `config.tensor_parallel_size` ranks; to the engine it looks like a
    ModelRunner (`launch`, `num_kvcache_blocks`) with a `shutdown`."""

    def __init__(self, config: Config):
        size = config.tensor_parallel_size
        if config.torch_device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(
                f"tensor_parallel_size={size} needs {size} GPUs, torch sees {torch.cuda.device_count()}"
            )
        self.config = config
        self.driver: _Rank0Runner | None = None
        store = create_rendezvous(size, COLLECTIVE_TIMEOUT_S)
        self.workers = WorkerSet()
        shares_cpu = config.torch_device.type == "cpu"
        if shares_cpu:
            _cpu_threads.enter(size)
        # Runs once: on shutdown(), when this executor is collected, or at interpreter exit.
        self._finalizer = weakref.finalize(self, _release, self.workers, shares_cpu)
        _watch_interpreter_exit()
        try:
            self._start_workers(store)
            for i in range(size - 1):
                self._expect(i, "hello")
            group = new_tp_group(
                store,
                0,
                size,
                worker_device(config, 0),
                COLLECTIVE_TIMEOUT_S,
                custom_all_reduce=not config.disable_custom_all_reduce,
            )
            self.workers.group = group
            # A worker dying from here on could leave rank 0 waiting in a collective: watch them.
            threading.Thread(target=self.workers.watch, name="nanovllm-tp-watch", daemon=True).start()
            try:
                with building_with(group):
                    self.driver = _Rank0Runner(config, worker_device(config, 0))
                self.workers.graphs = self.driver.cuda_graphs
            except Exception as e:  # a worker that died mid-collective is the likelier cause
                dead = self._wait_for_death(timeout_s=2.0)
                if dead is None:
                    raise
                raise RuntimeError(dead) from e
            blocks = [self.driver.num_kvcache_blocks] + [self._expect(i, "ready") for i in range(size - 1)]
        except BaseException:
            self.shutdown()
            raise
        self._store = store  # kept for the group's lifetime (NCCL connects lazily through it)
        self.rendezvous = f"{RENDEZVOUS_HOST}:{store.port}"
        if len(set(blocks)) > 1:
            logger.info("KV cache blocks per rank differ: %s; using the smallest", blocks)
        # Every rank allocated its own count; the scheduler hands out only ids all of them hold.
        self.num_kvcache_blocks = min(blocks)
        self.driver.send = self.workers.send_step  # (not a method of self: no reference cycle)

    def _start_workers(self, store) -> None:
        ctx = mp.get_context("spawn")  # fork would copy CUDA state and the driver's threads
        pid = os.getpid()
        for rank in range(1, self.config.tensor_parallel_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(self.config, rank, RENDEZVOUS_HOST, store.port, child_end, pid, COLLECTIVE_TIMEOUT_S),
                name=f"nanovllm-tp-rank{rank}",
                daemon=True,  # also stopped at interpreter exit by multiprocessing itself
            )
            proc.start()  # (listed once started: shutdown() can only stop a started process)
            self.workers.conns.append(parent_end)
            self.workers.procs.append(proc)
            child_end.close()  # only the worker holds it now: its exit is EOF here

    # ---- one step ---------------------------------------------------------------------------

    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        """Send the step to the workers and queue it on rank 0 without waiting (overlapped scheduling:
        every rank keeps the sampled ids rank 0 broadcasts, for the next step's pending inputs). A
        worker that died is noticed here, before the step goes out, or when the step is read back."""
        self._check_alive()
        self.workers.step_sent = False
        try:
            launched = self.driver.launch(batch)
        except BaseException as e:
            if not self.workers.step_sent:  # failed before any worker saw the step: nothing is out of step
                raise
            self._fail_group(e)
        return _CheckedStep(
            launched.token_ids,
            launched.event,
            launched.output,
            launched.prompt_logprobs,
            launched.pooled,
            self,
        )

    def _fail_group(self, e: BaseException) -> NoReturn:
        """A step the workers were sent failed. The ranks may now wait at different collectives: the
        group cannot be trusted again, and a worker waiting inside one never reads a polite
        "shutdown": stop the workers at once, and raise."""
        interrupted = not isinstance(e, Exception)  # Ctrl-C: no worker death to wait for
        dead = None if interrupted or self.workers.failure else self._wait_for_death(timeout_s=2.0)
        left = "a worker left the group during a step" if self.workers.aborted else None
        reason = self.workers.failure or dead or left or f"rank 0 failed during a step: {e!r}"
        self.workers.failure = reason
        self.workers.shutdown(timeout_s=0.0)
        self.shutdown()
        if interrupted:  # KeyboardInterrupt: let it through as it is
            raise e
        raise RuntimeError(f"{reason}\n{UNUSABLE}") from e

    # ---- health -----------------------------------------------------------------------------

    def _check_alive(self) -> None:
        w = self.workers
        if w.failure is None and w.closing:
            raise RuntimeError("the engine was shut down; create a new LLM")
        if w.failure is None:
            dead = w.dead()
            if dead:
                w.failure = w.describe_death(dead[0])
        if w.failure is not None:
            self.shutdown()
            raise RuntimeError(f"{w.failure}\n{UNUSABLE}")

    def _wait_for_death(self, timeout_s: float) -> str | None:
        """A collective fails a moment before the dead worker's exit status shows: wait that long."""
        wait([p.sentinel for p in self.workers.procs], timeout=timeout_s)
        dead = self.workers.dead()
        return self.workers.describe_death(dead[0]) if dead else None

    def _expect(self, i: int, kind: str):
        """The next control message of worker i, which must be `kind`; raises RuntimeError if the
        worker dies, reports an error or stays silent for STARTUP_TIMEOUT_S."""
        conn, proc = self.workers.conns[i], self.workers.procs[i]
        ready = wait([conn, proc.sentinel], timeout=STARTUP_TIMEOUT_S)
        if not ready:
            raise RuntimeError(
                f"tensor-parallel worker rank {i + 1} sent no {kind!r} within {STARTUP_TIMEOUT_S:.0f} s"
            )
        if conn in ready:
            try:
                got, payload = conn.recv()
            except EOFError:
                got, payload = None, None
            if got == kind:
                return payload
            if got == "error":
                raise RuntimeError(f"tensor-parallel worker rank {i + 1} failed to start:\n{payload}")
        raise RuntimeError(self.workers.describe_death(i))

    # ---- shutdown ---------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the workers and release this rank's model, KV cache and group (its CUDA graphs first:
        `WorkerSet.shutdown`). Idempotent."""
        self.driver = None
        self._finalizer()
        self._store = None


def _release(workers: WorkerSet, shares_cpu: bool) -> None:
    # At interpreter exit the group is left to the process's exit: NCCL's abort there never returned
    # (2 x H100: a script ending without llm.shutdown() hung in it for minutes), while the same abort
    # from shutdown() takes well under a second.
    workers.shutdown(release_group=not _interpreter_exiting.is_set())
    if shares_cpu:
        _cpu_threads.leave()


_interpreter_exiting = threading.Event()


@functools.cache
def _watch_interpreter_exit() -> None:
    """Set _interpreter_exiting at exit, before any finalizer runs: atexit calls the last registered
    first, and weakref.finalize registered its own hook when the first finalizer was made."""
    atexit.register(_interpreter_exiting.set)


class _CpuThreads:
    """CPU ranks share the cores: while CPU tensor-parallel engines run, this process uses
    cores // size torch threads (more threads than cores makes every rank spin-wait, ~10x slower);
    the thread count the process had is restored when the last of them shuts down."""

    def __init__(self):
        self.num_engines, self.num_threads_before = 0, None
        self._lock = threading.Lock()

    def enter(self, size: int) -> None:
        with self._lock:
            if self.num_engines == 0:
                self.num_threads_before = torch.get_num_threads()
            self.num_engines += 1
            torch.set_num_threads(min(torch.get_num_threads(), max(1, (os.cpu_count() or 1) // size)))

    def leave(self) -> None:
        with self._lock:
            self.num_engines -= 1
            if self.num_engines == 0:
                torch.set_num_threads(self.num_threads_before)


_cpu_threads = _CpuThreads()
