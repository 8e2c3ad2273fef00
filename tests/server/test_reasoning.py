"""A reasoning model's reply split into thinking and answer (server/reasoning.py), whole and streamed: the
same split for every way of cutting the output into pieces; then a server with `--reasoning-parser qwen3` on
a checkpoint whose tokenizer has Qwen3's think tags (tests/test_reasoning_structured_outputs.py's), through
the openai client."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from nanovllm.reasoning import REASONING_PARSERS, prompt_ends_thinking, think_tags
from nanovllm.server.reasoning import ReasoningSplitter
from tests.checkpoints import END_THINK, load_hf_model
from tests.server.helpers import MODEL, _serve
from tests.test_reasoning_structured_outputs import _bias_for_end_at

TAGS = REASONING_PARSERS["qwen3"]


def _split(text: str, thinking: bool) -> tuple[str | None, str | None]:
    return ReasoningSplitter(TAGS, thinking).extract(text)


def _streamed(pieces: list[str], thinking: bool) -> tuple[list[tuple[str, str]], tuple[str, str]]:
    splitter = ReasoningSplitter(TAGS, thinking)
    sent = [splitter.feed(piece) for piece in pieces]
    sent.append(splitter.flush())
    joined = ("".join(r for r, _ in sent), "".join(c for _, c in sent))
    return sent, joined


def test_the_split():
    qwen3 = "<think>\nTwo and two.\n</think>\n\nFour."
    assert _split(qwen3, True) == ("\nTwo and two.\n", "\n\nFour.")
    assert _split("Two and two.\n</think>\n\nFour.", True) == (
        "Two and two.\n",
        "\n\nFour.",
    )  # (R1: opened in the prompt)
    assert _split("<think>\nstill thinking", True) == ("\nstill thinking", None)  # cut by max_tokens
    assert _split("</think>Four.", True) == ("", "Four.")  # (an empty thinking: "", as vLLM's)
    assert _split("<think>x</think>", True) == ("x", None)
    assert _split("Four.", False) == (None, "Four.")  # the prompt closed the thinking
    assert _split("x</think>y", False) == (None, "x</think>y")
    # the model opens a thinking itself after a prompt that closed an earlier one (a tool loop's next turn)
    assert _split("<think>x</think>y", False) == ("x", "y")
    assert _split("", True) == (None, None)
    assert _split("a</think>b</think>c", True) == ("a", "b</think>c")  # only the first end tag counts


def test_streaming_holds_back_only_a_possible_tag():
    sent, joined = _streamed(["<th", "ink>\nTwo", " and two.</", "thi", "nk>\n\nFo", "ur."], True)
    assert sent == [
        ("", ""),
        ("\nTwo", ""),
        (" and two.", ""),
        ("", ""),
        ("", "\n\nFo"),
        ("", "ur."),
        ("", ""),
    ]
    assert joined == ("\nTwo and two.", "\n\nFour.")
    sent, _ = _streamed(["<th", "e end"], True)  # not the start tag after all: thinking
    assert sent == [("", ""), ("<the end", ""), ("", "")]
    assert _streamed(["<tool", "s>"], True)[0][0] == ("<tool", "")  # (cannot be the tag: sent at once)
    sent, _ = _streamed(["thinking </thi"], True)  # cut inside a would-be tag: it was thinking
    assert sent == [("thinking ", ""), ("</thi", "")]
    assert _streamed(["<think>", "a"], False)[0] == [("", ""), ("a", ""), ("", "")]
    assert _streamed(["<th", "e"], False)[0] == [("", ""), ("", "<the"), ("", "")]


_PIECES = st.sampled_from(
    ["<think>", "</think>", "<", "</", "<th", "ink>", "think", ">", "a", "\n", " b", "</thi"]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=12), st.booleans(), st.data())
def test_every_cut_gives_the_whole_split(fragments, thinking, data):
    text = "".join(fragments)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=6)))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    reasoning, content = _split(text, thinking)
    assert _streamed(pieces, thinking)[1] == (reasoning or "", content or "")


def test_the_prompt_decides_where_the_output_starts():
    start, end = 7, 8
    assert not prompt_ends_thinking([1, 2, 3], start, end)  # no tag: the model opens its thinking
    assert prompt_ends_thinking([1, start, 2, end, 3], start, end)  # enable_thinking false
    assert not prompt_ends_thinking([1, start, 2, end, start, 3], start, end)  # opened in the prompt
    with pytest.raises(ValueError, match="known parsers: qwen3, deepseek_r1"):
        think_tags("o1")


# ---- a real server with --reasoning-parser qwen3 ---------------------------------------------------------

CHOICE = {"guided_choice": ["Sunny.", "Rainy."]}  # (applies after the thinking)


@pytest.fixture(scope="module")
def server(think_ckpt, tmp_path_factory):
    """This module's server (conftest's `client` talks to it): the think checkpoint, the qwen3 parser."""
    flags = ("--reasoning-parser", "qwen3", "--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    yield from _serve(think_ckpt, tmp_path_factory, *flags)


@pytest.fixture(scope="module")
def steer(think_ckpt):
    """tools -> (bias, thought): a logit_bias on `</think>` that makes the chat prompt's greedy reply close
    its thinking after a few tokens (found on transformers' logits: _bias_for_end_at), and the text of
    those tokens: the unbiased greedy ones, since the bias wins nowhere before."""
    model, tokenizer = load_hf_model(think_ckpt), AutoTokenizer.from_pretrained(think_ckpt)

    def steered(tools: list[dict] | None = None) -> tuple[float, str]:
        prompt = tokenizer.apply_chat_template(
            MESSAGES, tools=tools, tokenize=False, add_generation_prompt=True
        )
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        for step in range(2, 8):
            try:
                bias = _bias_for_end_at((model, None), prompt_ids, step)
            except AssertionError:  # (no margin at this step)
                continue
            with torch.no_grad():
                out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=step, do_sample=False)
            return bias, tokenizer.decode(out[0, len(prompt_ids) :])
        pytest.fail("no step where a bias on </think> wins first")

    return steered


MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def _chat(client, **fields):
    fields = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 24} | fields
    return client.chat.completions.create(**fields)


def test_the_reply_splits_into_reasoning_and_content(client, steer):
    bias, thought = steer()
    body = {"logit_bias": {str(END_THINK): bias}, "extra_body": CHOICE}
    (choice,) = _chat(client, **body).choices
    extra = choice.message.model_extra
    assert extra["reasoning"] == extra["reasoning_content"] == thought and thought
    assert choice.message.content in ("Sunny.", "Rainy.") and choice.finish_reason == "stop"

    deltas = [(c.choices[0].delta, c.choices[0].finish_reason) for c in _chat(client, stream=True, **body)]
    thinking = [(d.model_extra or {}).get("reasoning") for d, _ in deltas]
    assert "".join(t or "" for t in thinking) == thought
    answered = [i for i, (d, _) in enumerate(deltas) if d.content]
    # no answer before the thinking ends (one chunk may hold both: tokens can come several at a time)
    assert max(i for i, t in enumerate(thinking) if t) <= min(answered)
    assert "".join(d.content or "" for d, _ in deltas) == choice.message.content
    assert [r for _, r in deltas] == [None] * (len(deltas) - 1) + ["stop"]

    hide = {**body, "extra_body": {**CHOICE, "include_reasoning": False}}
    (hidden,) = _chat(client, **hide).choices
    assert "reasoning" not in (hidden.message.model_extra or {})
    assert hidden.message.content == choice.message.content
    for chunk in _chat(client, stream=True, **hide):
        assert not {"reasoning", "reasoning_content"} & set(chunk.choices[0].delta.model_extra or {})

    # the reply goes back in the next turn as the openai client sends it (with its reasoning fields)
    again = [*MESSAGES, choice.message, {"role": "user", "content": "And tomorrow?"}]
    assert _chat(client, messages=again, max_tokens=2).choices[0].finish_reason == "length"


def test_a_prompt_that_closed_the_thinking_is_all_answer(client):
    """Qwen3's enable_thinking false: the template closes the thinking in the prompt; the constraint applies
    from the first token and the reply is all content."""
    (choice,) = _chat(
        client, extra_body={**CHOICE, "chat_template_kwargs": {"enable_thinking": False}}
    ).choices
    assert choice.message.model_extra["reasoning"] is None and choice.message.content in ("Sunny.", "Rainy.")


def test_tool_calls_are_read_from_the_answer(client, steer):
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    bias, thought = steer(tools)
    call = r'<tool_call>\n\{"name": "get_time", "arguments": \{\}\}\n</tool_call>'
    body = {"logit_bias": {str(END_THINK): bias}, "tools": tools, "extra_body": {"guided_regex": call}}
    body["max_tokens"] = 80  # (the call is ~30 tokens of this small vocabulary)
    (choice,) = _chat(client, **body).choices
    assert choice.message.model_extra["reasoning"] == thought and choice.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_time", "{}")
    ]
    assert choice.message.content is None


def test_a_named_call_is_announced_after_the_thinking(client, steer):
    """Streamed under a named tool_choice, the call (id, name) comes with its first argument text, after the
    thinking: never a call announced while the model still thinks."""
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    bias, thought = steer(tools)
    named = {"type": "function", "function": {"name": "get_time"}}
    body = {"logit_bias": {str(END_THINK): bias}, "tools": tools, "tool_choice": named}
    deltas = [c.choices[0].delta for c in _chat(client, stream=True, **body)]
    thinking = [i for i, d in enumerate(deltas) if (d.model_extra or {}).get("reasoning")]
    calls = [i for i, d in enumerate(deltas) if d.tool_calls]
    assert thinking and calls and max(thinking) <= min(calls)  # (one chunk may end one and start the other)
    first = deltas[calls[0]].tool_calls[0]
    assert first.id and first.function.name == "get_time" and first.function.arguments
    assert json.loads("".join(deltas[i].tool_calls[0].function.arguments for i in calls)) == {}
    # cut before the thinking ends: no call at all, streamed or not
    (choice,) = _chat(client, tools=tools, tool_choice=named, max_tokens=2).choices
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    assert not any(
        c.choices[0].delta.tool_calls
        for c in _chat(client, stream=True, tools=tools, tool_choice=named, max_tokens=2)
    )
