"""Engine configuration: the user's arguments, validated and resolved once, then frozen.

`Config` holds what the user passed plus the values derived from the checkpoint (architecture, dtype,
max_model_len, EOS ids). Values only known after the model is loaded (number of KV blocks) are
computed by the model runner and passed on, never written back here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from nanovllm.layers.pooler import PoolerConfig, pooler_config
from nanovllm.reasoning import think_tags

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_MODEL = "qwen3-0.6b"  # the preset the CLI and the benchmarks run when no model is given
MAX_MODEL_LEN_CAP = 16384  # default cap on max_model_len when the checkpoint allows more
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)
RUNNERS = ("auto", "generate", "pooling")  # vLLM's --runner (no "draft")
SCHEDULING_POLICIES = ("fcfs", "priority")  # the waiting queue's order: engine/request_queue.py
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@dataclass(frozen=True)
class Config:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    num_kvcache_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    async_scheduling: bool = True  # schedule step n+1 while the device(s) run step n
    # "fcfs": arrival order; "priority": each request's priority (lower first), then arrival, and a running
    # request of the lowest priority is the one preempted (docs/scheduling.md#priority-scheduling)
    scheduling_policy: str = "fcfs"
    tensor_parallel_size: int = 1
    disable_custom_all_reduce: bool = False  # True: every TP all-reduce through NCCL (not peer memory)
    seed: int | None = 0  # None: 0, as vLLM V1 takes it
    kernel_backend: str = "auto"  # auto | triton | torch (torch: the reference ops everywhere)
    # Where LLM.generate's default SamplingParams come from (vLLM's): "auto" the checkpoint's
    # generation_config.json, "vllm" SamplingParams' own defaults, or a folder holding one.
    generation_config: str = "auto"
    # A reasoning model's parser (vLLM's --reasoning-parser, nanovllm/reasoning.py: "qwen3", "deepseek_r1"):
    # a structured output then applies only after the thinking's end tag (docs/structured_outputs.md)
    reasoning_parser: str | None = None
    # vLLM's --runner: "generate" (text), "pooling" (embeddings only: LLM.embed, /v1/embeddings; no LM head
    # is loaded), or "auto": pooling for a sentence-transformers checkpoint (modules.json) or a bare `*Model`
    # architecture (e.g. MistralModel), else generate. Embeddings work under "generate" too
    # (docs/embeddings.md).
    runner: str = "auto"
    # vLLM's pooler config: {"pooling_type": "LAST" | "MEAN" | "CLS", "normalize": bool}, over the
    # checkpoint's sentence-transformers files, over LAST + normalize (layers/pooler.py)
    pooler_config: dict | None = None
    # Resolved in __post_init__ from the checkpoint; not user arguments.
    hf_config: PretrainedConfig = field(init=False, repr=False)
    model_path: Path | None = field(init=False)  # None: a preset with random weights
    tokenizer_path: Path | None = field(init=False)
    torch_dtype: torch.dtype = field(init=False)
    torch_device: torch.device = field(init=False)
    # The EOS: the tokenizer's eos_token_id, as vLLM's (config.json's, without a tokenizer). A request it
    # ends reports stop_reason None.
    eos_token_id: int | None = field(init=False)
    # Every id that ends a request unless ignore_eos, eos_token_id first: it and generation_config.json's
    # eos_token_id (config.json's without that file). A request ended by one of the others reports it as
    # stop_reason, as vLLM adds them to its stop_token_ids. While output < min_tokens all are banned.
    eos_token_ids: tuple[int, ...] = field(init=False)
    # The SamplingParams fields generation_config sets (e.g. Qwen3's temperature 0.6, top_k 20, top_p 0.95).
    default_sampling_params: dict = field(init=False)
    runner_type: str = field(init=False)  # "generate" | "pooling": `runner` resolved
    pooler: PoolerConfig = field(init=False)  # how embeddings are pooled (layers/pooler.py)

    @property
    def max_tokens_cap(self) -> int | None:
        """The server's limit on a request's max_tokens (vLLM's override_max_tokens): a generation_config
        folder's max_new_tokens. With "auto" the checkpoint's max_new_tokens is only the default of a
        request that gives none."""
        if self.generation_config in ("auto", "vllm"):
            return None
        return self.default_sampling_params.get("max_tokens")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> Config:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; valid ones: {sorted(names - {'model'})}")
        return cls(model=model, **kwargs)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        _check_int(self, "max_num_seqs", 1)
        _check_int(self, "tensor_parallel_size", 1)
        if self.max_num_batched_tokens is not None:
            _check_int(self, "max_num_batched_tokens", 1)
        if self.num_kvcache_blocks is not None:
            _check_int(self, "num_kvcache_blocks", 1)
        if self.seed is None:
            set_("seed", 0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must be an int in [-2**63, 2**64) (torch's range), got {self.seed!r}")
        if self.block_size is not None and self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {self.block_size!r}")
        if (
            not isinstance(self.gpu_memory_utilization, float | int)
            or not 0 < self.gpu_memory_utilization <= 1
        ):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.kernel_backend not in ("auto", "triton", "torch"):
            raise ValueError(
                f"kernel_backend must be 'auto', 'triton' or 'torch', got {self.kernel_backend!r}"
            )
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}"
            )
        if self.reasoning_parser is not None:
            think_tags(self.reasoning_parser)  # (ValueError naming the known parsers)
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        set_("torch_device", _resolve_device(self.device))

        model_path, hf_config = _load_hf_config(self.model)
        set_("model_path", model_path)
        set_("hf_config", hf_config)
        tok = model_path if model_path is not None else PRESET_DIR / "tokenizer"
        set_(
            "tokenizer_path",
            tok if (tok / "tokenizer.json").exists() or (tok / "tokenizer.model").exists() else None,
        )
        set_("torch_dtype", self._resolve_dtype())
        folder = _generation_config_folder(self.generation_config, model_path)
        generation = _read_generation_config(folder)  # (read once: the defaults and the EOS ids)
        set_("default_sampling_params", _default_sampling_params(self.generation_config, folder, generation))
        eos = _eos_token_id(hf_config, self.tokenizer_path)
        set_("eos_token_id", eos)
        set_("eos_token_ids", _eos_token_ids(eos, hf_config, generation))

        # late: models and layers import kernels and torch ops
        from nanovllm.layers.rotary_embedding import rope_length_limit
        from nanovllm.models import get_model_class

        max_pos = getattr(hf_config, "max_position_embeddings", None) or MAX_MODEL_LEN_CAP
        limit = rope_length_limit(hf_config, max_pos)
        if self.max_model_len is None:
            # Not vLLM's default (the whole rope-scaled length): a user who did not ask for a long context
            # keeps the memory and kernel choices of max_position_embeddings (see docs/models.md).
            set_("max_model_len", min(max_pos, limit.max_len, MAX_MODEL_LEN_CAP))
        else:
            _check_int(self, "max_model_len", 2)
            if self.max_model_len > limit.max_len:
                raise ValueError(
                    f"max_model_len={self.max_model_len} exceeds {limit.max_len}, the longest this model "
                    f"allows: {limit.reason}"
                )

        get_model_class(hf_config).check_config(hf_config, self.max_model_len)
        set_("runner_type", _runner_type(self.runner, hf_config, model_path))
        set_("pooler", pooler_config(model_path, self.pooler_config))
        if self.block_size is None:
            set_("block_size", 16)
        if self.max_num_batched_tokens is None:
            set_("max_num_batched_tokens", max(16384, self.max_num_seqs))
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running request can decode each step"
            )
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        tp = self.tensor_parallel_size
        if hf_config.num_attention_heads % tp or (num_kv_heads % tp and tp % num_kv_heads):
            raise ValueError(
                f"tensor_parallel_size={tp} must divide num_attention_heads={hf_config.num_attention_heads} "
                f"and divide or be a multiple of num_key_value_heads={num_kv_heads}"
            )

    def _resolve_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.torch_device.type == "cpu":
            return torch.float32
        ckpt = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        if isinstance(ckpt, str):
            ckpt = _DTYPES.get(ckpt)
        return ckpt if ckpt in (torch.bfloat16, torch.float16) else torch.bfloat16

    @property
    def is_preset(self) -> bool:
        return self.model_path is None


def _runner_type(runner: str, hf_config: PretrainedConfig, model_path: Path | None) -> str:
    """`runner` resolved: "auto" is "pooling" for a sentence-transformers checkpoint or a bare `*Model`
    architecture (no LM head: MistralModel, Qwen3Model), else "generate"."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    if runner != "auto":
        return runner
    archs = getattr(hf_config, "architectures", None) or []
    bare = bool(archs) and archs[0].endswith("Model")
    sentence_transformers = model_path is not None and (model_path / "modules.json").exists()
    return "pooling" if bare or sentence_transformers else "generate"


def _check_int(cfg: Config, name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def _load_hf_config(model: str) -> tuple[Path | None, PretrainedConfig]:
    """A checkpoint directory or a preset name -> (path or None, the Hugging Face config)."""
    if not isinstance(model, str | os.PathLike) or not str(model):
        raise ValueError(f"model must be a checkpoint directory or a preset name, got {model!r}")
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model directory {str(path)!r} has no config.json")
        try:
            return path, AutoConfig.from_pretrained(path)
        except Exception as e:  # transformers raises many kinds; the user needs the reason
            raise ValueError(f"cannot read the config in {str(path)!r}: {e}") from e
    preset = PRESET_DIR / f"{model}.json"
    if preset.exists():
        data = json.loads(preset.read_text())
        data.pop("_comment", None)
        return None, AutoConfig.for_model(data.pop("model_type"), **data)
    raise ValueError(
        f"model {str(model)!r} is neither a checkpoint directory nor a preset; presets (random weights): "
        f"{preset_names()}"
    )


def _generation_config_folder(generation_config: str, model_path: Path | None) -> Path | None:
    """Where the generation_config.json vLLM reads is: the checkpoint's for "auto" and "vllm" (the latter
    for its EOS ids only), else the given folder."""
    if not isinstance(generation_config, str | os.PathLike):
        raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder, got {generation_config!r}")
    return model_path if generation_config in ("auto", "vllm") else Path(generation_config)


def _read_generation_config(folder: Path | None) -> dict | None:
    """The generation_config.json in `folder`, or None where there is none."""
    file = folder / "generation_config.json" if folder is not None else None
    return json.loads(file.read_text()) if file is not None and file.exists() else None


def _eos_token_id(hf_config: PretrainedConfig, tokenizer_path: Path | None) -> int | None:
    if tokenizer_path is not None:
        from nanovllm.utils.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer_path).eos_token_id
    eos = getattr(hf_config, "eos_token_id", None)
    return eos if isinstance(eos, int) else None


def _eos_token_ids(eos: int | None, hf_config: PretrainedConfig, generation: dict | None) -> tuple[int, ...]:
    """eos, then the generation config's eos ids: those of the generation_config.json vLLM reads
    (`generation`), or config.json's where there is none."""
    if generation is not None:
        value = generation.get("eos_token_id")
    else:
        value = getattr(hf_config, "eos_token_id", None)
    ids = [eos] if eos is not None else []
    for v in value if isinstance(value, list | tuple) else [value]:
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return tuple(ids)


# generation_config.json keys vLLM takes as default SamplingParams fields (HF's max_new_tokens is max_tokens).
_GENERATION_DEFAULTS = {
    "repetition_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "max_new_tokens": "max_tokens",
}


def _default_sampling_params(generation_config: str, folder: Path | None, data: dict | None) -> dict:
    """The SamplingParams fields a generation_config.json (`data`, read from `folder`) sets, as vLLM's
    ModelConfig.get_diff_sampling_param reads them: "auto" the checkpoint's file (none: nothing), "vllm"
    nothing, else a folder that must hold one."""
    if generation_config == "vllm":
        return {}
    if data is None:
        if generation_config == "auto":
            return {}
        raise ValueError(
            f"generation_config must be 'auto', 'vllm' or a folder holding a generation_config.json, "
            f"got {generation_config!r}"
        )
    defaults = {name: data[key] for key, name in _GENERATION_DEFAULTS.items() if data.get(key) is not None}
    from nanovllm.sampling_params import SamplingParams  # (checked now: a bad file fails at LLM(...))

    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"{folder / 'generation_config.json'}: {e}") from None
    return defaults
