"""The AsyncEngine's thread and queues, driven with a fake engine: outputs reach the right request,
invalid or failing requests get an answer (never a hang), and the rest keep being served."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.server.async_engine import AsyncEngine, EngineDeadError, SubRequest


class FakeEngine:
    """One token per step per request; `fail_step` / `fail_add` inject failures."""

    def __init__(
        self,
        fail_add: bool = False,
        fail_step_for: str | None = None,
        die_on: str | None = None,
        step_s: float = 0.0,
    ):
        self.step_s = step_s
        self.config = SimpleNamespace(max_model_len=64)
        self.requests: dict[str, list] = {}  # id -> [params, tokens, stream]
        self.fail_add, self.fail_step_for, self.die_on = fail_add, fail_step_for, die_on
        self.aborted: list[str] = []

    def encode_prompt(self, ids, params):
        if len(ids) + params.max_tokens > self.config.max_model_len:
            raise ValueError(f"too long for max_model_len={self.config.max_model_len}")
        return list(ids)

    def add_request(self, prompt, params, request_id, incremental, token_ids):
        if self.fail_add:
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
            raise SystemExit("the engine is gone")  # not an Exception: kills the thread
        if self.fail_step_for is not None and any(self.fail_step_for in r for r in self.requests):
            for rid in [r for r in self.requests if self.fail_step_for in r]:
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
        return {"num_running": len(self.requests)}

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
        async for index, out in stream:
            assert not out.finished or out.outputs[0].finish_reason == "length"
            got[index] = out.outputs[0].token_ids
    finally:
        stream.close()
    return got


def _run(fake: FakeEngine, body):
    async def main():
        engine = AsyncEngine(lambda: fake)
        await engine.start()
        try:
            return await body(engine)
        finally:
            engine.shutdown()

    return asyncio.run(asyncio.wait_for(main(), 30))


def test_outputs_reach_their_requests():
    async def body(engine):
        a, b = await asyncio.gather(_final(engine, _subs("a", 2, 3)), _final(engine, _subs("b", 1, 5), False))
        return a, b

    a, b = _run(FakeEngine(), body)
    assert a == {0: [0, 1, 2], 1: [0, 1, 2]} and b == {0: [0, 1, 2, 3, 4]}


def test_invalid_request_is_a_value_error_and_queues_nothing():
    fake = FakeEngine()

    async def body(engine):
        with pytest.raises(ValueError, match="max_model_len=64"):
            await engine.submit(_subs("ok", 1) + _subs("long", 1, prompt_len=80), True)
        return await _final(engine, _subs("next", 1))

    assert _run(fake, body) == {0: [0, 1, 2]} and not fake.aborted


def test_a_failing_add_is_answered_and_the_engine_keeps_serving():
    fake = FakeEngine(fail_add=True)

    async def body(engine):
        with pytest.raises(TypeError):
            await engine.submit(_subs("a", 1), True)
        fake.fail_add = False
        return await _final(engine, _subs("b", 1))

    assert _run(fake, body) == {0: [0, 1, 2]}


def test_a_failing_step_fails_only_its_requests():
    async def body(engine):
        bad = engine.submit(_subs("bad", 1, 10), True)
        good = _final(engine, _subs("good", 1, 4))
        bad_stream, good_result = await asyncio.gather(bad, good)
        with pytest.raises(RuntimeError, match="step failed"):
            async for _ in bad_stream:
                pass
        return good_result

    assert _run(FakeEngine(fail_step_for="bad"), body) == {0: [0, 1, 2, 3]}


def test_a_dead_engine_answers_everyone():
    async def body(engine):
        stream = await engine.submit(_subs("doomed", 1, 50), True)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        assert not engine.is_alive
        with pytest.raises(EngineDeadError):
            await engine.submit(_subs("late", 1), True)

    _run(FakeEngine(die_on="doomed"), body)


def test_close_aborts_unfinished_requests():
    fake = FakeEngine(step_s=0.01)  # 60 tokens take 0.6 s: the abort comes long before

    async def body(engine):
        stream = await engine.submit(_subs("long", 2, 60), True)
        await stream.__anext__()
        stream.close()
        for _ in range(100):  # the abort is applied by the engine thread between steps
            if not fake.requests:
                break
            await asyncio.sleep(0.01)

    _run(fake, body)
    assert sorted(fake.aborted) == ["long-0", "long-1"] and not fake.requests
