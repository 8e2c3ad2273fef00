"""Incremental detokenization and stop strings.

Decoding one token at a time can split a multi-byte character or a word piece, so each step decodes
a small window of trailing tokens and emits only the text that became final. Stop strings are
searched in the new text (plus enough of the old to catch a stop string that straddles steps); the
text is cut before the stop string (after it, with include_stop), and nothing later is read.

The output is decoded after the prompt's last tokens, as vLLM primes its decoder with them, so that the
prompt's text followed by the output's reads as one decode of both: with a SentencePiece decoder (Llama 2,
Mistral), which drops the space of the first "▁word" it decodes, the output starts " word", not "word".
A request that streams nothing and has no stop string is decoded once at the end by `decode_after_prompt`,
which gives the same text.
"""

from __future__ import annotations

from nanovllm.utils.tokenizer import TokenDecoder

# Tokens before the first new one that are re-decoded to get spacing and merges right.
_CONTEXT_TOKENS = 6
# Tokens without text (special, unknown ids) a decode window may hold in a row before it moves past them.
_SILENT_TOKENS = 8


def decode_after_prompt(
    decoder: TokenDecoder, prompt_token_ids: list[int], output_token_ids: list[int]
) -> str:
    """The output's text in one decode, as IncrementalDetokenizer would give it token by token: decoded
    after the prompt's last _CONTEXT_TOKENS tokens, less the text of those up to their last whole
    character (the output alone if the output changes that text)."""
    context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
    num_read, head = _whole_prefix(decoder, context)
    first = next((t for t in output_token_ids if not decoder.is_silent(t)), None)
    read = _context_read(decoder, context, num_read, first) if first is not None else num_read
    if read != num_read:
        num_read, head = read, decoder.decode(context[:read])
    # (an output that ends inside a character, cut by max_tokens, leaves those bytes out, as vLLM does)
    _, full = _whole_prefix(decoder, context + list(output_token_ids), num_read)
    if full.startswith(head):
        return full[len(head) :]
    return decoder.decode(output_token_ids)


def _whole_prefix(decoder: TokenDecoder, token_ids: list[int], least: int = 0) -> tuple[int, str]:
    """(n, the text of token_ids[:n]): n the most tokens, down to `least`, whose text does not end in
    "\ufffd", i.e. in the first bytes of an unfinished character or stray ones. A prompt may end inside a
    character that the output completes: the output's text has that character, as vLLM's (its decoder is
    primed up to the prompt's last whole character). Silent tokens are stepped over without a decode (the
    text is the same without them): after an unfinished character, a run of them would otherwise cost a
    decode of the whole output each."""
    n = len(token_ids)
    text = decoder.decode(token_ids)
    while n > least and text.endswith("\ufffd"):
        n -= 1
        while n > least and decoder.is_silent(token_ids[n - 1]):
            n -= 1
        text = decoder.decode(token_ids[:n])
    return n, text


def _context_read(decoder: TokenDecoder, context: list[int], num_read: int, first_token: int) -> int:
    """How much of the context is the prompt's text, once the output's first token (not silent) is known.
    A run of byte pieces decodes as one (TokenDecoder.byte_ids), so the prompt's text cannot end inside
    one: if the token after the cut is a byte piece (the output's first token, or the first token of an
    unfinished character the prompt ends with), the run before the cut goes with the output too, as a
    character that the prompt split does."""
    after = (t for t in [*context[num_read:], first_token] if not decoder.is_silent(t))
    if next(after) in decoder.byte_ids:
        in_run = lambda t: t in decoder.byte_ids or decoder.is_silent(t)  # noqa: E731
        while num_read and in_run(context[num_read - 1]):
            num_read -= 1
    return num_read


class IncrementalDetokenizer:
    def __init__(
        self,
        decoder: TokenDecoder | None,  # None: no tokenizer, no text
        prompt_token_ids: list[int],
        stop: list[str] | None,
        include_stop: bool = False,
    ):
        self.decoder = decoder
        self.include_stop = include_stop
        self.stop = stop or []
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.tokens: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # tokens[prefix_offset:read_offset] is context already emitted
        self.read_offset = len(self.tokens)
        if decoder is not None:  # (the prompt's unfinished last character is read with the output)
            self.read_offset, _ = _whole_prefix(decoder, self.tokens)
        self.text = ""  # final output text so far
        self._started = False  # whether a token (not silent) was added

    def add(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token; returns the stop string if the text now contains one. With
        check_stop False (min_tokens not reached yet) stop strings are neither searched nor cut."""
        if self.decoder is None or self.decoder.is_silent(token_id):
            return None  # (it adds no text wherever it is: no decode, and the window does not grow)
        if not self._started:  # the output's first token: the context may give way to it
            self._started = True
            self.read_offset = _context_read(self.decoder, self.tokens, self.read_offset, token_id)
        self.tokens.append(token_id)
        if token_id in self.decoder.byte_ids:
            return None  # a run of byte pieces decodes as one (TokenDecoder.byte_ids): wait for its end
        prefix = self.decoder.decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self.decoder.decode(self.tokens[self.prefix_offset :])
        if full.endswith("\ufffd"):
            return None  # an incomplete UTF-8 sequence: wait for more tokens
        if full == prefix:
            # Tokens that decode to nothing here (special tokens, ids the tokenizer does not know, where the
            # decoder is not known to drop them): nothing to emit. The window keeps the text before them,
            # whose spacing the next word depends on (a SentencePiece decoder drops the space of a window's
            # first word), until _SILENT_TOKENS of them come in a row: then it moves on, or every later step
            # would re-decode a growing window.
            if len(self.tokens) - self.read_offset > _SILENT_TOKENS:
                self._advance()
            return None
        if len(full) <= len(prefix):
            return None  # the new token changed the text before it (clean-up of spaces): wait
        old_len = len(self.text)
        self.text += full[len(prefix) :]
        self._advance()
        if not check_stop:
            return None
        for stop in self.stop:
            idx = self.text.find(stop, max(0, old_len - len(stop) + 1))
            if idx != -1:
                self.text = self.text[: idx + len(stop) if self.include_stop else idx]
                return stop
        return None

    def _advance(self) -> None:
        """The tokens read so far are final: the next decode window starts at the last read ones."""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        if self.prefix_offset > 4 * _CONTEXT_TOKENS:  # drop tokens no window will read again
            del self.tokens[: self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0

    @property
    def stable_text(self) -> str:
        """The text no later token can change. A stop string completed by a later token cuts the text
        where it starts, up to max_stop_len - 1 characters back, so a running request's streamed text
        holds those back (then streamed text only ever grows, and ends equal to the final text)."""
        if not self.stop or self.include_stop:  # (kept stop strings never cut text already shown)
            return self.text
        return self.text[: max(0, len(self.text) - (self.max_stop_len - 1))]

    def flush(self) -> None:
        """At the end of a request, emit whatever is still held back, but for the bytes of an unfinished
        last character (the request ended inside it): like vLLM, the text leaves them out, rather than
        end in "\ufffd" (with a byte-fallback decoder, as Llama 2's, one per byte of the run they end)."""
        if self.decoder is None or self.read_offset == len(self.tokens):
            return
        prefix = self.decoder.decode(self.tokens[self.prefix_offset : self.read_offset])
        window = self.tokens[self.prefix_offset :]
        _, full = _whole_prefix(self.decoder, window, self.read_offset - self.prefix_offset)
        self.text += full[len(prefix) :]
        self.read_offset = len(self.tokens)
