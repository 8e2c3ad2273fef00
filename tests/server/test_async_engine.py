"""The AsyncEngine and its engine process, driven with a fake engine (built in the engine process):
outputs reach the right request, invalid or failing requests get an answer (never a hang), the rest
keep being served, an engine process that dies (even SIGKILL) fails everything pending and later, and
shutdown leaves no process behind."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing as mp
import os
import signal
import time
from types import SimpleNamespace

import pytest

from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.async_engine import AsyncEngine, EngineDeadError, SubRequest
from nanovllm.server.engine_core import EngineMessage, _delta, _Sent, decode_deltas


class FakeEngine:
    """One token per step per request; `fail_add_for` / `fail_step_for` / `die_on` inject failures
    for the request ids that contain the given text. It runs in the engine process: tests see its
    state through stats()."""

    def __init__(
        self,
        fail_add_for: str | None = None,
        fail_step_for: str | None = None,
        die_on: str | None = None,
        step_s: float = 0.0,
    ):
        self.step_s = step_s
        self.config = SimpleNamespace(max_model_len=64)
        self.requests: dict[str, list] = {}  # id -> [params, tokens, stream]
        self.fail_add_for, self.fail_step_for, self.die_on = fail_add_for, fail_step_for, die_on
        self.aborted: list[str] = []
        self.dropped_request_ids: list[str] = []  # as LLMEngine: the requests a raising step failed

    def encode_prompt(self, ids, params):
        if len(ids) + params.max_tokens > self.config.max_model_len:
            raise ValueError(f"too long for max_model_len={self.config.max_model_len}")
        return list(ids)

    def add_request(self, prompt, params, request_id, incremental, token_ids, priority=0, counted=True):
        if self.fail_add_for is not None and self.fail_add_for in request_id:
            raise TypeError("a bug in add_request")
        self.requests[request_id] = [params, [], incremental]

    def abort(self, request_id):
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished(self):
        return bool(self.requests)

    def step(self):
        time.sleep(self.step_s)
        if self.die_on is not None and self.die_on in " ".join(self.requests):
            raise SystemExit("the engine is gone")  # not an Exception: ends the engine loop
        if self.fail_step_for is not None and any(self.fail_step_for in r for r in self.requests):
            self.dropped_request_ids = [r for r in self.requests if self.fail_step_for in r]
            for rid in self.dropped_request_ids:
                del self.requests[rid]
            raise RuntimeError("step failed")
        outputs = []
        for rid, (params, tokens, stream) in list(self.requests.items()):
            tokens.append(len(tokens))
            done = len(tokens) >= params.max_tokens
            if done or stream:
                c = CompletionOutput(0, "x" * len(tokens), list(tokens), "length" if done else None)
                outputs.append(RequestOutput(rid, None, [1], [c], 0, done))
            if done:
                del self.requests[rid]
        return outputs

    def stats(self):
        return {"num_running": len(self.requests), "num_aborted": len(self.aborted)}

    def shutdown(self):
        pass


def _subs(name: str, n: int, max_tokens: int = 3, prompt_len: int = 2) -> list[SubRequest]:
    return [
        SubRequest(f"{name}-{i}", None, [1] * prompt_len, SamplingParams(max_tokens=max_tokens))
        for i in range(n)
    ]


async def _final(engine: AsyncEngine, subs, incremental=True) -> dict[int, list[int]]:
    stream = await engine.submit(subs, incremental)
    got: dict[int, list[int]] = {}
    try:
        async for index, delta in stream:
            assert not delta.finished or delta.finish_reason == "length"
            got[index] = got.get(index, []) + delta.token_ids
            assert delta.text == "x" * len(delta.token_ids)
    finally:
        stream.close()
    return got


async def _wait_for_stats(engine: AsyncEngine, **want) -> None:
    for _ in range(500):
        if all(engine.stats.get(k) == v for k, v in want.items()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"stats {engine.stats} never reached {want}")


def _run(make_fake, body):
    async def main():
        engine = AsyncEngine(make_fake)
        await engine.start()
        try:
            return await body(engine)
        finally:
            engine.shutdown()
            assert not engine._proc.is_alive() and engine._proc.exitcode is not None
            assert engine._proc not in mp.active_children()

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_outputs_reach_their_requests():
    async def body(engine):
        a, b = await asyncio.gather(_final(engine, _subs("a", 2, 3)), _final(engine, _subs("b", 1, 5), False))
        return a, b

    a, b = _run(FakeEngine, body)
    assert a == {0: [0, 1, 2], 1: [0, 1, 2]} and b == {0: [0, 1, 2, 3, 4]}


def test_invalid_request_is_a_value_error_and_queues_nothing():
    async def body(engine):
        with pytest.raises(ValueError, match="max_model_len=64"):
            await engine.submit(_subs("ok", 1) + _subs("long", 1, prompt_len=80), True)
        result = await _final(engine, _subs("next", 1))
        await _wait_for_stats(engine, num_running=0)
        return result, engine.stats["num_aborted"]

    assert _run(FakeEngine, body) == ({0: [0, 1, 2]}, 0)


def test_a_failing_add_is_answered_and_the_engine_keeps_serving():
    async def body(engine):
        with pytest.raises(TypeError):
            await engine.submit(_subs("bad", 1), True)
        return await _final(engine, _subs("good", 1))

    assert _run(functools.partial(FakeEngine, fail_add_for="bad"), body) == {0: [0, 1, 2]}


def test_a_failing_step_fails_only_its_requests():
    async def body(engine):
        bad = engine.submit(_subs("bad", 1, 10), True)
        good = _final(engine, _subs("good", 1, 4))
        bad_stream, good_result = await asyncio.gather(bad, good)
        with pytest.raises(RuntimeError, match="step failed"):
            async for _ in bad_stream:
                pass
        return good_result

    assert _run(functools.partial(FakeEngine, fail_step_for="bad"), body) == {0: [0, 1, 2, 3]}


def test_a_dead_engine_answers_everyone():
    async def body(engine):
        running = await engine.submit(_subs("running", 1, 60), True)
        with pytest.raises(EngineDeadError):  # from submit or from the stream: the add and the fatal
            async for _ in await engine.submit(_subs("doomed", 1, 50), True):  # step share a message
                pass
        with pytest.raises(EngineDeadError):
            async for _ in running:
                pass
        assert not engine.is_alive
        with pytest.raises(EngineDeadError):
            await engine.submit(_subs("late", 1), True)

    _run(functools.partial(FakeEngine, die_on="doomed"), body)


def test_close_aborts_unfinished_requests():
    async def body(engine):
        stream = await engine.submit(_subs("long", 2, 60), True)
        await stream.__anext__()
        stream.close()
        # the abort is applied by the engine process between steps; its next message says so
        await _wait_for_stats(engine, num_running=0, num_aborted=2)

    _run(functools.partial(FakeEngine, step_s=0.01), body)  # 60 tokens take 0.6 s: the abort comes first


def test_deltas_merge_when_the_handler_falls_behind():
    async def body(engine):
        stream = await engine.submit(_subs("slow", 1, 20), True)
        await _wait_for_stats(engine, num_running=0)  # all 20 steps ran before we read anything
        try:
            return [delta async for _, delta in stream]
        finally:
            stream.close()

    (delta,) = _run(FakeEngine, body)
    assert delta.token_ids == list(range(20)) and delta.text == "x" * 20 and delta.finished


def test_a_killed_engine_process_fails_everything_and_never_hangs():
    async def body(engine):
        streams = [await engine.submit(_subs(f"s{i}", 2, 60), True) for i in range(3)]
        for stream in streams:
            await stream.__anext__()
        os.kill(engine._proc.pid, signal.SIGKILL)
        for stream in streams:
            with pytest.raises(EngineDeadError, match="SIGKILL"):
                async for _ in stream:
                    pass
        assert not engine.is_alive
        with pytest.raises(EngineDeadError):
            await engine.submit(_subs("late", 1), True)

    _run(functools.partial(FakeEngine, step_s=0.05), body)  # 60 tokens take 3 s: killed long before


def test_a_start_up_failure_reaches_start():
    async def main():
        engine = AsyncEngine(functools.partial(_fail_to_build, "no such model"))
        with pytest.raises(ValueError, match="no such model"):
            await engine.start()
        assert not engine.is_alive and engine._proc not in mp.active_children()

    asyncio.run(asyncio.wait_for(main(), 60))


def _fail_to_build(message: str):
    raise ValueError(message)


def test_deltas_carry_every_field_of_the_logprobs():
    generated = [Logprob(7, -0.5, {7: -0.5, 3: -1.0}, 1), Logprob(3, -2.0, {1: -0.1, 3: -2.0}, 2)]
    prompt = [None, Logprob(4, -3.0, {}, 5)]
    out = RequestOutput(
        "r", None, [1, 4], [CompletionOutput(0, "ab", [7, 3], None, logprobs=generated)], 0, False
    )
    out.prompt_logprobs = prompt
    (delta,) = decode_deltas(EngineMessage({}, deltas=[_delta(out, _Sent())]))
    assert delta.logprobs == generated and delta.prompt_logprobs == prompt
