"""vLLM's bad_words / bad_words_token_ids: a word's last token is banned once the output ends with the
rest of it (a one-token word always). Oracle: transformers' NoBadWordsLogitsProcessor over the same
model's logits, fed the generated tokens (vLLM, and so nanovllm, match words within the output only)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.generation.logits_process import NoBadWordsLogitsProcessor

from nanovllm import LLM, SamplingParams
from tests.checkpoints import build_checkpoint, load_hf_model

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(str(ckpt), max_model_len=128)


@pytest.fixture(scope="module")
def free_run(llm) -> list[int]:
    (out,) = llm.generate([PROMPT], GREEDY, use_tqdm=False)
    return out.outputs[0].token_ids


@torch.no_grad()
def _hf_greedy_without(model, prompt: list[int], bad: list[list[int]], max_tokens: int) -> list[int]:
    ban = NoBadWordsLogitsProcessor(bad, eos_token_id=None)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = model(torch.tensor([prompt + out])).logits[:, -1]
        logits = ban(torch.tensor([out], dtype=torch.long), logits)
        out.append(int(logits[0].argmax()))
    return out


def test_bans_equal_transformers_no_bad_words(llm, ckpt, free_run):
    o = free_run
    # a one-token word from the free run, and a two-token word whose second token the free run
    # produced right after its first
    bad = [[o[2]], [o[5], o[6]]]
    (out,) = llm.generate([PROMPT], dataclasses.replace(GREEDY, bad_words_token_ids=bad), use_tqdm=False)
    tokens = out.outputs[0].token_ids
    assert tokens == _hf_greedy_without(load_hf_model(ckpt), PROMPT, bad, MAX_TOKENS)
    assert tokens != o and o[2] not in tokens
    assert all(tokens[i : i + 2] != [o[5], o[6]] for i in range(len(tokens) - 1))


def test_a_word_is_banned_as_is_and_mid_sentence(llm, free_run):
    """bad_words strings are encoded as vLLM does: the word, and " word" when that is another token
    sequence of the same length."""
    tok = llm.tokenizer
    params = SamplingParams(bad_words=["  return", "value"]).with_bad_words_encoded(tok, 2048)
    expected = []
    for word in ("return", "value"):
        plain = tok.encode(word, add_special_tokens=False)
        spaced = tok.encode(" " + word, add_special_tokens=False)
        expected += [plain] + ([spaced] if len(spaced) == len(plain) and spaced[0] != plain[0] else [])
    assert params.bad_words_token_ids == expected
    assert params.with_bad_words_encoded(tok, 1).bad_words_token_ids is None  # ids the model cannot produce
    # a token of the free run whose text is a word: banning the word bans the token
    for token in free_run:
        word = tok.decode([token]).strip()
        encoded = SamplingParams(bad_words=[word]).with_bad_words_encoded(tok, 2048).bad_words_token_ids
        if word.isalpha() and [token] in encoded:
            break
    else:
        pytest.fail("no whole-word token in the free run")
    (out,) = llm.generate([PROMPT], dataclasses.replace(GREEDY, bad_words=[word]), use_tqdm=False)
    assert token not in out.outputs[0].token_ids


def test_every_sample_keeps_the_ban(llm, free_run):
    banned = free_run[0]
    params = SamplingParams(
        temperature=1.0, seed=1, n=4, max_tokens=MAX_TOKENS, ignore_eos=True, bad_words_token_ids=[[banned]]
    )
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert all(banned not in c.token_ids for c in out.outputs)


def test_a_request_without_bad_words_is_untouched_by_its_neighbours(llm, free_run):
    banned = dataclasses.replace(GREEDY, bad_words_token_ids=[[free_run[1]], free_run[4:6]])
    (alone,) = llm.generate([PROMPT], banned, use_tqdm=False)
    outs = llm.generate([PROMPT, PROMPT, PROMPT], [banned, GREEDY, banned], use_tqdm=False)
    cut = alone.outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in outs] == [cut, free_run, cut] and cut != free_run


def test_overlapped_and_plain_scheduling_agree(ckpt, llm, free_run):
    """A multi-token word reads the previous token on the host: the overlapped engine (the default) gives
    the tokens of one that never overlaps."""
    assert llm.engine.overlap
    params = dataclasses.replace(GREEDY, bad_words_token_ids=[free_run[2:4], free_run[7:9]])
    prompts = [PROMPT, PROMPT[3:], PROMPT[:-2]]
    overlapped = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with LLM(str(ckpt), max_model_len=128, async_scheduling=False) as plain:
        assert [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)] == overlapped


def test_multi_token_words_turn_overlap_off(llm, free_run):
    engine = llm.engine
    engine.add_request(PROMPT, dataclasses.replace(GREEDY, bad_words_token_ids=[free_run[:2]]))
    engine.step()
    assert not engine._can_overlap()  # the ban reads the last token, which must be on the host
    while engine.has_unfinished():
        engine.step()
    engine.add_request(PROMPT, dataclasses.replace(GREEDY, bad_words_token_ids=[[free_run[0]]]))
    engine.step()
    assert engine._can_overlap() == engine.overlap  # one-token words need no history
    while engine.has_unfinished():
        engine.step()


def test_validation_and_a_model_without_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="bad_words must be a list of non-blank strings"):
        SamplingParams(bad_words=[" "])
    with pytest.raises(ValueError, match="bad_words_token_ids must be a list of non-empty token id lists"):
        SamplingParams(bad_words_token_ids=[[]])
    assert SamplingParams(bad_words_token_ids=[[3000]]).vocab_error(2048).param == "bad_words_token_ids"
    path = build_checkpoint(tmp_path / "no-tok", "qwen3", max_position_embeddings=256, tokenizer=False)
    bare = LLM(str(path), max_model_len=64)
    with pytest.raises(ValueError, match="bad_words needs the model's tokenizer"):
        bare.generate([PROMPT], dataclasses.replace(GREEDY, bad_words=["x"]), use_tqdm=False)
    (out,) = bare.generate([PROMPT], dataclasses.replace(GREEDY, bad_words_token_ids=[[7]]), use_tqdm=False)
    assert 7 not in out.outputs[0].token_ids and not bare.engine.has_unfinished()
    bare.shutdown()


def test_a_multi_token_word_joining_overlapped_requests(llm, free_run):
    """Added while other requests run overlapped: its steps wait for their tokens, and its own tokens equal
    the request's alone."""
    params = dataclasses.replace(GREEDY, bad_words_token_ids=[free_run[2:4]])
    (alone,) = llm.generate([PROMPT], params, use_tqdm=False)
    engine = llm.engine
    others = [engine.add_request(PROMPT[i:], dataclasses.replace(GREEDY, max_tokens=40)) for i in range(3)]
    for _ in range(3):
        engine.step()
    rid = engine.add_request(PROMPT, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] = out
    assert done[rid].outputs[0].token_ids == alone.outputs[0].token_ids != free_run
    assert all(len(done[o].outputs[0].token_ids) == 40 for o in others)
