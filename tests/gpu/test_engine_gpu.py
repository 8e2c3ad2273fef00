"""End-to-end checks on a real GPU (run by scripts/gpu_suite.py on the device machine)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from nanovllm import LLM, BeamSearchParams, PoolingParams, SamplingParams
from nanovllm.kernels.decode_attention import DECODE_MAX_SELF_COMBINE

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


def _prompts(n: int = 12, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10000) for _ in range(rng.randint(20, 700))] for _ in range(n)]


def _tokens(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _reference_tokens_one_by_one(prompts, **args) -> list[list[int]]:
    """Each prompt's greedy tokens alone, from the torch reference ops run eagerly."""
    ref = LLM("qwen3-0.6b", kernel_backend="torch", enforce_eager=True, **args)
    try:
        return [_tokens(ref, [p])[0] for p in prompts]
    finally:
        ref.shutdown()


def _record_prefill_replays(runner) -> list[tuple[int, int]]:
    """(sequences, graph size) of every prefill-graph replay the runner makes from now on."""
    replays = []
    graphs = runner.cuda_graphs
    replay = graphs.replay_prefill
    graphs.replay_prefill = lambda inp, size, fill: (
        replays.append((inp.num_seqs, size)) or replay(inp, size, fill)
    )
    return replays


@pytest.fixture(scope="module")
def fast():
    llm = LLM("qwen3-0.6b", gpu_memory_utilization=0.3, max_model_len=4096)
    yield llm
    llm.shutdown()


def test_triton_graph_path_equals_torch_reference():
    """Triton kernels + CUDA graphs vs the torch reference ops (eager), Qwen3-0.6B shapes, float32.

    In float32 both paths agree to ~1e-6, far below the logit gaps, so greedy tokens must be equal.
    (In bf16 random-weight models have many near-tied logits, so token equality is tested in float32;
    bf16 closeness is checked token by token in the next test.)"""
    prompts = _prompts()
    args = dict(dtype="float32", max_model_len=4096)
    ref = LLM("qwen3-0.6b", num_kvcache_blocks=2000, kernel_backend="torch", enforce_eager=True, **args)
    try:
        expected = _tokens(ref, prompts)
    finally:
        ref.shutdown()
    fast32 = LLM("qwen3-0.6b", num_kvcache_blocks=2000, **args)
    assert fast32.engine.runner.cuda_graphs.decode, "no CUDA graphs were captured"
    got = _tokens(fast32, prompts)
    mismatched = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not mismatched, f"sequences {mismatched} differ: {[(got[i], expected[i]) for i in mismatched[:2]]}"


def test_bf16_triton_logits_close_to_torch_reference(fast):
    """bf16: the Triton path's last-token logits vs the torch path's, on the same prompts."""
    prompts = _prompts(6, seed=3)
    one = SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True)
    got = fast.generate(prompts, one, use_tqdm=False)
    ref = LLM(
        "qwen3-0.6b", num_kvcache_blocks=2000, max_model_len=4096, kernel_backend="torch", enforce_eager=True
    )
    try:
        expected = ref.generate(prompts, one, use_tqdm=False)
    finally:
        ref.shutdown()
    for a, b in zip(got, expected):
        la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        common = set(la.top_logprobs) & set(lb.top_logprobs)
        assert len(common) >= 3
        for t in common:
            assert abs(la.top_logprobs[t] - lb.top_logprobs[t]) < 0.05


def test_cuda_graphs_equal_eager(fast):
    prompts = _prompts(seed=1)
    eager = LLM("qwen3-0.6b", num_kvcache_blocks=2000, max_model_len=4096, enforce_eager=True)
    try:
        expected = _tokens(eager, prompts)
    finally:
        eager.shutdown()
    assert fast.engine.runner.cuda_graphs.decode, "no CUDA graphs were captured"
    assert _tokens(fast, prompts) == expected


def test_two_stream_halves_equal_one_piece_and_eager():
    """Decode graphs of 16..128 sequences run two halves on two streams (engine/decode_step.py). In float32
    their greedy tokens must equal an eager run's (cut and padded the same way) and the batch's in one
    piece. 40 prompts decode as graph 48: halves of 24, cut by length, each half counting its splits in its
    own slice of the counters while both run at once."""
    prompts = _prompts(40, seed=5)
    args = dict(dtype="float32", max_model_len=4096, num_kvcache_blocks=3000)
    graphs = LLM("qwen3-0.6b", **args)
    try:
        step, captured = graphs.engine.runner.decode, graphs.engine.runner.cuda_graphs.decode
        assert 48 in step.two_stream_sizes and step.side_stream is not None and 48 in captured
        num_splits, by_length = step.splits(24)
        assert by_length and 2 <= num_splits <= DECODE_MAX_SELF_COMBINE, "the halves no longer combine splits"
        two_streams = _tokens(graphs, prompts)
    finally:
        graphs.shutdown()
    eager = LLM("qwen3-0.6b", enforce_eager=True, **args)
    try:
        eager_halves = _tokens(eager, prompts)
        eager.engine.runner.decode.two_stream_sizes = range(0)
        one_piece = _tokens(eager, prompts)
    finally:
        eager.shutdown()
    assert two_streams == eager_halves
    assert two_streams == one_piece


def test_prefill_graphs_equal_torch_reference():
    """A prefill step of one sequence replays a captured graph padded to the next token size: prompts
    sent one at a time, a long one in chunks (each after its computed prefix), and a prefix-cache hit.
    float32 greedy tokens must equal the torch reference ops run eagerly (see the first test)."""
    rng = random.Random(5)
    prompts = [[rng.randrange(10000) for _ in range(n)] for n in (7, 100, 700, 1500, 5000)]
    prompts.append(prompts[2][:600] + prompts[0])  # the first 592 tokens are cached blocks
    args = dict(dtype="float32", max_model_len=8192, max_num_batched_tokens=2048, num_kvcache_blocks=2000)
    expected = _reference_tokens_one_by_one(prompts, **args)
    llm = LLM("qwen3-0.6b", **args)
    try:
        runner = llm.engine.runner
        assert sorted(runner.cuda_graphs.prefill) == [16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048]
        replays = _record_prefill_replays(runner)
        got = [_tokens(llm, [p])[0] for p in prompts]
        cached = llm.generate([prompts[-1]], GREEDY, use_tqdm=False)[0].num_cached_tokens
    finally:
        llm.shutdown()
    assert got == expected
    # 7 -> 16, 100 -> 128, 700 -> 768, 1500 -> 1536, 5000 in chunks of 2048, 2048, 904, the last prompt's
    # 15 uncached tokens (twice: the second run hits the cache of the first) -> 16
    assert replays == [(1, size) for size in (16, 128, 768, 1536, 2048, 2048, 1024, 16, 16)], replays
    assert cached == 592


def test_mixed_step_graphs_equal_torch_reference():
    """Prompts arriving while others decode: each mixed step (a prompt, or a chunk of one, beside the
    running requests' decode tokens) replays a prefill graph too, its attention over a padded work list.
    float32 greedy tokens must equal each prompt's tokens from the eager torch reference."""
    rng = random.Random(6)
    prompts = [[rng.randrange(10000) for _ in range(n)] for n in (300, 100, 37, 1500, 5, 60)]
    args = dict(dtype="float32", max_model_len=4096, max_num_batched_tokens=1024, num_kvcache_blocks=2000)
    expected = _reference_tokens_one_by_one(prompts, **args)
    llm = LLM("qwen3-0.6b", **args)
    try:
        engine = llm.engine
        replays = _record_prefill_replays(engine.runner)
        done = {}
        ids = []
        for prompt in prompts:
            ids.append(engine.add_request(prompt, GREEDY))
            for _ in range(3):
                done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        while engine.has_unfinished():
            done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    finally:
        llm.shutdown()
    assert [done[rid] for rid in ids] == expected
    assert any(num_seqs > 1 for num_seqs, _ in replays), replays  # mixed steps were replayed
    # the 1,500-token prompt's first chunk fills the 1,024-token budget beside the decodes
    assert any(num_seqs > 1 and size == 1024 for num_seqs, size in replays), replays


def test_prefix_cache_and_preemption_on_gpu():
    """float32 so that recomputation after preemption and cached prefixes give the same tokens."""
    prompts = _prompts(16, seed=2)
    args = dict(dtype="float32", max_model_len=2048)
    free = _tokens(LLM("qwen3-0.6b", num_kvcache_blocks=2000, **args), prompts)
    llm = LLM("qwen3-0.6b", num_kvcache_blocks=160, max_num_batched_tokens=1024, **args)
    assert _tokens(llm, prompts) == free
    assert llm.engine.scheduler.num_preemptions > 0
    # The most recently finished prompts' blocks are still in the prefix cache.
    second = llm.generate(prompts[-3:], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in second] == free[-3:]
    assert sum(o.num_cached_tokens for o in second) > 0
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_consistency()


def test_prompt_logprobs_close_to_torch_reference():
    """prompt_logprobs on the GPU (its steps run eagerly; the results come back in pinned memory behind
    the step's event) vs the torch reference path, bf16, prompts chunked over several 256-token steps next
    to requests that do not score."""
    prompts = _prompts(6, seed=4)
    scored = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=5)
    params = [scored if i % 2 == 0 else GREEDY for i in range(len(prompts))]
    chunked = LLM("qwen3-0.6b", num_kvcache_blocks=2000, max_model_len=4096, max_num_batched_tokens=256)
    try:
        got = chunked.generate(prompts, params, use_tqdm=False)
    finally:
        chunked.shutdown()
    ref = LLM(
        "qwen3-0.6b", num_kvcache_blocks=2000, max_model_len=4096, kernel_backend="torch", enforce_eager=True
    )
    try:
        expected = ref.generate(prompts[::2], scored, use_tqdm=False)
    finally:
        ref.shutdown()
    assert all(o.prompt_logprobs is None for o in got[1::2])
    errors = []
    for a, b in zip(got[::2], expected):
        assert len(a.prompt_logprobs) == len(a.prompt_token_ids) and a.prompt_logprobs[0] is None
        for la, lb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert la.token_id == lb.token_id and la.rank >= 1 and len(la.top_logprobs) == 5
            errors.append(abs(la.logprob - lb.logprob))
    errors.sort()
    assert errors[int(0.95 * len(errors))] < 0.05 and errors[-1] < 0.3, errors[-5:]


def test_allowed_token_ids_and_logit_bias_on_the_fused_draw(fast):
    """The Gumbel-max kernels draw from the masked, biased fp32 copy; greedy rows take its argmax."""
    prompts = _prompts(8, seed=5)
    allowed = [100, 200, 300, 400]
    drawn = SamplingParams(temperature=0.6, max_tokens=16, ignore_eos=True, allowed_token_ids=allowed)
    forced = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logit_bias={4242: 100.0})
    outs = fast.generate(prompts, [drawn, forced] * 4, use_tqdm=False)
    for i, out in enumerate(outs):
        tokens = out.outputs[0].token_ids
        assert set(tokens) <= set(allowed) if i % 2 == 0 else tokens == [4242] * 16
    assert len({t for out in outs[::2] for t in out.outputs[0].token_ids}) > 1  # still a draw


def test_bad_words_on_the_fused_draw_and_in_greedy_rows(fast):
    """Bans (here bad words) reach the Gumbel-max kernels' and the greedy rows' logits, in graphed decode
    steps; a two-token word bans its second token only right after its first (overlap off)."""
    prompts = _prompts(8, seed=6)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    free = [out.outputs[0].token_ids for out in fast.generate(prompts, greedy, use_tqdm=False)]
    words = [[free[0][3]], free[1][5:7]]  # one token; two tokens the free run wrote in a row
    banned = dataclasses.replace(greedy, bad_words_token_ids=words)
    outs = fast.generate(prompts, banned, use_tqdm=False)
    outs += fast.generate(prompts, dataclasses.replace(banned, temperature=0.8, seed=3), use_tqdm=False)
    for out in outs:
        tokens = out.outputs[0].token_ids
        assert words[0][0] not in tokens
        assert all(tokens[i : i + 2] != words[1] for i in range(len(tokens) - 1))
    assert outs[1].outputs[0].token_ids != free[1]  # (greedy, it met the two-token word)


def test_penalties_overlapped_equal_waiting_on_the_graph_path(fast):
    """Penalties under overlapped scheduling on the GPU: a penalized row's pending token is filled in on the
    device from the previous step's sampled ids (SamplingBatch.build) behind graphed decode steps and the
    fused draw; the engine keeps a step in flight and gives the tokens it gives when it waits for each."""
    prompts = _prompts(8, seed=7)
    params = [
        SamplingParams(
            temperature=0.8 if i % 2 else 0.0,
            seed=i if i % 2 else None,
            max_tokens=24 + 4 * i,
            ignore_eos=True,  # (known ends: both engines schedule the same batches)
            repetition_penalty=[1.05, 1.3, 1.0, 0.9][i % 4],
            frequency_penalty=[0.0, 0.5, -0.4, 0.2][i % 4],
            presence_penalty=[0.3, 0.0, 0.6, -0.2][i % 4],
        )
        for i in range(len(prompts))
    ]
    engine = fast.engine
    engine.overlap = False
    # Both runs compute the whole prompts: a prefix-cache hit would recompute only each prompt's last partial
    # block, in matmuls of other shapes, and bf16's last bits there flip near-tied logits later on.
    assert fast.reset_prefix_cache()
    try:
        want = [o.outputs[0].token_ids for o in fast.generate(prompts, params, use_tqdm=False)]
    finally:
        engine.overlap = True
    step, inflight = engine.step, []

    def spy():
        outputs = step()
        inflight.append(engine._inflight is not None)
        return outputs

    engine.step = spy
    assert fast.reset_prefix_cache()
    try:
        got = [o.outputs[0].token_ids for o in fast.generate(prompts, params, use_tqdm=False)]
    finally:
        del engine.step
    assert got == want
    assert sum(inflight) >= len(inflight) - 2  # every step but the last ones left one in flight
    free = [o.outputs[0].token_ids for o in fast.generate(prompts[::2], GREEDY, use_tqdm=False)]
    assert any(g[:24] != f[:24] for g, f in zip(got[::2], free))  # (the penalties changed greedy rows)


def test_beam_search_equals_torch_reference():
    """LLM.beam_search on the GPU path (Triton kernels, graphs, prefix-cache hits every step) gives the torch
    reference's beams, float32 (where near-ties cannot flip), and leaves every block free."""
    prompts = [{"prompt_token_ids": p} for p in _prompts(2, seed=8)]
    params = BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True)
    args = dict(dtype="float32", max_model_len=1024, num_kvcache_blocks=1000)

    def beams(llm: LLM) -> list[list[tuple[list[int], float]]]:
        try:
            outs = llm.beam_search(prompts, params)
            bm = llm.engine.scheduler.block_manager
            assert bm.num_free_blocks == bm.num_blocks
            return [[(b.tokens, b.cum_logprob) for b in out.sequences] for out in outs]
        finally:
            llm.shutdown()

    expected = beams(LLM("qwen3-0.6b", kernel_backend="torch", enforce_eager=True, **args))
    got = beams(LLM("qwen3-0.6b", **args))
    assert [[t for t, _ in out] for out in got] == [[t for t, _ in out] for out in expected]
    for out, ref in zip(got, expected):
        assert [c for _, c in out] == pytest.approx([c for _, c in ref], abs=1e-3)
        assert len({tuple(t) for t, _ in out}) == 4  # four distinct beams


def test_structured_outputs_in_graphed_steps_and_the_fused_draw(fast):
    """Constrained rows (regex, choice, JSON schema; greedy and sampled) beside free ones in graphed decode
    steps: every constrained output keeps to its constraint, the free rows' tokens do not change, and ids
    past the tokenizer's vocabulary (the preset model's logits are wider) are never drawn."""
    import json
    import re

    from nanovllm import StructuredOutputsParams

    date = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
    schema = {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0}, "ok": {"type": "boolean"}},
        "required": ["id", "ok"],
    }
    constraints = [dict(regex=date), dict(choice=["alpha", "beta", "gamma"]), dict(json=schema)]
    prompts = _prompts(8, seed=8)
    free = [out.outputs[0].token_ids for out in fast.generate(prompts, GREEDY, use_tqdm=False)]
    params = []
    for i in range(8):
        if i % 4 == 3:
            params.append(GREEDY)
            continue
        params.append(
            SamplingParams(
                temperature=0.0 if i < 4 else 0.9,
                seed=None if i < 4 else i,
                max_tokens=64,
                structured_outputs=StructuredOutputsParams(**constraints[i % 4]),
            )
        )
    outs = fast.generate(prompts, params, use_tqdm=False)
    num_tokens = len(fast.tokenizer)
    for i, (out, p) in enumerate(zip(outs, params)):
        tokens, text = out.outputs[0].token_ids, out.outputs[0].text
        if p is GREEDY:
            assert tokens == free[i]
            continue
        assert max(tokens) < num_tokens
        kind = i % 4
        if kind == 0:
            assert re.fullmatch(date, text) and out.outputs[0].finish_reason == "stop"
        elif kind == 1:
            assert text in ("alpha", "beta", "gamma") and out.outputs[0].finish_reason == "stop"
        elif out.outputs[0].finish_reason == "stop":
            value = json.loads(text)
            assert set(value) == {"id", "ok"} and isinstance(value["ok"], bool) and value["id"] >= 0


def test_structured_outputs_after_the_thinking_overlapped_equal_waiting(tmp_path):
    """reasoning_parser="qwen3" on the GPU path (graphs; under overlap a row's next mask is picked on the
    device from its pending token): a constrained row thinks freely until `</think>` (brought within a few
    steps by a bias), then follows its regex; the overlapped engine gives the waiting one's tokens. A tiny
    random checkpoint whose tokenizer has Qwen3's think tags (the presets' has none)."""
    import re

    from nanovllm import StructuredOutputsParams
    from tests.checkpoints import END_THINK, build_think_checkpoint

    path = build_think_checkpoint(tmp_path)
    regex = r"(yes|no|maybe)-[0-9]{2}"
    prompts = ["The answer is", "The answer is</think>", "Hello world", "x y z<think>", "Count: 1 2 3"]
    settings = [(0.0, None, 4.0), (0.0, None, 4.0), (1.0, 1, 6.0), (1.0, 2, 6.0), (1.0, 3, 6.0)]
    params = [
        SamplingParams(
            temperature=t,
            seed=seed,
            max_tokens=24,
            logit_bias={END_THINK: bias},
            structured_outputs=StructuredOutputsParams(regex=regex),
        )
        for t, seed, bias in settings
    ]
    outs = {}
    for overlap in (False, True):
        llm = LLM(
            str(path),
            reasoning_parser="qwen3",
            async_scheduling=overlap,
            max_model_len=256,
            num_kvcache_blocks=64,  # (beside the module's other engine: no share of the memory to size)
        )
        try:
            assert llm.engine.overlap == overlap
            got = llm.generate(prompts, params, use_tqdm=False)
            outs[overlap] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in got]
            tokenizer = llm.tokenizer
        finally:
            llm.shutdown()
    assert outs[True] == outs[False]
    ended = [(tokens, reason) for tokens, reason in outs[False] if END_THINK in tokens]
    assert len(ended) >= 3
    for tokens, reason in ended:
        answer = tokenizer.decode(tokens[tokens.index(END_THINK) + 1 :])
        assert re.fullmatch(regex, answer) if reason == "stop" else re.match(r"[ynm]", answer)


def _embeddings(llm: LLM, prompts) -> list[torch.Tensor]:
    return [torch.tensor(o.outputs.embedding) for o in llm.embed(prompts, use_tqdm=False)]


@pytest.mark.parametrize("kind", ["LAST", "MEAN"])
def test_embeddings_on_the_graph_path_equal_torch_reference(kind):
    """Embedding requests (runner "pooling": no LM head, decode graphs without it) through prefill graphs,
    chunks and a prefix-cache hit, float32, against the eager torch reference ops, prompt by prompt."""
    rng = random.Random(8)
    prompts = [[rng.randrange(10000) for _ in range(n)] for n in (1, 7, 100, 700, 1500, 5000)]
    prompts.append(prompts[3][:600] + prompts[1])  # (LAST: its first 592 tokens from the cache)
    args = dict(dtype="float32", max_model_len=8192, max_num_batched_tokens=2048, num_kvcache_blocks=2000)
    args.update(runner="pooling", pooler_config={"pooling_type": kind})
    ref = LLM("qwen3-0.6b", kernel_backend="torch", enforce_eager=True, **args)
    try:
        want = [_embeddings(ref, [p])[0] for p in prompts]
    finally:
        ref.shutdown()
    llm = LLM("qwen3-0.6b", **args)
    try:
        assert llm.engine.runner.model.lm_head is None and llm.engine.runner.cuda_graphs.prefill
        got = _embeddings(llm, prompts)
        cached = llm.embed([prompts[-1]], use_tqdm=False)[0].num_cached_tokens
    finally:
        llm.shutdown()
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3, msg=f"prompt {i}")
    assert cached == (592 if kind == "LAST" else 0)


def test_embeddings_beside_generation_in_mixed_steps(fast):
    """Embedding requests arriving while generations decode (overlapped mixed steps on the graph path),
    float32: the embeddings equal the eager torch reference's, and the generations equal theirs alone. In
    bf16 (the `fast` engine) the same embeddings keep the reference's direction."""
    prompts = _prompts(8, seed=9)
    args = dict(dtype="float32", max_model_len=4096, num_kvcache_blocks=1000)
    ref = LLM("qwen3-0.6b", kernel_backend="torch", enforce_eager=True, runner="pooling", **args)
    try:
        want = _embeddings(ref, prompts)
    finally:
        ref.shutdown()
    llm = LLM("qwen3-0.6b", **args)
    try:
        alone = _tokens(llm, prompts[:4])
        assert llm.reset_prefix_cache()  # (the mixed run computes the same rows, not cache hits)
        engine, done, emb = llm.engine, {}, []
        gen = [engine.add_request(p, GREEDY) for p in prompts[:4]]
        for p in prompts[4:] + prompts[:4]:
            emb.append(engine.add_request(p, PoolingParams()))
            for _ in range(2):
                done.update((o.request_id, o) for o in engine.step() if o.finished)
        while engine.has_unfinished():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
    finally:
        llm.shutdown()
    assert [done[rid].outputs[0].token_ids for rid in gen] == alone
    for i, (rid, w) in enumerate(zip(emb, want[4:] + want[:4])):
        torch.testing.assert_close(done[rid].outputs.data, w, atol=1e-4, rtol=1e-3, msg=f"request {i}")
    for i, (g, w) in enumerate(zip(_embeddings(fast, prompts), want)):
        cos = torch.nn.functional.cosine_similarity(g, w, dim=0).item()
        assert cos > 0.99 and abs(g.norm().item() - 1) < 1e-3, (i, cos)
