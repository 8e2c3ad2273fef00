"""Host cost of penalized sampling rows per decode step: `ModelRunner.sampling_requests`' part
(`SamplingRequest.for_sequence`) and `SamplingBatch.build`, for rows of a long prompt and output (default: 64
rows x (1,000 prompt + 2,000 output) tokens, repetition_penalty 1.05, Qwen2.5-Instruct's default), each row
growing by one token a step as in decode. No model: the numbers are the host's alone.

    PYTHONPATH=. python scripts/penalty_rows.py [--rows 64 --prompt 1000 --output 2000 --device cpu]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from nanovllm.engine.sequence import Sequence
from nanovllm.layers.sampling_batch import SamplingBatch, SamplingRequest, SamplingStaging
from nanovllm.sampling_params import SamplingParams

VOCAB_SIZE = 151_936  # Qwen2.5's


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=1000)
    parser.add_argument("--output", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rng, device = random.Random(0), torch.device(args.device)
    params = SamplingParams(temperature=0, repetition_penalty=1.05)
    seqs = []
    for _ in range(args.rows):
        seq = Sequence([rng.randrange(VOCAB_SIZE) for _ in range(args.prompt)], params)
        seq.token_ids += [rng.randrange(VOCAB_SIZE) for _ in range(args.output)]
        seqs.append(seq)
    staging = SamplingStaging(args.rows, device)
    requests_s = build_s = 0.0
    warm_up = 5
    for step in range(warm_up + args.steps):
        for seq in seqs:  # one new token a row, as in decode
            seq.token_ids.append(rng.randrange(VOCAB_SIZE))
        t0 = time.perf_counter()
        requests = [
            SamplingRequest.for_sequence(
                seq.params, seq.token_ids, seq.num_prompt_tokens, (0,), staging=staging
            )
            for seq in seqs
        ]
        t1 = time.perf_counter()
        SamplingBatch.build(requests, VOCAB_SIZE, device, staging)
        t2 = time.perf_counter()
        if step >= warm_up:
            requests_s, build_s = requests_s + t1 - t0, build_s + t2 - t1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(
        f"{args.rows} rows x ({args.prompt} + {args.output}) tokens on {device}: for_sequence "
        f"{requests_s / args.steps * 1e3:.2f} ms, SamplingBatch.build {build_s / args.steps * 1e3:.2f} ms"
        " per step"
    )


if __name__ == "__main__":
    main()
