"""The Hugging Face transformers side of the throughput comparison, on exactly nanovllm's weights.

- `build_hf_model`: transformers' model for the same checkpoint; for a preset (random weights) the same
  tensors nanovllm loads, drawn by `iter_random_weights` with the same seed on the same device, in the
  Hugging Face checkpoint layout (separate q/k/v and gate/up, which nanovllm packs when loading).
- `run_continuous_batching`: transformers' continuous batching (`init_continuous_batching`, one
  `add_request` per request with its own max_new_tokens, results collected until done or a time cap).
- `run_static_generate`: plain `model.generate` on a left-padded batch (static batching).
- `paged|torch_varlen`: a paged attention function for continuous batching, registered through
  transformers' `AttentionInterface`, that runs PyTorch's own FlashAttention-2 (`varlen_attn`). The GPU
  machine has no flash-attn package, so without it transformers falls back to `paged|sdpa`, which
  attends every query of a step to the keys of every request in the step under a dense mask.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from typing import Any

import torch
import torch.nn.functional as F

from nanovllm.benchmark.common import Skipped, Workload, memory_stats, now, reset_peak_memory
from nanovllm.config import Config
from nanovllm.models import get_model_class
from nanovllm.utils.loader import iter_random_weights

VARLEN_ATTENTION = "paged|torch_varlen"
CPU_CACHE_BUDGET_BYTES = 1 << 30  # transformers sizes its CPU cache with psutil, which may be absent

# The settings `--hf-mode tuned` tries, in order; the fastest that finishes is reported as "tuned".
# Each is a ContinuousBatchingConfig plus an optional attn_implementation.
TUNED_CANDIDATES: dict[str, dict[str, Any]] = {
    # PyTorch's FlashAttention-2 instead of the dense-mask SDPA path; no CUDA graphs.
    "varlen": {"attn_implementation": VARLEN_ATTENTION, "use_cuda_graph": False, "use_async_batching": False},
    # ... with CUDA graphs and async batching: transformers' own choice for mask-free attention.
    "varlen-graphs-async": {
        "attn_implementation": VARLEN_ATTENTION,
        "use_cuda_graph": True,
        "use_async_batching": True,
    },
    # ... with async batching only (double-buffered inputs: the host prepares step n+1 during step n).
    "varlen-async": {
        "attn_implementation": VARLEN_ATTENTION,
        "use_cuda_graph": False,
        "use_async_batching": True,
    },
    # Stock transformers only: the SDPA path with CUDA graphs and async batching forced on.
    "sdpa-graphs-async": {
        "attn_implementation": "paged|sdpa",
        "use_cuda_graph": True,
        "use_async_batching": True,
    },
}


# ---- the model ---------------------------------------------------------------------------------------


def build_hf_model(config: Config) -> torch.nn.Module:
    """transformers' CausalLM with nanovllm's weights, dtype and device (attention: sdpa)."""
    from transformers import AutoModelForCausalLM

    dtype, device = config.torch_dtype, config.torch_device
    if config.model_path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            config.model_path, dtype=dtype, attn_implementation="sdpa"
        )
        return model.to(device).eval()
    hf_config = copy.deepcopy(config.hf_config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    params = dict(model.named_parameters())  # a tied lm_head appears once, as the embedding
    shapes = get_model_class(hf_config).checkpoint_shapes(hf_config)
    loaded = set()
    with torch.no_grad():
        for name, tensor in iter_random_weights(shapes, config.seed, device):
            if name not in params:
                raise ValueError(f"transformers' model has no parameter {name!r}")
            params[name].copy_(tensor)
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"weights not set in transformers' model: {missing[:5]}")
    return model.eval()


def _sampling_config(max_new_tokens: int, temperature: float, **extra):
    from transformers import GenerationConfig

    # top_k=0 / top_p=1: plain temperature sampling, as nanovllm's SamplingParams(temperature=...) does.
    return GenerationConfig(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=0,
        **extra,
    )


# ---- continuous batching -----------------------------------------------------------------------------


def run_continuous_batching(
    model: torch.nn.Module,
    workload: Workload,
    settings: dict[str, Any],
    temperature: float,
    time_cap_s: float,
    warmup: Workload | None = None,
) -> dict[str, Any]:
    """Serve `workload` with transformers' continuous batching under `settings` (ContinuousBatchingConfig
    fields plus an optional attn_implementation); EOS is disabled, as with ignore_eos. Returns exact
    token counts of the requests that finished; if time_cap_s runs out first, the rest are dropped
    and the result says timed_out."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    settings = dict(settings)
    if settings.get("use_async_batching") and model.device.type != "cuda":
        raise Skipped("transformers' async batching needs CUDA")
    attn = settings.pop("attn_implementation", None)
    original_attn = model.config._attn_implementation
    if attn == VARLEN_ATTENTION:
        register_varlen_attention()
        check_varlen_attention(model.device, model.dtype)
        settings.setdefault("max_blocks_per_request", 0)  # its decode fast path needs flash_attn_with_kvcache
    if attn is not None:
        model.set_attn_implementation(attn)
    gen_config = _sampling_config(max(workload.max_tokens), temperature, eos_token_id=-1)
    hints = WorkloadHints(  # what generate_batch() derives from its inputs
        max_prompt_length=max(map(len, workload.prompts)),
        max_generated_length=max(workload.max_tokens),
        num_requests=workload.num_requests,
    )
    manager = None
    start_init = time.perf_counter()
    try:
        with _cpu_cache_budget(model.device):
            manager = model.init_continuous_batching(
                generation_config=gen_config,
                continuous_batching_config=ContinuousBatchingConfig(**settings),
                workload_hints=hints,
            )
            manager.warmup()  # allocates the cache, captures graphs if enabled (as generate_batch does)
        attn_used = model.config._attn_implementation  # after the manager's switch to a paged one
        manager.start()
        if warmup is not None:  # first kernel launches, lazy inits: outside the timed run
            _serve(manager, warmup, time.perf_counter() + max(time_cap_s, 60))
        cb = manager.continuous_batching_config
        cache = manager.batch_processor.cache
        init_s = time.perf_counter() - start_init
        reset_peak_memory()
        start = now()
        outputs, timed_out = _serve(manager, workload, start + time_cap_s)
        elapsed = now() - start
        mem = memory_stats()
    finally:
        if manager is not None:
            manager.stop(block=True, timeout=120, hard_stop=True)
            manager.destroy()
        model.set_attn_implementation(original_attn)
    failed = [o for o in outputs if o.error is not None]
    if failed and len(failed) == len(outputs):
        raise RuntimeError(f"every request failed; first error: {failed[0].error}")
    num_tokens = sum(len(o.generated_tokens) for o in outputs if o.error is None)
    return {
        "num_requests": workload.num_requests,
        "num_finished": len(outputs) - len(failed),
        "num_failed": len(failed),
        "first_error": failed[0].error if failed else None,
        "timed_out": timed_out,
        "time_cap_s": time_cap_s,
        "expected_output_tokens": workload.num_output_tokens,
        "output_tokens": num_tokens,
        "seconds": elapsed,
        "tok_per_s": num_tokens / elapsed,
        "init_seconds": init_s,
        "settings": {"attn_implementation": attn or "default (paged|<model's>)", **settings},
        "resolved": {
            "attn_implementation": attn_used,
            "block_size": cache.block_size,
            "num_blocks": cache.num_blocks,
            "max_batch_tokens": cache.max_batch_tokens,
            "max_requests_per_batch": cb.max_requests_per_batch,
            "use_cuda_graph": list(cb.use_cuda_graph) if cb.use_cuda_graph is not None else None,
            "use_async_batching": cb.use_async_batching,
            "max_blocks_per_request": cb.max_blocks_per_request,
        },
        "kv_cache_tokens": cache.num_blocks * cache.block_size,
        **mem,
    }


def _serve(manager, workload: Workload, deadline: float) -> tuple[list, bool]:
    """Submit every request, collect the finished outputs; stop waiting at the deadline."""
    ids = set()
    for prompt, max_tokens in zip(workload.prompts, workload.max_tokens):
        rid = manager.add_request(prompt, max_new_tokens=max_tokens, eos_token_id=-1)
        if rid is None:
            raise RuntimeError("transformers' continuous batching refused a request (its loop stopped?)")
        ids.add(rid)
    outputs = {}
    while len(outputs) < len(ids):
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return list(outputs.values()), True
        result = manager.get_result(timeout=min(remaining, 1.0))
        if result is not None and result.request_id in ids and result.is_finished():
            outputs[result.request_id] = result
        elif result is None and not manager.is_running():
            error = manager.background_thread_status.fatal_error
            raise RuntimeError(f"transformers' continuous batching loop stopped: {error!r}")
    return list(outputs.values()), False


@contextlib.contextmanager
def _cpu_cache_budget(device: torch.device):
    """On the CPU, transformers asks psutil how much memory its cache may take (0 without psutil):
    give it a fixed budget instead. Changes nothing on a GPU."""
    if device.type != "cpu":
        yield
        return
    from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler

    original = PagedAttentionMemoryHandler.get_available_memory
    PagedAttentionMemoryHandler.get_available_memory = lambda self: CPU_CACHE_BUDGET_BYTES
    try:
        yield
    finally:
        PagedAttentionMemoryHandler.get_available_memory = original


# ---- static batching ---------------------------------------------------------------------------------


@torch.no_grad()
def run_static_generate(
    model: torch.nn.Module, workload: Workload, temperature: float, time_cap_s: float
) -> dict[str, Any]:
    """`model.generate` on the whole batch, left-padded. Static batching runs every row to the longest
    max_tokens: `useful_tokens` counts each request's own max_tokens, `generated_tokens` every row."""
    device = model.device
    width = max(map(len, workload.prompts))
    input_ids = torch.zeros(workload.num_requests, width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(workload.prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention_mask[i, width - len(p) :] = 1
    max_new = max(workload.max_tokens)
    # min_new_tokens = max_new_tokens: EOS never ends a row early (ignore_eos); max_time caps the run.
    gen_config = _sampling_config(max_new, temperature, min_new_tokens=max_new, max_time=time_cap_s)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    model.generate(
        input_ids[:, -8:],
        attention_mask=attention_mask[:, -8:],
        generation_config=_sampling_config(2, temperature),
    )  # warm-up
    reset_peak_memory()
    start = now()
    out = model.generate(input_ids, attention_mask=attention_mask, generation_config=gen_config)
    elapsed = now() - start
    steps = out.shape[1] - width
    useful = sum(min(m, steps) for m in workload.max_tokens)
    return {
        "num_requests": workload.num_requests,
        "padded_prompt_len": width,
        "max_new_tokens": max_new,
        "steps_done": steps,
        "timed_out": steps < max_new,
        "time_cap_s": time_cap_s,
        "expected_output_tokens": workload.num_output_tokens,
        "useful_tokens": useful,
        "generated_tokens": steps * workload.num_requests,
        "seconds": elapsed,
        "tok_per_s": useful / elapsed,
        "generated_tok_per_s": steps * workload.num_requests / elapsed,
        **memory_stats(),
    }


# ---- paged attention on PyTorch's FlashAttention-2 ---------------------------------------------------


def _load_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "enable_gqa" in inspect.signature(varlen_attn).parameters:
        return lambda *args, **kwargs: varlen_attn(*args, **kwargs, enable_gqa=True)
    return varlen_attn


def causal_varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale) -> torch.Tensor:
    """Per-sequence SDPA; causal with the queries aligned to the end of their keys (a cached prefix).
    q: [num_q_tokens, num_heads, head_dim]; k, v: [num_k_tokens, num_kv_heads, head_dim]."""
    out = torch.zeros_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if q1 == q0:
            continue
        mask = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool, device=q.device).tril(k1 - k0 - (q1 - q0))
        o = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1),
            k[k0:k1].transpose(0, 1),
            v[k0:k1].transpose(0, 1),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[q0:q1] = o.transpose(0, 1)
    return out


def causal_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q: int, max_k: int, scale: float):
    varlen_attn = _load_varlen_attn() if q.is_cuda else None
    if varlen_attn is None:
        return causal_varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
    return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale=scale, window_size=(-1, 0))


def varlen_paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, num_heads, num_q_tokens, head_dim]
    key: torch.Tensor,  # [1, num_kv_heads, num_q_tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache=None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | dict | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | dict | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' `paged|flash_attention_2` varlen path, with PyTorch's varlen_attn as the kernel."""
    if cache is None:
        raise ValueError(f"{VARLEN_ATTENTION} runs only inside transformers' continuous batching")
    if getattr(module, "sliding_window", None):
        raise ValueError(f"{VARLEN_ATTENTION} does not implement sliding-window attention")
    # k, v: [num_k_tokens, num_kv_heads, head_dim], each request's cached + new tokens in cu_seq_lens_k order
    k, v = cache.update(
        key_states=key,
        value_states=value,
        layer_idx=module.layer_idx,
        read_index=kwargs["read_index"],
        write_index=kwargs["write_index"],
    )
    if isinstance(cu_seq_lens_k, dict):
        cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k["full_attention"], max_seqlen_k["full_attention"]
    q = query.transpose(1, 2).squeeze(0)  # [num_q_tokens, num_heads, head_dim]
    out = causal_varlen_attention(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        cu_seq_lens_q.to(torch.int32),
        cu_seq_lens_k.to(torch.int32),
        max_seqlen_q,
        max_seqlen_k,
        module.scaling,
    )
    return out, None  # [num_q_tokens, num_heads, head_dim]; the caller reshapes to [1, num_q_tokens, -1]


def register_varlen_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_paged_attention_forward)


def check_varlen_attention(device: torch.device, dtype: torch.dtype) -> None:
    """Compare the kernel with the reference on a small batch (with cached prefixes) before trusting
    its timing: raises if they disagree."""
    if device.type != "cuda":
        return  # the CPU runs the reference itself
    gen = torch.Generator(device=device).manual_seed(0)
    q_lens, k_lens = [5, 1, 37, 1], [5, 20, 70, 300]
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(k_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), 16, 128, generator=gen, device=device, dtype=dtype)
    k = torch.randn(sum(k_lens), 8, 128, generator=gen, device=device, dtype=dtype)
    v = torch.randn(sum(k_lens), 8, 128, generator=gen, device=device, dtype=dtype)
    got = causal_varlen_attention(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), 128**-0.5)
    ref = causal_varlen_attention_reference(q.float(), k.float(), v.float(), cu_q, cu_k, 128**-0.5)
    err = (got.float() - ref).abs().max().item()
    if not err < 5e-2:
        raise RuntimeError(f"varlen_attn disagrees with the SDPA reference: max |difference| {err:.3g}")
