"""The engine process ("engine core"): owns the `LLMEngine` and runs its step loop, away from the HTTP
front end's GIL.

    front end --(commands: pipe)--> engine process: apply add / abort / stop, then step()
    front end <--(one EngineMessage per iteration: pipe)-- deltas of the requests that progressed + stats

Commands are applied between steps, so a request that arrives at any moment joins the running batch at
the next step (continuous batching). Each loop iteration sends exactly one message: the replies to the
adds it applied, a small `RequestDelta` per request that progressed (new tokens and text only, never the
whole output again), the requests a failed step dropped, and `engine.stats()`. The front end is
async_engine.py; this module is what runs in the spawned process (`run_engine_core`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import numpy as np

from nanovllm.outputs import Logprob, PoolingRequestOutput, RequestOutput
from nanovllm.pooling_params import PoolingParams
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.heap import freeze_heap

if TYPE_CHECKING:
    from nanovllm.engine.llm_engine import LLMEngine

logger = logging.getLogger("nanovllm.server")

# ---- commands: front end -> engine process ------------------------------------------------------------


@dataclass
class SubRequest:
    """One engine request: a prompt's choice."""

    request_id: str
    prompt: str | None  # the text, when the prompt was text
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams  # PoolingParams: an embedding request
    fill_max_tokens: bool = False  # max_tokens at most what max_model_len leaves after the prompt
    priority: int = 0
    # A step of a server-side beam search: kept out of the request and token metrics (the server counts
    # the search itself as the client's request).
    internal: bool = False


@dataclass
class AddCommand:
    """Queue all of `subs` or, if one is invalid, none; the engine replies with `add_id`."""

    add_id: int
    subs: list[SubRequest]
    incremental: bool  # report every new token (streaming), else only finished requests


@dataclass
class AbortCommand:
    request_ids: list[str]


STOP = "stop"  # the command that ends the loop


# ---- messages: engine process -> front end ------------------------------------------------------------


@dataclass(slots=True)
class RequestDelta:
    """What one request gained since its previous delta. Prompt token ids never travel back: the front
    end sent them."""

    request_id: str
    token_ids: list[int]  # new tokens
    text: str  # new text (the engine's text only grows: it holds back what a stop string could cut)
    logprobs: list[Logprob] | None  # one per new token; None when not asked for
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort", once finished
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache: first delta only
    # SamplingParams.prompt_logprobs (None for the first prompt token): first delta only
    prompt_logprobs: list[Logprob | None] | None = None
    # an embedding request's vector, float32 (its only delta; an array pickles as bytes: a list of 4,096
    # Python floats would cost the engine loop ~100x more)
    embedding: np.ndarray | None = None

    def merge(self, later: RequestDelta) -> RequestDelta:
        """This delta followed by `later`, as one."""
        logprobs = None if self.logprobs is None else self.logprobs + (later.logprobs or [])
        return RequestDelta(
            self.request_id,
            self.token_ids + later.token_ids,
            self.text + later.text,
            logprobs,
            later.finished,
            later.finish_reason,
            later.stop_reason,
            self.num_cached_tokens if self.num_cached_tokens is not None else later.num_cached_tokens,
            self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
            later.embedding,
        )


@dataclass
class EngineMessage:
    """One loop iteration of the engine process. The first message says the engine is built; a message
    with `error` set is the last one (the engine failed to start, or its loop died)."""

    stats: dict[str, float]  # engine.stats() after this iteration
    replies: list[tuple[int, BaseException | None]] = field(default_factory=list)  # (add_id, error)
    # RequestDelta's fields as a plain tuple (logprobs as Logprob's fields in tuples): 256 of
    # them pickle in ~60 us, 5x faster than dataclasses. `decode_deltas` turns them back.
    deltas: list[tuple] = field(default_factory=list)
    failed: list[tuple[list[str], BaseException]] = field(default_factory=list)  # a step's dropped requests
    error: BaseException | None = None


# ---- the engine process ---------------------------------------------------------------------------------


def run_engine_core(
    make_engine: Callable[[], LLMEngine],
    commands: Connection,
    conn: Connection,
    parent_pid: int,
    log_level: int,
) -> None:
    """Entry point of the spawned engine process: pickled commands (AddCommand | AbortCommand | STOP)
    come in on `commands`, pickled EngineMessages go out on `conn`. It is not a daemon (it may spawn
    tensor-parallel workers), so it exits when its parent is gone: EOF on `commands`, or, while it
    is busy in a step, a thread that watches the parent pid."""
    from nanovllm.engine.tp_worker import exit_when_parent_dies

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front end's; it stops us
    exit_when_parent_dies(parent_pid)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s [engine core]: %(message)s")
    code = 0
    try:
        engine = make_engine()
    except BaseException as e:
        logger.exception("building the engine failed")
        _send_error(conn, e)
        code = 1
    else:
        freeze_heap()  # this process serves one engine until it exits: full collections skip its objects
        try:
            EngineCore(engine, commands, conn).run()
        except BaseException as e:
            logger.exception("the engine loop failed")
            _send_error(conn, e)
            code = 1
        finally:
            engine.shutdown()
    conn.close()
    # Skip the interpreter's teardown (collecting every torch module takes seconds on a small CPU).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class _Sent:
    """How much of a request's output earlier deltas carried."""

    num_tokens: int = 0
    num_chars: int = 0


class EngineCore:
    """The loop: apply commands (waiting for one when idle), step, send one message."""

    def __init__(self, engine: LLMEngine, commands: Connection, conn: Connection):
        self.engine = engine
        self.commands = commands
        self.conn = conn
        self.sent: dict[str, _Sent] = {}  # the requests added and not yet finished or aborted
        self.message = EngineMessage(engine.stats())

    def run(self) -> None:
        self._flush()  # the first message: ready
        engine = self.engine
        while self._apply_commands(block=not engine.has_unfinished()):
            if engine.has_unfinished():
                self._step()
            self._flush()

    def _flush(self) -> None:
        self.message.stats = self.engine.stats()
        _send(self.conn, self.message)
        self.message = EngineMessage({})

    def _apply_commands(self, block: bool) -> bool:
        """Apply the commands that have arrived. Returns False on STOP, or when the front end is gone."""
        if not block and not self.commands.poll():
            return True
        while True:
            try:
                cmd = pickle.loads(self.commands.recv_bytes())
            except EOFError:
                return False
            if cmd == STOP:
                return False
            if isinstance(cmd, AddCommand):
                self._add(cmd)
            else:
                for rid in cmd.request_ids:
                    self.engine.abort(rid)
                    self.sent.pop(rid, None)
            if not self.commands.poll():
                return True

    def _add(self, cmd: AddCommand) -> None:
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
                    # (a min_tokens above it: a ParamError naming min_tokens, the server's 400)
                    params = dataclasses.replace(params, max_tokens=min(params.max_tokens, room))
                checked.append((engine.encode_prompt(sub.prompt_token_ids, params), params))
        except ValueError as e:
            self.message.replies.append((cmd.add_id, e))
            return
        except Exception as e:  # a bug, not the user's fault: fail this request, keep serving
            logger.exception("checking a request failed")
            self.message.replies.append((cmd.add_id, _portable(e)))
            return
        try:
            for sub, (token_ids, params) in zip(cmd.subs, checked):
                engine.add_request(
                    sub.prompt,
                    params,
                    sub.request_id,
                    cmd.incremental,
                    token_ids,
                    priority=sub.priority,
                    counted=not sub.internal,
                )
                self.sent[sub.request_id] = _Sent()
        except Exception as e:  # a bug, not the user's fault: fail this request, keep serving
            logger.exception("adding a request failed")
            for sub in cmd.subs:
                engine.abort(sub.request_id)
                self.sent.pop(sub.request_id, None)
            self.message.replies.append((cmd.add_id, _portable(e)))
            return
        self.message.replies.append((cmd.add_id, None))

    def _step(self) -> None:
        engine = self.engine
        try:
            outputs = engine.step()
        except Exception as e:
            # The engine has aborted that step's requests and stays usable: fail only those.
            logger.exception("engine step failed")
            failed = [rid for rid in engine.dropped_request_ids if rid in self.sent]
            if not failed:  # nothing was dropped (e.g. nothing schedulable): fail all, or we spin
                failed = list(self.sent)
                for rid in failed:
                    engine.abort(rid)
            for rid in failed:
                del self.sent[rid]
            self.message.failed.append((failed, _portable(e)))
            return
        deltas = self.message.deltas
        for out in outputs:
            sent = self.sent.get(out.request_id)
            if sent is not None:  # else aborted in the meantime
                deltas.append(_delta(out, sent))
                if out.finished:
                    del self.sent[out.request_id]


def _delta(out: RequestOutput | PoolingRequestOutput, sent: _Sent) -> tuple:
    """The part of a cumulative output not sent yet, as RequestDelta's fields; advances `sent`."""
    if isinstance(out, PoolingRequestOutput):  # (finished: its vector, as a list of floats)
        return (
            out.request_id,
            [],
            "",
            None,
            True,
            "stop",
            None,
            out.num_cached_tokens,
            None,
            out.outputs.data.numpy(),
        )
    c = out.outputs[0]
    num_tokens = len(c.token_ids)
    logprobs = None
    if c.logprobs is not None:
        new = c.logprobs[sent.num_tokens : num_tokens]
        logprobs = [(lp.token_id, lp.logprob, lp.top_logprobs, lp.rank) for lp in new]
    first = sent.num_tokens == 0
    prompt_logprobs = None
    if first and out.prompt_logprobs is not None:
        prompt_logprobs = [
            lp and (lp.token_id, lp.logprob, lp.top_logprobs, lp.rank) for lp in out.prompt_logprobs
        ]
    delta = (
        out.request_id,
        c.token_ids[sent.num_tokens :],
        c.text[sent.num_chars :],
        logprobs,
        out.finished,
        c.finish_reason if out.finished else None,
        c.stop_reason if out.finished else None,
        out.num_cached_tokens if first else None,
        prompt_logprobs,
    )
    sent.num_tokens, sent.num_chars = num_tokens, len(c.text)
    return delta


def decode_deltas(message: EngineMessage) -> list[RequestDelta]:
    deltas = [RequestDelta(*fields) for fields in message.deltas]
    for d in deltas:
        if d.logprobs is not None:
            d.logprobs = [Logprob(*lp) for lp in d.logprobs]
        if d.prompt_logprobs is not None:
            d.prompt_logprobs = [lp and Logprob(*lp) for lp in d.prompt_logprobs]
    return deltas


def _send(conn: Connection, message: EngineMessage) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _send_error(conn: Connection, error: BaseException) -> None:
    try:
        _send(conn, EngineMessage({}, error=_portable(error)))
    except OSError:  # the front end is gone too
        pass


def _portable(e: BaseException) -> BaseException:
    """`e` if it survives pickling, else a RuntimeError carrying its repr (the traceback is logged here)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(repr(e))
