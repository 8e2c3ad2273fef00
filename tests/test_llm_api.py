"""The offline API's vLLM shapes beyond one sample of one prompt: `SamplingParams(n=...)` and `LLM.chat`."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.cli import main, preset_note
from nanovllm.sampling_params import derive_seed

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]  # > one 16-token block
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two and two?"},
]


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(str(ckpt), max_model_len=128)


def _sampled(seed: int | None, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=seed, n=n)


def _tokens(out) -> list[list[int]]:
    return [c.token_ids for c in out.outputs]


# ---- n samples per prompt -----------------------------------------------------------------------


def test_greedy_samples_are_all_the_single_greedy_answer(llm):
    single = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0]
    (out,) = llm.generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, n=3)
    )
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert _tokens(out) == _tokens(single) * 3  # the samples share the prompt's KV blocks and still agree
    assert out.prompt_token_ids == PROMPT and out.finished
    assert all(c.finish_reason == "length" for c in out.outputs)


def test_seeded_samples_are_the_per_sample_seeds_requests(llm):
    (out,) = llm.generate([PROMPT], _sampled(seed=7, n=3), use_tqdm=False)
    alone = [llm.generate([PROMPT], _sampled(seed), use_tqdm=False)[0] for seed in (7, derive_seed(7, 1))]
    assert _tokens(out)[:2] == [_tokens(a)[0] for a in alone]  # sample 0 keeps the seed
    assert len({tuple(t) for t in _tokens(out)}) == 3  # distinct seeds: distinct samples
    assert _tokens(llm.generate([PROMPT], _sampled(seed=7, n=3), use_tqdm=False)[0]) == _tokens(out)


def test_samples_share_the_prompts_blocks(llm):
    prompt = list(range(600, 640))  # 40 tokens not seen before: two full 16-token blocks and a partial one
    bm = llm.engine.scheduler.block_manager
    before = bm.num_hit_tokens
    (out,) = llm.generate([prompt], _sampled(seed=5, n=3), use_tqdm=False)
    assert out.num_cached_tokens == 0  # sample 0 computed the prompt ...
    assert bm.num_hit_tokens - before == 2 * 32  # ... and samples 1 and 2 reused its two full blocks


def test_unseeded_samples_differ(llm):
    (out,) = llm.generate([PROMPT], _sampled(seed=None, n=4), use_tqdm=False)
    assert len(out.outputs) == 4 and len({tuple(t) for t in _tokens(out)}) > 1


def test_each_prompt_gets_its_own_n_in_order(llm):
    other = [30, 31, 32]
    outs = llm.generate([PROMPT, other, PROMPT], [_sampled(1, n=2), GREEDY, _sampled(2, n=3)], use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [2, 1, 3]
    assert [o.prompt_token_ids for o in outs] == [PROMPT, other, PROMPT]
    assert _tokens(outs[1]) == _tokens(llm.generate([other], GREEDY, use_tqdm=False)[0])
    assert len({o.request_id for o in outs}) == 3
    engine = llm.engine
    assert not engine.has_unfinished() and engine.requests == {}


def test_vllm_dict_prompts(llm):
    text = "Hello there"
    by_text, by_ids = llm.generate([{"prompt": text}, {"prompt_token_ids": PROMPT}], GREEDY, use_tqdm=False)
    assert by_text.prompt == text and _tokens(by_text) == _tokens(
        llm.generate(text, GREEDY, use_tqdm=False)[0]
    )
    assert by_ids.prompt is None and by_ids.prompt_token_ids == PROMPT
    assert _tokens(llm.generate({"prompt_token_ids": PROMPT}, GREEDY, use_tqdm=False)[0]) == _tokens(by_ids)
    with pytest.raises(ValueError, match="'prompt_token_ids'"):
        llm.generate([{"prompt": text, "extra": 1}], GREEDY, use_tqdm=False)


def test_vllm_tokens_prompt_may_carry_its_text(llm):
    # vLLM's TokensPrompt has an optional "prompt": the text of the ids, reported back as the output's prompt.
    (out,) = llm.generate([{"prompt_token_ids": PROMPT, "prompt": "the text"}], GREEDY, use_tqdm=False)
    assert out.prompt == "the text" and out.prompt_token_ids == PROMPT
    assert _tokens(out) == _tokens(llm.generate({"prompt_token_ids": PROMPT}, GREEDY, use_tqdm=False)[0])


# ---- conversations ------------------------------------------------------------------------------


def test_chat_is_generate_on_the_rendered_conversation(llm):
    tok = llm.get_tokenizer()
    assert tok is llm.tokenizer
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    (out,) = llm.chat(CONVERSATION, GREEDY, use_tqdm=False)
    assert out.prompt == text and text.endswith("<|im_start|>assistant\n")
    assert out.prompt_token_ids == ids
    assert _tokens(out) == _tokens(llm.generate([ids], GREEDY, use_tqdm=False)[0])


def test_chat_takes_a_list_of_conversations_and_n(llm):
    second = [{"role": "user", "content": "And three and three?"}]
    outs = llm.chat([CONVERSATION, second], [GREEDY, _sampled(3, n=2)], use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [1, 2]
    assert _tokens(outs[0]) == _tokens(llm.chat(CONVERSATION, GREEDY, use_tqdm=False)[0])
    assert "And three and three?" in outs[1].prompt


def test_chat_template_options_reach_the_template(llm):
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{{ mood }}{% endif %}"
    )
    (out,) = llm.chat(
        CONVERSATION, GREEDY, use_tqdm=False, chat_template=template, chat_template_kwargs={"mood": " calm"}
    )
    assert out.prompt == "[system] Be brief.\n[user] What is two and two?\n[assistant] calm"
    (bare,) = llm.chat(
        CONVERSATION, GREEDY, use_tqdm=False, chat_template=template, add_generation_prompt=False
    )
    assert bare.prompt == "[system] Be brief.\n[user] What is two and two?\n"


def test_chat_continues_a_final_assistant_message(llm):
    started = [*CONVERSATION, {"role": "assistant", "content": "The answer is"}]
    (out,) = llm.chat(
        started, GREEDY, use_tqdm=False, add_generation_prompt=False, continue_final_message=True
    )
    assert out.prompt.endswith("<|im_start|>assistant\nThe answer is")


def test_chat_shows_tools_and_past_calls_to_the_template(llm):
    """vLLM's LLM.chat(tools=...): the tools go to the template, an earlier reply's tool calls with their
    arguments (OpenAI's JSON text) as objects. (The preset template's own rendering of them:
    tests/server/test_tool_calling.py.)"""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    conversation = [
        *CONVERSATION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
    ]
    template = (
        "{% for t in tools %}[tool] {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}"
        "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments.a }}{% endfor %};"
        "{% endfor %}"
    )
    (out,) = llm.chat(conversation, GREEDY, use_tqdm=False, tools=tools, chat_template=template)
    assert (
        out.prompt == "[tool] add\n[system] Be brief.;[user] What is two and two?;[assistant] add2;[tool] 4;"
    )
    bad = [
        *CONVERSATION,
        {"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{"}}]},
    ]
    with pytest.raises(ValueError, match=r"conversation 0.*arguments is not valid JSON"):
        llm.chat(bad, GREEDY, use_tqdm=False, tools=tools)


def test_cli_generate_with_samples_and_chat(ckpt, capsys):
    argv = ["generate", "--model", str(ckpt), "--max-model-len", "128", "--prompt", "hi", "--max-tokens", "3"]
    assert main([*argv, "--ignore-eos", "--temperature", "1", "--n", "2", "--chat"]) == 0
    printed = capsys.readouterr().out
    assert "--- prompt: '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'" in printed
    assert "[sample 0]" in printed and "[sample 1]" in printed and "6 tokens in" in printed
    assert main([*argv, "--n", "0"]) == 2
    assert "n must be an int >= 1" in capsys.readouterr().err


def test_cli_generate_on_a_preset_says_its_weights_are_random(capsys):
    argv = ["generate", "--model", "qwen3-tiny", "--prompt", "hi", "--max-tokens", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "'qwen3-tiny' is a preset with RANDOM weights" in err and "empty" not in err  # its vocab: 2,048
    big = preset_note("qwen3-0.6b", 151936, 2048)  # the random model draws ids the tokenizer cannot spell
    assert big.endswith("mostly empty (ids past its tokenizer's 2,048 tokens decode to nothing)")
    assert preset_note("qwen3-0.6b", 151936, None).endswith("the text is meaningless")  # no tokenizer


def test_chat_takes_openai_text_parts_and_lets_kwargs_override(llm):
    text_parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]
    parts = [{"role": "user", "content": text_parts}]
    (out,) = llm.chat(parts, GREEDY, use_tqdm=False)
    (plain,) = llm.chat([{"role": "user", "content": "What is\n2+2?"}], GREEDY, use_tqdm=False)  # (joined)
    assert out.prompt == plain.prompt and "2+2?" in out.prompt
    (bare,) = llm.chat(parts, GREEDY, use_tqdm=False, chat_template_kwargs={"add_generation_prompt": False})
    assert not bare.prompt.endswith("assistant\n")
    with pytest.raises(ValueError, match="conversation 0.*role"):
        llm.chat([{"content": "no role"}], GREEDY, use_tqdm=False)


# ---- token settings: logit_bias, allowed_token_ids --------------------------------------------------


def test_allowed_token_ids_and_logit_bias_steer_generation(llm):
    allowed = [40, 41, 42]
    sampled = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=1)
    only = llm.generate([PROMPT], [_with(GREEDY, allowed_token_ids=allowed)], use_tqdm=False)[0]
    drawn = llm.generate([PROMPT], _with(sampled, allowed_token_ids=allowed), use_tqdm=False)[0]
    assert set(only.outputs[0].token_ids) <= set(allowed) and set(drawn.outputs[0].token_ids) <= set(allowed)
    forced = llm.generate([PROMPT], _with(GREEDY, logit_bias={77: 100.0}), use_tqdm=False)[0]
    assert forced.outputs[0].token_ids == [77] * MAX_TOKENS
    plain, bias_elsewhere = llm.generate(
        [PROMPT, PROMPT], [GREEDY, _with(GREEDY, logit_bias={77: 100.0})], use_tqdm=False
    )
    assert plain.outputs[0].token_ids == _tokens(llm.generate([PROMPT], GREEDY, use_tqdm=False)[0])[0]
    assert bias_elsewhere.outputs[0].token_ids == [77] * MAX_TOKENS  # one row's bias, not its neighbour's


@pytest.mark.parametrize("field, value", [("logit_bias", {10**6: 1.0}), ("allowed_token_ids", [1, 10**6])])
def test_token_settings_outside_the_vocabulary_raise(llm, field, value):
    with pytest.raises(ValueError, match=f"{field} names token ids outside the vocabulary"):
        llm.generate([PROMPT], _with(GREEDY, **{field: value}), use_tqdm=False)
    assert llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids  # still usable


# ---- special tokens in the text ---------------------------------------------------------------------

IM_START = 1  # a special token of the test tokenizer that is not EOS


@pytest.mark.parametrize("path", ["decoded at the end", "stop strings", "streamed"])
@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens_decides_whether_their_text_shows(llm, path, skip):
    """Text is decoded once at the end, or token by token (stop strings, streaming): each honours the flag."""
    params = SamplingParams(
        temperature=1.0,
        seed=1,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        allowed_token_ids=[IM_START, 40],  # a draw that mixes <|im_start|> and "F"
        skip_special_tokens=skip,
        stop=["no such text"] if path == "stop strings" else None,
    )
    if path == "streamed":
        rid = llm.engine.add_request(PROMPT, params, incremental=True)
        outs = []
        while not outs or not outs[-1].finished:
            outs += [o for o in llm.engine.step() if o.request_id == rid]
        streamed = [o.outputs[0].text for o in outs]
        assert all(streamed[-1].startswith(text) for text in streamed)  # the streamed text only grows
        out = outs[-1].outputs[0]
    else:
        out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert IM_START in out.token_ids and 40 in out.token_ids  # (the seed's draw, or the test proves less)
    tokenizer = llm.get_tokenizer()
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=skip)
    assert ("<|im_start|>" in out.text) is not skip and "F" in out.text


def test_streamed_outputs_share_the_requests_token_lists(llm):
    """A streamed request's outputs hold its token id lists, not copies: a copy per step would cost the engine
    O(prompt + output) host time per token, i.e. quadratic in the output's length."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=["no such text"])
    rid = llm.engine.add_request(PROMPT, params, incremental=True)
    outs, seen = [], []
    while not outs or not outs[-1].finished:
        for o in llm.engine.step():
            if o.request_id == rid:
                outs.append(o)
                seen.append(len(o.outputs[0].token_ids))
    assert seen == list(range(1, 25))  # (as each step saw it: one more token)
    assert [o.outputs[0].finished() for o in outs] == [False] * 23 + [True]  # vLLM's method
    assert all(o.outputs[0].token_ids is outs[0].outputs[0].token_ids for o in outs)
    assert all(o.prompt_token_ids is outs[0].prompt_token_ids for o in outs)
    want = llm.generate([PROMPT], params, use_tqdm=False)[0]
    assert outs[-1].prompt_token_ids == PROMPT and outs[-1].outputs[0].token_ids == _tokens(want)[0]


def _with(params: SamplingParams, **changes) -> SamplingParams:
    return dataclasses.replace(params, **changes)


def test_generate_runs_with_the_heap_frozen_and_thaws_it_after(llm, monkeypatch):
    """No full garbage collection walks the engine's objects during generate (utils/heap.py), and the
    freeze ends with the call, also when a step fails."""
    gc.unfreeze()
    step, counts = llm.engine.step, []

    def counting_step():
        counts.append(gc.get_freeze_count())
        return step()

    monkeypatch.setattr(llm.engine, "step", counting_step)
    llm.generate([PROMPT], GREEDY, use_tqdm=False)
    assert counts and min(counts) > 0
    assert gc.get_freeze_count() == 0

    def failing_step():
        raise RuntimeError("step failed")

    monkeypatch.setattr(llm.engine, "step", failing_step)
    with pytest.raises(RuntimeError, match="step failed"):
        llm.generate([PROMPT], GREEDY, use_tqdm=False)
    assert gc.get_freeze_count() == 0
    assert not llm.engine.has_unfinished()  # the failed call's request was aborted


def test_cumulative_logprob_and_request_times(llm):
    """vLLM's CompletionOutput.cumulative_logprob (with logprobs) and RequestOutput.metrics."""
    (out,) = llm.generate([PROMPT], dataclasses.replace(GREEDY, logprobs=0), use_tqdm=False)
    c = out.outputs[0]
    assert len(c.logprobs) == MAX_TOKENS
    assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs))
    assert c.cumulative_logprob < 0
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    (plain,) = llm.generate([PROMPT], GREEDY, use_tqdm=False)
    assert plain.outputs[0].cumulative_logprob is None
    assert plain.metrics.arrival_time > m.finished_time - 1e-3  # each request its own times
    with_logprobs = dataclasses.replace(_sampled(seed=3, n=3), logprobs=1)
    (samples,) = llm.generate([PROMPT], with_logprobs, use_tqdm=False)
    for c in samples.outputs:  # each sample its own sum
        assert c.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs))
    assert len({c.cumulative_logprob for c in samples.outputs}) > 1
    times = samples.metrics
    assert times.arrival_time <= times.first_token_time <= times.last_token_time <= times.finished_time


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(llm):
    """vLLM's truncate_prompt_tokens: the request runs on the prompt's last k tokens (also a prompt too long
    for max_model_len=128 without it), and reports those as its prompt_token_ids."""
    keep = 7
    (cut,) = llm.generate([PROMPT], dataclasses.replace(GREEDY, truncate_prompt_tokens=keep), use_tqdm=False)
    (tail,) = llm.generate([PROMPT[-keep:]], GREEDY, use_tqdm=False)
    assert cut.prompt_token_ids == PROMPT[-keep:]
    assert _tokens(cut) == _tokens(tail)
    long_prompt = PROMPT * 10  # 180 tokens
    params = dataclasses.replace(GREEDY, truncate_prompt_tokens=100)
    (out,) = llm.generate([long_prompt], params, use_tqdm=False)
    assert out.prompt_token_ids == long_prompt[-100:] and len(out.outputs[0].token_ids) == MAX_TOKENS
    (text,) = llm.generate(["a b c d e f g h i j"], dataclasses.replace(GREEDY, truncate_prompt_tokens=2))
    assert text.prompt == "a b c d e f g h i j"  # the text as given, the ids as run
    assert text.prompt_token_ids == llm.tokenizer.encode("a b c d e f g h i j")[-2:]
    to_model_len = dataclasses.replace(GREEDY, truncate_prompt_tokens=-1)  # -1: max_model_len tokens (vLLM's)
    (whole,) = llm.generate([PROMPT], to_model_len, use_tqdm=False)
    assert whole.prompt_token_ids == PROMPT
    with pytest.raises(ValueError, match=r"prompt \(128 tokens\) \+ max_tokens \(8\)"):
        llm.generate([long_prompt], to_model_len, use_tqdm=False)
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be None, -1 or an int >= 1"):
        SamplingParams(truncate_prompt_tokens=0)
    with pytest.raises(ValueError, match="truncate_prompt_tokens=129 exceeds max_model_len=128"):
        llm.generate([PROMPT], dataclasses.replace(GREEDY, truncate_prompt_tokens=129), use_tqdm=False)


def test_default_sampling_params_come_from_generation_config(ckpt, tmp_path):
    """vLLM's LLM.get_default_sampling_params: with no SamplingParams, generate and chat sample with what the
    checkpoint's generation_config.json sets (max_new_tokens as max_tokens); generation_config="vllm" ignores
    it."""
    model = shutil.copytree(ckpt, tmp_path / "model")
    settings = {"temperature": 0.0, "top_k": 20, "top_p": 0.95, "max_new_tokens": 5, "do_sample": True}
    (model / "generation_config.json").write_text(json.dumps(settings))
    llm = LLM(str(model), max_model_len=128)
    expected = SamplingParams(temperature=0.0, top_k=20, top_p=0.95, max_tokens=5)
    assert llm.get_default_sampling_params() == expected
    (default,) = llm.generate([PROMPT], use_tqdm=False)
    assert _tokens(default) == _tokens(llm.generate([PROMPT], expected, use_tqdm=False)[0])
    assert len(default.outputs[0].token_ids) <= 5
    (chat,) = llm.chat(CONVERSATION, use_tqdm=False)
    assert len(chat.outputs[0].token_ids) <= 5
    assert LLM(str(model), max_model_len=128, generation_config="vllm").get_default_sampling_params() == (
        SamplingParams()
    )
    (model / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ValueError, match="generation_config.json: top_p must be in"):
        LLM(str(model), max_model_len=128)


def test_use_tqdm_may_be_the_bar_factory(llm):
    """vLLM's use_tqdm: a callable (e.g. functools.partial(tqdm, leave=False)) makes the progress bar."""
    from tqdm.auto import tqdm

    bars = []
    make_bar = lambda **kwargs: bars.append(tqdm(**kwargs, leave=False)) or bars[-1]  # noqa: E731
    (out,) = llm.generate([PROMPT], GREEDY, use_tqdm=make_bar)
    assert len(bars) == 1 and bars[0].n == 1 and bars[0].total == 1
    assert _tokens(out) == _tokens(llm.generate([PROMPT], GREEDY, use_tqdm=False)[0])


def test_generation_config_eos_ids_end_a_request_as_stop_token_ids(ckpt, tmp_path):
    """vLLM's EOS is the tokenizer's; generation_config.json's other eos ids join the request's
    stop_token_ids (Qwen3: 151645, then [151645, 151643]), so a request they end reports the id as
    stop_reason, with the same tokens and text as that stop token id would give. ignore_eos ignores them."""
    llm = LLM(str(ckpt), max_model_len=128)
    free = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    k = next(i for i, t in enumerate(free) if i >= 2 and t != 2 and t not in free[:i])
    stop = dataclasses.replace(GREEDY, ignore_eos=False)
    as_stop_id = llm.generate([PROMPT], dataclasses.replace(stop, stop_token_ids=[free[k]]), use_tqdm=False)
    del llm
    gc.collect()
    model = shutil.copytree(ckpt, tmp_path / "model")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, free[k]]}))
    llm = LLM(str(model), max_model_len=128)
    assert (llm.config.eos_token_id, llm.config.eos_token_ids) == (2, (2, free[k]))
    (out,) = llm.generate([PROMPT], stop, use_tqdm=False)
    c, expected = out.outputs[0], as_stop_id[0].outputs[0]
    assert (c.finish_reason, c.stop_reason, c.token_ids) == ("stop", free[k], free[: k + 1])
    assert (c.text, c.stop_reason, c.token_ids) == (expected.text, expected.stop_reason, expected.token_ids)
    assert llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == free  # ignore_eos


# ---- reset_prefix_cache -------------------------------------------------------------------------


def test_reset_prefix_cache_makes_the_next_prompt_compute_again(llm):
    prompt = list(range(700, 740))  # two full 16-token blocks and a partial one
    llm.generate([prompt], GREEDY, use_tqdm=False)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 32
    assert llm.reset_prefix_cache() is True
    after = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert after.num_cached_tokens == 0


def test_reset_prefix_cache_is_refused_while_a_request_holds_blocks(llm):
    prompt = list(range(750, 790))
    llm.generate([prompt], GREEDY, use_tqdm=False)
    rid = llm.engine.add_request(None, GREEDY, prompt_token_ids=list(range(800, 820)))
    llm.engine.step()  # admitted: it holds blocks now
    try:
        assert llm.reset_prefix_cache() is False
        assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 32  # nothing forgotten
    finally:
        llm.engine.abort(rid)
        while llm.engine.has_unfinished():
            llm.engine.step()
    assert llm.reset_prefix_cache() is True


# ---- priority (vLLM's scheduling_policy="priority") -------------------------------------------------

PROMPTS = [PROMPT, PROMPT[:9], PROMPT[3:], [40, 41, 42, 43, 44]]


@pytest.fixture(scope="module")
def priority_llm(ckpt):
    with LLM(str(ckpt), max_model_len=128, max_num_seqs=1, scheduling_policy="priority") as llm:
        yield llm


def test_generate_with_priority_returns_outputs_in_prompt_order(llm, priority_llm):
    expected = [_tokens(o) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    outs = priority_llm.generate(PROMPTS, GREEDY, use_tqdm=False, priority=[3, -1, 0, 3])
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    assert [_tokens(o) for o in outs] == expected  # greedy tokens do not depend on the order
    # one request at a time (max_num_seqs=1): served by (priority, arrival)
    order = sorted(range(len(outs)), key=lambda i: outs[i].metrics.first_token_time)
    assert order == [1, 2, 0, 3]


def test_chat_takes_a_priority_per_conversation(priority_llm):
    outs = priority_llm.chat([CONVERSATION, CONVERSATION], GREEDY, use_tqdm=False, priority=[1, 0])
    assert _tokens(outs[0]) == _tokens(outs[1])
    assert outs[1].metrics.first_token_time < outs[0].metrics.first_token_time


def test_priority_is_checked_before_anything_is_queued(llm, priority_llm):
    with pytest.raises(ValueError, match="2 priorities for 1 prompts"):
        priority_llm.generate([PROMPT], GREEDY, priority=[0, 1])
    with pytest.raises(TypeError, match="priority must be an int"):
        priority_llm.generate([PROMPT], GREEDY, priority=[1.5])
    # vLLM refuses a priority under fcfs, the default; 0 changes nothing and is accepted
    with pytest.raises(ValueError, match="scheduling_policy='priority'"):
        llm.generate([PROMPT, PROMPT], GREEDY, priority=[0, 2])
    assert _tokens(llm.generate([PROMPT], GREEDY, use_tqdm=False, priority=[0])[0]) == _tokens(
        llm.generate([PROMPT], GREEDY, use_tqdm=False)[0]
    )
    assert not llm.engine.requests and not priority_llm.engine.requests
    with pytest.raises(ValueError, match="scheduling_policy must be one of"):
        LLM("qwen3-tiny", scheduling_policy="lifo")
