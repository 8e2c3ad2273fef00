"""The engine behind the HTTP server: one thread owns the `LLMEngine` and runs its step loop.

    asyncio handlers --(commands: queue.Queue)--> engine thread: add / abort, then step()
    asyncio handlers <--(loop.call_soon_threadsafe)-- per-request asyncio.Queue of outputs

Commands are applied between steps, so a request that arrives at any moment joins the running batch
at the next step (continuous batching). Only the engine thread touches the engine; the event loop
reads a stats snapshot the thread publishes after each step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.metrics import Metrics

logger = logging.getLogger("nanovllm.server")


class EngineDeadError(RuntimeError):
    """The engine thread has stopped; no request can be served."""


@dataclass
class SubRequest:
    """One engine request: a prompt's choice."""

    request_id: str
    prompt: str | None  # the text, when the prompt was text
    prompt_token_ids: list[int]
    params: SamplingParams
    fill_max_tokens: bool = False  # max_tokens = what max_model_len leaves after the prompt


@dataclass
class _Add:
    subs: list[SubRequest]
    incremental: bool
    sink: asyncio.Queue  # gets (index into subs, RequestOutput | Exception)
    accepted: asyncio.Future  # resolved once all subs are queued (or one is invalid: none is)


@dataclass
class _Abort:
    request_ids: list[str]


_STOP = object()


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], LLMEngine], metrics: Metrics | None = None):
        self._make_engine = make_engine
        self.metrics = metrics
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.Queue, int]] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.stats: dict[str, float] = {}  # snapshot of engine.stats(), replaced after each step

    # ---- lifecycle (event loop side) ------------------------------------------------------------

    async def start(self) -> None:
        """Build the engine in its own thread and wait until it is ready (re-raises its error)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)
        self._thread.start()
        await self._loop.run_in_executor(None, self._ready.wait)
        if self._error is not None:
            raise self._error

    def shutdown(self, timeout_s: float = 30.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    # ---- requests (event loop side) -------------------------------------------------------------

    async def submit(self, subs: list[SubRequest], incremental: bool) -> RequestStream:
        """Queue the sub-requests of one API request. Raises ValueError (naming the problem) if any is
        invalid, in which case none was queued."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine has stopped: {self._error!r}")
        stream = RequestStream(self, subs, incremental)
        accepted = self._loop.create_future()
        self._commands.put(_Add(subs, incremental, stream._queue, accepted))
        if self._error is not None:  # it died just now: its last sweep of the queue may have missed us
            accepted.cancel()
            raise EngineDeadError(f"the engine has stopped: {self._error!r}")
        try:
            await accepted
        except BaseException as e:
            if isinstance(e, ValueError):  # invalid: nothing was queued, nothing to abort
                stream._finished.update(range(len(subs)))
            else:  # cancelled (client gone), engine failure: drop whatever was queued
                stream.close()
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._commands.put(_Abort(request_ids))

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            engine = self._make_engine()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self.engine = engine
        self.stats = engine.stats()
        self._ready.set()
        try:
            while self._apply_commands(block=not engine.has_unfinished()):
                if engine.has_unfinished():
                    self._step(engine)
                self.stats = engine.stats()
        except BaseException as e:
            logger.exception("the engine thread failed")
            self._error = e
            dead = EngineDeadError(f"the engine thread failed: {e!r}")
            self._fail(list(self._sinks), dead)
            while True:  # answer the requests still queued, or their handlers would wait forever
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if isinstance(cmd, _Add):
                    self._resolve(cmd.accepted, dead)
        finally:
            engine.shutdown()

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle). Returns False on shutdown."""
        try:
            cmd = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if cmd is _STOP:
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            else:
                for rid in cmd.request_ids:
                    self.engine.abort(rid)
                    self._sinks.pop(rid, None)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, cmd: _Add) -> None:
        engine = self.engine
        try:  # validate all before queuing any
            checked = []
            for sub in cmd.subs:
                params = sub.params
                if sub.fill_max_tokens:
                    room = engine.config.max_model_len - len(sub.prompt_token_ids)
                    if room < 1:
                        raise ValueError(
                            f"the prompt ({len(sub.prompt_token_ids)} tokens) leaves no room to generate "
                            f"within max_model_len={engine.config.max_model_len}"
                        )
                    params = dataclasses.replace(params, max_tokens=room)
                checked.append((engine.encode_prompt(sub.prompt_token_ids, params), params))
        except ValueError as e:
            self._resolve(cmd.accepted, e)
            return
        try:
            for index, (sub, (token_ids, params)) in enumerate(zip(cmd.subs, checked)):
                engine.add_request(sub.prompt, params, sub.request_id, cmd.incremental, token_ids)
                self._sinks[sub.request_id] = (cmd.sink, index)
        except Exception as e:  # a bug, not the user's fault: fail this request, keep serving
            logger.exception("adding a request failed")
            for sub in cmd.subs:
                engine.abort(sub.request_id)
                self._sinks.pop(sub.request_id, None)
            self._resolve(cmd.accepted, e)
            return
        self._resolve(cmd.accepted, None)

    def _step(self, engine: LLMEngine) -> None:
        try:
            outputs = engine.step()
        except Exception as e:
            # The engine has aborted that step's requests and stays usable: fail only those.
            logger.exception("engine step failed")
            failed = [rid for rid in self._sinks if rid not in engine.requests]
            if not failed:  # nothing was dropped (e.g. nothing schedulable): fail all, or we spin
                failed = list(self._sinks)
                for rid in failed:
                    engine.abort(rid)
            self._fail(failed, e)
            return
        deliveries = []
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue  # aborted in the meantime
            deliveries.append((sink[0], (sink[1], out)))
            if out.finished:
                del self._sinks[out.request_id]
        if deliveries:
            self._loop.call_soon_threadsafe(_deliver, deliveries)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        deliveries = []
        for rid in request_ids:
            sink = self._sinks.pop(rid, None)
            if sink is not None:
                deliveries.append((sink[0], (sink[1], error)))
        if deliveries:
            self._loop.call_soon_threadsafe(_deliver, deliveries)

    def _resolve(self, future: asyncio.Future, error: BaseException | None) -> None:
        def resolve() -> None:
            if not future.done():
                future.set_result(None) if error is None else future.set_exception(error)

        self._loop.call_soon_threadsafe(resolve)


def _deliver(deliveries: list[tuple[asyncio.Queue, tuple]]) -> None:
    for sink, item in deliveries:
        sink.put_nowait(item)


class RequestStream:
    """The outputs of one API request's sub-requests, as (index, cumulative RequestOutput).

    Outputs are cumulative, so when the handler falls behind the engine (many streams, a fast GPU) only
    the latest output of each sub-request is kept: the client gets fewer, larger chunks instead of a
    growing backlog. `close()` aborts whatever has not finished: call it in a `finally`."""

    def __init__(self, engine: AsyncEngine, subs: list[SubRequest], incremental: bool):
        self._engine = engine
        self._incremental = incremental  # else the engine reports only finished outputs
        self._ids = [s.request_id for s in subs]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pending: dict[int, RequestOutput | BaseException] = {}  # latest per index, in arrival order
        self._finished: set[int] = set()
        self._arrival = time.perf_counter()
        self._first_token: dict[int, float] = {}

    @property
    def num_unfinished(self) -> int:
        return len(self._ids) - len(self._finished)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self._pending:
            if not self.num_unfinished:
                raise StopAsyncIteration
            self._take(await self._queue.get())
            while not self._queue.empty():
                self._take(self._queue.get_nowait())
        index = next(iter(self._pending))
        out = self._pending.pop(index)
        if isinstance(out, BaseException):
            self._finished.add(index)
            raise out
        now = time.perf_counter()
        first = self._first_token.setdefault(index, now)
        metrics = self._engine.metrics
        if metrics is not None and first == now and self._incremental:
            metrics.ttft.observe(now - self._arrival)
        if out.finished:
            self._finished.add(index)
            if metrics is not None:
                c = out.outputs[0]
                decode_s = now - first if self._incremental else None
                metrics.observe_finished(c.finish_reason, now - self._arrival, decode_s, len(c.token_ids))
        return index, out

    def _take(self, item: tuple[int, RequestOutput | BaseException]) -> None:
        index, out = item
        self._pending[index] = out  # a newer output replaces the older one, keeping its place

    def close(self) -> None:
        unfinished = [rid for i, rid in enumerate(self._ids) if i not in self._finished]
        self._finished.update(range(len(self._ids)))
        if unfinished:
            self._engine.abort(unfinished)
            if self._engine.metrics is not None:
                for _ in unfinished:
                    self._engine.metrics.observe_aborted()
