"""A reasoning model's reply split into its thinking and its answer, whole and streamed (vLLM's
`--reasoning-parser`; the tags: nanovllm/reasoning.py).

The chat endpoint returns the thinking as `message.reasoning` (and, for clients written against vLLM before
0.11, DeepSeek's API or SGLang, as `reasoning_content` too) and the answer as `content`; tool calls are read
from the answer alone. The rule, the same whole and streamed:
  - an output that starts inside the thinking (`thinking`: the prompt did not close it, see
    `prompt_ends_thinking`), or that opens with the start tag (Qwen3 writes its own `<think>`, also after a
    prompt whose earlier turn closed one), is thinking up to the first end tag and answer after it; the
    opening start tag is dropped; without an end tag (cut by max_tokens) it is all thinking;
  - any other output (Qwen3's `enable_thinking: false`) is all answer.
As vLLM, nothing is trimmed: Qwen3's answer starts with the "\\n\\n" it writes after `</think>`, and an empty
thinking closed by the end tag is "".
"""

from __future__ import annotations

from nanovllm.reasoning import ThinkTags


class ReasoningSplitter:
    """One choice's output -> (reasoning, content). One instance per choice: it holds the stream's state."""

    def __init__(self, tags: ThinkTags, thinking: bool):
        self.tags = tags
        self._at_start = True  # the output may yet open with the start tag
        self._thinking = thinking
        self._held = ""  # streamed text not yet sent: a possible start of a tag

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """A finished output -> (reasoning, content); content None when empty, reasoning None when there is
        no thinking (and "" for an empty one that the end tag closed)."""
        opened = text.startswith(self.tags.start)
        if not (self._thinking or opened):
            return None, text or None
        text = text.removeprefix(self.tags.start)
        reasoning, found, content = text.partition(self.tags.end)
        return (reasoning, content or None) if found else (text or None, None)

    def feed(self, delta: str) -> tuple[str, str]:
        """Streaming: the next piece of the output -> (reasoning, content) to send now."""
        text, self._held = self._held + delta, ""
        if self._at_start:  # hold back what may still become the start tag
            if self.tags.start.startswith(text) and text != self.tags.start:
                self._held = text
                return "", ""
            self._at_start = False
            if text.startswith(self.tags.start):  # (the model opens its thinking itself)
                self._thinking, text = True, text.removeprefix(self.tags.start)
        if not self._thinking:
            return "", text
        reasoning, found, content = text.partition(self.tags.end)
        if found:
            self._thinking = False
            return reasoning, content
        keep = _tag_prefix_at_end(text, self.tags.end)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], ""

    def flush(self) -> tuple[str, str]:
        """The stream ended: what was held back (never a whole tag, so it is thinking)."""
        held, self._held = self._held, ""
        return (held, "") if self._thinking else ("", held)


def _tag_prefix_at_end(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper prefix of `tag` (0 if none)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
