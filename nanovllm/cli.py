"""Command line: `nanovllm generate|serve|bench ...` (also `python -m nanovllm`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from nanovllm.config import DEFAULT_MODEL, RUNNERS, SCHEDULING_POLICIES, Config, preset_names
from nanovllm.reasoning import REASONING_PARSERS
from nanovllm.server.tool_parsers import TOOL_PARSERS

_ENGINE_ARG_TYPES = {
    "dtype": str,
    "device": str,
    "max_model_len": int,
    "max_num_seqs": int,
    "max_num_batched_tokens": int,
    "block_size": int,
    "num_kvcache_blocks": int,
    "gpu_memory_utilization": float,
    "enable_prefix_caching": bool,
    "enforce_eager": bool,
    "async_scheduling": bool,
    "scheduling_policy": str,
    "tensor_parallel_size": int,
    "disable_custom_all_reduce": bool,
    "seed": int,
    "kernel_backend": str,
    "generation_config": str,
    "reasoning_parser": str,
    "runner": str,
    "pooler_config": json.loads,  # JSON, as vLLM's --pooler-config '{"pooling_type": "MEAN"}'
}
_ENGINE_ARG_CHOICES = {
    "scheduling_policy": SCHEDULING_POLICIES,
    "reasoning_parser": sorted(REASONING_PARSERS),
    "runner": RUNNERS,
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per engine argument of `Config` (default: the engine's own default)."""
    group = parser.add_argument_group("engine arguments")
    fields = {f.name: f for f in dataclasses.fields(Config) if f.init and f.name != "model"}
    if set(fields) != set(_ENGINE_ARG_TYPES):
        raise RuntimeError("cli._ENGINE_ARG_TYPES is out of date with Config")
    for name, typ in _ENGINE_ARG_TYPES.items():
        flag = "--" + name.replace("_", "-")
        help_ = f"default: {fields[name].default!r}"
        if typ is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            choices = _ENGINE_ARG_CHOICES.get(name)
            group.add_argument(flag, type=typ, default=None, choices=choices, help=help_)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in _ENGINE_ARG_TYPES if getattr(args, name) is not None}


def preset_note(name: str, vocab_size: int, tokenizer_size: int | None) -> str:
    """What `generate` prints about a preset's random weights (and why its text may come out empty).
    tokenizer_size: None without a tokenizer (generate then refuses text prompts with the reason)."""
    note = f"note: {name!r} is a preset with RANDOM weights: the text is meaningless"
    if tokenizer_size is not None and vocab_size > tokenizer_size:
        note += f", and mostly empty (ids past its tokenizer's {tokenizer_size:,} tokens decode to nothing)"
    return note


def _generate(args: argparse.Namespace) -> int:
    from nanovllm import LLM, SamplingParams

    prompts = args.prompt or ["Hello, my name is", "The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
        ignore_eos=args.ignore_eos,
        n=args.n,
    )  # (before the model loads: a bad value fails at once)
    with LLM(args.model, **engine_kwargs(args)) as llm:  # shut down on the way out, errors included
        if llm.config.is_preset:
            vocab_size = llm.config.hf_config.vocab_size
            tokenizer_size = len(llm.tokenizer) if llm.tokenizer is not None else None
            print(preset_note(args.model, vocab_size, tokenizer_size), file=sys.stderr)
        start = time.perf_counter()
        if args.chat:  # each prompt is one user turn, through the model's chat template
            outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outputs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
    num_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    for out in outputs:
        print(f"--- prompt: {out.prompt!r}")
        for c in out.outputs:
            sample = f" [sample {c.index}]" if len(out.outputs) > 1 else ""
            print(f"    output{sample}: {c.text!r}\n    token ids: {c.token_ids}")
            print(f"    ({len(c.token_ids)} tokens, finish: {c.finish_reason})")
    print(f"{num_tokens} tokens in {elapsed:.2f} s ({num_tokens / elapsed:.1f} tok/s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanovllm", description="nanovllm: a small, readable, fast LLM engine"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for a few prompts")
    gen.add_argument("--model", default=DEFAULT_MODEL, help=f"checkpoint dir or preset {preset_names()}")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user turn of a conversation")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide when to call tools (tool_choice "auto"); needs --tool-call-parser',
    )
    serve.add_argument(
        "--tool-call-parser",
        default=None,
        choices=sorted(TOOL_PARSERS),
        help="how tool calls are found in replies: hermes (Qwen2.5, Qwen3), llama3_json, mistral, "
        "pythonic (Llama 3.2, Llama 4), qwen3_coder (Qwen3-Coder, Qwen3.5)",
    )
    add_engine_args(serve)
    serve.set_defaults(func=lambda a: __import__("nanovllm.server.api_server", fromlist=["main"]).main(a))

    # `bench` takes its own arguments (main() hands them over before parsing); listed here for --help.
    bench = sub.add_parser(
        "bench",
        add_help=False,
        help="benchmarks: `nanovllm bench [throughput|latency] --help`",
    )
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=lambda a: _bench(a.args))
    return parser


def _bench(argv: list[str]) -> int:
    from nanovllm.benchmark import main as bench_main

    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ValueError as e:  # a user mistake: the reason, not a stack trace
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
