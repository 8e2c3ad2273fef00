"""The real server (`python -m nanovllm serve`, a subprocess on a free port) driven by the official
`openai` client, on a tiny random checkpoint with a trained tokenizer and chat template (the fixtures:
conftest.py; the launcher and the readers of errors and metrics: helpers.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tests.checkpoints import hf_greedy, load_hf_model
from tests.server.helpers import (
    EOS,
    MAX_MODEL_LEN,
    MAX_NEW_TOKENS,
    MODEL,
    _error,
    _metric,
    _metrics,
    _one_torch_thread,
    _serve,
    _wait_until_idle,
)

ROOT = Path(__file__).resolve().parents[2]


def _complete(client, prompt="The capital of France is", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


def _chat(client, content="Tell me a story.", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def _tokens(client, prompt, **kw) -> list[str]:
    return _complete(client, prompt, logprobs=0, **kw).choices[0].logprobs.tokens


# ---- basics ----------------------------------------------------------------------------------------


def test_health_models_metrics(server, client):
    assert httpx.get(server + "/health").status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    samples = _metrics(server)
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prefix_cache_hit_rate",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_count",
        "time_per_output_token_seconds_count",
    ):
        _metric(samples, name)
    assert _metric(samples, "time_to_first_token_seconds_bucket", 'le="+Inf"') >= 0


def test_completion_text_and_usage(client, tokenizer):
    prompt = "The capital of France is"
    out = _complete(client, prompt, max_tokens=8, extra_body={"ignore_eos": True})
    c = out.choices[0]
    assert out.object == "text_completion" and out.model == MODEL
    assert c.finish_reason == "length" and c.text
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_chat_text_and_usage(client, tokenizer):
    out = _chat(client, "hi", max_tokens=6, extra_body={"ignore_eos": True})
    c = out.choices[0]
    assert out.object == "chat.completion" and c.message.role == "assistant" and c.message.content
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert out.usage.prompt_tokens == len(tokenizer.encode(templated, add_special_tokens=False))
    assert out.usage.completion_tokens == 6
    # max_completion_tokens is the newer name for the same limit
    assert _chat(client, "hi", max_tokens=None, max_completion_tokens=3).usage.completion_tokens <= 3


def test_chat_template_options_reach_the_template(client, tokenizer):
    """vLLM's chat_template_kwargs (Qwen3's enable_thinking), add_generation_prompt and
    continue_final_message: the prompt is the template's rendering with them."""
    msgs = [{"role": "user", "content": "hi"}]
    greedy = dict(model=MODEL, max_tokens=6, temperature=0)
    out = client.chat.completions.create(
        messages=msgs, extra_body={"chat_template_kwargs": {"enable_thinking": False}}, **greedy
    )
    rendered = tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert "<think>" in rendered and out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == client.completions.create(prompt=ids, **greedy).choices[0].text
    started = [*msgs, {"role": "assistant", "content": "The answer is"}]
    continuing = {"add_generation_prompt": False, "continue_final_message": True}
    out = client.chat.completions.create(messages=started, extra_body=continuing, **greedy)
    rendered = tokenizer.apply_chat_template(started, tokenize=False, continue_final_message=True)
    assert rendered.endswith("The answer is")
    assert out.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert out.choices[0].message.role == "assistant"
    # Without a generation prompt, the output goes on the last message and takes its role (vLLM's
    # get_chat_request_role), streamed or not.
    plain = {"add_generation_prompt": False}
    assert (
        client.chat.completions.create(messages=msgs, extra_body=plain, **greedy).choices[0].message.role
        == "user"
    )
    chunks = list(client.chat.completions.create(messages=msgs, extra_body=plain, stream=True, **greedy))
    assert chunks[0].choices[0].delta.role == "user"


def test_chat_default_max_tokens_is_max_new_tokens_within_the_context(client):
    """As vLLM's server: chat without max_tokens generates the checkpoint's max_new_tokens, or less when the
    prompt leaves less room; a max_tokens the request gives is not capped by it (generation_config auto)."""
    ignore_eos = {"ignore_eos": True}
    out = _chat(client, "hi", max_tokens=None, extra_body=ignore_eos)
    assert out.usage.completion_tokens == MAX_NEW_TOKENS and out.choices[0].finish_reason == "length"
    out = _chat(client, "x " * 230, max_tokens=None, extra_body=ignore_eos)  # 243 prompt tokens: 13 left
    assert out.usage.prompt_tokens + out.usage.completion_tokens == MAX_MODEL_LEN
    assert out.choices[0].finish_reason == "length"
    assert _chat(client, "hi", max_tokens=40, extra_body=ignore_eos).usage.completion_tokens == 40
    assert _complete(client, max_tokens=None, extra_body=ignore_eos).usage.completion_tokens == 16  # OpenAI's


def test_streaming_equals_non_streaming(client):
    for kw in ({}, {"stop": ["e"]}):  # with a stop string too (the held-back text must not leak)
        full = _complete(client, max_tokens=16, **kw)
        chunks = list(
            _complete(client, max_tokens=16, stream=True, stream_options={"include_usage": True}, **kw)
        )
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == full.choices[0].text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == full.choices[
            0
        ].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
        assert all(ch.usage is None for ch in chunks[:-1])
        # every completion chunk has stop_reason, null until the last (vLLM's)
        assert all("stop_reason" in ch.choices[0].model_extra for ch in chunks[:-1])
        assert chunks[-2].choices[0].model_extra["stop_reason"] == full.choices[0].model_extra["stop_reason"]

        full = _chat(client, max_tokens=16, **kw)
        chunks = list(_chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == full.choices[0].message.content
        assert chunks[-1].usage == full.usage


def test_continuous_usage_stats(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's usage so far (the chat
    role chunk: none generated yet), and the final usage chunk the request's."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    for create in (_complete, _chat):
        chunks = list(
            create(client, max_tokens=6, stream=True, stream_options=options, extra_body={"ignore_eos": True})
        )
        final = chunks[-1].usage
        assert chunks[-1].choices == [] and final.completion_tokens == 6
        running = [ch.usage for ch in chunks[:-1]]
        assert all(u.prompt_tokens == final.prompt_tokens for u in running)
        assert [u.completion_tokens for u in running] == sorted(u.completion_tokens for u in running)
        assert running[-1].completion_tokens == 6
        assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in running)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].usage.completion_tokens == 0


def test_chat_chunks_always_carry_content(client):
    """Every chat chunk's delta has a content string, "" when a token brought no text (vLLM's DeltaMessage):
    here the only token is EOS, whose chunk finishes the choice with no text."""
    chunks = list(_chat(client, stream=True, extra_body={"allowed_token_ids": [EOS]}))
    assert [ch.choices[0].delta.content for ch in chunks] == ["", ""]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices(client):
    out = _complete(client, n=2, temperature=1.0, seed=7, max_tokens=8)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.choices[0].text != out.choices[1].text  # distinct per-choice seeds
    assert _complete(client, n=2, max_tokens=8, extra_body={"ignore_eos": True}).usage.completion_tokens == 16
    again = _complete(client, n=2, temperature=1.0, seed=7, max_tokens=8)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # deterministic
    single = _complete(client, temperature=1.0, seed=7, max_tokens=8)
    assert single.choices[0].text == out.choices[0].text  # choice 0 keeps the request's seed

    streamed: dict[int, str] = {0: "", 1: ""}
    for ch in _chat(client, n=2, temperature=1.0, seed=7, max_tokens=8, stream=True):
        for c in ch.choices:
            streamed[c.index] += c.delta.content or ""
    full = _chat(client, n=2, temperature=1.0, seed=7, max_tokens=8)
    assert [streamed[0], streamed[1]] == [c.message.content for c in full.choices]


def test_batch_prompts(client, tokenizer):
    out = _complete(client, ["Hello", "The capital of France is"], n=2, max_tokens=4)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: the two choices of a prompt agree
    assert out.choices[0].text == _complete(client, "Hello", max_tokens=4).choices[0].text
    ids = tokenizer.encode("Hello")
    by_ids = _complete(client, ids, max_tokens=4)
    assert by_ids.choices[0].text == out.choices[0].text
    assert len(_complete(client, [ids, ids[:1]], max_tokens=4).choices) == 2


def test_seeds(client):
    a = _complete(client, temperature=1.0, seed=1, max_tokens=12).choices[0].text
    b = _complete(client, temperature=1.0, seed=1, max_tokens=12).choices[0].text
    c = _complete(client, temperature=1.0, seed=2, max_tokens=12).choices[0].text
    assert a == b and a != c


def test_stop_strings(client):
    tokens = _tokens(client, "The capital of France is", max_tokens=16, extra_body={"ignore_eos": True})
    full = "".join(tokens)
    # a stop string that straddles two tokens: its start is already out when its end arrives
    i = next(i for i in range(2, 15) if len(tokens[i]) >= 2 and tokens[i + 1])
    stop = tokens[i][-2:] + tokens[i + 1][:1]
    cut = full[: full.find(stop)]
    out = _complete(client, max_tokens=16, stop=[stop, "never-appears"]).choices[0]
    assert out.text == cut and out.finish_reason == "stop"
    assert out.model_extra["stop_reason"] == stop
    chunks = list(_complete(client, max_tokens=16, stop=[stop, "never-appears"], stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == cut  # nothing past the cut leaked
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs(client):
    out = _complete(client, max_tokens=6, logprobs=3).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == out.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4 and top[token] == logprob
        assert logprob == pytest.approx(max(top.values()))  # greedy takes the most likely token


def _prompt_reference(ckpt, token_ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax over the prompt's logits: row t - 1 scores token t."""
    with torch.no_grad():
        return load_hf_model(ckpt)(torch.tensor([token_ids])).logits[0].float().log_softmax(-1)


def test_completion_echo_scores_the_prompt(client, ckpt, tokenizer):
    prompt = "The capital of France is"
    ids = tokenizer(prompt)["input_ids"]
    plain = _complete(client, prompt, max_tokens=4).choices[0]
    out = _complete(client, prompt, max_tokens=4, echo=True, logprobs=2).choices[0]
    assert out.text == prompt + plain.text
    lp = out.logprobs
    assert len(lp.tokens) == len(ids) + 4 and "".join(lp.tokens) == out.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    ref = _prompt_reference(ckpt, ids)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-3)
        assert lp.top_logprobs[t][lp.tokens[t]] == lp.token_logprobs[t] and 2 <= len(lp.top_logprobs[t]) <= 3
    assert "prompt_logprobs" not in out.model_extra  # asked for echo, not for vLLM's field
    chunks = list(_complete(client, prompt, max_tokens=4, echo=True, logprobs=2, stream=True))
    assert chunks[0].choices[0].text.startswith(prompt)
    assert "".join(ch.choices[0].text for ch in chunks) == out.text
    streamed = [x for ch in chunks for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    echo_only = _complete(client, [ids], max_tokens=2, echo=True).choices[0]  # token ids: decoded
    assert echo_only.text.startswith(tokenizer.decode(ids)) and echo_only.logprobs is None


def test_truncate_prompt_tokens_runs_and_reports_the_prompts_tail(client, tokenizer):
    ids = tokenizer.encode("The capital of France is a city with a long history")
    kept = {"truncate_prompt_tokens": 4}
    out = _complete(client, prompt=ids, echo=True, extra_body=kept)
    tail = _complete(client, prompt=ids[-4:])
    assert out.usage.prompt_tokens == 4
    assert out.choices[0].text == tokenizer.decode(ids[-4:]) + tail.choices[0].text  # echo: what ran
    chat = _chat(client, "hi " * 20, max_tokens=3, extra_body=kept)
    assert chat.usage.prompt_tokens == 4
    whole = _complete(client, prompt=ids, extra_body={"truncate_prompt_tokens": -1})  # -1: max_model_len
    assert (
        whole.usage.prompt_tokens == len(ids)
        and whole.choices[0].text == _complete(client, prompt=ids).choices[0].text
    )
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens"):
        _complete(client, prompt=ids, extra_body={"truncate_prompt_tokens": MAX_MODEL_LEN + 1})


def test_bad_words_are_never_generated(client, tokenizer):
    free = _complete(client, logprobs=0)
    tokens = free.choices[0].logprobs.tokens
    word = next(t.strip() for t in tokens if t.strip().isalpha())  # a whole word the free run wrote
    out = _complete(client, extra_body={"bad_words": [word]})
    assert word in free.choices[0].text and word not in out.choices[0].text
    chat_free = _chat(client, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content
    said = next(w for w in chat_free.split() if w.isalpha())  # a whole word the free chat run wrote
    chat = _chat(client, max_tokens=12, extra_body={"ignore_eos": True, "bad_words": [said]})
    assert said not in chat.choices[0].message.content.split()


def test_echo_of_the_prompt_alone_and_of_several_prompts_with_n(client, tokenizer):
    prompt = "The capital of France is"
    ids = tokenizer(prompt)["input_ids"]
    out = _complete(client, prompt, max_tokens=0, echo=True, logprobs=1)  # OpenAI's prompt scoring
    choice = out.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids) and choice.logprobs.token_logprobs[0] is None
    assert out.usage.completion_tokens == 0
    chunks = list(_complete(client, prompt, max_tokens=0, echo=True, logprobs=1, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == prompt
    assert [
        x for ch in chunks for x in ch.choices[0].logprobs.token_logprobs
    ] == choice.logprobs.token_logprobs
    # two prompts x n=2: each choice echoes its own prompt and shares its choice 0's scores
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    kw = dict(max_tokens=2, n=2, echo=True, logprobs=0, temperature=1.0, seed=4)
    many = _complete(client, prompts, **kw).choices
    streamed = {}
    for ch in _complete(client, prompts, stream=True, **kw):
        for c in ch.choices:
            text, lps = streamed.get(c.index, ("", []))
            streamed[c.index] = (text + c.text, lps + c.logprobs.token_logprobs)
    for c in many:
        p = prompts[c.index // 2]
        assert c.text.startswith(tokenizer.decode(p))
        assert (
            c.logprobs.token_logprobs[: len(p)]
            == many[c.index - c.index % 2].logprobs.token_logprobs[: len(p)]
        )
        assert (
            streamed[c.index][0] == c.text
            and streamed[c.index][1][: len(p)] == c.logprobs.token_logprobs[: len(p)]
        )


def test_prompt_logprobs_field(client, ckpt, tokenizer):
    prompt = "Once upon a time"
    ids = tokenizer(prompt)["input_ids"]
    ref = _prompt_reference(ckpt, ids)
    out = _complete(client, prompt, max_tokens=2, n=2, seed=1, extra_body={"prompt_logprobs": 2})
    for choice in out.choices:
        scored = choice.model_extra["prompt_logprobs"]
        assert len(scored) == len(ids) and scored[0] is None
        for t in range(1, len(ids)):
            own = scored[t][str(ids[t])]
            assert own["logprob"] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-3)
            row, value = ref[t - 1], ref[t - 1, ids[t]]  # (near ties may go either way)
            assert 1 + int((row > value + 1e-3).sum()) <= own["rank"] <= 1 + int((row > value - 1e-3).sum())
            assert own["decoded_token"] == tokenizer.decode([ids[t]])
            best = ref[t - 1].topk(2).indices.tolist()
            assert [scored[t][str(b)]["rank"] for b in best] == [1, 2]
    chunks = list(_complete(client, prompt, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 2}))
    assert (
        chunks[0].choices[0].model_extra["prompt_logprobs"] == out.choices[0].model_extra["prompt_logprobs"]
    )
    chat_chunks = list(_chat(client, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 0}))
    streamed = [
        ch.model_extra["prompt_logprobs"] for ch in chat_chunks if ch.model_extra.get("prompt_logprobs")
    ]
    chat = _chat(client, max_tokens=2, extra_body={"prompt_logprobs": 0})
    assert streamed == [chat.model_extra["prompt_logprobs"]]  # once, on the first content chunk
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me a story."}], tokenize=False, add_generation_prompt=True
    )
    scored = chat.model_extra["prompt_logprobs"]  # vLLM: the chat response's, not a choice's
    assert (
        len(scored) == len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) and scored[0] is None
    )
    assert all(len(position) == 1 for position in scored[1:])  # prompt_logprobs=0: the token alone


def test_chat_logprobs(client):
    out = _chat(client, max_tokens=5, logprobs=True, top_logprobs=2).choices[0]
    content = out.logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == out.message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    streamed = [
        t
        for ch in _chat(client, max_tokens=5, logprobs=True, stream=True)
        if ch.choices
        for t in (ch.choices[0].logprobs.content if ch.choices[0].logprobs else [])
    ]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert _chat(client, max_tokens=3).choices[0].logprobs is None


# ---- vLLM's extra sampling fields -------------------------------------------------------------------


def test_ignore_eos_and_min_tokens(client, eos_prompt):
    plain = _complete(client, eos_prompt, max_tokens=8).choices[0]
    assert plain.finish_reason == "stop" and plain.model_extra["stop_reason"] is None  # EOS
    out = _complete(client, eos_prompt, max_tokens=8, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"
    out = _complete(client, eos_prompt, max_tokens=8, extra_body={"min_tokens": 5})
    assert out.usage.completion_tokens >= 5


def test_stop_token_ids(client, hf, tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    with _one_torch_thread():
        ids = hf_greedy(hf, prompt, 10)
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    out = _complete(client, prompt, max_tokens=10, extra_body={"stop_token_ids": [ids[k]]})
    assert out.usage.completion_tokens == k + 1 and out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == ids[k]
    # min_tokens bans the stop token until enough are out; ignore_eos + min_tokens = max_tokens: exact count
    extra = {"stop_token_ids": [ids[k]], "min_tokens": 9, "ignore_eos": True}
    assert _complete(client, prompt, max_tokens=9, extra_body=extra).usage.completion_tokens == 9


def test_include_stop_str_in_output(client):
    tokens = _tokens(client, "The capital of France is", max_tokens=16, extra_body={"ignore_eos": True})
    full = "".join(tokens)
    stop = next(t for t in tokens[3:] if t.strip() and full.find(t) > 0)  # a piece of text after the start
    end = full.find(stop)
    plain = _complete(client, max_tokens=16, stop=[stop]).choices[0]
    kept = _complete(client, max_tokens=16, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert plain.text == full[:end] and not plain.text.endswith(stop)
    assert kept.choices[0].text == full[: end + len(stop)] and kept.choices[0].text.endswith(stop)
    assert plain.finish_reason == kept.choices[0].finish_reason == "stop"
    chunks = _complete(
        client, max_tokens=16, stop=[stop], stream=True, extra_body={"include_stop_str_in_output": True}
    )
    assert "".join(ch.choices[0].text for ch in chunks) == kept.choices[0].text


def test_top_k_min_p_penalties(client, tokenizer):
    greedy = _tokens(client, "def f(x):", max_tokens=12)
    assert _tokens(client, "def f(x):", max_tokens=12, temperature=1.0, extra_body={"top_k": 1}) == greedy
    assert _tokens(client, "def f(x):", max_tokens=12, temperature=1.0, extra_body={"min_p": 1.0}) == greedy
    base = _tokens(client, "Hello", max_tokens=24)
    for kw in ({"presence_penalty": -2}, {"frequency_penalty": -2}):  # rewarding repeats: a loop
        assert len(set(_tokens(client, "Hello", max_tokens=24, **kw))) <= 3 < len(set(base))
    for kw in ({"presence_penalty": 2}, {"frequency_penalty": 2}):
        out = _tokens(client, "Hello", max_tokens=24, **kw)
        assert out != base and len(set(out)) >= len(set(base))
    # repetition_penalty < 1 favours tokens already in the context: the output copies the prompt's tokens
    prompt = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
    out = _complete(client, prompt, max_tokens=12, logprobs=0, extra_body={"repetition_penalty": 0.01})
    prompt_tokens = {tokenizer.decode([t]) for t in tokenizer.encode(prompt)}
    assert set(out.choices[0].logprobs.tokens) <= prompt_tokens


# ---- errors ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def priority_client(ckpt, tmp_path_factory):
    """A second server, under --scheduling-policy priority."""
    for url in _serve(ckpt, tmp_path_factory, "--scheduling-policy", "priority"):
        yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_priority_needs_the_priority_policy(client, priority_client):
    def greedy(**extra):
        return dict(max_tokens=4, temperature=0, extra_body={"ignore_eos": True, **extra})

    expected = _complete(client, **greedy()).choices[0].text
    assert _complete(client, **greedy(priority=0)).choices[0].text == expected
    with pytest.raises(openai.BadRequestError) as e:  # vLLM's 400 under fcfs
        _complete(client, **greedy(priority=3))
    assert _error(e)["param"] == "priority" and "scheduling_policy" in _error(e)["message"]
    for priority in (-2, 0, 5):
        assert _complete(priority_client, **greedy(priority=priority)).choices[0].text == expected
    chat = _chat(priority_client, max_tokens=2, extra_body={"priority": 1})
    assert chat.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"extra_body": {"prompt_logprobs": -1}}, "prompt_logprobs"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),  # outside the vocabulary
        ({"extra_body": {"allowed_token_ids": [99999]}}, "allowed_token_ids"),
        ({"extra_body": {"guided_grammar": "root ::= 'a'"}}, "guided_grammar"),  # (guided_json is supported)
        ({"n": 2, "best_of": 1}, "best_of"),
    ],
)
def test_unsupported_completion_params(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, max_tokens=2, **kwargs)
    assert e.value.status_code == 400 and _error(e)["param"] == param and param in _error(e)["message"]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        # tools ask for tool_choice "auto", which this server (no --tool-call-parser) cannot read
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"logit_bias": {"five": 10}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs=true
    ],
)
def test_unsupported_chat_params(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, max_tokens=2, **kwargs)
    assert _error(e)["param"] == param


def test_logit_bias_and_allowed_token_ids(client, tokenizer):
    forced = _complete(client, max_tokens=4, logprobs=0, logit_bias={"77": 100}).choices[0]
    assert forced.logprobs.tokens == [tokenizer.decode([77])] * 4
    chat = _chat(client, max_tokens=4, logprobs=True, extra_body={"allowed_token_ids": [40, 41]}).choices[0]
    assert {t.token for t in chat.logprobs.content} <= {tokenizer.decode([40]), tokenizer.decode([41])}


def test_neutral_values_are_accepted(client):
    _complete(client, max_tokens=2, echo=False, best_of=1, logit_bias={}, suffix=None, user="u")
    _chat(client, max_tokens=2, tools=[], response_format={"type": "text"}, logit_bias=None)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 10**400}, "temperature"),  # (the engine's step failed on it: a 500)
        ({"top_p": 1.5}, "top_p"),
        ({"logprobs": 50}, "logprobs"),
        ({"n": 0}, "n"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"extra_body": {"min_tokens": 20}}, "min_tokens"),  # > max_tokens
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_bad_values(client, kwargs, param):
    kwargs.setdefault("max_tokens", 4)
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, **kwargs)
    assert _error(e)["param"] == param and param in _error(e)["message"]


def test_chat_min_tokens_past_the_context_names_min_tokens(client):
    """Chat without max_tokens generates at most what the context leaves: a min_tokens larger than that is
    the min_tokens field's fault, not the messages' (the engine's check, named by its ParamError); and so
    is one larger than the checkpoint's max_new_tokens, which the request then defaults to."""
    for prompt, min_tokens in (("x " * 230, 20), ("hi", MAX_NEW_TOKENS + 1)):  # 13 left; 242 left
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, prompt, max_tokens=None, extra_body={"min_tokens": min_tokens})
        assert _error(e)["param"] == "min_tokens" and "min_tokens" in _error(e)["message"]


def test_bad_requests_leave_the_server_serving(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert _error(e)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, list(range(3, 3 + 250)), max_tokens=16)
    assert "max_model_len=256" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _complete(client, [5, 99999], max_tokens=2)
    assert "vocabulary" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError):
        _chat(client, "x " * 300, max_tokens=None)  # no room left to generate
    for body in (b'{"model": "tiny", "prompt": ', b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(server + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(
        server + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = httpx.get(server + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    # and the server still serves
    assert _complete(client, max_tokens=3).usage.completion_tokens >= 1
    assert httpx.get(server + "/health").status_code == 200


def test_unpaired_surrogates_are_a_400(server, client):
    """JSON lets a lone UTF-16 surrogate escape through ("\\ud83d": an emoji cut in half by a client that
    slices UTF-16 strings); no tokenizer and no UTF-8 response can take it: a 400 naming where it is."""
    cases = [
        ("/v1/completions", r'{"prompt": "hi \ud83d", "max_tokens": 2}', "prompt"),
        ("/v1/completions", r'{"prompt": "hi", "stream": true, "bad_words": ["\udc00"]}', "bad_words[0]"),
        (
            "/v1/chat/completions",
            r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]}',
            "messages[0].content[0].text",
        ),
        ("/v1/completions", r'{"prompt": "hi", "max_tokens": 2, "\ud800": 1}', None),  # in a key
        ("/tokenize", r'{"prompt": "\udfff"}', "prompt"),
    ]
    for path, raw, param in cases:
        r = httpx.post(server + path, content=raw.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        assert r.json()["error"]["param"] == param and "surrogate" in r.json()["error"]["message"]
    # not escaped but encoded (json.loads decodes bytes with surrogatepass), in UTF-8 or UTF-16
    for raw in (b'{"prompt": "a\xed\xa0\x80"}', '{"prompt": "a\ud800"}'.encode("utf-16-le", "surrogatepass")):
        r = httpx.post(server + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", (raw, r.text)
    # a pair (an escaped emoji, as json.dumps writes it) is one character, and fine
    ok = httpx.post(server + "/tokenize", content=rb'{"prompt": "\ud83d\ude00"}')
    assert ok.status_code == 200 and ok.json()["count"] >= 1
    assert _complete(client, max_tokens=3).usage.completion_tokens >= 1


# ---- concurrency and disconnects ----------------------------------------------------------------------


def test_concurrent_streaming_clients(server):
    num_clients, max_tokens = 32, 8

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int, str]:
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"Request number {i} says",
            max_tokens=max_tokens,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, usage, reason = "", None, None
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].text
                reason = ch.choices[0].finish_reason or reason
            if ch.usage is not None:
                usage = ch.usage.completion_tokens
        return text, usage, reason

    async def main():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(num_clients)))

    results = asyncio.run(main())
    assert all(usage == max_tokens and reason == "length" and text for text, usage, reason in results)
    assert len({text for text, _, _ in results}) > num_clients // 2  # different seeds, different texts


_aborted = lambda s: _metric(s, "request_success_total", 'finished_reason="abort"')  # noqa: E731
_generated = lambda s: _metric(s, "generation_tokens_total")  # noqa: E731


def test_late_request_joins_the_running_batch(server, client):
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 240,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=60) as http, http.stream("POST", server + "/v1/completions", json=body) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data:"))
        next(lines)
        # a request that arrives mid-generation finishes while the long one is still running
        assert _complete(client, max_tokens=3, extra_body={"ignore_eos": True}).usage.completion_tokens == 3
        assert _metric(_metrics(server), "num_requests_running") == 1
        assert json.loads(next(lines)[5:])["choices"][0]["finish_reason"] is None
    _wait_until_idle(server)


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    before = _wait_until_idle(server)
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 240,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=60) as http, http.stream("POST", server + "/v1/completions", json=body) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data:"))
        assert all(json.loads(next(lines)[5:])["choices"] for _ in range(3))
        during = _metrics(server)
        assert _metric(during, "num_requests_running") == 1 and _metric(during, "kv_cache_usage_perc") > 0
    # the connection is closed: the request is aborted and its KV blocks freed
    after = _wait_until_idle(server)
    assert _aborted(after) == _aborted(before) + 1
    assert _generated(after) - _generated(before) < 240


def test_disconnect_while_waiting_for_a_full_response_aborts(server):
    before = _wait_until_idle(server)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True}
    # The client gives up and closes the connection long before the 240 tokens are done: the tiny model makes
    # them in ~0.25 s on a 2-core machine, so a 0.3 s read timeout could come after the last one (seen once).
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.03))
    after = _wait_until_idle(server)
    assert _aborted(after) == _aborted(before) + 1
    assert _generated(after) - _generated(before) < 240


# ---- the serving benchmark ------------------------------------------------------------------------------


def test_serving_benchmark_runs(server, tmp_path):
    out = tmp_path / "serving.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "serving.py"),
        "--base-url",
        server,
        "--num-prompts",
        "6",
        "--request-rate",
        "inf",
        "20",
        "--input-len",
        "4",
        "24",
        "--output-len",
        "2",
        "6",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["model"] == MODEL and len(report["runs"]) == 2
    for run in report["runs"]:
        assert run["num_completed"] == 6 and run["num_failed"] == 0
        assert 6 * 2 <= run["total_output_tokens"] <= 6 * 6
        assert run["output_throughput"] > 0 and run["p99_ttft_ms"] >= run["p50_ttft_ms"] > 0
        # (a loaded host can stream a short output as one chunk: then there is no gap between chunks, and 0)
        assert run["p50_tpot_ms"] > 0 and run["p50_itl_ms"] >= 0
