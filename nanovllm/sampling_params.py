"""Per-request sampling settings, validated once at construction (vLLM's names and meanings)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
from dataclasses import dataclass

# Temperatures below this are greedy (argmax), as in vLLM. Since a positive temperature below MIN_TEMPERATURE
# is raised to it (as vLLM does, with a warning), only 0 is below it once SamplingParams is built.
GREEDY_EPS = 1e-5
MIN_TEMPERATURE = 1e-2
# The most alternatives logprobs / prompt_logprobs may ask for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20

logger = logging.getLogger("nanovllm")


class ParamError(ValueError):
    """A bad SamplingParams value; `param` names the field (the server's 400 names it, as vLLM's does)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param  # (kept by pickling, through __dict__: the server's engine process sends it)


@dataclass(slots=True)
class StructuredOutputsParams:
    """Constrain the output to a language (vLLM's structured outputs): set exactly one of `json` (a JSON
    schema, as a dict or its text), `regex` (the whole output matches it), `choice` (the output is one of
    these strings) or `json_object=True` (any JSON object). The output can then only follow the
    constraint: each step samples among the tokens that keep it matchable (docs/structured_outputs.md)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # vLLM's EBNF / Lark grammars: not supported (an error)
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON with no whitespace between its tokens
    # (always so here: a schema's absent additionalProperties is taken as false)
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None  # a regex for what may stand between JSON tokens
    structural_tag: str | None = None  # not supported (an error)

    def __post_init__(self) -> None:
        field = "structured_outputs"
        for name in ("grammar", "structural_tag"):
            if getattr(self, name) is not None:
                raise ParamError(
                    f"{field}.{name} is not supported: use json, regex, choice or json_object", field
                )
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ParamError(f"{field}.json_object must be a bool, got {self.json_object!r}", field)
        # (json=False, the schema admitting nothing, counts: it fails to compile; json_object=False does not)
        asked = [k for k in ("json", "regex", "choice") if getattr(self, k) is not None]
        asked += ["json_object"] if self.json_object is True else []
        if len(asked) != 1:
            raise ParamError(
                f"{field} must set exactly one of json, regex, choice or json_object, got {asked or 'none'}",
                field,
            )
        if self.json is not None and not isinstance(self.json, str | dict | bool):
            raise ParamError(
                f"{field}.json must be a JSON schema (a dict or its text), got {self.json!r}", field
            )
        if self.regex is not None and not isinstance(self.regex, str):
            raise ParamError(f"{field}.regex must be a string, got {self.regex!r}", field)
        if self.choice is not None:
            if (
                not isinstance(self.choice, list | tuple)
                or not self.choice
                or not all(isinstance(c, str) for c in self.choice)
            ):
                raise ParamError(
                    f"{field}.choice must be a non-empty list of strings, got {self.choice!r}", field
                )
            self.choice = list(self.choice)
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ParamError(
                f"{field}.whitespace_pattern must be a string, got {self.whitespace_pattern!r}", field
            )
        for flag in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, flag), bool):
                raise ParamError(f"{field}.{flag} must be a bool, got {getattr(self, flag)!r}", field)

    @property
    def whitespace(self) -> str | None:
        """The regex for JSON's whitespace (None: the default, structured/json_schema.py's)."""
        return "" if self.disable_any_whitespace else self.whitespace_pattern


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    seed: int | None = None  # -1: None (unseeded), as in vLLM
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # top-N alternatives per generated token (0: only the sampled token)
    # top-N alternatives per prompt token, after the first (0: only the prompt token's own logprob)
    prompt_logprobs: int | None = None
    n: int = 1  # samples per prompt: LLM.generate returns them as one RequestOutput's outputs
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (in [-100, 100])
    allowed_token_ids: list[int] | None = None  # sample only among these tokens
    skip_special_tokens: bool = True  # leave special tokens' text out of the output text
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text at its end
    # keep only the prompt's last k tokens (vLLM's; -1: max_model_len of them; None: all)
    truncate_prompt_tokens: int | None = None
    bad_words: list[str] | None = None  # words never generated (vLLM's); the engine encodes them into:
    # token-id sequences never generated: [t1..tn] bans tn after output t1..tn-1 (one token: always banned)
    bad_words_token_ids: list[list[int]] | None = None
    structured_outputs: StructuredOutputsParams | None = None  # the output follows a regex, schema, choice

    def __post_init__(self) -> None:
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise _bad(self, "temperature", "a finite number >= 0")
        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.warning("temperature %s is raised to %s, as vLLM does", self.temperature, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise _bad(self, "top_p", "in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _bad(self, "top_k", "an int >= -1 (-1 or 0 disables it)")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise _bad(self, "min_p", "in [0, 1]")
        if _is_int(self.seed) and self.seed == -1:
            self.seed = None  # vLLM's spelling of "no seed"
        if self.seed is not None and not _is_int(self.seed):
            raise _bad(self, "seed", "an int or None")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _bad(self, "max_tokens", "an int >= 1")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise _bad(self, "min_tokens", f"an int in [0, max_tokens={self.max_tokens}]")
        if not isinstance(self.ignore_eos, bool):
            raise _bad(self, "ignore_eos", "a bool")
        if not _is_real(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
            raise _bad(self, "presence_penalty", "in [-2, 2]")
        if not _is_real(self.frequency_penalty) or not -2 <= self.frequency_penalty <= 2:
            raise _bad(self, "frequency_penalty", "in [-2, 2]")
        if not _is_finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise _bad(self, "repetition_penalty", "a finite number > 0")
        if self.logprobs is True:  # vLLM reads True (OpenAI's flag) as 1: the sampled token and the best one
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise _bad(self, "logprobs", f"None or an int in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise _bad(self, "prompt_logprobs", f"None or an int in [0, {MAX_LOGPROBS}]")
        if not _is_int(self.n) or self.n < 1:
            raise _bad(self, "n", "an int >= 1")
        if self.truncate_prompt_tokens is not None and (
            not _is_int(self.truncate_prompt_tokens)
            or not (self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1)
        ):
            raise _bad(self, "truncate_prompt_tokens", "None, -1 or an int >= 1")
        for flag in ("skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, flag), bool):
                raise _bad(self, flag, "a bool")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                _is_int(t) and t >= 0 and _is_real(b) and -100 <= b <= 100 for t, b in self.logit_bias.items()
            ):
                valid = "a dict of token id (int >= 0) -> bias in [-100, 100], or None"
                raise _bad(self, "logit_bias", valid)
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()} or None
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, list | tuple) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
                raise _bad(self, "allowed_token_ids", "a non-empty list of token ids (ints >= 0), or None")
            self.allowed_token_ids = list(ids)
        if self.bad_words is not None:
            if not isinstance(self.bad_words, list | tuple) or not all(
                isinstance(w, str) and w.strip() for w in self.bad_words
            ):
                raise _bad(self, "bad_words", "a list of non-blank strings, or None")
            self.bad_words = list(self.bad_words) or None
        if self.bad_words_token_ids is not None:
            seqs = self.bad_words_token_ids
            if not isinstance(seqs, list | tuple) or not all(
                isinstance(w, list | tuple) and w and all(_is_int(t) and t >= 0 for t in w) for w in seqs
            ):
                raise _bad(self, "bad_words_token_ids", "a list of non-empty token id lists, or None")
            self.bad_words_token_ids = [list(w) for w in seqs] or None
        if self.temperature < GREEDY_EPS:  # greedy: the filters mean nothing; vLLM resets them
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
                raise _bad(self, "stop", "a non-empty string, a list of them, or None")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, list | tuple) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids
            ):
                raise _bad(self, "stop_token_ids", "a list of non-negative ints or None")
            self.stop_token_ids = list(self.stop_token_ids)
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise _bad(self, "structured_outputs", "a StructuredOutputsParams or None")

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's): changing its lists or dicts leaves this one alone."""
        return copy.deepcopy(self)

    def choice(self, index: int) -> SamplingParams:
        """The params of sample `index` of an n-sample request, run as a request of its own (n=1). With a
        seed, each sample draws from its own seed, derived from this one (sample 0 keeps it), so that the
        samples differ and each is reproducible. Only sample 0 scores the prompt (prompt_logprobs): the
        samples share one prompt."""
        if index == 0:
            return dataclasses.replace(self, n=1)
        seed = None if self.seed is None else derive_seed(self.seed, index)
        return dataclasses.replace(self, n=1, seed=seed, prompt_logprobs=None)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def vocab_error(self, vocab_size: int) -> ParamError | None:
        """A ParamError naming the field if logit_bias, allowed_token_ids, bad_words_token_ids or
        stop_token_ids (as vLLM checks them) name a token outside [0, vocab_size)."""
        bad_words = [t for w in self.bad_words_token_ids or () for t in w]
        for field, ids in (
            ("logit_bias", self.logit_bias),
            ("allowed_token_ids", self.allowed_token_ids),
            ("bad_words_token_ids", bad_words),
            ("stop_token_ids", self.stop_token_ids),
        ):
            outside = sorted(t for t in ids or () if t >= vocab_size)[:5]
            if outside:
                message = f"{field} names token ids outside the vocabulary [0, {vocab_size}): {outside}"
                return ParamError(message, field)
        return None

    def truncated_prompt(self, token_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt tokens a request runs on: the last truncate_prompt_tokens of them (-1: max_model_len;
        None: all). ValueError if that is more than max_model_len, as in vLLM."""
        return truncate_prompt(token_ids, self.truncate_prompt_tokens, max_model_len)

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def bad_word_context(self) -> int:
        """How many of the latest output tokens the bad words' bans depend on (0: none, or only
        one-token words, which are always banned)."""
        return max(map(len, self.bad_words_token_ids), default=1) - 1 if self.bad_words_token_ids else 0

    @property
    def reads_output(self) -> bool:
        """Building the sampler's batch reads the latest generated tokens on the host (multi-token bad
        words: does the output end with a word's first tokens?), so each step must wait for the previous
        one's token. Penalties and structured outputs read every generated token too, but a pending one is
        read on the device (SamplingBatch.build): they need no wait."""
        return self.bad_word_context > 0

    def with_bad_words_encoded(self, tokenizer, vocab_size: int) -> SamplingParams:
        """bad_words as token-id sequences, added to bad_words_token_ids, as vLLM encodes them: each word
        without special tokens as is (left-stripped) and, when it is a different token sequence of the same
        length, with a leading space (the word mid-sentence). A sequence with an id the model cannot
        produce (>= vocab_size) is dropped."""
        seqs = list(self.bad_words_token_ids or [])
        for word in self.bad_words or ():
            word = word.lstrip()
            plain = tokenizer.encode(word, add_special_tokens=False)
            spaced = tokenizer.encode(" " + word, add_special_tokens=False)
            seqs.append(plain)
            if len(spaced) == len(plain) and spaced[0] != plain[0]:
                seqs.append(spaced)
        unique = [list(w) for w in dict.fromkeys(map(tuple, seqs)) if w and max(w) < vocab_size]
        return dataclasses.replace(self, bad_words_token_ids=unique or None)


@dataclass(slots=True)
class BeamSearchParams:
    """`LLM.beam_search`'s settings: vLLM's fields, defaults and meanings (beam_width and max_tokens have no
    default there either). How the search uses them: docs/sampling.md#beam-search."""

    beam_width: int  # beams kept per prompt, and returned
    max_tokens: int  # generated tokens per beam, at most
    ignore_eos: bool = False  # False: a beam that draws EOS is complete and grows no further
    temperature: float = 0.0  # of each step's drawn token (0: greedy); the candidates are the best anyway
    length_penalty: float = 1.0  # a beam scores cum_logprob / length ** length_penalty
    include_stop_str_in_output: bool = False  # an EOS-ended beam's text shows the EOS token's text

    def __post_init__(self) -> None:
        # (each step asks for 2 * beam_width logprobs per beam, as vLLM does, and at most MAX_LOGPROBS exist)
        if not _is_int(self.beam_width) or not 1 <= self.beam_width <= MAX_LOGPROBS // 2:
            raise _bad(self, "beam_width", f"an int in [1, {MAX_LOGPROBS // 2}]")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _bad(self, "max_tokens", "an int >= 1")
        if not _is_finite(self.temperature) or self.temperature < 0:
            raise _bad(self, "temperature", "a finite number >= 0")
        if not _is_finite(self.length_penalty):
            raise _bad(self, "length_penalty", "a finite number")
        for flag in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, flag), bool):
                raise _bad(self, flag, "a bool")

    def step_params(self) -> SamplingParams:
        """What each search step runs every live beam with: one token, and the 2 * beam_width best
        alternatives to it (vLLM's choice, after transformers': enough that beam_width survive even when
        some of them end in EOS)."""
        return SamplingParams(temperature=self.temperature, max_tokens=1, logprobs=2 * self.beam_width)


def _bad(params: SamplingParams | BeamSearchParams, field: str, valid: str) -> ParamError:
    return ParamError(f"{field} must be {valid}, got {getattr(params, field)!r}", field)


def truncate_prompt(token_ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """The last `keep` prompt tokens (-1: max_model_len of them; None: all); ValueError if `keep` is more than
    max_model_len, as in vLLM."""
    if keep is None:
        return token_ids
    if keep > max_model_len:
        raise ValueError(f"truncate_prompt_tokens={keep} exceeds max_model_len={max_model_len}")
    return token_ids[-(max_model_len if keep == -1 else keep) :]


def derive_seed(seed: int, index: int) -> int:
    """Distinct, deterministic per-sample seeds (sample 0 keeps the request's seed)."""
    return (seed + index * 0x9E3779B97F4A7C15) % (1 << 63)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x  # x == x rejects NaN


def _is_finite(x: object) -> bool:
    """A real number a float holds: not inf, nor an int too large for one (10**400: the sampler's float()
    of it raised OverflowError in the engine step)."""
    return _is_real(x) and abs(x) <= sys.float_info.max
