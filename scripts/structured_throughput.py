"""What a structured output costs end to end: the same prompts generated free, and under a regex that never
completes (so every request runs to max_tokens and the token counts are equal), on one LLM. The constrained
runs pay the masks (a `[rows, vocab]` index_put per step once the states are warm) and give up overlapped
scheduling (the host reads each token before it builds the next step). Each setting runs twice; the first
run of a constraint also computes its states' masks, the second finds them cached.

    PYTHONPATH=. python scripts/structured_throughput.py [--model qwen3-0.6b --num-prompts 64 --out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

from nanovllm import LLM, SamplingParams, StructuredOutputsParams
from nanovllm.benchmark.common import run_info, write_report

# Words and spaces: never complete, so each request runs to max_tokens like the free ones (ignore_eos)
OPEN_REGEX = r"[a-z ,.]+"
# Many states (a string's length counted to 24, then the list goes on or closes): closing it completes the
# request, so these runs make fewer tokens; compare tok/s
LIST_SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 1}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--out", default=None, help="folder for the JSON result")
    args = ap.parse_args(argv)
    llm = LLM(args.model)
    rng = random.Random(0)
    prompts = [[rng.randrange(2048) for _ in range(rng.randint(100, 400))] for _ in range(args.num_prompts)]
    free = SamplingParams(temperature=0.6, seed=1, max_tokens=args.max_tokens, ignore_eos=True)
    settings = {
        "free": free,
        "regex": dataclasses.replace(free, structured_outputs=StructuredOutputsParams(regex=OPEN_REGEX)),
        "schema": dataclasses.replace(free, structured_outputs=StructuredOutputsParams(json=LIST_SCHEMA)),
    }
    llm.generate(prompts[:4], free, use_tqdm=False)  # warm-up: kernels, graphs
    rows = {}
    for name, params in settings.items():
        for run in range(2):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rows[f"{name}-{run}"] = {"tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}
            print(f"{name:6s} run {run}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} tok/s")
    result = {
        **run_info(),
        "workload": {"model": args.model, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens},
        "regex": OPEN_REGEX,
        "schema": LIST_SCHEMA,
        "runs": rows,
        "constrained_over_free": rows["regex-1"]["tok_per_s"] / rows["free-1"]["tok_per_s"],
        "schema_over_free": rows["schema-1"]["tok_per_s"] / rows["free-1"]["tok_per_s"],
    }
    print(f"tok/s over free's (second runs): regex {result['constrained_over_free']:.3f}, schema "
          f"{result['schema_over_free']:.3f}")  # fmt: skip
    if args.out:
        print("->", write_report("structured_throughput", result, args.out))
    llm.shutdown()
    return result


if __name__ == "__main__":
    main()
