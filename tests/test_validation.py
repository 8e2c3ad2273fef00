"""Every bad input gets a clear exception (never an AssertionError) naming the field and the value, and
the engine that refused it keeps generating the same tokens afterwards."""

from __future__ import annotations

import json
import pickle
import re
import shutil

import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from tests.checkpoints import build_checkpoint

MAX_MODEL_LEN = 64
VOCAB = 2048
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
GOOD_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], "Hello there"]


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(str(ckpt), max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def reference(llm):
    return _tokens(llm.generate(GOOD_PROMPTS, GREEDY, use_tqdm=False))


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_healthy(llm: LLM, reference: list[list[int]]) -> None:
    """Nothing left queued or held, and the same greedy tokens as before the error."""
    engine = llm.engine
    bm = engine.scheduler.block_manager
    assert not engine.has_unfinished() and engine.requests == {}
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_consistency()
    assert _tokens(llm.generate(GOOD_PROMPTS, GREEDY, use_tqdm=False)) == reference


def raises(exc_type: type[Exception], *fragments: str):
    """pytest.raises that also checks that the message carries each fragment."""
    return pytest.raises(exc_type, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# ---- the model argument -------------------------------------------------------------------------


def test_missing_model_dir(tmp_path):
    missing = tmp_path / "no-such-model"
    with raises(ValueError, str(missing), "neither a checkpoint directory nor a preset", "qwen3-tiny"):
        LLM(str(missing))


def test_dir_without_config(tmp_path):
    with raises(ValueError, str(tmp_path), "no config.json"):
        LLM(str(tmp_path))


def test_garbage_config(tmp_path):
    (tmp_path / "config.json").write_text("{this is not json")
    with raises(ValueError, "cannot read the config", str(tmp_path)):
        LLM(str(tmp_path))


def test_unsupported_architecture(ckpt, tmp_path):
    other = shutil.copytree(ckpt, tmp_path / "gpt2ish")
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(config))
    with raises(ValueError, "unsupported architecture", "GPT2LMHeadModel", "supported", "Qwen3ForCausalLM"):
        LLM(str(other))


# ---- engine arguments ---------------------------------------------------------------------------


def test_unknown_engine_argument(ckpt):
    with raises(TypeError, "unknown engine argument", "max_num_seq'", "max_num_seqs"):
        LLM(str(ckpt), max_num_seq=4)


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        (dict(block_size=48), ["block_size", "48", "16"]),
        (dict(gpu_memory_utilization=1.5), ["gpu_memory_utilization", "1.5"]),
        (dict(gpu_memory_utilization=0), ["gpu_memory_utilization", "0"]),
        (dict(max_num_seqs=0), ["max_num_seqs", "0"]),
        (dict(max_num_seqs=2.5), ["max_num_seqs", "2.5"]),
        (dict(dtype="int8"), ["dtype", "'int8'", "bfloat16"]),
        (dict(device="tpu"), ["device", "'tpu'", "cpu"]),
        (dict(kernel_backend="x"), ["kernel_backend", "'x'", "torch"]),
        (dict(max_model_len=100_000), ["max_model_len=100000", "max_position_embeddings=256"]),
        (dict(max_model_len=1), ["max_model_len", "1"]),
        (dict(max_num_batched_tokens=4, max_num_seqs=8), ["max_num_batched_tokens (4)", "max_num_seqs (8)"]),
        (dict(num_kvcache_blocks=0), ["num_kvcache_blocks", "0"]),
        (dict(seed=1.5), ["seed", "1.5"]),  # (was a RuntimeError from torch, deep in start-up)
        (dict(seed=2**64), ["seed", str(2**64)]),
        (dict(tensor_parallel_size=3), ["tensor_parallel_size=3", "num_attention_heads=4"]),
    ],
)
def test_bad_engine_values(ckpt, kwargs, fragments):
    with raises(ValueError, *fragments):
        LLM(str(ckpt), **kwargs)


def test_seed_none_is_seed_0_as_in_vllm():
    assert Config("qwen3-tiny", device="cpu", seed=None).seed == 0


def test_kv_cache_too_small_for_one_request_fails_at_start_up(ckpt):
    with raises(ValueError, "KV cache", "2 blocks", "max_model_len=64", "num_kvcache_blocks"):
        LLM(str(ckpt), max_model_len=64, block_size=16, num_kvcache_blocks=2)


def test_failed_constructions_leave_a_working_engine_alone(llm, reference):
    assert_healthy(llm, reference)


# ---- sampling parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("temperature", dict(temperature=-0.5)),
        ("temperature", dict(temperature=float("nan"))),
        ("temperature", dict(temperature=float("inf"))),  # (vLLM: "must be a finite number")
        ("temperature", dict(temperature=10**400)),  # an int no float can hold
        ("temperature", dict(temperature="0.5")),
        ("top_p", dict(top_p=0)),
        ("top_p", dict(top_p=1.5)),
        ("top_k", dict(top_k=-2)),
        ("top_k", dict(top_k=2.5)),
        ("min_p", dict(min_p=1.5)),
        ("min_p", dict(min_p=-0.1)),
        ("seed", dict(seed=1.5)),
        ("max_tokens", dict(max_tokens=0)),
        ("max_tokens", dict(max_tokens=True)),
        ("min_tokens", dict(min_tokens=5, max_tokens=4)),
        ("min_tokens", dict(min_tokens=-1)),
        ("ignore_eos", dict(ignore_eos="yes")),
        ("logprobs", dict(logprobs=21)),
        ("logprobs", dict(logprobs=-1)),
        ("presence_penalty", dict(presence_penalty=2.5)),
        ("frequency_penalty", dict(frequency_penalty=-3)),
        ("repetition_penalty", dict(repetition_penalty=0)),
        ("repetition_penalty", dict(repetition_penalty=-1.0)),
        ("repetition_penalty", dict(repetition_penalty=float("inf"))),
        ("repetition_penalty", dict(repetition_penalty=10**400)),
        ("stop", dict(stop="")),
        ("stop", dict(stop=["ok", ""])),
        ("stop", dict(stop=[1])),
        ("stop_token_ids", dict(stop_token_ids=[-1])),
        ("stop_token_ids", dict(stop_token_ids=["a"])),
        ("n", dict(n=0)),
        ("n", dict(n=2.0)),
        ("n", dict(n=True)),
        ("skip_special_tokens", dict(skip_special_tokens=1)),
        ("include_stop_str_in_output", dict(include_stop_str_in_output="no")),
    ],
)
def test_out_of_range_sampling_params(field, kwargs):
    value = kwargs[field]
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    message = str(e.value)
    assert message.startswith(field), message
    # The error names its field (the server's 400 names it), also after the trip from the engine process.
    assert e.value.param == field and pickle.loads(pickle.dumps(e.value)).param == field
    shown = repr([value] if field == "stop" and isinstance(value, str) else value)  # stop="" -> [""]
    assert shown in message, message


def test_boundary_sampling_params_are_accepted():
    SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=0.0, max_tokens=1, min_tokens=1, logprobs=0)
    SamplingParams(top_p=1e-6, top_k=0, min_p=1.0, logprobs=20, presence_penalty=2, frequency_penalty=-2)
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    as_flags = SamplingParams(logprobs=True, prompt_logprobs=True)  # vLLM's: True is 1
    assert as_flags == SamplingParams(logprobs=1, prompt_logprobs=1)


def test_greedy_resets_the_filters_as_in_vllm():
    """vLLM's SamplingParams: temperature < 1e-5 (greedy) sets top_p 1, top_k 0, min_p 0 (checked first)."""
    greedy = SamplingParams(temperature=0, top_p=0.5, top_k=20, min_p=0.1)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    sampled = SamplingParams(temperature=0.5, top_p=0.5, top_k=20, min_p=0.1)
    assert (sampled.top_p, sampled.top_k, sampled.min_p) == (0.5, 20, 0.1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=0, top_p=1.5)


def test_tiny_temperature_is_raised_to_0_01_as_in_vllm(caplog):
    """vLLM raises a temperature in (0, 0.01) to 0.01, with a warning: it samples, even below 1e-5."""
    with caplog.at_level("WARNING", logger="nanovllm"):
        for t in (1e-6, 0.005):
            params = SamplingParams(temperature=t, top_k=5)
            assert (params.temperature, params.top_k, params.is_greedy) == (0.01, 5, False)
    assert sum("temperature" in r.getMessage() for r in caplog.records) == 2
    assert SamplingParams(temperature=0.01).temperature == 0.01 and SamplingParams(temperature=0).is_greedy


def test_stop_token_ids_outside_the_vocabulary_raise_as_in_vllm(llm, reference):
    """vLLM's SamplingParams.verify refuses stop_token_ids >= the vocabulary size; the engine goes on."""
    with pytest.raises(ValueError, match=rf"stop_token_ids .*\[0, {VOCAB}\): \[{VOCAB}\]"):
        llm.generate(GOOD_PROMPTS[:1], SamplingParams(stop_token_ids=[5, VOCAB]), use_tqdm=False)
    assert _tokens(llm.generate(GOOD_PROMPTS, GREEDY, use_tqdm=False)) == reference


def test_clone_is_a_deep_copy_as_in_vllm():
    params = SamplingParams(stop=["x"], stop_token_ids=[3], logit_bias={5: 1.0}, seed=7)
    twin = params.clone()
    assert twin == params and twin is not params
    twin.stop.append("y")
    twin.logit_bias[6] = 2.0
    assert params.stop == ["x"] and params.logit_bias == {5: 1.0}


def test_seed_minus_one_is_no_seed_as_in_vllm():
    # vLLM's SamplingParams turns seed=-1 into None: unseeded, not a fixed seed of -1.
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=-2).seed == -2


# ---- prompts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, fragments",
    [
        ("", ["prompt 0", "prompt is empty"]),
        ([[]], ["prompt 0", "prompt is empty"]),
        ([[5, VOCAB, 6]], ["prompt 0", f"token id {VOCAB}", f"[0, {VOCAB})"]),
        ([[5, -1, 6]], ["prompt 0", "token id -1", "outside the vocabulary"]),
        ([[5, 6.0]], ["prompt 0", "token id 6.0", "not an int"]),
        ([[5, True]], ["prompt 0", "token id True", "not an int"]),
        ([None], ["prompt 0", "NoneType"]),
        (
            [list(range(3, 3 + MAX_MODEL_LEN - 5))],
            ["prompt 0", "max_tokens (6)", f"max_model_len={MAX_MODEL_LEN}"],
        ),
        (["word " * 80], ["prompt 0", f"max_model_len={MAX_MODEL_LEN}"]),
        (42, ["prompts must be", "int"]),
    ],
)
def test_bad_prompts(llm, reference, prompt, fragments):
    with raises(ValueError, *fragments):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert_healthy(llm, reference)


def test_empty_prompt_through_the_engine_api(llm, reference):
    for prompt in ("", []):
        with raises(ValueError, "prompt is empty"):
            llm.engine.add_request(prompt, GREEDY)
    assert_healthy(llm, reference)


def test_one_bad_prompt_in_a_batch_runs_nothing(llm, reference):
    engine = llm.engine
    prompts_before = engine.num_prompt_tokens
    batch = [[5, 6, 7], "fine", [8, 9, 99999], [10, 11]]
    with raises(ValueError, "prompt 2", "token id 99999"):
        llm.generate(batch, GREEDY, use_tqdm=False)
    assert not engine.has_unfinished()
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.num_prompt_tokens == prompts_before  # nothing was even queued
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert_healthy(llm, reference)


def test_mismatched_number_of_sampling_params(llm, reference):
    with raises(ValueError, "3 sampling params", "2 prompts"):
        llm.generate(GOOD_PROMPTS, [GREEDY] * 3, use_tqdm=False)
    with raises(ValueError, "prompt 1", "SamplingParams", "dict"):
        llm.generate(GOOD_PROMPTS, [GREEDY, {"temperature": 0}], use_tqdm=False)
    assert_healthy(llm, reference)


def test_engine_requests_run_one_sample(llm, reference):
    with raises(ValueError, "n=2", "params.choice(i)"):
        llm.engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, n=2))
    assert_healthy(llm, reference)


def test_duplicate_request_id(llm, reference):
    engine = llm.engine
    engine.add_request([5, 6, 7], GREEDY, request_id="dup")
    with raises(ValueError, "'dup'", "already in use"):
        engine.add_request([8, 9], GREEDY, request_id="dup")
    engine.abort("dup")
    assert_healthy(llm, reference)


def test_text_prompt_without_a_tokenizer(tmp_path):
    ckpt = build_checkpoint(tmp_path / "no-tok", "qwen3", tokenizer=False, max_position_embeddings=64)
    llm = LLM(str(ckpt), max_model_len=64)
    assert llm.tokenizer is None
    ids = [5, 6, 7, 8]
    before = _tokens(llm.generate([ids], GREEDY, use_tqdm=False))
    with raises(ValueError, "prompt 0", "no tokenizer", "token ids"):
        llm.generate("Hello", GREEDY, use_tqdm=False)
    with raises(ValueError, "no tokenizer", "generate()"):
        llm.chat([{"role": "user", "content": "Hello"}], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished()
    assert _tokens(llm.generate([ids], GREEDY, use_tqdm=False)) == before
    assert len(before[0]) == GREEDY.max_tokens


# ---- conversations (LLM.chat) -------------------------------------------------------------------

USER_HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "messages, kwargs, fragments",
    [
        ("hi", {}, ["messages must be a conversation"]),
        ([], {}, ["messages must be a conversation"]),
        ([[]], {}, ["messages must be a conversation"]),
        ([USER_HI, "hi"], {}, ["messages must be a conversation"]),
        (
            USER_HI,
            dict(chat_template="{{ raise_exception('no system turn') }}"),
            ["conversation 0", "no system"],
        ),
        ([USER_HI, [{"role": "user", "content": "word " * 80}]], {}, ["conversation 1", "max_model_len"]),
        ([{"content": "no role"}], {}, ["conversation 0", "messages[0].role must be a string"]),
        (
            [USER_HI, [USER_HI[0], {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]],
            {},
            ["conversation 1", "messages[1].content[0]: only text parts"],
        ),
    ],
)
def test_bad_conversations(llm, reference, messages, kwargs, fragments):
    with raises(ValueError, *fragments):
        llm.chat(messages, GREEDY, use_tqdm=False, **kwargs)
    assert_healthy(llm, reference)


def test_chat_without_a_chat_template(llm, reference, monkeypatch):
    monkeypatch.setattr(llm.tokenizer, "chat_template", None)
    with raises(ValueError, "no chat template", "chat_template="):
        llm.chat(USER_HI, GREEDY, use_tqdm=False)
    # a template of the caller's own works without one
    out = llm.chat(USER_HI, GREEDY, use_tqdm=False, chat_template="{{ messages[0]['content'] }}:")
    assert out[0].prompt == "hi:"
    assert_healthy(llm, reference)


# ---- a step that fails ---------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError("device fell over"), KeyboardInterrupt()])
def test_a_failed_step_leaves_no_trace(llm, reference, error, monkeypatch):
    """The step's blocks were registered in the prefix cache when scheduled; the forward that was to
    fill them never ran, so they must not be served to the next request with the same prompt."""
    first_id = 300 if isinstance(error, KeyboardInterrupt) else 100
    prompt = list(range(first_id, first_id + 41))  # 2 full blocks + 9 tokens, not seen before

    def fail(batch):
        raise error

    with monkeypatch.context() as m:
        m.setattr(llm.engine.runner, "launch", fail)
        with pytest.raises(type(error)):
            llm.generate([prompt, *GOOD_PROMPTS], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished()
    first = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0  # nothing of the failed step was cached
    again = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 32 and again.outputs[0].token_ids == first.outputs[0].token_ids
    assert_healthy(llm, reference)


def test_a_failed_step_drops_every_sample_of_an_n_request(llm, reference, monkeypatch):
    """LLM.generate runs each of n samples as a request of its own: a failed step fails them all."""
    prompt = list(range(500, 541))  # not seen before
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True, n=3)
    engine = llm.engine
    added = []
    add_request = engine.add_request

    def recording_add(*args, **kwargs):
        added.append(add_request(*args, **kwargs))
        return added[-1]

    def fail(batch):
        raise RuntimeError("device fell over")

    with monkeypatch.context() as m:
        m.setattr(engine, "add_request", recording_add)
        m.setattr(engine.runner, "launch", fail)
        with raises(RuntimeError, "device fell over"):
            llm.generate([prompt, GOOD_PROMPTS[0]], [params, GREEDY], use_tqdm=False)
    samples = added[:3]
    assert len(added) == 4 and set(samples) <= set(engine.dropped_request_ids)
    assert not engine.has_unfinished() and engine.requests == {}
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    assert out.num_cached_tokens == 0 and len(out.outputs) == 3
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert_healthy(llm, reference)
