"""Overlapped scheduling (LLMEngine.step): the host schedules step n+1 while step n runs, with the
tokens of step n pending. It must give exactly what the engine gives when it waits for every step:
same tokens, texts, finish and stop reasons, logprobs and cached-token counts — through EOS-like
stops found a step late, stop strings, chunked prefill, preemption, prefix hits and aborts — and
leave the KV cache clean (no block hashed over a pending token)."""

from __future__ import annotations

import random

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.engine.sequence import PENDING_TOKEN
from tests.checkpoints import mixed_prompts

# Small enough to preempt and to prefill in chunks; block size 16 so short prompts fill blocks.
ENGINE = dict(
    device="cpu",
    max_model_len=256,
    max_num_seqs=6,
    max_num_batched_tokens=64,
    num_kvcache_blocks=30,
    block_size=16,
)


@pytest.fixture(scope="module")
def engines():
    sync, overlap = LLM("qwen3-tiny", async_scheduling=False, **ENGINE), LLM("qwen3-tiny", **ENGINE)
    assert overlap.engine.overlap and not sync.engine.overlap
    yield sync, overlap
    sync.shutdown()
    overlap.shutdown()


def _params(n: int, seed: int = 0) -> list[SamplingParams]:
    """Greedy and seeded random rows (both independent of the batch), stopping in every way."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 6
        common = dict(max_tokens=rng.randint(1, 40), seed=rng.randint(0, 99) if i % 2 else None)
        common["temperature"] = 0.8 if i % 2 else 0.0
        if kind == 0:
            out.append(SamplingParams(**common))
        elif kind == 1:  # stops early on any of a third of the vocabulary
            out.append(SamplingParams(stop_token_ids=list(range(3, 2048, 3)), **common))
        elif kind == 2:  # ... but not before min_tokens
            out.append(SamplingParams(stop_token_ids=list(range(3, 2048, 3)), min_tokens=5, **common))
        elif kind == 3:
            out.append(SamplingParams(stop=["a", "e"], logprobs=2, **common))
        elif kind == 4:
            out.append(SamplingParams(logprobs=3, **common))
        else:  # penalties: overlapped too (the pending token is filled in on the device)
            out.append(
                SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, **common)
            )
    return out


def _summary(outs):
    return [
        (
            o.outputs[0].token_ids,
            o.outputs[0].text,
            o.outputs[0].finish_reason,
            o.outputs[0].stop_reason,
            [
                (lp.token_id, round(lp.logprob, 4), sorted(lp.top_logprobs))
                for lp in o.outputs[0].logprobs or []
            ],
            o.num_cached_tokens,
        )
        for o in outs
    ]


def _check_clean(llm: LLM) -> None:
    engine = llm.engine
    bm = engine.scheduler.block_manager
    assert engine._inflight is None and not engine.requests and not engine.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_consistency()
    for block in bm.blocks:
        assert block.token_ids is None or PENDING_TOKEN not in block.token_ids


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_gives_what_waiting_gives(engines, seed):
    sync, overlap = engines
    rng = random.Random(seed)
    prompts = mixed_prompts([rng.randint(1, 150) for _ in range(14)], seed=seed)
    params = _params(len(prompts), seed)
    want = sync.generate(prompts, params, use_tqdm=False)
    got = overlap.generate(prompts, params, use_tqdm=False)
    assert _summary(got) == _summary(want)
    assert overlap.engine.scheduler.num_preemptions > 0  # the cache is small enough to preempt
    assert any(o.num_cached_tokens for o in got)  # and prefixes are shared
    for llm in engines:
        _check_clean(llm)
        llm.engine.scheduler.block_manager.reset_prefix_cache()


def test_streaming_and_aborts_in_flight(engines):
    """Stream every request; abort some right after the step that launched their token, while it
    is still in flight. The others end as they do without overlap; the aborted free their blocks."""
    sync, overlap = engines
    prompts = mixed_prompts([30, 70, 5, 120, 48, 90, 17], seed=7)
    params = [
        SamplingParams(temperature=0, max_tokens=30, stop=["e"] if i % 3 == 0 else None) for i in range(7)
    ]
    want = sync.generate(prompts, params, use_tqdm=False)
    engine = overlap.engine
    ids = [engine.add_request(p, sp, incremental=True) for p, sp in zip(prompts, params)]
    aborted = {ids[1], ids[4]}
    streamed: dict[str, list] = {rid: [] for rid in ids}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            assert PENDING_TOKEN not in out.outputs[0].token_ids
            streamed[out.request_id].append(out)
        steps += 1
        if steps == 6:
            for rid in aborted:
                seq = engine.requests[rid].seq
                assert seq.num_pending_tokens  # its token is still on the device
                engine.abort(rid)
    for rid, ref in zip(ids, want):
        outs = streamed[rid]
        if rid in aborted:
            assert not outs or not outs[-1].finished
            continue
        final = outs[-1]
        ref = ref.outputs[0]
        assert final.finished and final.outputs[0].token_ids == ref.token_ids
        assert final.outputs[0].text == ref.text and final.outputs[0].finish_reason == ref.finish_reason
        texts = [o.outputs[0].text for o in outs]
        assert all(a == b[: len(a)] for a, b in zip(texts, texts[1:]))  # streamed text only grows
    _check_clean(overlap)


def _spy_overlap(llm: LLM, monkeypatch) -> list[tuple[bool, bool]]:
    """Per step() call from now on: (it returned with its step still in flight, a running request reads
    the generated tokens on the host)."""
    engine, steps = llm.engine, []
    step = engine.step

    def spy():
        outputs = step()
        steps.append((engine._inflight is not None, any(s.reads_output for s in engine.scheduler.running)))
        return outputs

    monkeypatch.setattr(engine, "step", spy)
    return steps


def test_switching_overlap_off_per_request(engines, monkeypatch):
    """A request with a multi-token bad word (its ban reads the latest token on the host) makes the engine
    wait for each step while it runs; results equal."""
    sync, overlap = engines
    prompts = mixed_prompts([20, 40, 60], seed=3)
    params = [
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=25, bad_words_token_ids=[[5, 6]]),
        SamplingParams(temperature=0, max_tokens=30),
    ]
    want = _summary(sync.generate(prompts, params, use_tqdm=False))
    steps = _spy_overlap(overlap, monkeypatch)
    assert _summary(overlap.generate(prompts, params, use_tqdm=False)) == want
    _check_clean(overlap)
    assert any(reads for _, reads in steps)
    assert not any(inflight and reads for inflight, reads in steps)


@pytest.mark.parametrize("seed", [0, 1])
def test_penalties_run_overlapped(engines, monkeypatch, seed):
    """Repetition, frequency and presence penalties on every request (greedy and seeded, prompts of
    different lengths, through preemption and prefix hits): the engine keeps a step in flight, the pending
    token filled in on the device for the penalties, and gives the tokens of the waiting engine."""
    sync, overlap = engines
    rng = random.Random(seed)
    prompts = mixed_prompts([rng.randint(1, 120) for _ in range(10)], seed=seed + 30)
    params = [
        SamplingParams(
            temperature=0.8 if i % 2 else 0.0,
            seed=rng.randint(0, 99) if i % 2 else None,
            max_tokens=rng.randint(10, 40),
            repetition_penalty=rng.choice([1.0, 0.8, 1.5]),
            frequency_penalty=rng.choice([0.0, 0.7, -0.5]),
            presence_penalty=rng.choice([0.5, -0.3]),
            logprobs=1 if i % 3 == 0 else None,
        )
        for i in range(len(prompts))
    ]
    for llm in engines:
        llm.engine.scheduler.block_manager.reset_prefix_cache()
    want = sync.generate(prompts, params, use_tqdm=False)
    preemptions = overlap.engine.scheduler.num_preemptions
    steps = _spy_overlap(overlap, monkeypatch)
    got = overlap.generate(prompts, params, use_tqdm=False)
    assert _summary(got) == _summary(want)
    assert overlap.engine._can_overlap()  # (idle now: nothing runs)
    assert sum(inflight for inflight, _ in steps) >= len(steps) - 2  # all but the last steps, not none
    assert overlap.engine.scheduler.num_preemptions > preemptions and any(o.num_cached_tokens for o in got)
    _check_clean(overlap)


def test_a_step_that_fails_when_read_back(engines, monkeypatch):
    """Reading step n back raises (a GPU fault surfaces there) while step n+1 is in flight: the requests
    of both steps fail and are listed in dropped_request_ids, nothing keeps a pending token, the cache
    is clean, and the engine then serves new requests exactly as before."""
    from nanovllm.engine.step_input import LaunchedStep

    sync, overlap = engines
    prompts = mixed_prompts([30, 50, 12, 70], seed=11)
    params = [SamplingParams(temperature=0, max_tokens=20) for _ in prompts]
    want = _summary(sync.generate(prompts, params, use_tqdm=False))
    engine = overlap.engine
    real_wait, calls = LaunchedStep.wait, []

    def wait(self):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected read-back fault")
        return real_wait(self)

    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    with monkeypatch.context() as m:
        m.setattr(LaunchedStep, "wait", wait)
        with pytest.raises(RuntimeError, match="injected read-back fault"):
            while engine.has_unfinished():
                engine.step()
    assert engine.dropped_request_ids and set(engine.dropped_request_ids) <= set(ids)
    for rid in ids:
        req = engine.requests.get(rid)
        assert req is None or PENDING_TOKEN not in req.seq.token_ids
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    _check_clean(overlap)
    assert _summary(overlap.generate(prompts, params, use_tqdm=False)) == want
    _check_clean(overlap)


def _spy_step_sizes(llm: LLM, monkeypatch) -> list[int]:
    """The token count of each batch the engine schedules from now on (appended as they come)."""
    scheduler, sizes = llm.engine.scheduler, []
    schedule = scheduler.schedule

    def spy(token_limit=None):
        batch = schedule(token_limit)
        sizes.append(batch.num_tokens)
        return batch

    monkeypatch.setattr(scheduler, "schedule", spy)
    return sizes


def test_a_step_from_an_idle_device_is_small(engines, monkeypatch):
    """Pipeline fill: the first step launched on an idle device takes at most IDLE_STEP_TOKENS tokens, and the
    next one, scheduled while it runs, the full budget; without overlap (nothing to fill the wait with) the
    budget is whole. Results stay those of the waiting engine."""
    import nanovllm.engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "IDLE_STEP_TOKENS", 20)
    sync, overlap = engines
    prompts = mixed_prompts([30, 25, 40, 12], seed=11)  # 107 prompt tokens: two full-budget steps
    params = SamplingParams(temperature=0, max_tokens=8)
    sizes = {}
    for name, llm in (("sync", sync), ("overlap", overlap)):
        sizes[name] = _spy_step_sizes(llm, monkeypatch)
        llm.engine.scheduler.block_manager.reset_prefix_cache()  # (the test before caches this first prompt)
        outs = llm.generate(prompts, params, use_tqdm=False)
        _check_clean(llm)
        if name == "sync":
            want = outs
        else:
            assert _summary(outs) == _summary(want)
    assert sizes["sync"][:2] == [64, 2 + 43]  # the budget; then 2 decodes and the 43 prompt tokens left
    assert sizes["overlap"][:3] == [20, 64, 2 + 23]  # 20 from idle, then the budget while it runs


@pytest.mark.parametrize(
    "waited, first_size, settings",
    [
        (0, 64, dict(bad_words_token_ids=[[5, 6]])),
        (3, 20, dict(bad_words_token_ids=[[5, 6]])),
        (0, 20, dict(repetition_penalty=1.2, presence_penalty=0.5)),  # (penalties need no wait)
    ],
)
def test_no_small_step_when_it_would_be_waited_for(engines, monkeypatch, waited, first_size, settings):
    """A request with a multi-token bad word that the small step would admit makes the engine wait for that
    step: the budget is then whole (a split would only add a step). One further back leaves pipeline fill
    on, as does a request with penalties."""
    import nanovllm.engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "IDLE_STEP_TOKENS", 20)
    sync, overlap = engines
    prompts = mixed_prompts([30, 25, 40, 12], seed=12)
    params = [SamplingParams(temperature=0, max_tokens=8) for _ in prompts]
    params[waited] = SamplingParams(temperature=0, max_tokens=8, **settings)
    for llm in engines:  # (the other case ran the same prompts)
        llm.engine.scheduler.block_manager.reset_prefix_cache()
    want = _summary(sync.generate(prompts, params, use_tqdm=False))
    sizes = _spy_step_sizes(overlap, monkeypatch)
    assert _summary(overlap.generate(prompts, params, use_tqdm=False)) == want
    _check_clean(overlap)
    assert sizes[0] == first_size


def test_prefix_hits_count_as_the_scheduler_counts_them(engines, monkeypatch):
    """The walk that decides pipeline fill charges each waiting request its uncached tokens, as the scheduler
    does: with the first prompt's leading block cached (16 of its 30 tokens), the small step of 20 tokens
    would reach the second request, with a multi-token bad word, so the budget stays whole."""
    import nanovllm.engine.llm_engine as llm_engine

    monkeypatch.setattr(llm_engine, "IDLE_STEP_TOKENS", 20)
    sync, overlap = engines
    prompts = mixed_prompts([30, 25, 40, 12], seed=13)
    params = [SamplingParams(temperature=0, max_tokens=8) for _ in prompts]
    params[1] = SamplingParams(temperature=0, max_tokens=8, bad_words_token_ids=[[5, 6]])
    for llm in engines:  # the same cache in both: the first prompt's leading block only
        llm.engine.scheduler.block_manager.reset_prefix_cache()
        llm.generate(prompts[:1], params[:1], use_tqdm=False)
    want = _summary(sync.generate(prompts, params, use_tqdm=False))
    sizes = _spy_step_sizes(overlap, monkeypatch)
    outs = overlap.generate(prompts, params, use_tqdm=False)
    assert _summary(outs) == want
    _check_clean(overlap)
    assert outs[0].num_cached_tokens == 16
    assert sizes[0] == 64  # (charged all 30 tokens, the walk stopped before the bad-word one: 20)


def test_a_failed_step_leaves_no_cached_block_to_a_request_that_hit_it_after_an_abort(engines, monkeypatch):
    """Step 1 registers A's full prompt blocks; A is aborted while step 1 is in flight and B, the same
    prompt, hits those blocks in step 2. Reading step 1 back fails (its K/V never written: simulated by
    filling the cache with noise), so step 2 fails too. The blocks must leave the prefix cache: a later
    request with that prompt computes it again and gets the tokens of the waiting engine."""
    from nanovllm.engine.step_input import LaunchedStep

    sync, overlap = engines
    prompt = mixed_prompts([40], seed=21)[0]  # two full blocks and 8 tokens
    params = SamplingParams(temperature=0, max_tokens=6)
    want = _summary(sync.generate([prompt], params, use_tqdm=False))
    engine = overlap.engine
    engine.scheduler.block_manager.reset_prefix_cache()
    a = engine.add_request(prompt, params)
    engine.step()
    assert engine._inflight is not None  # step 1 (A's prompt) still on the device
    engine.abort(a)
    b = engine.add_request(prompt, params)

    def wait(self):
        overlap.engine.runner.kv_cache.normal_(0, 30)  # the failed step's K/V: garbage
        raise RuntimeError("injected read-back fault")

    with monkeypatch.context() as m:
        m.setattr(LaunchedStep, "wait", wait)
        with pytest.raises(RuntimeError, match="injected read-back fault"):
            engine.step()  # schedules B (hitting A's blocks), launches step 2, reads step 1 back
    assert engine.dropped_request_ids == [b]
    _check_clean(overlap)
    again = overlap.generate([prompt], params, use_tqdm=False)
    assert again[0].num_cached_tokens == 0
    assert _summary(again) == [(*want[0][:5], 0)]
    _check_clean(overlap)


@pytest.mark.parametrize("seed, small_tables", [(0, False), (1, False), (2, True)])
def test_structured_outputs_run_overlapped(engines, monkeypatch, seed, small_tables):
    """Structured outputs (regex, choice, JSON schema, any JSON object; greedy and seeded, beside free rows,
    through preemption): the engine keeps a step in flight, each constrained row's mask picked on the device
    from its pending token (layers/constraint_masks.py); a choice that completes ends with a discarded extra
    step. The tokens are those of the waiting engine."""
    from nanovllm import StructuredOutputsParams
    from nanovllm.layers.constraint_masks import ConstraintMasks, DeviceGrammar
    from nanovllm.structured import grammar

    if small_tables:  # device tables started again, successor maps and grammars evicted, all the time
        monkeypatch.setattr(DeviceGrammar, "MAX_SLOTS", 3)
        monkeypatch.setattr(DeviceGrammar, "MAX_SUCCESSOR_MAPS", 1)
        monkeypatch.setattr(ConstraintMasks, "MAX_GRAMMARS", 1)
        monkeypatch.setattr(grammar.Grammar, "MAX_CACHED_STATES", 2)
    sync, overlap = engines
    rng = random.Random(seed)
    prompts = mixed_prompts([rng.randint(1, 120) for _ in range(10)], seed=seed + 40)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}
    constraints = [
        dict(regex=r"[0-9]{2,4}(-[a-z]+)*"),
        dict(choice=["alpha", "beta", "gamma delta"]),
        dict(json=schema),
        dict(json_object=True),
        None,
    ]
    params = []
    for i in range(len(prompts)):
        constraint = constraints[i % len(constraints)]
        params.append(
            SamplingParams(
                temperature=0.8 if i % 2 else 0.0,
                seed=rng.randint(0, 99) if i % 2 else None,
                max_tokens=rng.randint(10, 40),
                logprobs=1 if i % 3 == 0 else None,
                structured_outputs=None if constraint is None else StructuredOutputsParams(**constraint),
            )
        )
    for llm in engines:
        llm.engine.scheduler.block_manager.reset_prefix_cache()
    want = sync.generate(prompts, params, use_tqdm=False)
    steps = _spy_overlap(overlap, monkeypatch)
    got = overlap.generate(prompts, params, use_tqdm=False)
    assert _summary(got) == _summary(want)
    assert any(o.outputs[0].finish_reason == "stop" for o in got)  # (a complete match ended some)
    assert any(inflight for inflight, _ in steps) and not any(reads for _, reads in steps)
    _check_clean(overlap)
