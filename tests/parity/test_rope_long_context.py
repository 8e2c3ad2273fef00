"""max_model_len past max_position_embeddings through RoPE scaling, as vLLM derives it: YaRN up to
original_max_position_embeddings x factor, linear up to max_position_embeddings x factor. Tiny checkpoints
pretrained on 64 positions run a 200-token prompt at max_model_len=256 against transformers on the same
weights (prefill logits close, greedy tokens equal); dynamic NTK and lengths past the derived maximum are
refused at start-up."""

from __future__ import annotations

import random

import pytest
import torch

from nanovllm import LLM
from nanovllm.config import Config
from tests.checkpoints import build_checkpoint, hf_greedy, load_hf_model
from tests.parity.test_models_parity import GREEDY, MAX_TOKENS, _prefill_logits
from tests.test_validation import raises

MAX_POSITION_EMBEDDINGS = 64
FACTOR = 4.0
DERIVED_MAX_LEN = 256  # 64 x 4
PROMPT_LENS = [200, 7]  # 200 + MAX_TOKENS: far past the 64 pretrained positions, within 256

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=FACTOR, original_max_position_embeddings=64)
LINEAR = dict(rope_type="linear", rope_theta=10000.0, factor=FACTOR)
CASES = {
    "qwen3-yarn": ("qwen3", dict(rope_parameters=YARN)),
    # Qwen2.5's documented form: old-style rope_scaling with "type", rope_theta beside it
    "qwen2-yarn-rope-scaling": (
        "qwen2",
        dict(rope_scaling=dict(type="yarn", factor=FACTOR, original_max_position_embeddings=64)),
    ),
    "llama-linear": ("llama", dict(rope_parameters=LINEAR)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    num_threads = torch.get_num_threads()  # tiny models: more threads than free cores only spin
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, 2048) for _ in range(n)] for n in PROMPT_LENS]


@pytest.mark.parametrize("name", list(CASES))
def test_scaled_rope_runs_past_max_position_embeddings_as_transformers(name, tmp_path):
    arch, overrides = CASES[name]
    ckpt = build_checkpoint(tmp_path, arch, max_position_embeddings=MAX_POSITION_EMBEDDINGS, **overrides)
    hf = load_hf_model(ckpt)
    llm = LLM(str(ckpt), max_model_len=DERIVED_MAX_LEN, max_num_seqs=2, device="cpu", dtype="float32")
    rotary = llm.engine.runner.model.model.layers[0].self_attn.rotary_emb
    assert rotary.cos_sin_cache.shape[0] == DERIVED_MAX_LEN  # the table covers max_model_len

    prompts = _prompts()
    logits = _prefill_logits(llm, prompts)  # [sum(prompt lens), vocab_size]
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]  # [len(p), vocab_size]
        torch.testing.assert_close(logits[start : start + len(p)], ref, rtol=1e-4, atol=1e-4)
        start += len(p)

    expected = [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


@pytest.mark.parametrize("name", list(CASES))
def test_more_than_the_derived_maximum_is_refused(name, tmp_path):
    arch, overrides = CASES[name]
    ckpt = build_checkpoint(tmp_path, arch, max_position_embeddings=MAX_POSITION_EMBEDDINGS, **overrides)
    rope_type = name.split("-")[1]
    base = "original_max_position_embeddings=64" if rope_type == "yarn" else "max_position_embeddings=64"
    with raises(ValueError, "max_model_len=257", "256", base, "factor=4.0", f"rope_type '{rope_type}'"):
        Config(str(ckpt), max_model_len=DERIVED_MAX_LEN + 1, device="cpu")
    # The default is unchanged (max_position_embeddings), not vLLM's derived maximum: see docs/models.md.
    assert Config(str(ckpt), device="cpu").max_model_len == MAX_POSITION_EMBEDDINGS


def test_dynamic_ntk_is_refused_past_max_position_embeddings(tmp_path):
    dynamic = dict(rope_type="dynamic", rope_theta=10000.0, factor=FACTOR)
    ckpt = build_checkpoint(
        tmp_path, "llama", max_position_embeddings=MAX_POSITION_EMBEDDINGS, rope_parameters=dynamic
    )
    assert Config(str(ckpt), max_model_len=MAX_POSITION_EMBEDDINGS, device="cpu").max_model_len == 64
    with raises(ValueError, "max_model_len=65", "max_position_embeddings=64", "'dynamic'", "KV cache"):
        Config(str(ckpt), max_model_len=MAX_POSITION_EMBEDDINGS + 1, device="cpu")
