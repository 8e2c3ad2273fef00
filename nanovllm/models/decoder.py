"""The Llama-family decoder shared by every supported architecture.

Pre-norm residual blocks of GQA attention (RoPE, optional q/k RMSNorm, optional biases) and a
SwiGLU MLP. An architecture file only states what differs (`DecoderOptions`). Module and parameter
names follow the Hugging Face checkpoints, so weights load by name; q/k/v and gate/up are packed
into single matmuls (`packed_modules_mapping`).

The two RMSNorms of a layer cost no kernel of their own: once loaded, their weights are folded into the
columns of the matmul that follows each (`fold_norm_weights`), the matmul reads the un-normalized residual
stream, and the kernel after it scales each row by the stream row's rsqrt(mean(x**2) + eps). The residual
adds happen inside o_proj and down_proj. See docs/model.md, "The norms folded into the matmuls".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from nanovllm.kernels.backend import use_triton
from nanovllm.kernels.gemv import GEMV_MAX_K, GEMV_MAX_ROWS, gemv
from nanovllm.layers.attention import Attention, AttentionMetadata
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, linear
from nanovllm.layers.rotary_embedding import get_rope, rope_parameters_from_config
from nanovllm.utils.distributed import get_tp_size


@dataclass(frozen=True)
class DecoderOptions:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_kv_heads_of(config: PretrainedConfig) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def check_sliding_window(config: PretrainedConfig, max_model_len: int, every_layer: bool) -> None:
    """Raise ValueError when some layer would attend through a window shorter than max_model_len.

    transformers lets query i see key j when i - j < sliding_window, so a window of max_model_len or more
    is plain causal attention. every_layer: the window applies to all layers (Mistral); else only to the
    "sliding_attention" entries of `layer_types` (Qwen2/3, whose configs also set sliding_window to None
    when use_sliding_window is off)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return
    if not every_layer and "sliding_attention" not in (getattr(config, "layer_types", None) or []):
        return
    if max_model_len > window:
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        raise ValueError(
            f"{archs[0]} uses sliding-window attention (sliding_window={window}), which nanovllm does not "
            f"support yet; it runs exactly only with max_model_len <= sliding_window, got "
            f"max_model_len={max_model_len}. Pass max_model_len={window} or less."
        )


class DecoderAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, opts: DecoderOptions, max_position: int):
        super().__init__()
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            head_dim,
            config.num_attention_heads,
            num_kv_heads_of(config),
            bias=opts.qkv_bias,
        )
        o_size = config.num_attention_heads * head_dim
        self.o_proj = RowParallelLinear(o_size, config.hidden_size, bias=opts.o_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # per rank
        self.head_dim = head_dim
        self.rotary_emb = get_rope(head_dim, max_position, rope_parameters_from_config(config))
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, scale=head_dim**-0.5)
        if opts.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.qk_norm = opts.qk_norm

    def forward(
        self, positions: torch.Tensor, stream: torch.Tensor, eps: float, meta: AttentionMetadata
    ) -> torch.Tensor:
        """stream + attention(rmsnorm(stream)); stream: [num_tokens, hidden_size]. The norm is folded into
        qkv_proj, so qkv_proj reads the stream itself and the kernel after it applies each row's scale."""
        qkv = linear(stream, self.qkv_proj.weight)  # [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]
        out = self.attend(positions, qkv, meta, input_norm=(stream, eps, self.qkv_proj.bias))
        return self.o_proj.forward_add(out, stream)

    def attend(
        self,
        positions: torch.Tensor,
        qkv: torch.Tensor,
        meta: AttentionMetadata,
        input_norm: tuple[torch.Tensor, float, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Attention from the qkv projection: [num_tokens, num_heads * head_dim], o_proj's input.
        input_norm: see Attention.forward."""
        qk_norm = (self.q_norm, self.k_norm) if self.qk_norm else None
        out = self.attn(qkv, positions, meta, self.rotary_emb, qk_norm, input_norm)  # [T, heads, head_dim]
        return out.flatten(1)


class DecoderMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, opts: DecoderOptions):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=opts.mlp_bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=opts.mlp_bias)

    def forward(self, stream: torch.Tensor, eps: float) -> torch.Tensor:
        """stream + mlp(rmsnorm(stream)), the norm folded into gate_up_proj; SiLU(gate) * up in between."""
        act = self.gate_up_proj.forward_silu_mul(stream, rms_norm_eps=eps)  # [num_tokens, intermediate / tp]
        return self.down_proj.forward_add(act, stream)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, opts: DecoderOptions, max_position: int):
        super().__init__()
        self.self_attn = DecoderAttention(config, opts, max_position)
        self.mlp = DecoderMLP(config, opts)
        # Their weights move into qkv_proj / gate_up_proj once loaded (fold_norm_weights); they stay as
        # modules so that checkpoints load by name, and hold ones after the fold.
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norms_folded = False
        # Small decode batches run the adds, norms and SiLU inside the matmuls (kernels/gemv.py). Not under
        # TP: there o_proj and down_proj all-reduce their partial sums first.
        o_proj_k = config.num_attention_heads * head_dim_of(config)
        max_k = max(config.hidden_size, config.intermediate_size, o_proj_k)
        self.gemv_decode = get_tp_size() == 1 and max_k <= GEMV_MAX_K

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The residual stream is hidden + residual (residual None: hidden alone). This path keeps it whole in
        # `hidden` and returns residual None; the GEMV path adds the two inside its matmuls instead. The
        # stream may be updated in place: the tensor passed as hidden may be overwritten.
        if self.gemv_decode and meta.is_decode and hidden.shape[0] <= GEMV_MAX_ROWS and use_triton(hidden):
            return self._forward_gemv(positions, hidden, residual, meta)
        if not self.norms_folded:  # this path ignores the norms' weights: they must be in the matmuls
            raise RuntimeError("DecoderLayer.fold_norm_weights() must run once the weights are loaded")
        stream = hidden if residual is None else hidden + residual  # [num_tokens, hidden_size]
        stream = self.self_attn(positions, stream, self.input_layernorm.eps, meta)
        return self.mlp(stream, self.post_attention_layernorm.eps), None

    @torch.no_grad()
    def fold_norm_weights(self) -> None:
        """Move the two RMSNorm weights into the columns of the matmul after each, W[:, i] *= w[i] (rounded
        once from fp32), and set the norms' weights to one: rmsnorm(x) @ W.T is then the norm without its
        weight, then the folded matmul. Once, after the weights are loaded
        (DecoderForCausalLM.finish_loading); forward relies on it."""
        for norm, proj in (
            (self.input_layernorm, self.self_attn.qkv_proj),
            (self.post_attention_layernorm, self.mlp.gate_up_proj),
        ):
            proj.weight.copy_(proj.weight.float() * norm.weight.float())
            norm.weight.fill_(1)
        self.norms_folded = True

    def _forward_gemv(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Same ops as forward in six or seven kernels: qkv (add + norm inside), q/k-norm + rope + KV store,
        # attention (split, and reduce when split), o_proj, gate_up (add + norm, SiLU-and-mul inside), down.
        # The norms' weights are ones here (folded into the matmuls): the kernels only scale by the rstd.
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv_proj, gate_up_proj = attn.qkv_proj, mlp.gate_up_proj
        # qkv: [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]; residual, hidden: [num_tokens, hidden]
        qkv, residual = gemv(hidden, qkv_proj.weight, qkv_proj.bias, residual, norm1.weight, norm1.eps)
        hidden, _ = gemv(attn.attend(positions, qkv, meta), attn.o_proj.weight, attn.o_proj.bias)
        act, residual = gemv(
            hidden, gate_up_proj.weight, gate_up_proj.bias, residual, norm2.weight, norm2.eps, silu_mul=True
        )  # [num_tokens, intermediate_size]
        hidden, _ = gemv(act, mlp.down_proj.weight, mlp.down_proj.bias)
        return hidden, residual


class DecoderModel(nn.Module):
    def __init__(self, config: PretrainedConfig, opts: DecoderOptions, max_position: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, opts, max_position) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None  # [num_tokens, hidden_size]
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        return self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]


class DecoderForCausalLM(nn.Module):
    """Base of every registered architecture; subclasses set `options(config)`."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    @classmethod
    def options(cls, config: PretrainedConfig) -> DecoderOptions:
        return DecoderOptions()

    @classmethod
    def check_config(cls, config: PretrainedConfig, max_model_len: int) -> None:
        """Raise ValueError for a config this implementation cannot run exactly. By default: an activation
        other than SiLU, partial rotary embeddings, and layers marked "sliding_attention" (Qwen2/3 with
        use_sliding_window on) beyond their window. Subclasses that add checks call this first."""
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        hidden_act = getattr(config, "hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):  # transformers' ACT2FN: both are SiLU
            raise ValueError(f"{archs[0]}: the MLP is SwiGLU (SiLU) only, got hidden_act={hidden_act!r}")
        # transformers' Llama / Qwen2 / Qwen3 / Mistral rotate the whole head with the default rope (and
        # cannot run partial rotary with the scaled ones): a partial rotation here would not match them.
        partial = rope_parameters_from_config(config).get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ValueError(
                f"{archs[0]}: partial rotary embeddings are not supported, "
                f"got partial_rotary_factor={partial}"
            )
        check_sliding_window(config, max_model_len, every_layer=False)

    def __init__(self, config: PretrainedConfig, max_position: int, lm_head: bool = True):
        """lm_head False (runner "pooling": embeddings only): no LM head; a checkpoint's is skipped."""
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, self.options(config), max_position)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size) if lm_head else None
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings and lm_head:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta)  # [num_tokens, hidden_size]

    def finish_loading(self) -> None:
        """After load_weights: each layer's norms into its matmuls (DecoderLayer.fold_norm_weights)."""
        for layer in self.model.layers:
            layer.fold_norm_weights()

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.lm_head(hidden, out)  # [num_seqs, vocab_size] (None on ranks other than 0)

    @classmethod
    def checkpoint_shapes(cls, config: PretrainedConfig, lm_head: bool = True) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors of a Hugging Face checkpoint of this architecture
        (used to generate random weights for presets through the normal loading path)."""
        opts, hd = cls.options(config), head_dim_of(config)
        h, inter, nh, nkv = (
            config.hidden_size,
            config.intermediate_size,
            config.num_attention_heads,
            num_kv_heads_of(config),
        )
        shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
        if lm_head and not getattr(config, "tie_word_embeddings", False):
            shapes["lm_head.weight"] = (config.vocab_size, h)
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            for name, out in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
                shapes[p + f"self_attn.{name}.weight"] = (out, h)
                if opts.qkv_bias:
                    shapes[p + f"self_attn.{name}.bias"] = (out,)
            shapes[p + "self_attn.o_proj.weight"] = (h, nh * hd)
            if opts.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            if opts.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = shapes[p + "self_attn.k_norm.weight"] = (hd,)
            for name, shape in (
                ("gate_proj", (inter, h)),
                ("up_proj", (inter, h)),
                ("down_proj", (h, inter)),
            ):
                shapes[p + f"mlp.{name}.weight"] = shape
                if opts.mlp_bias:
                    shapes[p + f"mlp.{name}.bias"] = shape[:1]
            shapes[p + "input_layernorm.weight"] = shapes[p + "post_attention_layernorm.weight"] = (h,)
        return shapes
