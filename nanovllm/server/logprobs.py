"""Logprobs in the server's three response shapes: OpenAI completions' (tokens / token_logprobs /
top_logprobs / text_offset, with `echo` the prompt's tokens first), OpenAI chat's (content: [{token,
logprob, bytes, top_logprobs}]) and vLLM's `prompt_logprobs` ([None, {token id: {logprob, rank,
decoded_token}}, ...]).

With vLLM's `return_tokens_as_token_ids` (`LogprobFormatter.shown_as`) each token of the first two is shown
as "token_id:{id}", so that a token whose bytes are not valid UTF-8 on their own (part of a character)
can still be told apart; text_offset still counts the text's characters, and prompt_logprobs (keyed by
the id already) keeps its decoded_token text, as vLLM's."""

from __future__ import annotations

from nanovllm.outputs import Logprob

MIN_LOGPROB = -9999.0  # -inf is not valid JSON


def token_id_str(token_id: int) -> str:
    """A token as return_tokens_as_token_ids (or a server without a tokenizer) shows it."""
    return f"token_id:{token_id}"


class LogprobFormatter:
    """Turns engine Logprob records into JSON, with the tokenizer's strings and bytes (cached)."""

    def __init__(self, tokenizer, show_token_ids: bool = False):
        self.tokenizer = tokenizer
        self.show_token_ids = show_token_ids  # tokens shown as "token_id:{id}" (return_tokens_as_token_ids)
        self._token_strs: dict[int, str] = {}
        self._byte_level = tokenizer is not None and _is_byte_level(tokenizer)
        self._twin: LogprobFormatter | None = None

    def shown_as(self, token_ids: bool) -> LogprobFormatter:
        """This formatter, or (token_ids: a request's return_tokens_as_token_ids) its twin that shows tokens
        as their ids; the two share the decoded strings."""
        if token_ids == self.show_token_ids:
            return self
        if self._twin is None:
            self._twin = LogprobFormatter(self.tokenizer, token_ids)
            self._twin._token_strs, self._twin._twin = self._token_strs, self
        return self._twin

    def completion(
        self, entries: list[Logprob], num_top: int, text_offset: int = 0, first_token: int | None = None
    ) -> tuple[dict, int]:
        """-> (a choice's `logprobs`, the text offset after it). first_token (echo: the prompt's first
        token, which has no logprob) comes first, with null logprobs as in OpenAI's and vLLM's echo."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        token_ids = [lp.token_id for lp in entries]
        if first_token is not None:
            token_ids.insert(0, first_token)
            tokens.append(self.token_str(first_token))
            token_logprobs.append(None)
            top_logprobs.append(None)
        for lp in entries:
            token = self.token_str(lp.token_id)
            tokens.append(token)
            token_logprobs.append(max(lp.logprob, MIN_LOGPROB))
            top = {self.token_str(t): max(v, MIN_LOGPROB) for t, v in list(lp.top_logprobs.items())[:num_top]}
            top.setdefault(token, token_logprobs[-1])  # the token itself is always listed, as in vLLM
            top_logprobs.append(top)
        for token_id in token_ids:  # (the text's characters, whichever way the tokens are shown)
            offsets.append(text_offset)
            text_offset += len(self.token_text(token_id))
        body = {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
        return body, text_offset

    def chat(self, entries: list[Logprob], num_top: int) -> dict:
        content = []
        for lp in entries:
            top = [self._chat_entry(t, v) for t, v in list(lp.top_logprobs.items())[:num_top]]
            content.append({**self._chat_entry(lp.token_id, lp.logprob), "top_logprobs": top})
        return {"content": content}

    def prompt(self, entries: list[Logprob | None], num_top: int) -> list[dict | None]:
        """vLLM's prompt_logprobs: per prompt token, None for the first, else the token and its top
        alternatives, keyed by token id (a string in JSON), each with its rank (1: the most likely)."""
        out: list[dict | None] = []
        for lp in entries:
            if lp is None:
                out.append(None)
                continue
            position = {
                str(t): self._prompt_entry(t, v, rank)
                for rank, (t, v) in enumerate(list(lp.top_logprobs.items())[:num_top], start=1)
            }
            position.setdefault(str(lp.token_id), self._prompt_entry(lp.token_id, lp.logprob, lp.rank))
            out.append(position)
        return out

    def _chat_entry(self, token_id: int, logprob: float) -> dict:
        return {
            "token": self.token_str(token_id),
            "logprob": max(logprob, MIN_LOGPROB),
            "bytes": self.token_bytes(token_id),
        }

    def _prompt_entry(self, token_id: int, logprob: float, rank: int | None) -> dict:
        text = self.token_text(token_id)  # (the id is its key already)
        return {"logprob": max(logprob, MIN_LOGPROB), "rank": rank, "decoded_token": text}

    def token_str(self, token_id: int) -> str:
        """The token as the logprobs show it."""
        return token_id_str(token_id) if self.show_token_ids else self.token_text(token_id)

    def token_text(self, token_id: int) -> str:
        """The token decoded alone ("token_id:{id}" without a tokenizer)."""
        s = self._token_strs.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id]) if self.tokenizer is not None else token_id_str(token_id)
            self._token_strs[token_id] = s
        return s

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's exact bytes (a byte-level BPE token can hold part of a UTF-8 character); shown as its
        id, the bytes of "token_id:{id}" (the `bytes` of what `token` shows, as OpenAI defines them)."""
        if self._byte_level and not self.show_token_ids:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if piece is not None and all(ch in _BYTE_DECODER for ch in piece):
                return [_BYTE_DECODER[ch] for ch in piece]
        return list(self.token_str(token_id).encode("utf-8"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {ch: b for b, ch in _bytes_to_unicode().items()}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"
