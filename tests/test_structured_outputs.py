"""Structured outputs through the engine (vLLM's StructuredOutputsParams): the output follows a regex, a
choice, a JSON schema or any JSON object. Oracle: transformers' own model on the same weights, its greedy
choice each step restricted to the tokens a plain walk of every token's bytes through the constraint's DFA
allows (the DFA itself is proven against Python's `re` in tests/structured)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from nanovllm import LLM, SamplingParams, StructuredOutputsParams
from nanovllm.sampling_params import ParamError
from nanovllm.structured.grammar import constraint_regex
from nanovllm.structured.regex_dfa import compile_regex
from nanovllm.structured.vocab import token_bytes
from tests.checkpoints import load_hf_model

PROMPT = "The answer is"
EOS = 2  # the preset tokenizer's <|im_end|>
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age"],
}


def _params(max_tokens: int = 48, **constraint) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(**constraint)
    )


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(str(ckpt), max_model_len=256)


def dfa_allowed(dfa, state: int, vocab: list[bytes | None], size: int, eos: int) -> torch.Tensor:
    """[size] bool: the tokens whose bytes keep the DFA alive from `state` (checked token by token), and EOS
    once the text is a whole match: the oracle's rule for a constrained step."""
    allowed = torch.zeros(size, dtype=torch.bool)
    for t, data in enumerate(vocab):
        if data and dfa.advance(state, data) != 0:
            allowed[t] = True
    allowed[eos] = bool(dfa.accepting[state])
    return allowed


@torch.no_grad()
def _hf_constrained_greedy(model, tokenizer, prompt_ids, params: SamplingParams) -> tuple[list[int], bool]:
    """Greedy decoding of transformers' model, each step among the tokens whose bytes keep the DFA alive
    (checked token by token), EOS allowed once the text is a whole match. -> (tokens, ended)."""
    dfa = compile_regex(constraint_regex(params.structured_outputs))
    vocab = token_bytes(tokenizer)
    state, out = dfa.start, []
    for _ in range(params.max_tokens):
        logits = model(torch.tensor([prompt_ids + out])).logits[0, -1].double()
        allowed = dfa_allowed(dfa, state, vocab, logits.numel(), EOS)
        if not allowed.any():
            return out, True  # complete: nothing may follow
        token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
        if token == EOS:
            return out, True
        out.append(token)
        state = dfa.advance(state, vocab[token])
    return out, False


@pytest.mark.parametrize(
    "constraint",
    [
        dict(regex=DATE),
        dict(regex=r"[a-z]+( [a-z]+)*\."),
        dict(choice=["yes", "no", "maybe not"]),
        dict(json=PERSON),
        dict(json_object=True),
    ],
    ids=["date", "words", "choice", "schema", "json_object"],
)
def test_greedy_equals_transformers_under_the_same_constraint(llm, ckpt, constraint):
    params = _params(**constraint)
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    expected, ended = _hf_constrained_greedy(load_hf_model(ckpt), llm.tokenizer, prompt_ids, params)
    got = out.outputs[0]
    assert got.token_ids[: len(expected)] == expected
    assert got.finish_reason == ("stop" if ended else "length")
    if ended:  # a whole match (the EOS, if it ended on one, is not in the text)
        assert re.fullmatch(constraint_regex(params.structured_outputs), got.text, flags=re.ASCII)


def test_the_outputs_parse(llm):
    """Whatever the (random) model writes: a choice is one of them, a schema's output is an instance."""
    outs = llm.generate(
        [PROMPT, "Q: pick one", "x y z"],
        [_params(choice=["red", "green", "blue"]), _params(max_tokens=96, json=PERSON), _params(regex=DATE)],
        use_tqdm=False,
    )
    assert outs[0].outputs[0].text in ("red", "green", "blue")
    assert outs[0].outputs[0].finish_reason == "stop"
    person = outs[1].outputs[0]
    if person.finish_reason == "stop":
        value = json.loads(person.text)
        assert set(value) <= {"name", "age", "tags"} and {"name", "age"} <= set(value)
        assert isinstance(value["age"], int) and 0 <= value["age"] <= 120 and len(value["name"]) <= 8
    assert re.fullmatch(DATE, outs[2].outputs[0].text)  # a date is complete after 10 characters


def test_random_sampling_and_n_keep_to_the_constraint(llm):
    params = SamplingParams(
        temperature=1.0, seed=7, n=4, max_tokens=40, structured_outputs=StructuredOutputsParams(regex=DATE)
    )
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert len(out.outputs) == 4
    for sample in out.outputs:
        assert sample.finish_reason == "stop" and re.fullmatch(DATE, sample.text)


def test_a_complete_match_ends_the_request_even_with_ignore_eos(llm):
    """A choice is complete once written: nothing may follow, so the request stops there (no EOS token),
    ignore_eos or not; min_tokens cannot extend it either."""
    for extra in (dict(ignore_eos=True), dict(min_tokens=30)):
        params = dataclasses.replace(_params(choice=["alpha", "beta"]), **extra)
        (out,) = llm.generate([PROMPT], params, use_tqdm=False)
        assert out.outputs[0].text in ("alpha", "beta") and out.outputs[0].finish_reason == "stop"
        assert EOS not in out.outputs[0].token_ids


def test_ignore_eos_keeps_an_open_match_going(llm):
    """An accepting state that may go on: with ignore_eos the EOS is not offered, so the output runs to
    max_tokens, still matching."""
    params = dataclasses.replace(_params(max_tokens=12, regex=r"[0-9]+"), ignore_eos=True)
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 12
    assert re.fullmatch(r"[0-9]+", out.outputs[0].text)


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(llm):
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    (alone,) = llm.generate(["hello world"], plain, use_tqdm=False)
    outs = llm.generate(
        ["hello world", PROMPT, "hello world"], [plain, _params(json_object=True), plain], use_tqdm=False
    )
    assert outs[0].outputs[0].token_ids == alone.outputs[0].token_ids == outs[2].outputs[0].token_ids


def test_bad_constraints_are_param_errors_and_the_engine_goes_on(llm):
    cases = [
        dict(regex="(unclosed"),
        dict(regex=r"(?=lookahead)a"),
        dict(json={"type": "string", "format": "no-such-format"}),
        dict(json="{not json"),
        dict(regex="a{0}"),  # only the empty output
        dict(json=_fanning_refs(30)),  # 2**30 subschemas once inlined: refused at once, not computed
        dict(json=_nested_arrays(400)),
        dict(json={"type": "object", "properties": {"a": {"enum": [b"bytes"]}}}),  # (not JSON)
        dict(json={"type": "string"}, whitespace_pattern="("),
    ]
    for constraint in cases:
        with pytest.raises(ParamError) as e:
            llm.generate([PROMPT], _params(**constraint), use_tqdm=False)
        assert e.value.param == "structured_outputs", constraint
    for bad in (dict(), dict(regex="a", choice=["b"]), dict(grammar="root ::= 'a'"), dict(choice=[])):
        with pytest.raises(ParamError):
            StructuredOutputsParams(**bad)
    with pytest.raises(ParamError):
        SamplingParams(structured_outputs={"regex": "a"})
    (out,) = llm.generate([PROMPT], _params(regex="ok|fine"), use_tqdm=False)
    assert out.outputs[0].text in ("ok", "fine")


def _fanning_refs(n: int) -> dict:
    defs = {
        f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]} for i in range(n)
    }
    return {"$ref": "#/$defs/d0", "$defs": {**defs, f"d{n}": {"type": "integer"}}}


def _nested_arrays(n: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(n):
        schema = {"type": "array", "items": schema}
    return schema


def test_end_tokens_obey_allowed_token_ids(llm):
    """An accepting state allows the end tokens, but only the constraint's ban is lifted: allowed_token_ids
    without the EOS still rule it out (here it is also pushed up by logit_bias)."""
    digits = [t for t in range(len(llm.tokenizer)) if re.fullmatch(r"[0-9]+", llm.tokenizer.decode([t]))]
    params = dataclasses.replace(
        _params(max_tokens=10, regex=r"[0-9]+"), allowed_token_ids=digits, logit_bias={EOS: 100.0}
    )
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert EOS not in out.outputs[0].token_ids and out.outputs[0].finish_reason == "length"
    # without allowed_token_ids, the bias makes the EOS come as soon as the output matches
    free = dataclasses.replace(params, allowed_token_ids=None)
    (out,) = llm.generate([PROMPT], free, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 2 and out.outputs[0].token_ids[-1] == EOS


def test_token_id_prompts_and_a_grammar_reused(llm):
    """A schema asked for twice compiles once (the engine's cache), and token-id prompts work too."""
    ids = llm.tokenizer.encode(PROMPT)
    first = llm.generate([ids], _params(json=PERSON), use_tqdm=False)[0].outputs[0].token_ids
    compiler = llm.engine._structured()
    num_grammars = len(compiler._grammars)
    again = llm.generate([ids], _params(json=json.dumps(PERSON)), use_tqdm=False)[0].outputs[0].token_ids
    same = llm.generate([ids], _params(json=dict(PERSON)), use_tqdm=False)[0].outputs[0].token_ids
    assert first == again == same
    assert len(compiler._grammars) == num_grammars + 1  # (the text form is keyed by its text)


def test_the_throughput_script_runs(tmp_path):
    """scripts/structured_throughput.py (run on the GPU) on the tiny preset: both settings generate the same
    number of tokens, the constrained ones within the regex."""
    from tests.scripts import load_script

    result = load_script("scripts/structured_throughput.py").main(
        ["--model", "qwen3-tiny", "--num-prompts", "3", "--max-tokens", "8", "--out", str(tmp_path)]
    )
    runs = result["runs"]
    assert {runs[f"{name}-{i}"]["tokens"] for name in ("free", "regex") for i in (0, 1)} == {24}
    assert 0 < runs["schema-1"]["tokens"] <= 24
    assert result["constrained_over_free"] > 0 and list(tmp_path.glob("structured_throughput-*.json"))
