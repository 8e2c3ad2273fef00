"""Reasoning models' thinking (vLLM's `--reasoning-parser`): which tags enclose it, and whether a prompt has
already closed it.

Qwen3 and DeepSeek-R1 think before they answer: `<think>` ... `</think>`, then the reply. A reasoning parser
names the model's tags. Two places use it:
  - the engine: a structured output (or a tool call's constraint) applies only after `</think>`, so the
    model may think freely first (structured/grammar.py's reasoning state);
  - the server: a reply is split into `reasoning` (the thinking) and `content` (server/reasoning.py).
Whether the output starts inside the thinking depends on the prompt: Qwen3 with `enable_thinking: false`
renders an empty `<think>\\n\\n</think>\\n\\n` into the prompt, so its output is all reply; a template that
opens `<think>` in the prompt (DeepSeek-R1, Qwen3 2507) leaves the output inside the thinking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ThinkTags:
    """A reasoning parser's tags: each must be one token of the model's tokenizer."""

    start: str
    end: str


REASONING_PARSERS: dict[str, ThinkTags] = {
    "qwen3": ThinkTags("<think>", "</think>"),  # Qwen3, QwQ
    "deepseek_r1": ThinkTags("<think>", "</think>"),  # DeepSeek-R1 and its distills
}


def think_tags(name: str) -> ThinkTags:
    """The parser's tags; ValueError naming the known parsers if there is no such parser (Config's check)."""
    if not isinstance(name, str) or name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known parsers: {', '.join(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]


def think_token_ids(tokenizer, name: str, vocab_size: int | None = None) -> tuple[int, int]:
    """(start id, end id) of the parser's tags in this tokenizer, every check of them in one place: each tag
    must be one token (looked up as a token, not encoded: a SentencePiece tokenizer may put a prefix space
    before a tag it encodes) and, given the model's `vocab_size` (its logits' width), below it, or the
    thinking could never end. ValueError naming the parser otherwise: it does not fit the model."""
    tags = think_tags(name)
    ids = []
    for tag in (tags.start, tags.end):
        token_id = tokenizer.convert_tokens_to_ids(tag)
        # (a token the vocabulary lacks is None or the unk id; decoding catches any other stand-in)
        if token_id is None or token_id == tokenizer.unk_token_id or tokenizer.decode([token_id]) != tag:
            raise ValueError(
                f"reasoning parser {name!r} needs {tag!r} to be one token of the model's tokenizer; it is not"
            )
        ids.append(token_id)
    if vocab_size is not None and max(ids) >= vocab_size:
        raise ValueError(
            f"reasoning parser {name!r}: its tags' ids {tuple(ids)} must be below the model's vocab_size "
            f"{vocab_size} (the logits' width)"
        )
    return ids[0], ids[1]


def prompt_ends_thinking(prompt_token_ids: Sequence[int], start_id: int, end_id: int) -> bool:
    """Whether the output starts after the thinking: the prompt's last think tag is an end tag (Qwen3's
    `enable_thinking: false`). With no tag at all, the model opens its thinking itself (Qwen3's default): the
    output starts inside it. (Earlier turns' thoughts are dropped by the templates, so the last tag is the
    current turn's.)"""
    for token in reversed(prompt_token_ids):
        if token == end_id:
            return True
        if token == start_id:
            return False
    return False
