"""Latency: time to first token and time per output token, each beside its physical floor.

    python benchmarks/latency.py [--model qwen3-0.6b] [--out DIR]      # or: nanovllm bench latency

Method: the engine is driven directly (`LLMEngine.add_request` / `step`) and timed with the host clock
(`time.perf_counter`). Prompts are fresh random token ids each time (no prefix-cache hits).

- TTFT (batch 1): add one request with a C-token prompt and max_tokens=1, step until its token arrives,
  between two `torch.cuda.synchronize()`; median of --ttft-repeats runs after one warm-up run.
- TPOT (batch 1 and batch B): add B requests with C-token prompts, step until every one has its first
  token (prefill, possibly in chunks), then time --decode-steps steps in which all B decode together,
  back to back as `generate` runs them: with overlapped scheduling a `step()` launches the next forward
  and then waits for the previous one, so the interval between two returns is one step of the steady
  state. TPOT = median interval (the mean, from one synchronize to the next around all the steps, is
  recorded too). One shorter warm-up pass first. (Up to commit 5502795 every step was timed between
  two synchronizes, which serialized host and GPU work: those TPOTs are higher by the host's share.)

Floors, from the measured peaks of the card (common.CARD_PEAKS; H100: 3.0 TB/s, 804 bf16 TFLOP/s):
- decode step: (weight bytes + KV bytes the step reads) / bandwidth, KV at the mean context of the
  timed steps; the weight-only floor is printed too.
- prefill: max(weight bytes / bandwidth, FLOPs / peak FLOP/s); FLOPs = 2 x matmul params x tokens
  + causal attention (2 x 2 x layers x heads x head_dim x C^2 / 2) + the LM head on the last token,
  summed over the prompts of a batch.
- Prefill throughput: P prompts of C tokens added at once (16 x 1024 and 4 x 4096 = 16k tokens, one
  step at the default token budget), timed to the last first token; achieved TFLOP/s and % of floor.
  Then the same batch scored (`prompt_logprobs=0`, what log-likelihood evaluation asks for): every prompt
  row also goes through the LM head and a log-softmax, in eager steps; its floor adds the LM head's FLOPs
  over all rows.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Any

from nanovllm.benchmark.common import (
    DEFAULT_OUT_DIR,
    card_name,
    card_peaks,
    fmt,
    gib,
    memory_stats,
    now,
    print_table,
    reset_peak_memory,
    run_info,
    write_report,
)
from nanovllm.config import DEFAULT_MODEL, preset_names
from nanovllm.utils.heap import frozen_heap

PREFILL_SLACK_TOKENS = 512  # decode steps a request may take while the rest of its batch prefills


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def _prefill_batches(text: str) -> list[tuple[int, int]]:
    """ "16x1024,4x4096" -> [(16, 1024), (4, 4096)]: prompts x tokens, both >= 1."""
    batches = []
    for item in text.split(","):
        parts = item.strip().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise argparse.ArgumentTypeError(f"expected PROMPTSxTOKENS with both >= 1, got {item!r}")
        batches.append((int(parts[0]), int(parts[1])))
    return batches


def build_parser() -> argparse.ArgumentParser:
    from nanovllm.cli import add_engine_args

    p = argparse.ArgumentParser(
        prog="nanovllm bench latency", description="TTFT and TPOT of nanovllm beside their physical floors."
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint dir or preset {preset_names()}")
    p.add_argument("--contexts", type=_int_list, default=[128, 1024, 4096], help="prompt lengths, batch 1")
    p.add_argument("--batches", type=_int_list, default=[16, 64, 256], help="batch sizes for batched TPOT")
    p.add_argument("--batch-context", type=int, default=1024, help="prompt length of the batched TPOT runs")
    p.add_argument("--decode-steps", type=int, default=64, help="timed decode steps per TPOT measurement")
    p.add_argument("--ttft-repeats", type=int, default=5)
    p.add_argument(
        "--prefill-batches",
        type=_prefill_batches,
        default=[(16, 1024), (4, 4096)],
        help="prompts x length of each prefill-throughput batch, e.g. 16x1024,4x4096 (16k tokens each)",
    )
    p.add_argument("--bandwidth-tbs", type=float, default=None, help="default: the card's (CARD_PEAKS)")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: the card's (CARD_PEAKS)")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--out", default=str(DEFAULT_OUT_DIR), help="directory for the JSON report")
    add_engine_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_report("latency", report, args.out)
    print(f"\nwrote {path}")
    print_summary(report)
    return 0


# ---- model sizes and floors --------------------------------------------------------------------------


def model_sizes(config) -> dict[str, Any]:
    """Bytes and FLOP coefficients from the checkpoint's tensor shapes (a tied head counted once)."""
    from nanovllm.models import get_model_class
    from nanovllm.models.decoder import head_dim_of, num_kv_heads_of

    hf = config.hf_config
    elem = config.torch_dtype.itemsize
    shapes = get_model_class(hf).checkpoint_shapes(hf)
    numel = lambda shape: int(__import__("math").prod(shape))  # noqa: E731
    num_params = sum(numel(s) for s in shapes.values())
    matmul_params = sum(numel(s) for n, s in shapes.items() if n.endswith("proj.weight"))
    tp = config.tensor_parallel_size
    return {
        "num_params": num_params,
        "weight_bytes": num_params * elem,
        "weight_bytes_per_gpu": num_params * elem // tp,
        "matmul_params": matmul_params,
        "kv_bytes_per_token": 2 * hf.num_hidden_layers * num_kv_heads_of(hf) * head_dim_of(hf) * elem,
        "num_layers": hf.num_hidden_layers,
        "num_heads": hf.num_attention_heads,
        "head_dim": head_dim_of(hf),
        "hidden_size": hf.hidden_size,
        "vocab_size": hf.vocab_size,
        "tensor_parallel_size": tp,
    }


def decode_floor_ms(sizes: dict, batch: int, mean_context: float, bandwidth: float) -> tuple[float, float]:
    """(weights-only floor, weights + KV floor) of one decode step, per GPU, in ms."""
    tp = sizes["tensor_parallel_size"]
    weights = sizes["weight_bytes_per_gpu"]
    kv = batch * mean_context * sizes["kv_bytes_per_token"] / tp
    return 1e3 * weights / bandwidth, 1e3 * (weights + kv) / bandwidth


def prefill_flops(sizes: dict, prompt_lens: list[int]) -> float:
    """FLOPs of prefilling these prompts together (each attends causally to itself)."""
    s = sizes
    work = 0.0
    for n in prompt_lens:
        work += 2 * s["matmul_params"] * n
        work += 2 * 2 * s["num_layers"] * s["num_heads"] * s["head_dim"] * n**2 / 2
        work += 2 * s["vocab_size"] * s["hidden_size"]
    return work


def prefill_floor_ms(sizes: dict, prompt_lens: list[int], bandwidth: float, flops: float) -> float:
    work = prefill_flops(sizes, prompt_lens) / sizes["tensor_parallel_size"]
    return 1e3 * max(sizes["weight_bytes_per_gpu"] / bandwidth, work / flops)


# ---- measurements ------------------------------------------------------------------------------------


class _Prompts:
    def __init__(self, vocab_size: int, seed: int):
        self.rng = random.Random(seed)
        self.high = min(10_000, vocab_size - 1)

    def __call__(self, length: int) -> list[int]:
        return [self.rng.randint(0, self.high) for _ in range(length)]


def measure_ttft(engine, prompts: _Prompts, context: int, repeats: int) -> dict[str, Any]:
    from nanovllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        prompt = prompts(context)
        start = now()
        rid = engine.add_request(prompt, params)
        while rid in engine.requests:  # max_tokens=1: the request is dropped once its token is sampled
            engine.step()
        elapsed = now() - start
        if i:
            times.append(elapsed * 1e3)
    return {
        "context": context,
        "repeats": repeats,
        "ttft_ms_median": statistics.median(times),
        "ttft_ms_min": min(times),
    }


def measure_prefill(
    engine, prompts: _Prompts, num_prompts: int, length: int, repeats: int, prompt_logprobs: int | None = None
) -> dict[str, Any]:
    """Time prefilling `num_prompts` fresh prompts of `length` tokens added at once (one step when
    they fit the token budget, two when overlapped and over IDLE_STEP_TOKENS: pipeline fill), up to each
    one's first token; median of `repeats` after a warm-up."""
    from nanovllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=prompt_logprobs)
    times = []
    for i in range(repeats + 1):
        batch = [prompts(length) for _ in range(num_prompts)]
        start = now()
        ids = [engine.add_request(p, params) for p in batch]
        while any(rid in engine.requests for rid in ids):
            engine.step()
        elapsed = now() - start
        if i:
            times.append(elapsed * 1e3)
    return {
        "num_prompts": num_prompts,
        "prompt_len": length,
        "ms_median": statistics.median(times),
        "ms_mean": statistics.mean(times),  # with the host pauses (garbage collections) the median hides
    }


def measure_tpot(engine, prompts: _Prompts, batch: int, context: int, steps: int) -> dict[str, Any]:
    """Prefill `batch` fresh prompts, then time `steps` decode steps of the whole batch."""
    from nanovllm import SamplingParams

    # As many tokens as the model allows: nobody finishes inside the window (the requests prefilled
    # first decode while the others prefill); all are aborted after it.
    params = SamplingParams(temperature=0, max_tokens=engine.config.max_model_len - context, ignore_eos=True)
    ids = [engine.add_request(prompts(context), params) for _ in range(batch)]
    seqs = [engine.requests[rid].seq for rid in ids]
    preemptions = engine.scheduler.num_preemptions
    try:
        while any(s.num_output_tokens == 0 for s in seqs):  # prefill (chunked, mixed with decodes)
            engine.step()
        context_before = statistics.mean(s.num_tokens for s in seqs)
        step_ms = []
        start = last = now()
        for _ in range(steps):
            before = sum(s.num_output_tokens for s in seqs)
            engine.step()  # no synchronize: it would stop the next step's launch from overlapping this one
            t = time.perf_counter()
            step_ms.append((t - last) * 1e3)
            last = t
            served = sum(s.num_output_tokens for s in seqs) - before
            if served != batch:
                raise RuntimeError(f"a decode step served {served} of {batch} requests (KV cache too small?)")
        engine.sync()
        total_ms = (now() - start) * 1e3
    finally:
        for rid in ids:
            engine.abort(rid)
    return {
        "batch": batch,
        "context": context,
        "decode_steps": steps,
        "mean_context": context_before + (steps - 1) / 2,  # tokens in the cache, averaged over the steps
        "tpot_ms_median": statistics.median(step_ms),
        "tpot_ms_mean": total_ms / steps,
        "tok_per_s": batch / (statistics.median(step_ms) / 1e3),
        "num_preemptions": engine.scheduler.num_preemptions - preemptions,
    }


def _max_model_len(args) -> int:
    """Room for the longest prompt, the timed steps, and the steps taken while a batch prefills."""
    longest = max(max(args.contexts), args.batch_context if args.batches else 0)
    longest = max([longest] + [length for _, length in args.prefill_batches])
    return -(-(longest + args.decode_steps + PREFILL_SLACK_TOKENS) // 256) * 256


def run(args: argparse.Namespace) -> dict[str, Any]:
    from nanovllm import LLM
    from nanovllm.cli import engine_kwargs

    for name in ("decode_steps", "ttft_repeats", "batch_context"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("bandwidth_tbs", "peak_tflops"):  # None: the card's
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name):g}")
    kwargs = engine_kwargs(args)
    derived = "max_model_len" not in kwargs
    kwargs.setdefault("max_model_len", _max_model_len(args))
    kwargs.setdefault("max_num_seqs", max(256, max(args.batches)))
    reset_peak_memory()
    start = time.perf_counter()
    try:
        llm = LLM(args.model, **kwargs)
    except ValueError as e:
        if derived and "max_model_len" in str(e):  # (not asked for by the user: say where it came from)
            raise ValueError(
                f"{e}. max_model_len={kwargs['max_model_len']} is what the lengths asked for need "
                "(--contexts, --batch-context, --prefill-batches, plus --decode-steps); ask for shorter ones"
            ) from None
        raise
    init_s = time.perf_counter() - start
    engine, config = llm.engine, llm.config
    card_key, peaks = card_peaks(card_name())
    bandwidth = args.bandwidth_tbs * 1e12 if args.bandwidth_tbs else peaks.bandwidth_bytes_per_s
    flops = args.peak_tflops * 1e12 if args.peak_tflops else peaks.bf16_flop_per_s
    sizes = model_sizes(config)
    prompts = _Prompts(config.hf_config.vocab_size, args.prompt_seed)
    report: dict[str, Any] = {
        "benchmark": "latency",
        **run_info(),
        "model": args.model,
        "engine_args": kwargs,
        "method": "host clock; TTFT between two torch.cuda.synchronize; TPOT: interval between the returns "
        "of back-to-back LLMEngine.step calls (no synchronize between steps); fresh prompts",
        "params": {
            "contexts": args.contexts,
            "batches": args.batches,
            "batch_context": args.batch_context,
            "decode_steps": args.decode_steps,
            "ttft_repeats": args.ttft_repeats,
            "sampling": "greedy, ignore_eos",
        },
        "floor_basis": {"card": card_key, "bandwidth_bytes_per_s": bandwidth, "peak_flop_per_s": flops},
        "model_sizes": sizes,
        "init_seconds": init_s,
    }
    try:
        with frozen_heap():  # as LLM.generate runs: no full collections over the engine's objects
            ttft, tpot1, tpotb = [], [], []
            for c in args.contexts:
                r = measure_ttft(engine, prompts, c, args.ttft_repeats)
                r["floor_ms"] = prefill_floor_ms(sizes, [c], bandwidth, flops)
                ttft.append(r)
            for batch, contexts in [(1, args.contexts), *((b, [args.batch_context]) for b in args.batches)]:
                for c in contexts:
                    try:
                        measure_tpot(engine, prompts, batch, c, min(4, args.decode_steps))  # warm-up
                        r = measure_tpot(engine, prompts, batch, c, args.decode_steps)
                    except RuntimeError as e:  # e.g. a batch the KV cache cannot hold: record, go on
                        r = {"batch": batch, "context": c, "error": str(e)}
                    else:
                        r["floor_weights_ms"], r["floor_ms"] = decode_floor_ms(
                            sizes, batch, r["mean_context"], bandwidth
                        )
                        r["pct_of_floor"] = 100 * r["floor_ms"] / r["tpot_ms_median"]
                    (tpot1 if batch == 1 else tpotb).append(r)
            prefill = []
            for num_prompts, length in args.prefill_batches:
                r = measure_prefill(engine, prompts, num_prompts, length, args.ttft_repeats)
                lens = [length] * num_prompts
                r["floor_ms"] = prefill_floor_ms(sizes, lens, bandwidth, flops)
                r["tflop_per_s"] = (
                    prefill_flops(sizes, lens) / sizes["tensor_parallel_size"] / r["ms_median"] / 1e9
                )
                r["pct_of_floor"] = 100 * r["floor_ms"] / r["ms_median"]
                scored = measure_prefill(engine, prompts, num_prompts, length, args.ttft_repeats, 0)
                head_flops = 2 * sizes["hidden_size"] * sizes["vocab_size"] * num_prompts * (length - 1)
                r["scored_ms_median"], r["scored_ms_mean"] = scored["ms_median"], scored["ms_mean"]
                head_ms = head_flops / sizes["tensor_parallel_size"] / flops * 1e3
                r["scored_floor_ms"] = r["floor_ms"] + head_ms
                r["scored_tok_per_s"] = num_prompts * length / scored["ms_median"] * 1e3
                prefill.append(r)
            report.update(ttft=ttft, prefill=prefill, tpot_batch1=tpot1, tpot_batched=tpotb)
            report["kv_cache_blocks"] = engine.num_kvcache_blocks
            report["block_size"] = config.block_size
            report["kv_cache_tokens"] = engine.num_kvcache_blocks * config.block_size
            report.update(memory_stats())
    finally:
        llm.shutdown()
    return report


def print_summary(report: dict[str, Any]) -> None:
    title = f"on {report['card']} ({report['model']}, commit {report['git_commit']})"
    print_table(
        f"TTFT {title}",
        ["prompt tokens", "TTFT ms (median)", "floor ms", "floor / TTFT"],
        [
            [
                r["context"],
                f"{r['ttft_ms_median']:.2f}",
                f"{r['floor_ms']:.3f}",
                f"{100 * r['floor_ms'] / r['ttft_ms_median']:.0f}%",
            ]
            for r in report["ttft"]
        ],
    )
    print_table(
        f"Prefill throughput {title}",
        [
            "prompts x tokens",
            "ms (median)",
            "TFLOP/s",
            "floor ms",
            "floor / time",
            "scored ms",
            "scored floor ms",
            "scored tok/s",
        ],
        [
            [
                f"{r['num_prompts']} x {r['prompt_len']}",
                f"{r['ms_median']:.2f}",
                f"{r['tflop_per_s']:.0f}",
                f"{r['floor_ms']:.2f}",
                f"{r['pct_of_floor']:.0f}%",
                f"{r['scored_ms_median']:.2f}",
                f"{r['scored_floor_ms']:.2f}",
                fmt(r["scored_tok_per_s"]),
            ]
            for r in report.get("prefill", [])
        ],
    )
    rows = [
        [r["batch"], r["context"], "error: " + r["error"][:60], "", "", "", ""]
        if "error" in r
        else [
            r["batch"],
            r["context"],
            f"{r['tpot_ms_median']:.3f}",
            f"{r['floor_weights_ms']:.3f}",
            f"{r['floor_ms']:.3f}",
            f"{r['pct_of_floor']:.0f}%",
            fmt(r["tok_per_s"]),
        ]
        for r in report["tpot_batch1"] + report["tpot_batched"]
    ]
    print_table(
        f"TPOT {title}",
        [
            "batch",
            "prompt tokens",
            "TPOT ms (median)",
            "floor ms (weights)",
            "floor ms (+KV)",
            "floor / TPOT",
            "tok/s",
        ],
        rows,
    )
    print(
        f"\npeak GPU memory {fmt(gib(report.get('peak_memory_allocated_bytes')), 2)} GiB; KV cache "
        f"{fmt(report['kv_cache_tokens'])} tokens "
        f"({fmt(report['kv_cache_blocks'])} blocks x {report['block_size']})"
    )
