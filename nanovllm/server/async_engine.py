"""The engine behind the HTTP server, front-end side. The engine itself runs in its own process
(engine_core.py), so its Python work per step never holds the GIL the HTTP handlers need.

    handlers --submit / abort--> AsyncEngine --> writer thread --(commands: pipe)--> engine process
    handlers <--RequestStream-- AsyncEngine._on_message <--(call_soon_threadsafe)-- reader thread
                                                         <--(one EngineMessage per step: pipe)--

The reader thread blocks in `recv` (which releases the GIL) and hands each message to the event loop
in one call. The writer thread sends the commands, so a full pipe (the engine busy in a long step
while many requests arrive) never blocks the event loop. Everything else here runs on the event loop.

The engine process is spawned; it may spawn tensor-parallel workers of its own, so it is not a daemon:
it exits when this process dies, and `shutdown()` stops it. If it dies, every pending and later
request gets an EngineDeadError.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from nanovllm.server.engine_core import (
    STOP,
    AbortCommand,
    AddCommand,
    EngineMessage,
    RequestDelta,
    SubRequest,
    decode_deltas,
    run_engine_core,
)
from nanovllm.server.metrics import Metrics

if TYPE_CHECKING:
    from nanovllm.engine.llm_engine import LLMEngine

__all__ = ["AsyncEngine", "EngineDeadError", "RequestDelta", "RequestStream", "SubRequest"]

logger = logging.getLogger("nanovllm.server")

STOP_TIMEOUT_S = 5.0  # after the polite stop (and its timeout): SIGTERM, wait this long, then SIGKILL


class EngineDeadError(RuntimeError):
    """The engine process has stopped; no request can be served."""


class AsyncEngine:
    """The engine process and the requests waiting on it. `make_engine` is called in the engine
    process, so it must pickle: a top-level function or class, or a functools.partial of one."""

    def __init__(self, make_engine: Callable[[], LLMEngine], metrics: Metrics | None = None):
        self._make_engine = make_engine
        self.metrics = metrics
        self.stats: dict[str, float] = {}  # engine.stats() as of the engine's latest message
        self._proc: mp.process.BaseProcess | None = None
        self._commands: _CommandSender | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._error: BaseException | None = None  # why the engine stopped, once it did
        self._stopping = False
        self._add_ids = itertools.count()
        self._adds: dict[int, asyncio.Future] = {}  # add_id -> resolved by the engine's reply
        self._streams: dict[str, tuple[RequestStream, int]] = {}  # request id -> (stream, index)
        self._finalizer: weakref.finalize | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the engine process and wait until its engine is built (re-raises its error)."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        ctx = mp.get_context("spawn")  # fork would copy this process's threads (and CUDA state)
        child_commands, commands = ctx.Pipe(duplex=False)
        self._conn, child_conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=run_engine_core,
            args=(self._make_engine, child_commands, child_conn, os.getpid(), logging.getLogger().level),
            name="nanovllm-engine-core",
        )
        try:
            proc.start()  # raises if make_engine does not pickle
        except BaseException:
            commands.close()
            self._conn.close()
            raise
        finally:
            # The engine process holds the only other ends now: its exit is our EOF, and ours its.
            child_commands.close()
            child_conn.close()
        self._proc = proc
        self._commands = _CommandSender(commands)
        # Runs once: on shutdown(), or at interpreter exit (before multiprocessing joins its children).
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._commands, STOP_TIMEOUT_S)
        self._reader = threading.Thread(target=self._read, name="nanovllm-engine-reader", daemon=True)
        self._reader.start()
        try:
            await self._ready
        except BaseException:
            self.shutdown(timeout_s=STOP_TIMEOUT_S)
            raise

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop the engine process: politely, then after timeout_s SIGTERM, then SIGKILL. Idempotent."""
        if self._proc is None or self._stopping:
            return
        self._stopping = True
        self._finalizer.detach()
        _stop(self._proc, self._commands, timeout_s)
        self._reader.join(timeout=STOP_TIMEOUT_S)  # it reads to EOF, which the exit above made
        self._conn.close()

    @property
    def is_alive(self) -> bool:
        return self._error is None and self._proc is not None and self._proc.is_alive()

    # ---- requests -------------------------------------------------------------------------------

    async def submit(self, subs: list[SubRequest], incremental: bool) -> RequestStream:
        """Queue the sub-requests of one API request. Raises ValueError (naming the problem) if any is
        invalid, in which case none was queued."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine has stopped: {self._error or 'its process exited'}")
        stream = RequestStream(self, subs, incremental)
        add_id = next(self._add_ids)
        accepted = self._loop.create_future()
        self._adds[add_id] = accepted
        for index, sub in enumerate(subs):
            self._streams[sub.request_id] = (stream, index)
        self._commands.put(AddCommand(add_id, subs, incremental))
        try:
            await accepted
        except BaseException as e:
            self._adds.pop(add_id, None)
            if isinstance(e, ValueError):  # invalid: nothing was queued, nothing to abort
                stream._finished.update(range(len(subs)))
                for sub in subs:
                    self._streams.pop(sub.request_id, None)
            else:  # cancelled (client gone), engine failure: drop whatever was queued
                stream.close()
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._streams.pop(rid, None)
        if request_ids and self.is_alive:
            self._commands.put(AbortCommand(request_ids))

    # ---- messages from the engine process ---------------------------------------------------------

    def _read(self) -> None:
        """Reader thread: one event-loop call per message, until the engine process is gone."""
        while True:
            try:
                message = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                break
            self._call(self._on_message, message, decode_deltas(message))
            if message.error is not None:
                break
        self._proc.join(timeout=1.0)  # it closed its pipe: it is exiting
        self._call(self._on_exit, _describe_exit(self._proc))

    def _call(self, fn: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def _on_message(self, message: EngineMessage, deltas: list[RequestDelta]) -> None:
        if message.error is not None:
            if not self._ready.done():
                self._ready.set_exception(message.error)
            logger.error("the engine process failed: %r", message.error)
            self._fail_all(EngineDeadError(f"the engine process failed: {message.error!r}"))
            return
        self.stats = message.stats
        if not self._ready.done():
            self._ready.set_result(None)
        for add_id, error in message.replies:
            accepted = self._adds.pop(add_id, None)
            if accepted is not None and not accepted.done():
                accepted.set_result(None) if error is None else accepted.set_exception(error)
        for request_ids, error in message.failed:
            for rid in request_ids:
                entry = self._streams.pop(rid, None)
                if entry is not None:
                    entry[0]._put(entry[1], error)
        for delta in deltas:
            entry = self._streams.get(delta.request_id)
            if entry is None:
                continue  # aborted in the meantime
            entry[0]._put(entry[1], delta)
            if delta.finished:
                del self._streams[delta.request_id]

    def _on_exit(self, how: str) -> None:
        if not self._ready.done():
            self._ready.set_exception(RuntimeError(f"the engine process exited during start-up ({how})"))
        if self._error is not None:
            return
        if not self._stopping:
            logger.error("the engine process exited unexpectedly (%s)", how)
        self._fail_all(EngineDeadError(f"the engine process exited ({how})"))

    def _fail_all(self, error: EngineDeadError) -> None:
        self._error = error
        for accepted in self._adds.values():
            if not accepted.done():
                accepted.set_exception(error)
        self._adds.clear()
        for stream, index in self._streams.values():
            stream._put(index, error)
        self._streams.clear()


class _CommandSender:
    """Pickles and sends commands from its own thread, in the order they were put."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine-writer", daemon=True)
        self._thread.start()

    def put(self, command) -> None:
        self._queue.put(command)

    def _run(self) -> None:
        while (command := self._queue.get()) is not None:
            try:
                self._conn.send_bytes(pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL))
            except OSError:  # the engine process is gone; its reader reports that
                break
        self._conn.close()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=STOP_TIMEOUT_S)


def _stop(proc: mp.process.BaseProcess, commands: _CommandSender, timeout_s: float) -> None:
    if proc.is_alive():
        commands.put(STOP)
        proc.join(timeout_s)
    if proc.is_alive():
        proc.terminate()
        proc.join(STOP_TIMEOUT_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
    commands.close()


def _describe_exit(proc: mp.process.BaseProcess) -> str:
    code = proc.exitcode
    if code is None:
        return f"pid {proc.pid}, still exiting"
    if code < 0:
        return f"pid {proc.pid}, killed by {signal.Signals(-code).name}"
    return f"pid {proc.pid}, exit code {code}"


class RequestStream:
    """The outputs of one API request's sub-requests, as (index, RequestDelta): each delta holds the
    tokens and text that sub-request gained since the previous one.

    When the handler falls behind the engine (many streams, a fast GPU) the deltas waiting for a
    sub-request are merged into one: the client gets fewer, larger chunks instead of a growing backlog.
    `close()` aborts whatever has not finished: call it in a `finally`."""

    def __init__(self, engine: AsyncEngine, subs: list[SubRequest], incremental: bool):
        self._engine = engine
        # (a beam search's steps are not the client's requests: the search counts itself)
        self._metrics = None if any(s.internal for s in subs) else engine.metrics
        self._incremental = incremental  # else the engine reports only finished requests
        self._ids = [s.request_id for s in subs]
        self._pending: dict[int, RequestDelta | BaseException] = {}  # per index, in arrival order
        self._wakeup = asyncio.Event()
        self._finished: set[int] = set()
        self._arrival = time.perf_counter()
        self._first_token: dict[int, float] = {}
        self._num_tokens = [0] * len(subs)

    @property
    def num_unfinished(self) -> int:
        return len(self._ids) - len(self._finished)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestDelta]:
        while not self._pending:
            if not self.num_unfinished:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        index = next(iter(self._pending))
        delta = self._pending.pop(index)
        if isinstance(delta, BaseException):
            self._finished.add(index)
            raise delta
        self._num_tokens[index] += len(delta.token_ids)
        now = time.perf_counter()
        first = self._first_token.setdefault(index, now)
        metrics = self._metrics
        if metrics is not None and first == now and self._incremental:
            metrics.ttft.observe(now - self._arrival)
        if delta.finished:
            self._finished.add(index)
            if metrics is not None:
                decode_s = now - first if self._incremental else None
                num_tokens = self._num_tokens[index]
                metrics.observe_finished(delta.finish_reason, now - self._arrival, decode_s, num_tokens)
        return index, delta

    def _put(self, index: int, item: RequestDelta | BaseException) -> None:
        """From the AsyncEngine, on the event loop."""
        pending = self._pending.get(index)
        if isinstance(pending, RequestDelta) and isinstance(item, RequestDelta):
            item = pending.merge(item)
        self._pending[index] = item  # replacing keeps the index's place in the order
        self._wakeup.set()

    def close(self) -> None:
        unfinished = [rid for i, rid in enumerate(self._ids) if i not in self._finished]
        self._finished.update(range(len(self._ids)))
        if unfinished:
            self._engine.abort(unfinished)
            if self._metrics is not None:
                for _ in unfinished:
                    self._metrics.observe_aborted()
