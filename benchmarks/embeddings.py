"""Embedding throughput: nanovllm's `LLM.embed` (runner "pooling") against transformers' base model on the
same weights, in the same run, with the compute floor beside them (docs/embeddings.md).

Workload: `--num-prompts` prompts of random token ids (`random.seed(0)`; lengths `randint(--min-len,
--max-len)`, ids `randint(0, 10000)`), each embedded once (last-token pooling, normalized). nanovllm runs them
all at once (continuous batching, chunked prefill); transformers runs them as sentence-transformers does:
sorted by length, in batches of `--hf-batch-size`, right-padded with an attention mask, sdpa attention, the
last real token's hidden state normalized. Two timed runs each after a warm-up; the second counts. The two
sides' vectors are compared (cosine) so that the speed is of the same answer.

    PYTHONPATH=. python benchmarks/embeddings.py [--model qwen3-0.6b --num-prompts 1024 --out DIR]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from nanovllm import LLM
from nanovllm.benchmark.common import (
    card_name,
    card_peaks,
    free_device_memory,
    print_table,
    run_info,
    synchronize,
    write_report,
)
from nanovllm.benchmark.hf_baseline import build_hf_model
from nanovllm.benchmark.latency import model_sizes, prefill_flops


def make_prompts(num: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Ids below 10,000 (nano-vllm bench.py's), or the vocabulary's size where it is smaller."""
    rng = random.Random(seed)
    lens = [rng.randint(min_len, max_len) for _ in range(num)]
    top = min(10000, vocab_size - 1)
    return [[rng.randint(0, top) for _ in range(n)] for n in lens]


def run_nanovllm(llm: LLM, prompts: list[list[int]]) -> tuple[float, torch.Tensor]:
    """(seconds, [num_prompts, hidden_size] float32 vectors) of one LLM.embed over every prompt."""
    llm.reset_prefix_cache()  # (random prompts share nothing; each run computes every token)
    synchronize()
    start = time.perf_counter()
    outs = llm.embed(prompts, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, torch.tensor([o.outputs.embedding for o in outs])


@torch.inference_mode()
def run_transformers(model, prompts: list[list[int]], batch_size: int) -> tuple[float, torch.Tensor]:
    """(seconds, vectors in the prompts' order) of transformers' base model, length-sorted padded batches."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    vectors = torch.empty(len(prompts), model.config.hidden_size)
    synchronize()
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for r, i in enumerate(rows):
            ids[r, : len(prompts[i])] = torch.tensor(prompts[i])
            mask[r, : len(prompts[i])] = 1
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        last = hidden[torch.arange(len(rows), device=device), mask.sum(1).to(device) - 1]  # [rows, hidden]
        vectors[rows] = torch.nn.functional.normalize(last.float(), dim=-1).cpu()
    seconds = time.perf_counter() - start
    return seconds, vectors


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b", help="a preset or a checkpoint directory")
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--hf-mode", choices=("on", "none"), default="on")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="folder for the JSON result")
    args = ap.parse_args(argv)
    llm = LLM(args.model, runner="pooling", device=args.device)
    prompts = make_prompts(args.num_prompts, args.min_len, args.max_len, llm.config.hf_config.vocab_size)
    num_tokens = sum(map(len, prompts))
    llm.embed(prompts[:8], use_tqdm=False)  # warm-up
    runs = [run_nanovllm(llm, prompts) for _ in range(2)]
    seconds, ours = runs[-1]
    rows = [["nanovllm", f"{seconds:.3f}", f"{num_tokens / seconds:,.0f}", ""]]
    result = {
        **run_info(),
        "workload": vars(args) | {"num_prompt_tokens": num_tokens},
        "nanovllm": {"seconds": [s for s, _ in runs], "tok_per_s": num_tokens / seconds},
    }
    if llm.config.torch_device.type == "cuda":
        key, peaks = card_peaks(card_name())
        flops = prefill_flops(model_sizes(llm.config), [len(p) for p in prompts])
        flops -= (
            2 * llm.config.hf_config.vocab_size * llm.config.hf_config.hidden_size * len(prompts)
        )  # no LM head
        floor_s = flops / peaks.bf16_flop_per_s
        result["floor"] = {"card": key, "seconds": floor_s, "fraction": floor_s / seconds}
        rows[0][3] = f"{floor_s / seconds:.0%} of the compute floor ({floor_s * 1e3:.0f} ms)"
    config = llm.config
    llm.shutdown()  # (its KV cache holds most of the GPU: transformers' padded batches need it)
    free_device_memory()
    if args.hf_mode == "on":
        model = build_hf_model(config).model  # the base model of the same weights
        run_transformers(model, prompts[:8], args.hf_batch_size)  # warm-up
        hf_runs = [run_transformers(model, prompts, args.hf_batch_size) for _ in range(2)]
        hf_seconds, theirs = hf_runs[-1]
        cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
        result["transformers"] = {
            "seconds": [s for s, _ in hf_runs],
            "tok_per_s": num_tokens / hf_seconds,
            "batch_size": args.hf_batch_size,
        }
        result["speedup"] = hf_seconds / seconds
        result["cosine"] = {"min": cosine.min().item(), "mean": cosine.mean().item()}
        note = f"nanovllm {hf_seconds / seconds:.2f}x; cosine min {cosine.min().item():.4f}"
        rows.append(["transformers", f"{hf_seconds:.3f}", f"{num_tokens / hf_seconds:,.0f}", note])
    print_table(f"embeddings: {len(prompts)} prompts, {num_tokens:,} tokens", ["run", "s", "tok/s", ""], rows)
    if args.out:
        print("->", write_report("embeddings", result, args.out))
    return result


if __name__ == "__main__":
    main()
