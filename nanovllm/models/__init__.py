"""Model registry: `config.json`'s `architectures` entry -> implementation."""

from __future__ import annotations

from transformers import PretrainedConfig

from nanovllm.models.decoder import DecoderForCausalLM
from nanovllm.models.llama import LlamaForCausalLM
from nanovllm.models.mistral import MistralForCausalLM
from nanovllm.models.qwen2 import Qwen2ForCausalLM
from nanovllm.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[DecoderForCausalLM]] = {
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    # The bare decoders (no LM head), as embedding checkpoints name them: runner "pooling" (config.py)
    "Qwen3Model": Qwen3ForCausalLM,
    "Qwen2Model": Qwen2ForCausalLM,
    "LlamaModel": LlamaForCausalLM,
    "MistralModel": MistralForCausalLM,
}


def get_model_class(hf_config: PretrainedConfig) -> type[DecoderForCausalLM]:
    archs = getattr(hf_config, "architectures", None) or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"unsupported architecture {archs or None}; supported: {sorted(MODEL_REGISTRY)}")
