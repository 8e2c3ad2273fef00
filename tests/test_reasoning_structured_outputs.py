"""Structured outputs after the model's thinking (vLLM's `--reasoning-parser` with structured outputs): with
reasoning_parser="qwen3", a constrained request whose prompt leaves the output inside the thinking generates
freely until `</think>`, then follows its constraint; one whose prompt closed the thinking follows it from the
first token. Oracle: transformers' model on the same weights, greedy, applying the same rule by a plain walk
of every token's bytes. `</think>` is made to come at a known step by a logit_bias on it, sized from the
oracle's logits (the engine and the oracle both add it). The waiting and the overlapped engine give the same
tokens, a request preempted (and recomputed) while thinking or after it too: its matcher keeps its place."""

from __future__ import annotations

import re

import pytest
import torch

from nanovllm import LLM, SamplingParams, StructuredOutputsParams
from nanovllm.cli import build_parser, engine_kwargs
from nanovllm.structured.regex_dfa import compile_regex
from nanovllm.structured.vocab import token_bytes
from tests.checkpoints import END_THINK, build_think_checkpoint, load_hf_model
from tests.test_structured_outputs import dfa_allowed

EOS = 2  # the preset tokenizer's <|im_end|>
REGEX = r"(yes|no|maybe)-[0-9]{2}"
PROMPT = "The answer is"
END_STEP = 3  # where the bias brings `</think>` (a step the oracle's margins allow: _bias_for_end_at)
ENGINE = dict(device="cpu", max_model_len=256, reasoning_parser="qwen3")


@pytest.fixture(scope="module")
def engines(think_ckpt):
    sync, overlap = LLM(str(think_ckpt), async_scheduling=False, **ENGINE), LLM(str(think_ckpt), **ENGINE)
    assert overlap.engine.overlap and not sync.engine.overlap
    yield sync, overlap
    sync.shutdown()
    overlap.shutdown()


@pytest.fixture(scope="module")
def oracle(think_ckpt, engines):
    return load_hf_model(think_ckpt), token_bytes(engines[0].tokenizer)


@torch.no_grad()
def _hf_greedy(oracle, prompt_ids, max_tokens, bias, thinking: bool) -> tuple[list[int], bool]:
    """Greedy decoding of transformers' model with `bias` added to `</think>`'s logit: free while thinking
    (every id, EOS too), then each step among the tokens whose bytes keep the DFA alive, EOS allowed once the
    text is a whole match. -> (tokens, ended)."""
    model, vocab = oracle
    dfa = compile_regex(REGEX)
    state, out = dfa.start, []
    for _ in range(max_tokens):
        logits = model(torch.tensor([prompt_ids + out])).logits[0, -1].double()
        logits[END_THINK] += bias
        allowed = torch.ones(logits.numel(), dtype=torch.bool)
        if not thinking:
            allowed = dfa_allowed(dfa, state, vocab, logits.numel(), EOS)
            if not allowed.any():
                return out, True  # complete: nothing may follow
        token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
        if token == EOS:
            return out, True
        out.append(token)
        if thinking:
            thinking = token != END_THINK
        else:
            state = dfa.advance(state, vocab[token])
    return out, False


@torch.no_grad()
def _bias_for_end_at(oracle, prompt_ids, step: int) -> float:
    """A bias on `</think>`'s logit that makes greedy decoding write it at `step`, no earlier: its gap to the
    top logit (along the unbiased greedy path) there must be below every earlier one, with room to spare."""
    model, _ = oracle
    gaps, out = [], []
    for _ in range(step + 1):
        logits = model(torch.tensor([prompt_ids + out])).logits[0, -1].double()
        gaps.append(float(logits.max() - logits[END_THINK]))
        out.append(int(logits.argmax()))
    assert EOS not in out[:step] and END_THINK not in out
    assert gaps[step] + 0.2 < min(gaps[:step]), f"pick another step or prompt: gaps {gaps}"
    return gaps[step] + 0.1


def _params(bias: float = 0.0, max_tokens: int = 24, temperature: float = 0.0, **extra) -> SamplingParams:
    return SamplingParams(
        temperature=temperature,
        max_tokens=max_tokens,
        logit_bias={END_THINK: bias} if bias else None,
        structured_outputs=StructuredOutputsParams(regex=REGEX),
        **extra,
    )


def test_the_constraint_starts_after_the_thinking(engines, oracle):
    sync, overlap = engines
    prompt_ids = sync.tokenizer.encode(PROMPT)  # no think tag: the output starts inside the thinking
    bias = _bias_for_end_at(oracle, prompt_ids, END_STEP)
    expected, ended = _hf_greedy(oracle, prompt_ids, 24, bias, thinking=True)
    assert ended and expected.index(END_THINK) == END_STEP
    for llm in engines:
        (out,) = llm.generate([PROMPT], _params(bias), use_tqdm=False)
        got = out.outputs[0]
        assert got.token_ids == expected and got.finish_reason == "stop"
        thought, answer = got.token_ids[:END_STEP], got.token_ids[END_STEP + 1 :]
        # free before `</think>`: tokens no state of the regex allows (its first must be y, n or m) ...
        assert not re.match(r"[ynm]", llm.tokenizer.decode(thought[:1]))
        # ... and a whole match after it
        assert re.fullmatch(REGEX, llm.tokenizer.decode(answer))


def test_a_prompt_that_closed_the_thinking_is_constrained_from_the_first_token(engines, oracle):
    """Qwen3's enable_thinking=False renders `<think>\\n\\n</think>\\n\\n`: the output is all answer. The bias
    on `</think>` changes nothing then (the regex does not allow its text)."""
    sync, _ = engines
    closed = PROMPT + "<think>\n\n</think>\n\n"
    prompt_ids = sync.tokenizer.encode(closed)
    assert END_THINK in prompt_ids
    expected, ended = _hf_greedy(oracle, prompt_ids, 24, 0.0, thinking=False)
    assert ended
    for llm in engines:
        for bias in (0.0, 50.0):
            (out,) = llm.generate([closed], _params(bias), use_tqdm=False)
            assert out.outputs[0].token_ids == expected and out.outputs[0].finish_reason == "stop"
            assert re.fullmatch(REGEX, out.outputs[0].text)
    # and one that reopens it (an earlier turn closed, this one opened): thinking again
    (out,) = sync.generate([closed + "ok<think>"], _params(50.0), use_tqdm=False)
    assert out.outputs[0].token_ids[0] == END_THINK


def test_eos_stays_allowed_while_thinking(engines):
    """vLLM applies no mask while the model thinks: the EOS may end the request there (not after `</think>`,
    where the regex's start does not accept)."""
    params = SamplingParams(
        temperature=0,
        max_tokens=8,
        logit_bias={EOS: 50.0},
        structured_outputs=StructuredOutputsParams(regex=REGEX),
    )
    for llm in engines:
        thinking, closed = llm.generate([PROMPT, PROMPT + "</think>"], params, use_tqdm=False)
        assert thinking.outputs[0].token_ids == [EOS] and thinking.outputs[0].finish_reason == "stop"
        assert EOS not in closed.outputs[0].token_ids[:1]


def _preempt_once_at(llm: LLM, monkeypatch, num_outputs: int) -> list[int]:
    """Preempt the constrained request once, as a full KV cache does, when it has `num_outputs` output tokens
    (pending ones included): its blocks are freed and its tokens recomputed when it is scheduled again. It
    must be the youngest running request (the victim) and not the only one (a step must have some work).
    -> where it was preempted (filled in once it is)."""
    scheduler = llm.engine.scheduler
    can_append = scheduler.block_manager.can_append
    at = []

    def full_once(seq, num_tokens):
        if not at and seq.matcher is not None and seq.num_output_tokens >= num_outputs:
            at.append(seq.num_output_tokens)
            return False
        return can_append(seq, num_tokens)

    monkeypatch.setattr(scheduler.block_manager, "can_append", full_once)
    return at


@pytest.mark.parametrize("num_outputs", [END_STEP - 1, END_STEP + 2], ids=["thinking", "answering"])
def test_preemption_keeps_the_matchers_place(engines, oracle, monkeypatch, num_outputs):
    """A request preempted by recompute mid-thinking, or after `</think>` mid-answer, gives the tokens of a
    run that was not: its GrammarMatcher keeps its state through the preemption (the thinking is not begun
    again, the constraint not restarted), in the waiting and the overlapped engine."""
    sync, _ = engines
    prompt_ids = sync.tokenizer.encode(PROMPT)
    bias = _bias_for_end_at(oracle, prompt_ids, END_STEP)
    expected, ended = _hf_greedy(oracle, prompt_ids, 24, bias, thinking=True)
    assert ended and expected.index(END_THINK) == END_STEP and len(expected) > END_STEP + 3
    # beside an older free request, which runs on while the constrained one waits
    prompts = ["Hello world", PROMPT]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), _params(bias)]
    for llm in engines:
        llm.engine.scheduler.block_manager.reset_prefix_cache()  # (recomputed, not found in the cache)
        _, plain = llm.generate(prompts, params, use_tqdm=False)
        preemptions = llm.engine.scheduler.num_preemptions
        with monkeypatch.context() as patch:
            at = _preempt_once_at(llm, patch, num_outputs)
            _, out = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions == preemptions + 1
        # where the preemption came: inside the thinking, or in the answer (the scheduler counts a token in
        # flight under overlap, so it may be one later there)
        assert at[0] in (num_outputs, num_outputs + 1)
        assert (at[0] <= END_STEP) == (num_outputs < END_STEP)
        assert out.outputs[0].token_ids == plain.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == "stop"


def test_min_tokens_bans_eos_while_thinking(engines):
    """The reasoning state's mask allows every token, but min_tokens still bans EOS (the sampler's ban, apart
    from the constraint's mask): with EOS pushed to the top, the output ends on it right after min_tokens."""
    params = SamplingParams(
        temperature=0,
        max_tokens=8,
        min_tokens=3,
        logit_bias={EOS: 50.0},
        structured_outputs=StructuredOutputsParams(regex=REGEX),
    )
    for llm in engines:
        (out,) = llm.generate([PROMPT], params, use_tqdm=False)
        tokens = out.outputs[0].token_ids
        assert len(tokens) == 4 and tokens[3] == EOS and out.outputs[0].finish_reason == "stop"
        assert END_THINK not in tokens  # (still thinking: EOS is the constraint's to allow there)


def test_overlap_gives_what_waiting_gives(engines, monkeypatch):
    """Thinking and closed prompts, greedy and seeded random (a bias brings `</think>` within a few steps),
    beside a free request: the overlapped engine keeps a step in flight (a thinking row's mask is picked on
    the device from its pending token: the start's after `</think>`) and gives the waiting engine's tokens."""
    sync, overlap = engines
    prompts = [PROMPT, PROMPT + "</think>", "Hello world", "x y z<think>", PROMPT, "Count: 1 2 3"]
    params = [
        _params(4.0),
        _params(4.0),
        _params(6.0, temperature=1.0, seed=1),
        _params(6.0, temperature=1.0, seed=2),
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        _params(0.0, max_tokens=10, temperature=1.0, seed=3),  # (likely thinks to the end: length)
    ]
    want = sync.generate(prompts, params, use_tqdm=False)
    steps = []
    step = overlap.engine.step

    def spy():
        outputs = step()
        steps.append(overlap.engine._inflight is not None)
        return outputs

    monkeypatch.setattr(overlap.engine, "step", spy)
    got = overlap.generate(prompts, params, use_tqdm=False)
    summary = lambda outs: [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]  # noqa: E731
    assert summary(got) == summary(want)
    assert any(steps)  # steps ran overlapped
    ended_thinking = [
        o for o, p in zip(want, params) if p.structured_outputs and END_THINK in o.outputs[0].token_ids
    ]
    assert len(ended_thinking) >= 3
    for o in ended_thinking:
        answer = o.outputs[0].token_ids[o.outputs[0].token_ids.index(END_THINK) + 1 :]
        text = sync.tokenizer.decode(answer)
        assert re.fullmatch(REGEX, text) if o.outputs[0].finish_reason == "stop" else re.match(r"[ynm]", text)


def test_a_parser_must_be_known_and_its_tags_single_tokens_of_the_logits(think_ckpt, tmp_path):
    with pytest.raises(
        ValueError, match="unknown reasoning parser 'qwen2'; known parsers: qwen3, deepseek_r1"
    ):
        LLM("qwen3-tiny", reasoning_parser="qwen2")
    # the preset tokenizer spells `<think>` in 5 tokens: refused at construction, naming the parser
    with pytest.raises(ValueError, match="reasoning parser 'deepseek_r1' needs '<think>' to be one token"):
        LLM("qwen3-tiny", device="cpu", reasoning_parser="deepseek_r1")
    # tags the logits cannot produce: the thinking could never end
    narrow = build_think_checkpoint(tmp_path, vocab_size=2048)
    with pytest.raises(
        ValueError, match="'qwen3': its tags' ids .* must be below the model's vocab_size 2048"
    ):
        LLM(str(narrow), device="cpu", reasoning_parser="qwen3")
    LLM(str(narrow), device="cpu").shutdown()  # without a parser the tags are plain tokens


@pytest.mark.parametrize("command", [["generate"], ["serve", "some-model"]])
def test_the_cli_takes_a_reasoning_parser(command):
    args = build_parser().parse_args([*command, "--reasoning-parser", "qwen3"])
    assert engine_kwargs(args)["reasoning_parser"] == "qwen3"
    assert "reasoning_parser" not in engine_kwargs(build_parser().parse_args(command))
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--reasoning-parser", "nope"])
