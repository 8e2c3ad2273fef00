"""IncrementalDetokenizer: streamed text equals a one-shot decode; stop strings across tokens."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from nanovllm import LLM, SamplingParams
from nanovllm.config import PRESET_DIR
from nanovllm.engine.detokenizer import IncrementalDetokenizer, decode_after_prompt
from nanovllm.utils.tokenizer import TokenDecoder
from tests.checkpoints import build_checkpoint

MULTIBYTE = "héllo wörld 你好 🎉"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(PRESET_DIR / "tokenizer"))


def feed(detok: IncrementalDetokenizer, token_ids: list[int]) -> tuple[list[str], str | None]:
    """Add tokens one by one until a stop string; returns the text after each token and the stop."""
    texts = []
    for t in token_ids:
        stop = detok.add(t)
        texts.append(detok.text)
        if stop is not None:
            return texts, stop
    return texts, None


def streamed_text(
    tok, prompt: list[int], out: list[int], stop: list[str] | None = None, skip_special_tokens: bool = True
) -> str:
    """The final text of `out` fed token by token after `prompt`, then flushed (the request's end)."""
    detok = IncrementalDetokenizer(TokenDecoder(tok, skip_special_tokens), prompt, stop)
    feed(detok, out)
    detok.flush()
    return detok.text


def test_multibyte_characters_split_across_tokens(tok):
    ids = tok.encode(MULTIBYTE)
    # The premise: some characters really are split over several byte-level tokens.
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    detok = IncrementalDetokenizer(TokenDecoder(tok, True), tok.encode("Say:"), None)
    texts, stop = feed(detok, ids)
    assert stop is None
    for text in texts:  # never a half character, only ever growing
        assert "\ufffd" not in text and MULTIBYTE.startswith(text)
    assert detok.text == MULTIBYTE
    detok.flush()
    assert detok.text == MULTIBYTE


@pytest.mark.parametrize("stop", [None, ["never met"]])
def test_a_character_the_prompt_splits_is_in_the_output(tok, stop):
    # A prompt of token ids may end inside a character ("ab" + the first bytes of 你); the output's first
    # tokens complete it. vLLM's detokenizer emits the whole character with the output: it primes its
    # decoder after the prompt's last whole character. The window started after the prompt's bytes, whose
    # "\ufffd" is as long as the character, so the streamed text lost it ("好x"), and the text decoded at
    # the end had two "\ufffd" for it: the two paths disagreed.
    ids = tok.encode("ab你好x")
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    prompt, out = ids[:cut], ids[cut:]
    detok = IncrementalDetokenizer(TokenDecoder(tok, True), prompt, stop)
    texts, _ = feed(detok, out)
    detok.flush()
    assert detok.text == decode_after_prompt(TokenDecoder(tok, True), prompt, out) == "你好x"
    assert all("\ufffd" not in text for text in texts)


@pytest.fixture(scope="module")
def byte_fallback_tok():
    """A SentencePiece-style tokenizer with byte fallback (Llama 2, Mistral): a character without a piece
    of its own is spelt <0xE4><0xBD><0xA0>; the decoder turns a run of byte pieces that is not valid UTF-8
    into one "\ufffd" per byte."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("\u2581", "\u2581x", "\u2581say", "\u2581hi"):
        vocab[piece] = len(vocab)
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    sp.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    sp.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("name", ["tok", "byte_fallback_tok"])
def test_an_unfinished_character_at_the_end_is_left_out(request, name):
    # A request can end inside a character (max_tokens). vLLM's detokenizer only ever emits text that does
    # not end in "\ufffd", so its text leaves the unfinished character's bytes out: " x 你好", both when
    # streamed and not. The end of a request flushed them ("\ufffd" at the end); the text decoded at the
    # end had them too and, with a byte-fallback decoder, its whole byte run turned to "\ufffd" (" x 你��").
    tok = request.getfixturevalue(name)
    prompt = tok.encode("say", add_special_tokens=False)
    ids = tok.encode(" x 你好🎉" if name == "tok" else "x 你好🎉", add_special_tokens=False)
    if name == "byte_fallback_tok":
        assert tok.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"]  # the premise
    for num_bytes in (1, 2, 3):
        out = ids[: -4 + num_bytes]
        once = decode_after_prompt(TokenDecoder(tok, True), prompt, out)
        assert streamed_text(tok, prompt, out) == once == " x 你好"


def test_a_byte_piece_that_spoils_the_run_before_it_is_waited_for(byte_fallback_tok):
    # A byte-fallback decoder reads a run of byte pieces as one: "<0xC3><0x9F>" is "ß", but with one more
    # "<0xC3>" the run is not UTF-8 and reads as three "\ufffd". Streamed text had emitted "ß" at the
    # second piece and could not take it back, so it differed from the text decoded at the end.
    tok = byte_fallback_tok
    pieces = ["<0xC3>", "<0x9F>", "<0xC3>", "\u2581hi"]
    out = tok.convert_tokens_to_ids(pieces)
    assert tok.decode(out[:2]) == "ß" and tok.decode(out) == "\ufffd\ufffd\ufffd hi"  # the premise
    detok = IncrementalDetokenizer(TokenDecoder(tok, True), [], None)
    texts, _ = feed(detok, out)
    assert texts == ["", "", "", "\ufffd\ufffd\ufffd hi"]
    assert decode_after_prompt(TokenDecoder(tok, True), [], out) == tok.decode(out)


@pytest.mark.parametrize("seed", range(10))
def test_byte_piece_streams_match_the_decode_at_the_end(byte_fallback_tok, seed):
    # Runs of byte pieces, valid or not, in the prompt, the output and across the two: the streamed text
    # only grows, and ends as the text decoded at once; with no prompt, as the tokenizer's decode.
    tok = byte_fallback_tok
    pieces = [
        "<0xE4>",
        "<0xBD>",
        "<0xA0>",
        "<0xC3>",
        "<0xA9>",
        "<0x41>",
        "<0xF0>",
        "<0x9F>",
        "<0x8E>",
        "<0x89>",
    ]
    pieces += ["\u2581", "\u2581x", "\u2581hi", "</s>"]
    ids = tok.convert_tokens_to_ids(pieces)
    decoder, rng = TokenDecoder(tok, True), random.Random(seed)
    for _ in range(200):
        prompt = [rng.choice(ids) for _ in range(rng.randrange(0, 6))]
        out = [rng.choice(ids) for _ in range(rng.randrange(1, 12))]
        detok = IncrementalDetokenizer(decoder, prompt, None)
        texts, _ = feed(detok, out)
        detok.flush()
        assert all(detok.text.startswith(t) for t in texts)
        assert detok.text == decode_after_prompt(decoder, prompt, out)
        if not prompt and not tok.decode(out, skip_special_tokens=True).endswith("\ufffd"):
            assert detok.text == tok.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("seed", range(40))
def test_random_token_streams_match_a_full_decode(tok, seed):
    rng = random.Random(seed)
    prompt = tok.encode(rng.choice(["", "Hello", "你好", " x"]))
    out = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 60))]
    if seed % 2:  # mix in real multi-byte text
        out[rng.randrange(len(out)) :] = tok.encode(MULTIBYTE)
    while tok.decode(out).endswith("\ufffd"):  # (an unfinished last character is left out: tested above)
        out.pop()
    detok = IncrementalDetokenizer(TokenDecoder(tok, True), prompt, None)
    texts, _ = feed(detok, out)
    detok.flush()
    expected = tok.decode(out, skip_special_tokens=True)
    assert detok.text == expected
    assert all(expected.startswith(t) for t in texts)  # emitted text is final: never retracted


@pytest.mark.parametrize("name", ["tok", "byte_fallback_tok", "sp_tok"])
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_token_decoder_gives_the_tokenizers_text_and_knows_its_silent_ids(request, name, skip_special_tokens):
    # TokenDecoder skips transformers' per-id type check for the Rust decode: the text must not change,
    # special tokens, unknown ids and unfinished characters included. Its silent ids are those no text
    # depends on: leaving them out changes no decode.
    tok = request.getfixturevalue(name)
    decoder = TokenDecoder(tok, skip_special_tokens)
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tok) + 50) for _ in range(rng.randrange(0, 40))]
        ids.insert(rng.randrange(len(ids) + 1), tok.eos_token_id)
        text = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert decoder.decode(ids) == text
        assert decoder.decode([t for t in ids if not decoder.is_silent(t)]) == text
    assert decoder.is_silent(len(tok)) and decoder.is_silent(len(tok) + 10**6)
    assert decoder.is_silent(tok.eos_token_id) == skip_special_tokens
    with_text = [t for t in range(len(tok)) if tok.decode([t], skip_special_tokens=True)]
    assert len(with_text) > 10 and not any(decoder.is_silent(t) for t in with_text)


def test_token_decoder_reads_tokens_added_after_it_was_built():
    tok = AutoTokenizer.from_pretrained(str(PRESET_DIR / "tokenizer"))
    decoder = TokenDecoder(tok, True)
    new_id, new_special = len(tok), len(tok) + 1
    assert decoder.is_silent(new_id) and decoder.decode([new_id]) == ""
    tok.add_tokens(["zebra"])
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    assert not decoder.is_silent(new_id) and decoder.decode([new_id]) == "zebra"
    assert decoder.is_silent(new_special) and decoder.decode([new_special]) == ""


def _wordpiece_tok(**kwargs) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "hello": 1, ".": 2, "world": 3}
    wp = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.decoder = decoders.WordPiece(cleanup=False)  # (so that only transformers' clean-up is at work)
    return PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", **kwargs)


class _LoudTokenizer(PreTrainedTokenizerFast):
    def _decode(self, token_ids, **kwargs) -> str:
        return super()._decode(token_ids, **kwargs).upper()


def test_token_decoder_keeps_what_transformers_adds_to_the_decode():
    # A tokenizer that cleans up spaces ("hello ." -> "hello.") or decodes its own way keeps its text, and
    # no id of it is taken for silent (its own decode may give any id a text).
    ids = [1, 2, 3]
    cleaned = _wordpiece_tok(clean_up_tokenization_spaces=True)
    assert cleaned.backend_tokenizer.decode(ids) == "hello . world"  # the premise: transformers cleans up
    assert TokenDecoder(cleaned, True).decode(ids) == cleaned.decode(ids) == "hello. world"
    assert TokenDecoder(_wordpiece_tok(), True).decode(ids) == "hello . world"
    loud = _LoudTokenizer(tokenizer_object=_wordpiece_tok().backend_tokenizer, unk_token="[UNK]")
    assert TokenDecoder(loud, True).decode(ids) == "HELLO . WORLD"
    for tokenizer in (cleaned, loud):
        assert not TokenDecoder(tokenizer, True).is_silent(100)


def test_silent_tokens_after_an_unfinished_character_cost_no_decode_each(tok):
    # A random-weight preset samples ids past its tokenizer's vocabulary, which decode to nothing. The
    # text decoded at a request's end drops an unfinished last character one token at a time; with such
    # ids after it, each step back decoded the whole output again (quadratic: -1.4 points of the
    # throughput benchmark's floor on an H200).
    decoder = TokenDecoder(tok, True)
    calls = []
    counting = TokenDecoder(tok, True)
    counting.decode = lambda ids: calls.append(len(ids)) or decoder.decode(ids)
    partial = tok.encode("你", add_special_tokens=False)[:-1]
    assert tok.decode(partial).endswith("\ufffd")  # the premise
    out = tok.encode(" ok", add_special_tokens=False) + partial + [len(tok) + i for i in range(500)]
    prompt = tok.encode("say", add_special_tokens=False)
    assert decode_after_prompt(counting, prompt, out) == " ok" == streamed_text(tok, prompt, out)
    assert len(calls) <= 6


@pytest.fixture(scope="module")
def sp_tok():
    """A SentencePiece-style tokenizer (Metaspace, as Llama 2 and Mistral), with <s> and </s>."""
    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    sp.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    sp.train_from_iterator(["Once upon a time a quick fox"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_output_reads_on_from_the_prompt_on_both_paths(sp_tok):
    # A SentencePiece decoder (Llama 2, Mistral) drops the space of the first "\u2581word" it decodes. The
    # output is decoded after the prompt's last tokens (as vLLM primes its decoder), so the prompt's text
    # and the output's read as one decode: " quick fox". The engine's path without stop strings or streaming
    # decodes once at the end (decode_after_prompt) and must give the text token-by-token detokenization
    # gives: before session 32 it gave "quick fox", so a stop string, even one never met, changed the text.
    prompt = sp_tok.encode("Once upon a time", add_special_tokens=False)
    out = sp_tok.encode("quick fox", add_special_tokens=False)
    assert sp_tok.convert_ids_to_tokens(out)[0].startswith("\u2581")  # the premise
    assert sp_tok.decode(prompt + out) == "Once upon a time quick fox"
    once = decode_after_prompt(TokenDecoder(sp_tok, True), prompt, out)
    for stop in (None, ["never met"]):
        assert streamed_text(sp_tok, prompt, out, stop) == once == " quick fox"


@pytest.mark.parametrize("seed", range(4))
def test_one_decode_after_the_prompt_equals_the_streamed_text(tok, seed):
    rng = random.Random(seed)
    vocab = [t for t in range(len(tok)) if t not in tok.all_special_ids]
    prompt, out = rng.sample(vocab, 10), rng.sample(vocab, 40)
    assert streamed_text(tok, prompt, out) == decode_after_prompt(TokenDecoder(tok, True), prompt, out)


def test_a_skipped_special_token_keeps_the_next_words_space(sp_tok):
    # "quick </s> fox" with </s> skipped decodes "quick fox". The window must keep "quick" before the silent
    # token: started at </s>, it decoded "fox" as a window's first word and lost its space ("quickfox").
    quick, fox = (sp_tok.encode(w, add_special_tokens=False) for w in ("quick", "fox"))
    prompt = sp_tok.encode("Once upon a time", add_special_tokens=False)
    for silent in ([sp_tok.eos_token_id], [sp_tok.eos_token_id, sp_tok.bos_token_id]):
        out = quick + silent + fox
        once = decode_after_prompt(TokenDecoder(sp_tok, True), prompt, out)
        assert streamed_text(sp_tok, prompt, out) == once == " quick fox"


class _OwnDecodeTokenizer(PreTrainedTokenizerFast):
    def _decode(self, token_ids, **kwargs) -> str:  # (same text; TokenDecoder then knows no silent ids)
        return super()._decode(token_ids, **kwargs)


@pytest.mark.parametrize("cls", [AutoTokenizer, _OwnDecodeTokenizer])
def test_tokens_without_text_do_not_grow_the_decode_window(cls):
    # Special tokens (skipped) and ids past the tokenizer's vocabulary (random-weight presets sample from
    # the model's larger one) decode to nothing. Each step must still decode a window of bounded size:
    # re-decoding every token since the last text made long generations quadratic. TokenDecoder knows a
    # fast tokenizer's silent ids (they never enter the window); for others the window moves past them.
    tok = cls.from_pretrained(str(PRESET_DIR / "tokenizer"))
    silent = [tok.eos_token_id, len(tok) + 5, len(tok) + 100_000]
    assert all(tok.decode([t], skip_special_tokens=True) == "" for t in silent)
    detok = IncrementalDetokenizer(TokenDecoder(tok, True), tok.encode("Hi"), None)
    ids = silent * 300 + tok.encode(" done")
    texts, stop = feed(detok, ids)
    assert stop is None and detok.text == " done" == tok.decode(ids, skip_special_tokens=True)
    assert len(detok.tokens) <= 40


@pytest.mark.parametrize(
    "stop, expected_text",
    [
        ("lo w", "hél"),  # spans the tokens "lo" and " w"
        ("ö", "héllo w"),  # one character made of two byte tokens
        ("你好", "héllo wörld "),
        ("🎉", "héllo wörld 你好 "),
        ("h", ""),  # at the very start
    ],
)
def test_stop_string_across_token_boundaries_is_cut(tok, stop, expected_text):
    ids = tok.encode(MULTIBYTE)
    detok = IncrementalDetokenizer(TokenDecoder(tok, True), tok.encode("Say:"), [stop])
    texts, found = feed(detok, ids)
    assert found == stop
    assert detok.text == expected_text
    assert stop not in detok.text
    # It stopped at the very token that completed the stop string.
    assert stop in tok.decode(ids[: len(texts)]) and stop not in tok.decode(ids[: len(texts) - 1])


@pytest.mark.parametrize("stop, expected_text", [("lo w", "héllo w"), ("ö", "héllo wö"), ("🎉", MULTIBYTE)])
def test_stop_string_kept_when_asked(tok, stop, expected_text):
    detok = IncrementalDetokenizer(TokenDecoder(tok, True), tok.encode("Say:"), [stop], include_stop=True)
    _, found = feed(detok, tok.encode(MULTIBYTE))
    assert found == stop and detok.text == expected_text


def test_special_tokens_text_when_not_skipped(tok):
    ids = [*tok.encode("hi"), tok.eos_token_id, *tok.encode(" there")]
    for skip, expected in ((True, "hi there"), (False, f"hi{tok.eos_token} there")):
        streamed = streamed_text(tok, [], ids, skip_special_tokens=skip)
        assert streamed == expected == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("stop", ["lo w", "ö", "你好", "🎉", "rld 你", "nowhere at all"])
def test_stable_text_only_grows_and_ends_as_the_final_text(tok, stop):
    """What a stream shows while running (stable_text) is never taken back by a later stop string."""
    for include_stop in (False, True):
        detok = IncrementalDetokenizer(TokenDecoder(tok, True), tok.encode("Say:"), [stop], include_stop)
        _check_stable_text(detok, tok)


def _check_stable_text(detok: IncrementalDetokenizer, tok) -> None:
    shown = ""
    for token in tok.encode(MULTIBYTE):
        found = detok.add(token)
        if found is None:
            assert detok.stable_text.startswith(shown)
            shown = detok.stable_text
        else:
            break
    else:
        detok.flush()
    assert detok.text.startswith(shown)


def test_stop_string_in_a_later_token_only(tok):
    ids = tok.encode("one two three four")
    detok = IncrementalDetokenizer(TokenDecoder(tok, True), [], ["three", "nowhere"])
    texts, found = feed(detok, ids)
    assert (found, detok.text) == ("three", "one two ")
    assert len(texts) == len(tok.encode("one two three"))  # " four" never read


def test_no_stop_string_means_the_full_text(tok):
    ids = tok.encode(MULTIBYTE)
    detok = IncrementalDetokenizer(TokenDecoder(tok, True), [], ["xyz"])
    _, found = feed(detok, ids)
    detok.flush()
    assert found is None and detok.text == MULTIBYTE


def test_without_a_tokenizer_nothing_is_decoded():
    detok = IncrementalDetokenizer(None, [1, 2], ["x"])
    assert detok.add(5) is None
    detok.flush()
    assert detok.text == ""


# ---- through the engine -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    ckpt = build_checkpoint(tmp_path_factory.mktemp("qwen3-detok"), "qwen3", max_position_embeddings=128)
    return LLM(str(ckpt), max_model_len=128)


PROMPT = "Once upon a time"


def _first_occurrence_substring(text: str, length: int = 3) -> tuple[str, int]:
    """A substring of text (not at its start) whose first occurrence is where it was taken from."""
    for start in range(1, len(text) - length):
        s = text[start : start + length]
        if s.strip() and "\ufffd" not in s and text.find(s) == start:
            return s, start
    raise AssertionError(f"no usable stop string in {text!r}")


def test_generate_stops_at_a_stop_string(llm):
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    full = free[0].outputs[0]
    assert full.finish_reason == "length" and len(full.text) > 8
    stop, start = _first_occurrence_substring(full.text)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason == stop
    assert out.text == full.text[:start]
    assert stop not in out.text
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(full.token_ids)


def test_streamed_text_grows_to_the_final_text(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    rid = engine.add_request(PROMPT, params, incremental=True)
    texts = []
    while engine.has_unfinished():
        texts += [o.outputs[0].text for o in engine.step() if o.request_id == rid]
    final = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].text
    assert texts[-1] == final
    assert all(final.startswith(t) for t in texts)


def test_stop_string_before_min_tokens_is_ignored_not_cut(llm):
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    full = free[0].outputs[0]
    stop, start = _first_occurrence_substring(full.text)
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, ignore_eos=True, stop=[stop])
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full.token_ids  # min_tokens: the stop string could not end it early
    assert full.text.startswith(out.text) and len(out.text) > start + len(stop)


def test_stop_string_completed_by_the_min_tokens_th_token_does_not_stop(llm):
    """As in vLLM, stop strings are searched once the output has more than min_tokens tokens: like a stop
    token, one can end the request at token min_tokens + 1 at the earliest."""
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    stop, _ = _first_occurrence_substring(free[0].outputs[0].text)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    num_tokens = len(llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids)  # the last ends it
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=num_tokens, ignore_eos=True, stop=[stop])
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) > num_tokens


def test_stop_string_kept_in_the_output_when_asked(llm):
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    full = free[0].outputs[0]
    stop, start = _first_occurrence_substring(full.text)
    params = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
    )
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text == full.text[: start + len(stop)]


@pytest.mark.parametrize("path", ["one decode at the end", "incremental"])
def test_stop_token_text_is_left_out_unless_asked(llm, path):
    """Like EOS, a token of stop_token_ids ends the request and stays in its token ids, but its text is not
    part of the output text unless include_stop_str_in_output (vLLM's rule)."""
    tok = llm.tokenizer
    free = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    ids = free[0].outputs[0].token_ids
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i] and tok.decode([ids[i]]).strip())
    texts = []
    for include in (False, True):
        params = SamplingParams(
            temperature=0,
            max_tokens=24,
            ignore_eos=True,
            stop_token_ids=[ids[k]],
            include_stop_str_in_output=include,
        )
        if path == "incremental":
            rid = llm.engine.add_request(PROMPT, params, incremental=True)
            while llm.engine.has_unfinished():
                for o in llm.engine.step():
                    if o.request_id == rid:
                        out = o.outputs[0]
        else:
            out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ids[: k + 1] and out.stop_reason == ids[k]
        texts.append(out.text)
    assert texts == [tok.decode(ids[:k]), tok.decode(ids[: k + 1])]
