"""Mistral: Llama without biases, plus sliding-window attention, which we do not implement yet. A window
changes nothing while no sequence is longer than it, so such a checkpoint runs exactly when
max_model_len <= sliding_window and is refused otherwise."""

from transformers import PretrainedConfig

from nanovllm.models.decoder import DecoderForCausalLM, check_sliding_window


class MistralForCausalLM(DecoderForCausalLM):
    @classmethod
    def check_config(cls, config: PretrainedConfig, max_model_len: int) -> None:
        super().check_config(config, max_model_len)
        check_sliding_window(config, max_model_len, every_layer=True)
