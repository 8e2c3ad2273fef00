"""vLLM's `return_token_ids` and `return_tokens_as_token_ids` on the real server (conftest.py's tiny
checkpoint and server), through the official openai client: the ids decode to the text (and a final EOS
to its own text), the prompt's ids are the tokenizer's, each streamed token's id comes exactly once, and
logprobs name their tokens "token_id:{id}"; parsing alone first."""

from __future__ import annotations

import re

import openai
import pytest

from nanovllm.server.protocol import RequestError, parse_chat_request, parse_completion_request
from tests.server.helpers import EOS, MODEL, _error

IDS = {"return_token_ids": True}
AS_IDS = {"return_tokens_as_token_ids": True}
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
SAMPLED = {"n": 2, "temperature": 1.0, "seed": 7, "max_tokens": 6}
# three tokens (min_tokens keeps EOS out), then EOS, which the bias makes the only choice
ENDS_ON_EOS = {"max_tokens": 8, "logit_bias": {str(EOS): 100}, "extra": IDS | {"min_tokens": 3}}
TOKEN_ID = re.compile(r"token_id:(\d+)")


def _complete(client, prompt=PROMPT, extra=IDS, **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    return client.completions.create(model=MODEL, prompt=prompt, extra_body=extra, **kw)


def _chat(client, extra=IDS, **kw):
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body=extra, **kw)


def _text(tokenizer, ids: list[int]) -> str:
    """The text of generated ids: special tokens skipped, and a character cut short at the end (its bytes
    incomplete when the choice stopped) not shown, as the engine's detokenizer does."""
    return tokenizer.decode(ids, skip_special_tokens=True).removesuffix("\ufffd")


def _rendered(tokenizer) -> list[int]:
    """The chat endpoint's prompt: the template's text, encoded without added special tokens."""
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def _streamed(chunks) -> tuple[dict[int, list[int]], list]:
    """{choice index: its token ids joined from the chunks}, and each chunk's prompt_token_ids (or None)."""
    ids, prompts = {}, []
    for chunk in chunks:
        prompts.append(chunk.model_extra.get("prompt_token_ids"))
        for choice in chunk.choices:
            ids.setdefault(choice.index, []).extend(
                choice.model_extra.get("token_ids", [])
            )  # (not: chat's role)
    return ids, prompts


# ---- parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parse, body", [(parse_completion_request, {"prompt": "x"}), (parse_chat_request, {"messages": MESSAGES})]
)
def test_fields_are_booleans_off_by_default(parse, body):
    req = parse(body, 256)
    assert not req.return_token_ids and not req.return_tokens_as_token_ids
    req = parse(body | IDS | AS_IDS, 256)
    assert req.return_token_ids and req.return_tokens_as_token_ids
    assert parse(body | {"return_token_ids": None}, 256).return_token_ids is False
    for field in ("return_token_ids", "return_tokens_as_token_ids"):
        with pytest.raises(RequestError) as e:
            parse(body | {field: "yes"}, 256)
        assert e.value.param == field and field in str(e.value)


# ---- completions --------------------------------------------------------------------------------------


def test_completion_ids_decode_to_the_text(client, tokenizer):
    out = _complete(client, **SAMPLED)
    assert out.choices[0].text != out.choices[1].text  # (each choice its own ids)
    for choice in out.choices:
        assert choice.model_extra["prompt_token_ids"] == tokenizer.encode(PROMPT)
        assert _text(tokenizer, choice.model_extra["token_ids"]) == choice.text
    assert out.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in out.choices)
    plain = _complete(client, extra=None, **SAMPLED)
    assert [c.text for c in plain.choices] == [c.text for c in out.choices]
    assert not {"token_ids", "prompt_token_ids"} & {k for c in plain.choices for k in c.model_extra}


def test_a_final_eos_is_in_the_ids_not_the_text(client, tokenizer):
    (choice,) = _complete(client, **ENDS_ON_EOS).choices
    ids = choice.model_extra["token_ids"]
    assert choice.finish_reason == "stop" and len(ids) == 4 and ids[-1] == EOS
    # (vLLM's: the EOS is generated, so its id is there; its text is not the output's)
    assert tokenizer.decode(ids) == choice.text + tokenizer.decode([EOS])


def test_completion_stream_sends_each_id_once(client, tokenizer):
    full = _complete(client, **SAMPLED)
    chunks = list(_complete(client, stream=True, **SAMPLED))
    ids, _ = _streamed(chunks)
    assert ids == {c.index: c.model_extra["token_ids"] for c in full.choices}
    firsts = {}  # choice index -> its first chunk's prompt_token_ids; later chunks have none
    for chunk in chunks:
        (choice,) = chunk.choices
        prompt = choice.model_extra.pop("prompt_token_ids", None)
        assert prompt is not None if choice.index not in firsts else prompt is None
        firsts.setdefault(choice.index, prompt)
    assert firsts == {0: tokenizer.encode(PROMPT), 1: tokenizer.encode(PROMPT)}


def test_echo_ids_are_the_generated_ones(client, tokenizer):
    (choice,) = _complete(client, echo=True).choices
    assert choice.text.startswith(PROMPT)
    assert _text(tokenizer, choice.model_extra["token_ids"]) == choice.text[len(PROMPT) :]
    assert choice.model_extra["prompt_token_ids"] == tokenizer.encode(PROMPT)
    # echo of the prompt alone: nothing generated is shown, ids included
    (alone,) = _complete(client, echo=True, max_tokens=0).choices
    assert alone.text == PROMPT and alone.model_extra["token_ids"] == []
    (chunk,) = list(_complete(client, echo=True, max_tokens=0, stream=True))
    assert chunk.choices[0].model_extra["token_ids"] == []
    assert chunk.choices[0].model_extra["prompt_token_ids"] == tokenizer.encode(PROMPT)


def test_truncated_prompt_shows_the_ids_kept(client, tokenizer):
    ids = tokenizer.encode("one two three four five six seven")
    (choice,) = _complete(client, prompt=ids, extra=IDS | {"truncate_prompt_tokens": 3}).choices
    assert choice.model_extra["prompt_token_ids"] == ids[-3:]


def test_beam_search_choices_carry_their_ids(client, tokenizer):
    beams = IDS | {"use_beam_search": True}
    out = _complete(client, n=2, max_tokens=4, extra=beams)
    for choice in out.choices:  # (a beam's text shows special tokens)
        assert tokenizer.decode(choice.model_extra["token_ids"], skip_special_tokens=False) == choice.text
        assert choice.model_extra["prompt_token_ids"] == tokenizer.encode(PROMPT)
    chat = _chat(client, n=2, max_tokens=4, extra=beams)
    assert chat.model_extra["prompt_token_ids"] == _rendered(tokenizer)
    chunks = list(_chat(client, n=2, max_tokens=4, extra=beams, stream=True))
    ids, _ = _streamed(chunks)
    assert ids == {c.index: c.model_extra["token_ids"] for c in chat.choices}


# ---- chat -----------------------------------------------------------------------------------------------


def test_chat_ids(client, tokenizer):
    out = _chat(client, **SAMPLED)
    assert out.model_extra["prompt_token_ids"] == _rendered(tokenizer)
    for choice in out.choices:
        assert _text(tokenizer, choice.model_extra["token_ids"]) == choice.message.content
        assert "prompt_token_ids" not in choice.model_extra
    (ended,) = _chat(client, **ENDS_ON_EOS).choices
    assert ended.model_extra["token_ids"][-1] == EOS
    assert tokenizer.decode(ended.model_extra["token_ids"]) == ended.message.content + tokenizer.decode([EOS])
    assert "prompt_token_ids" not in _chat(client, extra=None).model_extra


def test_chat_stream_prompt_ids_come_first_and_once(client, tokenizer):
    full = _chat(client, **SAMPLED)
    chunks = list(_chat(client, stream=True, **SAMPLED))
    ids, prompts = _streamed(chunks)
    assert prompts[0] == _rendered(tokenizer) and prompts[1:] == [None] * (len(prompts) - 1)
    assert ids == {c.index: c.model_extra["token_ids"] for c in full.choices}


def test_tool_calls_held_back_still_send_every_id(client):
    """tool_choice "required" holds a call's text back until its arguments begin: the chunks in between
    still carry their tokens' ids."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    kw = {"tools": tools, "tool_choice": "required", "max_tokens": 12}
    full = _chat(client, **kw)
    chunks = list(_chat(client, stream=True, **kw))
    ids, _ = _streamed(chunks)
    assert ids == {0: full.choices[0].model_extra["token_ids"]}
    held = [
        ch for ch in chunks[1:] if ch.choices[0].delta.content == "" and not ch.choices[0].delta.tool_calls
    ]
    assert any(ch.choices[0].model_extra["token_ids"] for ch in held)
    assert len(ids[0]) == full.usage.completion_tokens


# ---- return_tokens_as_token_ids ---------------------------------------------------------------------------


def _id(token: str) -> int:
    match = TOKEN_ID.fullmatch(token)
    assert match, token
    return int(match[1])


def test_completion_logprobs_show_token_ids(client, tokenizer):
    (choice,) = _complete(client, logprobs=2, echo=True, extra=IDS | AS_IDS).choices
    lp = choice.logprobs
    prompt, generated = choice.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]
    assert [_id(t) for t in lp.tokens] == prompt + generated  # (echo: the prompt's tokens first)
    assert lp.top_logprobs[0] is None and all(_id(t) >= 0 for top in lp.top_logprobs[1:] for t in top)
    # text_offset still counts the text's characters
    lengths = [len(tokenizer.decode([i])) for i in prompt + generated]
    assert lp.text_offset == [sum(lengths[:i]) for i in range(len(lengths))]
    chunks = list(_complete(client, logprobs=1, stream=True, extra=IDS | AS_IDS))
    streamed = [_id(t) for ch in chunks for t in ch.choices[0].logprobs.tokens]
    assert streamed == _streamed(chunks)[0][0]
    plain = _complete(client, logprobs=0).choices[0].logprobs.tokens
    assert plain == [tokenizer.decode([i]) for i in choice.model_extra["token_ids"]]


def test_chat_logprobs_show_token_ids(client):
    (choice,) = _chat(client, logprobs=True, top_logprobs=2, extra=IDS | AS_IDS).choices
    content = choice.logprobs.content
    assert [_id(t.token) for t in content] == choice.model_extra["token_ids"]
    for entry in content:
        assert entry.bytes == list(entry.token.encode())  # the bytes of what is shown
        assert len(entry.top_logprobs) == 2
        assert all(_id(t.token) >= 0 and t.bytes == list(t.token.encode()) for t in entry.top_logprobs)
    chunks = list(_chat(client, logprobs=True, stream=True, extra=IDS | AS_IDS))
    streamed = [_id(t.token) for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.content]
    assert streamed == _streamed(chunks)[0][0]


def test_non_booleans_are_400s(client):
    for field in ("return_token_ids", "return_tokens_as_token_ids"):
        with pytest.raises(openai.BadRequestError) as e:
            _complete(client, extra={field: 1})
        assert _error(e)["param"] == field
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, extra={field: "true"})
        assert _error(e)["param"] == field
