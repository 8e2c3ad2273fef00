"""Llama 2 / 3 / 3.1+: the shared decoder as is. Biases follow `attention_bias` (q/k/v/o) and `mlp_bias`;
RoPE scaling (linear, dynamic, llama3) and an explicit `head_dim` are read by the shared layers."""

from transformers import PretrainedConfig

from nanovllm.models.decoder import DecoderForCausalLM, DecoderOptions


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def options(cls, config: PretrainedConfig) -> DecoderOptions:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return DecoderOptions(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
        )
