"""Every registered architecture vs transformers on the same tiny random checkpoint (fp32, CPU): prefill
logits close and greedy tokens equal, for mixed prompt lengths. The scaled-RoPE Llama cases pretrain on 64
positions and run prompts of up to 150 tokens, so the scaled part of the table is what gets compared."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanovllm import LLM, SamplingParams
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.models import MODEL_REGISTRY, get_model_class
from tests.checkpoints import build_checkpoint, hf_greedy, load_hf_model

MAX_TOKENS = 8
PROMPT_LENS = [3, 150, 17, 100, 1, 120, 64, 33]  # 100-150: past original_max_position_embeddings=64
MAX_MODEL_LEN = 256

LLAMA3_ROPE = dict(  # Llama 3.1's shape at toy size: every wavelength band (kept, smoothed, scaled) is hit
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


@dataclass(frozen=True)
class Case:
    arch: str  # key of tests.checkpoints.ARCHS
    overrides: dict = field(default_factory=dict)  # config fields
    max_shard_size: str | None = None
    dtype: torch.dtype = torch.float32  # of the saved checkpoint; the engine on CPU runs fp32
    max_model_len: int = MAX_MODEL_LEN


CASES = {
    "qwen3": Case("qwen3"),
    "qwen2-tied": Case("qwen2", dict(tie_word_embeddings=True)),  # as Qwen2.5-0.5B/1.5B
    "llama-untied": Case("llama"),
    "llama3-rope": Case("llama", dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=512)),
    "llama-linear-rope": Case(
        "llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))
    ),
    # transformers' dynamic NTK scales against max_position_embeddings and only once a sequence grows past
    # it; the engine refuses max_model_len > max_position_embeddings, so every position here (up to 158 <
    # 512) uses the unscaled table in transformers and in ours. The case checks the type is accepted and
    # gives exactly that; the scaled branch is covered by tests/unit/test_rotary.py.
    "llama-dynamic-rope": Case(
        "llama",
        dict(
            rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0),
            max_position_embeddings=512,
        ),
    ),
    "llama-biases-head-dim": Case(  # head_dim 24 != hidden 64 / 4 heads
        "llama", dict(attention_bias=True, mlp_bias=True, head_dim=24)
    ),
    # A window of 256 with max_model_len 256 never cuts a sequence: transformers' windowed mask is causal.
    "mistral": Case("mistral", dict(sliding_window=MAX_MODEL_LEN)),
    "llama-sharded": Case("llama", max_shard_size="200KB"),
    "qwen2-bf16-as-fp32": Case("qwen2", dtype=torch.bfloat16),
}


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 2048) for _ in range(n)] for n in PROMPT_LENS]


_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16"}
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models are tiny: with more threads than free cores, torch's workers spin against each other and
    # every forward gets many times slower.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@dataclass
class Setup:
    case: Case
    ckpt: Path
    hf: torch.nn.Module
    llm: LLM
    prompts: list[list[int]]


@pytest.fixture(scope="module", params=list(CASES))
def setup(request, tmp_path_factory) -> Setup:
    case = CASES[request.param]
    ckpt = build_checkpoint(
        tmp_path_factory.mktemp(request.param),
        case.arch,
        max_shard_size=case.max_shard_size,
        dtype=case.dtype,
        **case.overrides,
    )
    llm = LLM(str(ckpt), max_model_len=case.max_model_len, max_num_seqs=8, device="cpu", dtype="float32")
    return Setup(case, ckpt, load_hf_model(ckpt), llm, _prompts())


def _prefill_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of every prompt position from one batched prefill through the engine's runner."""
    runner, block_manager = llm.engine.runner, llm.engine.scheduler.block_manager
    seqs = [Sequence(p, GREEDY) for p in prompts]
    for s in seqs:  # lay each sequence on fresh blocks
        block_manager.allocate(s, [], s.num_tokens)
    try:
        inp = runner.prepare(ScheduledBatch(seqs, [s.num_tokens for s in seqs]))
        meta = AttentionMetadata(
            slot_mapping=inp.slot_mapping,
            cu_seqlens_q=inp.cu_seqlens_q,
            seq_lens=inp.seq_lens,
            block_tables=inp.block_tables,
            max_query_len=inp.max_query_len,
            max_seq_len=inp.max_seq_len,
            is_decode=False,
        )
        with torch.no_grad():
            # [sum(prompt lens), vocab_size]
            return runner.model.compute_logits(runner.model(inp.input_ids, inp.positions, meta))
    finally:
        for s in seqs:
            block_manager.free_seq(s)


def test_checkpoint_is_what_the_case_says(setup):
    case, ckpt, model = setup.case, setup.ckpt, setup.llm.engine.runner.model
    assert type(model).__name__ == setup.hf.config.architectures[0]
    tied = bool(case.overrides.get("tie_word_embeddings", False))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    shards = sorted(ckpt.glob("*.safetensors"))
    assert (ckpt / "model.safetensors.index.json").exists() == (case.max_shard_size is not None)
    assert len(shards) > 1 if case.max_shard_size else len(shards) == 1
    with safe_open(str(shards[0]), framework="pt") as f:
        saved = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert saved == {_SAFETENSORS_DTYPE[case.dtype]}
    assert next(model.parameters()).dtype == torch.float32


def test_prefill_logits_match(setup):
    prompts = setup.prompts[:4]  # lengths 3, 150, 17, 100
    logits = _prefill_logits(setup.llm, prompts)
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = setup.hf(torch.tensor([p])).logits[0]  # [len(p), vocab_size]
        torch.testing.assert_close(logits[start : start + len(p)], ref, rtol=1e-4, atol=1e-4)
        start += len(p)


def test_greedy_tokens_match(setup):
    expected = [hf_greedy(setup.hf, p, MAX_TOKENS) for p in setup.prompts]
    outputs = setup.llm.generate(setup.prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected


# ---------------------------------------------------------------- registry and start-up checks


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    ckpt = build_checkpoint(tmp_path, "llama")
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture") as err:
        LLM(str(ckpt))
    for name in ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"):
        assert name in str(err.value)
    causal = ["Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"]
    # (and the bare decoders embedding checkpoints name: runner "pooling", tests/test_embeddings.py)
    bare = [name.replace("ForCausalLM", "Model") for name in causal]
    assert sorted(MODEL_REGISTRY) == sorted(causal + bare)


def test_mistral_sliding_window_needs_max_model_len_within_it(tmp_path):
    ckpt = build_checkpoint(tmp_path, "mistral", sliding_window=64, max_position_embeddings=128)
    with pytest.raises(ValueError, match=r"sliding_window=64.*max_model_len=128"):
        LLM(str(ckpt))  # max_model_len defaults to max_position_embeddings
    with pytest.raises(ValueError, match="sliding_window"):
        LLM(str(ckpt), max_model_len=65)
    llm = LLM(str(ckpt), max_model_len=64)  # exact: no sequence is longer than the window
    assert llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_qwen2_sliding_window_only_counts_windowed_layers():
    from transformers import Qwen2Config

    base = dict(architectures=["Qwen2ForCausalLM"], num_hidden_layers=2, use_sliding_window=True)
    windowed = Qwen2Config(**base, sliding_window=64, max_window_layers=1)  # layer 1 slides
    with pytest.raises(ValueError, match="sliding_window=64"):
        get_model_class(windowed).check_config(windowed, 128)
    get_model_class(windowed).check_config(windowed, 64)
    unwindowed = Qwen2Config(**base, sliding_window=64, max_window_layers=2)  # no layer slides
    get_model_class(unwindowed).check_config(unwindowed, 128)
    off = Qwen2Config(**{**base, "use_sliding_window": False}, sliding_window=64)
    get_model_class(off).check_config(off, 128)


@pytest.mark.parametrize(
    "arch, name",
    [
        ("llama", "model.layers.0.self_attn.k_proj.weight"),  # one part of the packed qkv_proj
        ("llama", "model.layers.1.mlp.up_proj.weight"),  # one part of the packed gate_up_proj
        ("qwen2", "model.layers.0.self_attn.q_proj.bias"),  # one part of the packed qkv bias
        ("llama", "model.layers.1.self_attn.o_proj.weight"),
    ],
)
def test_missing_weight_raises(tmp_path, arch, name):
    # Parts of packed parameters used to count as loaded once any part was: the rest stayed uninitialized.
    ckpt = build_checkpoint(tmp_path, arch)
    weights = load_file(ckpt / "model.safetensors")
    del weights[name]
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"checkpoint is missing weights: [{name!r}]")):
        LLM(str(ckpt), max_model_len=MAX_MODEL_LEN)


def test_rotary_buffers_in_the_checkpoint_are_skipped(tmp_path):
    # Older transformers saved rotary_emb.inv_freq; ColossalAI-trained models carry cos_cached / sin_cached.
    # transformers ignores them (unexpected keys) and so does vLLM; cos_cached used to refuse the checkpoint.
    ckpt = build_checkpoint(tmp_path, "llama")
    prompt = _prompts()[2]
    expected = hf_greedy(load_hf_model(ckpt), prompt, MAX_TOKENS)
    weights = load_file(ckpt / "model.safetensors")
    for i in range(2):
        for buffer in ("inv_freq", "cos_cached", "sin_cached"):
            weights[f"model.layers.{i}.self_attn.rotary_emb.{buffer}"] = torch.ones(8)
    weights["model.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    llm = LLM(str(ckpt), max_model_len=MAX_MODEL_LEN)
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == expected

    # Any other tensor that fits no parameter is still an error.
    weights["model.layers.0.self_attn.extra.weight"] = torch.ones(8)
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.extra.weight' matches no parameter"):
        LLM(str(ckpt), max_model_len=MAX_MODEL_LEN)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),  # transformers runs GELU; the decoder is SwiGLU
        # transformers' Llama/Qwen/Mistral rotate the whole head with the default rope (and fail with scaled
        # ones); nanovllm would rotate half of it
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    ],
)
def test_config_options_the_decoder_ignores_are_refused(tmp_path, overrides, match):
    ckpt = build_checkpoint(tmp_path, "llama", **overrides)
    with pytest.raises(ValueError, match=re.escape(match)):
        LLM(str(ckpt), max_model_len=MAX_MODEL_LEN)


# ---------------------------------------------------------------- EOS ids from generation_config.json


def test_generation_config_eos_ids_stop_generation(tmp_path):
    # Llama 3 lists several EOS ids (<|end_of_text|>, <|eom_id|>, <|eot_id|>) in config.json and
    # generation_config.json; any of them ends a request.
    ckpt = build_checkpoint(tmp_path, "llama", eos_token_id=[2, 9])
    prompt = _prompts()[2]
    free_run = hf_greedy(load_hf_model(ckpt), prompt, MAX_TOKENS)
    # The EOS to add: the first token after the second that the run has not produced before.
    stop_at = next(i for i in range(2, MAX_TOKENS) if free_run[i] not in free_run[:i] + [2, 9])
    eos = free_run[stop_at]
    assert not {2, 9} & set(free_run[:stop_at])
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, eos]}))

    llm = LLM(str(ckpt), max_model_len=MAX_MODEL_LEN)
    assert llm.config.eos_token_ids == (2, 9, eos)  # config first, then generation_config's new ones
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    completion = out[0].outputs[0]
    assert completion.token_ids == free_run[: stop_at + 1]
    assert completion.finish_reason == "stop"
