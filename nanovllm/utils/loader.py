"""Stream checkpoint tensors into the model's parameters, each through its weight_loader."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

# Rotary buffers that some checkpoints carry (inv_freq from older transformers; cos_cached / sin_cached from
# ColossalAI-trained models): the rope table is computed from the config, so they are skipped, as transformers
# (unexpected keys) and vLLM's load_weights do.
_ROTARY_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {str(path)!r}")
    return files


def iter_checkpoint(path: Path) -> Iterator[tuple[str, object]]:
    """(name, safetensors slice) for every tensor; a slice reads only the part that is indexed."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


def iter_random_weights(
    shapes: dict[str, tuple[int, ...]], seed: int, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random weights by name (same on every rank): norms 1, biases 0, matrices N(0, 0.02)."""
    gen = torch.Generator(device=device)
    for i, (name, shape) in enumerate(shapes.items()):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape, device=device)
        else:
            key = seed * 1_000_003 + i
            gen.manual_seed(key if -(2**63) <= key < 2**64 else key % 2**64)  # (into torch's range)
            yield name, torch.randn(shape, generator=gen, device=device).mul_(0.02)


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    tensor = loaded if isinstance(loaded, torch.Tensor) else loaded[:]
    if param.shape != tensor.shape:
        raise ValueError(
            f"checkpoint tensor of shape {tuple(tensor.shape)} does not fit parameter {tuple(param.shape)}"
        )
    param.data.copy_(tensor)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, object]]) -> None:
    params = dict(model.named_parameters())
    try:
        _load(model, params, weights)
    finally:
        # A parameter's weight_loader is a bound method of its layer: a cycle (weight -> loader -> layer ->
        # weight) that would keep the weights alive after the model is dropped, until the garbage collector
        # next runs (a dropped 0.6B engine held its 1.2 GB). Loading is over: break it.
        for param in params.values():
            vars(param).pop("weight_loader", None)


def _load(model: nn.Module, params: dict[str, nn.Parameter], weights: Iterator[tuple[str, object]]) -> None:
    packed = getattr(model, "packed_modules_mapping", {})
    loaded_names = set()  # checkpoint names, so that each part of a packed parameter is accounted for
    has_lm_head = getattr(model, "lm_head", None) is not None
    for name, tensor in weights:
        if name.endswith(_ROTARY_BUFFERS):
            continue
        if not name.startswith(("model.", "lm_head.")):  # a bare decoder's (Qwen3-Embedding's: norm.weight)
            name = "model." + name
        if name == "lm_head.weight" and (getattr(model, "tie_word_embeddings", False) or not has_lm_head):
            continue  # tied: the embedding is the head; or no head (runner "pooling")
        for key, (packed_name, shard_id) in packed.items():
            if f".{key}." in name:
                param_name = name.replace(f".{key}.", f".{packed_name}.")
                params[param_name].weight_loader(params[param_name], tensor, shard_id)
                loaded_names.add(name)
                break
        else:
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded_names.add(name)
    # The checkpoint names each parameter needs: one per part of a packed parameter (q_proj, k_proj, v_proj
    # of qkv_proj), else its own name.
    expected = set()
    for param_name in params:
        parts = [
            param_name.replace(f".{packed_name}.", f".{key}.")
            for key, (packed_name, _) in packed.items()
            if f".{packed_name}." in param_name
        ]
        expected.update(parts or [param_name])
    tied = {"lm_head.weight"} if getattr(model, "tie_word_embeddings", False) else set()
    missing = sorted(expected - loaded_names - tied)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
