"""The vocabulary as bytes (`token_bytes`, exact for both tokenizer families) and the token masks a byte
DFA gives from a state (`TokenIndex`, against a token-by-token walk). DFAs are built here by hand as
numpy tables: state 0 is dead, and every transition that cannot reach acceptance goes to it."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AddedToken, PreTrainedTokenizerFast

from nanovllm.structured.vocab import TokenIndex, token_bytes

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Un café crème, s'il vous plaît; à bientôt!",
    "Größe, Übermut, señor, naïve façade. 你好，世界。我们在写代码。 Emoji: 😀 🎉 👍🏽",
    'def f(x):\n    return {"a": [1, 2, 3], "b": null}\n\t# tabs and  double  spaces',
] * 20
CHARS = (
    list("abcdefxyz ABCZ0123456789 .,;:!?\"'{}[]()\n\t-_")
    + list("éèöüßçñå")
    + list("你好世界中文")
    + [
        "😀",
        "🎉",
        "👍🏽",
    ]
)


def random_text(rng: random.Random, extra: list[str] = ()) -> str:
    words = [rng.choice(CHARS) for _ in range(rng.randrange(1, 40))] + list(extra)
    rng.shuffle(words)
    return "x" + "".join(words)  # starts with a letter: a SentencePiece space is prepended before it


def joined(tokens: list[bytes | None], ids: list[int]) -> bytes:
    assert all(tokens[i] is not None for i in ids), [i for i in ids if tokens[i] is None]
    return b"".join(tokens[i] for i in ids)


# --- token_bytes: byte-level BPE (GPT-2, Qwen, Llama 3) ---


@pytest.fixture(scope="module")
def byte_level_tok():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    hf.add_tokens([AddedToken("<think>", special=False)])
    hf.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    return hf


def test_byte_level_bytes_rebuild_any_text(byte_level_tok):
    tokens = token_bytes(byte_level_tok)
    assert len(tokens) == len(byte_level_tok)
    rng = random.Random(0)
    for _ in range(200):
        text = random_text(rng, extra=["<think>"] * rng.randrange(2))
        ids = byte_level_tok.encode(text, add_special_tokens=False)
        assert joined(tokens, ids) == text.encode()


def test_byte_level_tokens_may_hold_part_of_a_character(byte_level_tok):
    tokens = token_bytes(byte_level_tok)
    ids = byte_level_tok.encode("x😀", add_special_tokens=False)
    assert joined(tokens, ids) == "x😀".encode()
    assert any(tokens[i] == b"\xf0" for i in range(len(tokens)))  # one byte of a 4-byte character
    for token_id, b in enumerate(tokens):  # and each whole-character token decodes as the tokenizer does
        if b is not None and b.isascii():
            assert byte_level_tok.decode([token_id]) == b.decode()


def test_special_tokens_have_no_bytes_and_other_added_tokens_their_content(byte_level_tok):
    tokens = token_bytes(byte_level_tok)
    for name in ("<|endoftext|>", "<|im_end|>"):
        assert tokens[byte_level_tok.convert_tokens_to_ids(name)] is None
    assert tokens[byte_level_tok.convert_tokens_to_ids("<think>")] == b"<think>"


def test_a_byte_level_piece_outside_the_byte_alphabet_has_no_bytes():
    tok = Tokenizer(models.BPE({"a": 0, "\u0120": 1, "\n": 2, "\u0120\u00e9": 3}, []))  # 'Ġ' is a space
    tok.decoder = decoders.ByteLevel()
    tokens = token_bytes(PreTrainedTokenizerFast(tokenizer_object=tok))
    assert tokens == [b"a", b" ", None, b" \xe9"]  # a raw newline is not how byte-level BPE writes byte 10


# --- token_bytes: SentencePiece-style ('▁' for a space, '<0xNN>' byte fallback: Llama 2, Mistral) ---


def sentencepiece_tok(style: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([t.replace("😀", "") for t in CORPUS], trainer)  # 😀 only as bytes
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    if style == "llama2":  # a normalizer writes the spaces; the decoder replaces them back
        spec["pre_tokenizer"] = None
        normalizer = [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        spec["normalizer"] = json.loads(normalizers.Sequence(normalizer).__getstate__())
        decoder = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        decoder.append(decoders.Strip(" ", 1, 0))
    else:  # "metaspace": the pre-tokenizer writes them, its decoder reads them
        decoder = [decoders.Metaspace(replacement="\u2581", prepend_scheme="first"), decoders.ByteFallback()]
    spec["decoder"] = json.loads(decoders.Sequence(decoder).__getstate__())
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("style", ["llama2", "metaspace"])
def test_sentencepiece_bytes_rebuild_any_text_after_its_first_space(style):
    # Mid-text, '▁word' means " word". Encoding a text writes a '▁' before it, which the decoder drops at
    # the start of a text only: the tokens' bytes are the text with that one space before it.
    tok = sentencepiece_tok(style)
    tokens = token_bytes(tok)
    rng = random.Random(1)
    for _ in range(200):
        text = random_text(rng)
        ids = tok.encode(text, add_special_tokens=False)
        assert joined(tokens, ids) == b" " + text.encode()
        assert tok.decode(ids) == text  # (the premise: the decoder drops exactly that space)
    ids = tok.encode("x 😀", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte fallback
    assert [tokens[i] for i in ids[-4:]] == [b"\xf0", b"\x9f", b"\x98", b"\x80"]
    assert all(tokens[tok.convert_tokens_to_ids(name)] is None for name in ("<unk>", "<s>", "</s>"))


def test_a_tokenizer_without_a_known_decoder_is_refused():
    with pytest.raises(ValueError, match="fast tokenizer"):
        token_bytes(SimpleNamespace())  # a slow tokenizer has no backend_tokenizer
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    with pytest.raises(ValueError, match="WordPiece"):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]"))


# --- TokenIndex: masks against a walk of each token's bytes ---


def dead_if_hopeless(transitions: np.ndarray, accepting: np.ndarray) -> SimpleNamespace:
    """Sends every transition into a state that cannot reach acceptance to the dead state 0."""
    transitions, accepting = transitions.copy(), accepting.copy()
    transitions[0], accepting[0] = 0, False
    live = accepting.copy()
    while True:
        grown = live | (live[transitions].any(axis=1) & (np.arange(len(live)) != 0))
        if (grown == live).all():
            break
        live = grown
    transitions = np.where(live[transitions], transitions, 0).astype(np.int32)
    return SimpleNamespace(transitions=transitions, accepting=accepting, start=1)


def dfa_from_table(num_states: int, edges: dict[int, dict[bytes, int]], accepting: list[int]):
    """A DFA from {state: {set of bytes: next state}}; missing transitions go to 0."""
    transitions = np.zeros((num_states, 256), dtype=np.int32)
    for state, moves in edges.items():
        for byte_set, target in moves.items():
            transitions[state, list(byte_set)] = target
    return dead_if_hopeless(transitions, np.isin(np.arange(num_states), accepting))


def literal_dfa(words: list[bytes]) -> SimpleNamespace:
    """A trie over `words`: accepts exactly them."""
    transitions, accepting = [np.zeros(256, np.int32), np.zeros(256, np.int32)], [False, False]
    for word in words:
        state = 1
        for b in word:
            if transitions[state][b] == 0:
                transitions[state][b] = len(transitions)
                transitions.append(np.zeros(256, np.int32))
                accepting.append(False)
            state = transitions[state][b]
        accepting[state] = True
    return dead_if_hopeless(np.stack(transitions), np.array(accepting))


DIGITS = bytes(range(ord("0"), ord("9") + 1))
NOT_QUOTE = bytes(b for b in range(256) if b != ord('"'))
DFAS = {
    "digits": dfa_from_table(3, {1: {DIGITS: 2}, 2: {DIGITS: 2}}, [2]),  # [0-9]+
    "json_string": dfa_from_table(4, {1: {b'"': 2}, 2: {NOT_QUOTE: 2, b'"': 3}}, [3]),  # "[^"]*"
    "literals": literal_dfa([b"true", b"false", b"null", b"nullable", b'"ab"']),
}


def reference_next_states(tokens: list[bytes | None], vocab_size: int, dfa, state: int) -> np.ndarray:
    out = np.zeros(vocab_size, dtype=np.int32)
    for token_id in range(min(len(tokens), vocab_size)):
        if tokens[token_id]:
            s = state
            for b in tokens[token_id]:
                s = int(dfa.transitions[s, b])
            out[token_id] = s
    return out


def random_vocab(rng: random.Random, num_tokens: int, alphabet: bytes) -> list[bytes | None]:
    lengths = [1 + min(int(rng.expovariate(1 / 5)), 30) for _ in range(num_tokens)]
    tokens: list[bytes | None] = [bytes(rng.choices(alphabet, k=n)) for n in lengths]
    for i in rng.sample(range(num_tokens), num_tokens // 20):
        tokens[i] = rng.choice([None, b""])
    tokens[rng.randrange(num_tokens)] = bytes(rng.choices(alphabet, k=150))  # longer than any other
    tokens[rng.randrange(num_tokens)] = b'"' + b"1" * 120  # ... and one that lives long in some DFAs
    return tokens


def check_all_states(index: TokenIndex, tokens, dfa) -> None:
    for state in range(len(dfa.transitions)):
        expected = reference_next_states(tokens, index.vocab_size, dfa, state)
        np.testing.assert_array_equal(index.next_states(dfa, state), expected)
        np.testing.assert_array_equal(index.allowed(dfa, state), expected != 0)


@pytest.mark.parametrize("vocab_size_delta", [0, 37, -50])  # logits wider than the tokenizer, or narrower
@pytest.mark.parametrize("seed", range(3))
def test_masks_match_a_walk_of_each_token(seed, vocab_size_delta):
    rng = random.Random(seed)
    tokens = random_vocab(rng, 2000, b'0123456789"abtrueflsn ')
    index = TokenIndex(tokens, len(tokens) + vocab_size_delta)
    for dfa in DFAS.values():
        check_all_states(index, tokens, dfa)


@pytest.mark.parametrize("seed", range(4))
def test_masks_match_on_random_automata(seed):
    # Random tables over a small alphabet: from some states most tokens die at once (the walk goes on with the
    # live ones alone), from others most live long (the walk goes on over a prefix of all)
    rng = np.random.default_rng(seed)
    num_states = 12
    transitions = rng.integers(1, num_states, size=(num_states, 256), dtype=np.int32)
    transitions[rng.random((num_states, 256)) < rng.random((num_states, 1)) * 0.6] = 0
    dfa = dead_if_hopeless(transitions, rng.random(num_states) < 0.3)
    tokens = random_vocab(random.Random(seed), 3000, b"abcd\x00\xff")
    check_all_states(TokenIndex(tokens, len(tokens) + 5), tokens, dfa)


def test_the_masks_of_a_literal_choice():
    tokens = [b"tr", b"ue", b"true", b"null", b"nul", b"l", b"able", b"n", b"x", None, b"", b"t"]
    index = TokenIndex(tokens, vocab_size=len(tokens) + 3)
    dfa = DFAS["literals"]
    allowed = lambda state: {tokens[i] for i in np.flatnonzero(index.allowed(dfa, state))}
    assert allowed(1) == {b"tr", b"true", b"null", b"nul", b"n", b"t"}
    after_null = int(index.next_states(dfa, 1)[tokens.index(b"null")])
    assert dfa.accepting[after_null] and allowed(after_null) == {b"able"}
    assert not index.allowed(dfa, 0).any()  # the dead state allows nothing
    assert index.allowed(dfa, 1).shape == (len(tokens) + 3,)
    wide = SimpleNamespace(transitions=dfa.transitions.astype(np.int64), accepting=dfa.accepting)
    np.testing.assert_array_equal(index.next_states(wide, 1), index.next_states(dfa, 1))


def test_an_empty_vocabulary_and_bad_arguments():
    dfa = DFAS["digits"]
    assert not TokenIndex([None, b""], vocab_size=4).allowed(dfa, 1).any()
    index = TokenIndex([b"1"], vocab_size=1)
    with pytest.raises(ValueError, match="state must be in"):
        index.allowed(dfa, 3)
    with pytest.raises(ValueError, match="256"):
        index.allowed(SimpleNamespace(transitions=np.zeros((2, 10), np.int32)), 1)
