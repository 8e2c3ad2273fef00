"""Soak test: thousands of mixed requests through one engine, then check that nothing leaked or drifted.

    python scripts/soak.py --num-requests 10000 --model qwen3-0.6b [--out DIR]

Requests of mixed lengths and sampling settings (greedy, temperature, top-k/top-p/min-p, penalties,
seeds, stop strings and stop token ids, logprobs, min_tokens, ignore_eos), most of them sharing a
prompt prefix with others, go through one LLM in waves. Each wave sends most of its requests through
`LLM.generate` and the rest through `LLMEngine` (add_request / step), aborting some of those wherever
they are: waiting, mid-prefill, decoding, or preempted back to the queue. The KV cache is small, so
requests are preempted and recomputed all along; the token budget is small, so long prompts are
prefilled in chunks.

Checked after every wave: every KV block is free, the prefix cache is consistent, the engine holds no
request. At the end: every request finished with the right number of tokens for a right reason
(`check_output`), greedy probe prompts give the tokens they gave before the first wave, and on a GPU
torch.cuda.memory_allocated() is back to its value after the first (warm-up) wave. The JSON report
(card, date, commit, counts, preemptions, hit rate, wall time, each check) goes to --out; the exit
status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.benchmark.common import DEFAULT_OUT_DIR, run_info, write_report  # noqa: E402
from nanovllm.engine.llm_engine import LLMEngine  # noqa: E402
from nanovllm.engine.sequence import SequenceStatus  # noqa: E402
from nanovllm.outputs import RequestOutput  # noqa: E402

NUM_PREFIXES = 8  # shared prompt prefixes; most prompts start with one of them
NUM_PROBES = 4  # greedy prompts run before the first wave and after the last
PROBE_MAX_TOKENS = 16
MAX_FAILURES_REPORTED = 20
STOP_STRINGS = ["a", "e", "the", "\n", ["x", "yz"], ["0", "1", "2"]]


@dataclass
class SoakRequest:
    prompt: list[int]
    params: SamplingParams
    via_engine: bool  # add_request/step instead of LLM.generate
    abort: bool  # (via_engine only) aborted at some point unless it finishes first


# ---- the workload ---------------------------------------------------------------------------------


def _sampling_params(rng: random.Random, max_tokens: int, max_token_id: int) -> SamplingParams:
    style = rng.choice(["greedy", "greedy", "temperature", "top_k", "top_p", "min_p", "all"])
    kw: dict[str, Any] = {"max_tokens": max_tokens}
    if style == "greedy":
        kw["temperature"] = 0.0
    else:
        kw["temperature"] = rng.choice([0.3, 0.7, 1.0, 1.5])
        if style in ("top_k", "all"):
            kw["top_k"] = rng.choice([1, 5, 50])
        if style in ("top_p", "all"):
            kw["top_p"] = rng.choice([0.5, 0.9, 0.99])
        if style in ("min_p", "all"):
            kw["min_p"] = rng.choice([0.05, 0.2])
        if rng.random() < 0.4:
            kw["seed"] = rng.randrange(2**31)
    if rng.random() < 0.3:
        kw["repetition_penalty"] = rng.choice([0.9, 1.1, 1.3])
        kw["presence_penalty"] = rng.choice([0.0, 0.5, -0.5])
        kw["frequency_penalty"] = rng.choice([0.0, 0.3, -0.3])
    if rng.random() < 0.25:
        kw["stop"] = rng.choice(STOP_STRINGS)
    if rng.random() < 0.15:  # many ids, so that a random model hits one now and then
        kw["stop_token_ids"] = [rng.randrange(3, max_token_id) for _ in range(rng.randint(1, 30))]
    if rng.random() < 0.25:
        kw["logprobs"] = rng.choice([0, 1, 5, 20])
    if rng.random() < 0.2:
        kw["min_tokens"] = rng.randint(0, max_tokens)
    kw["ignore_eos"] = rng.random() < 0.3
    return SamplingParams(**kw)


def make_requests(
    num_requests: int, vocab_size: int, max_model_len: int, block_size: int, seed: int = 0
) -> list[SoakRequest]:
    """Mixed lengths (short, medium, up to max_model_len) and settings; ~2/3 of the prompts start with
    one of NUM_PREFIXES shared prefixes (one token to several blocks, some not block-aligned)."""
    rng = random.Random(seed)
    max_token_id = min(vocab_size, 2048)  # ids the small preset tokenizer can decode (stop strings)
    token = lambda: rng.randrange(3, max_token_id)  # noqa: E731 (0-2 are special in the presets)
    prefix_lens = [1, block_size, 2 * block_size, 3 * block_size + 5, block_size // 2, 5 * block_size]
    prefixes = [
        [token() for _ in range(min(prefix_lens[i % len(prefix_lens)], max_model_len // 2))]
        for i in range(NUM_PREFIXES)
    ]
    requests = []
    for _ in range(num_requests):
        max_tokens = rng.choice(
            [rng.randint(1, 8), rng.randint(1, 8), rng.randint(9, 48), rng.randint(49, 128)]
        )
        max_tokens = min(max_tokens, max_model_len // 2)
        room = max_model_len - max_tokens
        prompt_len = min(
            room, rng.choice([rng.randint(1, 16), rng.randint(17, 96), rng.randint(min(97, room), room)])
        )
        prompt = [token() for _ in range(prompt_len)]
        if rng.random() < 0.65:
            prompt = (rng.choice(prefixes) + prompt)[:room]
        via_engine = rng.random() < 0.25
        requests.append(
            SoakRequest(
                prompt,
                _sampling_params(rng, max_tokens, max_token_id),
                via_engine,
                abort=via_engine and rng.random() < 0.4,
            )
        )
    return requests


# ---- checks ---------------------------------------------------------------------------------------


def check_output(engine: LLMEngine, req: SoakRequest, out: RequestOutput) -> str | None:
    """Why out is wrong for req, or None. A "length" finish has exactly max_tokens tokens; a "stop"
    finish ends on EOS (unless ignore_eos), a stop token id or a stop string, never before
    min_tokens; neither EOS (unless ignore_eos) nor a stop token id appears before the last token."""
    p = req.params
    comp = out.outputs[0]
    tokens = comp.token_ids
    n = len(tokens)
    eos = set(engine.config.eos_token_ids)
    stop_ids = set(p.stop_token_ids or ())
    if not out.finished or comp.finish_reason not in ("stop", "length"):
        return f"finished={out.finished} finish_reason={comp.finish_reason!r}"
    if out.prompt_token_ids != req.prompt:
        return "prompt_token_ids differ from the prompt"
    if not p.min_tokens <= n <= p.max_tokens:
        return f"{n} tokens, outside [min_tokens={p.min_tokens}, max_tokens={p.max_tokens}]"
    if not p.ignore_eos and eos & set(tokens[:-1]):
        return "EOS before the last token"
    if stop_ids & set(tokens[:-1]):
        return "a stop token id before the last token"
    if comp.finish_reason == "length":
        if n != p.max_tokens:
            return f"finish_reason length after {n} of max_tokens={p.max_tokens}"
        if tokens[-1] in stop_ids or (not p.ignore_eos and tokens[-1] in eos):
            return f"finish_reason length, yet the last token {tokens[-1]} should have stopped it"
        missed = [s for s in p.stop or [] if s in comp.text]
        if missed and not p.min_tokens:
            return f"finish_reason length, yet the text holds the stop string {missed[0]!r}"
    if comp.finish_reason == "stop":
        last = tokens[-1]
        on_eos = not p.ignore_eos and last in eos
        on_stop_id = last in stop_ids and comp.stop_reason == last
        on_stop_str = (
            isinstance(comp.stop_reason, str)
            and comp.stop_reason in (p.stop or [])
            and comp.stop_reason in engine.decode(tokens)
        )
        if not (on_eos or on_stop_id or on_stop_str):
            return f"finish_reason stop without a cause (last token {last}, stop_reason {comp.stop_reason!r})"
        # (Before min_tokens a stop string may show up in the text without stopping it.)
        if isinstance(comp.stop_reason, str) and not p.min_tokens and comp.stop_reason in comp.text:
            return f"the stop string {comp.stop_reason!r} was not cut from the text"
    if p.logprobs is not None:
        lps = comp.logprobs or []
        if len(lps) != n or [lp.token_id for lp in lps] != tokens:
            return f"{len(lps)} logprobs for {n} tokens"
        if any(len(lp.top_logprobs) != p.logprobs or not lp.logprob <= 0 for lp in lps):
            return "a logprob entry with the wrong number of alternatives or a positive logprob"
    if p.ignore_eos and not p.stop and not p.stop_token_ids and n != p.max_tokens:
        return f"ignore_eos without stops, yet {n} of max_tokens={p.max_tokens} tokens"
    return None


def engine_problems(engine: LLMEngine) -> list[str]:
    """Leaks and broken invariants of an idle engine."""
    bm = engine.scheduler.block_manager
    problems = []
    if bm.num_free_blocks != bm.num_blocks:
        problems.append(f"{bm.num_blocks - bm.num_free_blocks} of {bm.num_blocks} KV blocks still held")
    if any(b.ref_count for b in bm.blocks):
        problems.append("blocks with non-zero ref counts")
    try:
        bm.check_consistency()
    except AssertionError as e:
        problems.append(f"prefix cache inconsistent: {e}")
    for h, block_id in bm.hash_to_block.items():
        tokens = bm.blocks[block_id].token_ids
        if tokens is None or len(tokens) != bm.block_size:
            problems.append(f"cached block {block_id} (hash {h}) does not hold one block of tokens")
            break
    if engine.has_unfinished() or engine.requests:
        problems.append(f"{len(engine.requests)} requests left in the engine")
    return problems


# ---- running --------------------------------------------------------------------------------------


def _abort_stage(engine: LLMEngine, request_id: str) -> str:
    seq = engine.requests[request_id].seq
    if seq.status is SequenceStatus.WAITING:
        return "preempted" if seq.num_preemptions else "waiting"
    return "prefilling" if seq.num_computed_tokens < seq.num_tokens - 1 else "decoding"


# Chance per step that a request marked for abort is aborted, by where it is: fresh waiting
# requests are many, preempted ones few and briefly seen, so every stage gets its share.
ABORT_CHANCE = {"waiting": 0.02, "prefilling": 0.3, "decoding": 0.15, "preempted": 1.0}


def run_engine_part(
    engine: LLMEngine, requests: list[SoakRequest], rng: random.Random, abort_stages: Counter
) -> dict[int, RequestOutput]:
    """Feed the requests to the engine a few per step (arrivals while others run), step until all
    are done, aborting the marked ones at random moments. Returns {index: output} of the ones that
    finished."""
    pending = list(range(len(requests)))
    ids: dict[str, int] = {}
    to_abort: set[str] = set()
    outputs: dict[int, RequestOutput] = {}
    while pending or engine.has_unfinished():
        for _ in range(min(len(pending), rng.randint(0, 4) if engine.has_unfinished() else 1)):
            i = pending.pop(0)
            rid = engine.add_request(requests[i].prompt, requests[i].params)
            ids[rid] = i
            if requests[i].abort:
                to_abort.add(rid)
        for out in engine.step():
            if out.finished:
                outputs[ids[out.request_id]] = out
                to_abort.discard(out.request_id)
        for rid in sorted(to_abort):
            stage = _abort_stage(engine, rid)
            if rng.random() < ABORT_CHANCE[stage]:
                abort_stages[stage] += 1
                engine.abort(rid)
                to_abort.discard(rid)
    for rid in list(ids)[:3]:
        engine.abort(rid)  # finished or aborted already: a no-op
    return outputs


def probe(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of the probe prompts, computed from scratch (no prefix-cache hits)."""
    llm.engine.scheduler.block_manager.reset_prefix_cache()
    params = SamplingParams(temperature=0, max_tokens=PROBE_MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def run_soak(llm: LLM, num_requests: int, num_waves: int = 10, seed: int = 0, log=print) -> dict[str, Any]:
    """Run the soak on llm; returns the report's results (counts, timings, checks)."""
    engine = llm.engine
    cfg = engine.config
    cuda = cfg.torch_device.type == "cuda"
    requests = make_requests(num_requests, engine.vocab_size, cfg.max_model_len, cfg.block_size, seed)
    rng = random.Random(seed + 1)
    probe_prompts = [r.prompt[: cfg.max_model_len - PROBE_MAX_TOKENS] for r in requests[:NUM_PROBES]]
    probe_before = probe(llm, probe_prompts)

    failures: list[dict[str, Any]] = []
    wave_problems: list[str] = []
    abort_stages: Counter = Counter()
    finish_reasons: Counter = Counter()
    stop_causes: Counter = Counter()
    num_checked = num_aborted = num_failed = 0
    memory_after_warmup = None
    start = time.perf_counter()
    wave_size = -(-num_requests // num_waves)
    for w in range(num_waves):
        wave = list(range(w * wave_size, min((w + 1) * wave_size, num_requests)))
        if not wave:
            break
        t = time.perf_counter()
        gen = [i for i in wave if not requests[i].via_engine]
        direct = [i for i in wave if requests[i].via_engine]
        generated = llm.generate(
            [requests[i].prompt for i in gen], [requests[i].params for i in gen], use_tqdm=False
        )
        outs = dict(zip(gen, generated))
        part = run_engine_part(engine, [requests[i] for i in direct], rng, abort_stages)
        outs.update({direct[j]: out for j, out in part.items()})
        num_aborted += len(direct) - len(part)
        for i, out in outs.items():
            comp = out.outputs[0]
            finish_reasons[comp.finish_reason] += 1
            if comp.finish_reason == "stop":
                kind = "string" if isinstance(comp.stop_reason, str) else "token id"
                stop_causes[kind if comp.stop_reason is not None else "eos"] += 1
            problem = check_output(engine, requests[i], out)
            num_checked += 1
            if problem is not None:
                num_failed += 1
                if len(failures) < MAX_FAILURES_REPORTED:
                    failures.append({"request": i, "problem": problem, "params": repr(requests[i].params)})
        wave_problems += [f"wave {w}: {p}" for p in engine_problems(engine)]
        if cuda and w == 0:
            torch.cuda.synchronize()
            memory_after_warmup = torch.cuda.memory_allocated()
        stats = engine.stats()
        log(
            f"wave {w + 1}/{num_waves}: {len(wave)} requests in {time.perf_counter() - t:.1f} s, "
            f"{stats['num_preemptions']} preemptions, hit rate {stats['prefix_cache_hit_rate']:.2f}"
        )
    wall_s = time.perf_counter() - start
    memory_at_end = None
    if cuda:
        torch.cuda.synchronize()
        memory_at_end = torch.cuda.memory_allocated()
    probe_after = probe(llm, probe_prompts)
    stats = engine.stats()
    via_engine = sum(r.via_engine for r in requests)

    def check(passed: bool, detail: str) -> dict[str, Any]:
        return {"passed": bool(passed), "detail": detail}

    checks = {
        "all_requests_accounted": check(
            num_checked + num_aborted == num_requests,
            f"{num_checked} finished + {num_aborted} aborted of {num_requests}",
        ),
        "outputs_correct": check(not num_failed, f"{num_failed} wrong outputs of {num_checked}"),
        "blocks_free_and_cache_consistent": check(
            not wave_problems, "; ".join(wave_problems[:5]) or "after every wave"
        ),
        "greedy_probe_unchanged": check(probe_before == probe_after, f"{NUM_PROBES} greedy prompts"),
        "preemption_exercised": check(
            stats["num_preemptions"] > 0, f"{stats['num_preemptions']} preemptions"
        ),
        "prefix_cache_hit": check(
            stats["prefix_cache_hit_rate"] > 0, f"hit rate {stats['prefix_cache_hit_rate']:.3f}"
        ),
    }
    if cuda:
        checks["gpu_memory_back_to_warmup"] = check(
            memory_at_end == memory_after_warmup,
            f"allocated {memory_after_warmup} bytes after wave 1, {memory_at_end} at the end",
        )
    return {
        "num_requests": num_requests,
        "num_waves": num_waves,
        "num_via_generate": num_requests - via_engine,
        "num_via_engine": via_engine,
        "num_finished": num_checked,
        "num_aborted": num_aborted,
        "abort_stages": dict(abort_stages),
        "finish_reasons": dict(finish_reasons),
        "stop_causes": dict(stop_causes),
        "num_preemptions": stats["num_preemptions"],
        "prefix_cache_hit_rate": stats["prefix_cache_hit_rate"],
        "num_prompt_tokens": stats["num_prompt_tokens"],
        "num_generated_tokens": stats["num_generated_tokens"],
        "wall_s": wall_s,
        "generated_tok_per_s": stats["num_generated_tokens"] / wall_s if wall_s else None,
        "memory_allocated_after_warmup_bytes": memory_after_warmup,
        "memory_allocated_at_end_bytes": memory_at_end,
        "checks": checks,
        "passed": all(c["passed"] for c in checks.values()),
        "failures": failures,  # the first MAX_FAILURES_REPORTED
    }


# ---- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--model", default="qwen3-0.6b", help="checkpoint directory or preset name")
    parser.add_argument("--out", default=str(DEFAULT_OUT_DIR), help="directory for the JSON report")
    parser.add_argument("--num-waves", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--dtype", default="auto")
    # 256 blocks x 16 = 4,096 tokens for up to 64 requests of up to 512: preemption all along, while
    # ~25 requests run at once (10,000 requests take a few minutes on one H100).
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--num-kvcache-blocks", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--enforce-eager", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_requests < 1 or args.num_waves < 1:
        raise SystemExit("--num-requests and --num-waves must be >= 1")
    engine_args = dict(
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        num_kvcache_blocks=args.num_kvcache_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager,
    )
    report: dict[str, Any] = {
        **run_info(),
        "model": args.model,
        "engine_args": engine_args,
        "seed": args.seed,
    }
    results: dict[str, Any] = {"passed": False, "checks": {}, "failures": []}
    try:
        start = time.perf_counter()
        llm = LLM(args.model, **engine_args)
        report["startup_s"] = time.perf_counter() - start
        try:
            results = run_soak(llm, args.num_requests, args.num_waves, args.seed)
        finally:
            llm.shutdown()
    except Exception as e:  # an engine error is a failed soak: still write the report
        traceback.print_exc()
        results["error"] = f"{type(e).__name__}: {e}"
    report.update(results)
    path = write_report("soak", report, args.out)
    for name, c in results["checks"].items():
        print(f"{'PASS' if c['passed'] else 'FAIL'}  {name}: {c['detail']}")
    for f in results["failures"][:5]:
        print(f"  request {f['request']}: {f['problem']}")
    if "error" in results:
        print(f"FAIL  the soak stopped: {results['error']}")
    else:
        print(
            f"{results['num_requests']} requests ({results['num_finished']} finished, "
            f"{results['num_aborted']} aborted) in {results['wall_s']:.1f} s; "
            f"{results['num_preemptions']} preemptions; hit rate {results['prefix_cache_hit_rate']:.2f}"
        )
    print(f"report: {path}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
