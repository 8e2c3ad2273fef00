"""Tiny random Hugging Face checkpoints, built in a temp dir: the parity oracle is transformers' own
model on the same weights."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
import transformers

from nanovllm.config import PRESET_DIR

TOKENIZER_DIR = PRESET_DIR / "tokenizer"  # 2048 tokens, eos <|im_end|> = 2, with a chat template

_BASE = dict(
    vocab_size=2048,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    eos_token_id=2,
    bos_token_id=None,
    pad_token_id=0,
)

ARCHS = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16, rope_theta=10000.0)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(rope_theta=10000.0)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(rope_theta=10000.0)),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(rope_theta=10000.0, sliding_window=None),
    ),
}


def build_checkpoint(
    path: Path,
    arch: str = "qwen3",
    seed: int = 0,
    tokenizer: bool = True,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Save a random `arch` model (config + safetensors [+ tokenizer]) to path and return it."""
    config_cls, model_cls, extra = ARCHS[arch]
    config = config_cls(**{**_BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    with torch.no_grad():  # bigger than the default init so that logits are far from uniform
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        for f in TOKENIZER_DIR.iterdir():
            shutil.copy(f, path / f.name)
    return path


def mixed_prompts(lens: list[int], seed: int = 0, shared_len: int = 40) -> list[list[int]]:
    """Random token-id prompts of the given lengths; every odd-indexed one longer than shared_len
    starts with the same shared_len tokens, so a batch exercises prefix-cache hits."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 2048) for _ in range(shared_len)]
    prompts = []
    for i, n in enumerate(lens):
        p = [rng.randrange(3, 2048) for _ in range(n)]
        if i % 2 and n > shared_len:
            p[:shared_len] = shared
        prompts.append(p)
    return prompts


def load_hf_model(path: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from transformers, recomputing the whole sequence each step (no EOS stop)."""
    tokens = list(prompt)
    for _ in range(max_tokens):
        logits = model(torch.tensor([tokens])).logits[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


THINK, END_THINK = 2048, 2049  # Qwen3's think tags, added after the preset tokenizer's 2,048 tokens
THINK_VOCAB_SIZE = 2064  # the think checkpoint's logits: wider than its tokenizer (ids 2050.. have no text)


def build_think_checkpoint(path: Path, vocab_size: int = THINK_VOCAB_SIZE) -> Path:
    """A tiny random Qwen3 whose tokenizer has `<think>` and `</think>` as added tokens (as Qwen3's), for
    reasoning parsers."""
    from transformers import AutoTokenizer

    build_checkpoint(path, "qwen3", tokenizer=False, vocab_size=vocab_size, max_position_embeddings=256)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.save_pretrained(path)
    if tokenizer.convert_tokens_to_ids(["<think>", "</think>"]) != [THINK, END_THINK]:
        raise RuntimeError("the think tags did not get the expected ids")
    return path
