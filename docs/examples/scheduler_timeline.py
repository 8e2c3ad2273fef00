"""The worked examples of docs/scheduling.md: requests through the real Scheduler, no model.

    PYTHONPATH=. python docs/examples/scheduler_timeline.py

A fake runner stands in for the model: it returns a token for every sequence whose scheduled tokens
reach its last known token, and None for a prefill chunk that stops short of it.
"""

from nanovllm.config import Config
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


def fake_run(batch) -> list[int | None]:
    return [
        7 if seq.num_computed_tokens + n == seq.num_tokens else None  # 7: any token that is not EOS
        for seq, n in zip(batch.seqs, batch.num_new_tokens)
    ]


def run(
    title: str,
    num_blocks: int,
    budget: int,
    prompts: dict[str, int],
    arrivals: dict[int, list[str]],
    num_steps: int,
) -> None:
    print(f"== {title}: block_size 16, token budget {budget}, {num_blocks} KV blocks")
    config = Config(
        "qwen3-tiny", block_size=16, max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=256
    )
    sched = Scheduler(config, num_kvcache_blocks=num_blocks)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    seqs = {
        name: Sequence(list(range(10 + i * 1000, 10 + i * 1000 + n)), params, name)  # distinct prompts
        for i, (name, n) in enumerate(prompts.items())
    }
    for step in range(1, num_steps + 1):
        for name in arrivals.get(step, []):
            sched.add(seqs[name])
        blocks_before = {name: len(s.block_table) for name, s in seqs.items()}
        free_before = sched.block_manager.num_free_blocks
        batch = sched.schedule()
        sampled = fake_run(batch)
        print(
            f"step {step}: {batch.num_tokens} tokens, budget left {budget - batch.num_tokens}, "
            f"free blocks {free_before} -> {sched.block_manager.num_free_blocks}, "
            f"preempted {batch.num_preempted}"
        )
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, sampled):
            start = seq.num_computed_tokens
            what = "samples" if token is not None else "chunk, no sample"
            print(
                f"  {seq.request_id}: n={n:<3d} positions {f'{start}..{start + n - 1}':<9} "
                f"blocks {blocks_before[seq.request_id]} -> {len(seq.block_table)}  {what}"
            )
        if sched.waiting:
            print(f"  waiting: {[s.request_id for s in sched.waiting]}")
        sched.update(batch, sampled)


def main() -> None:
    # A (15-token prompt) and B (33) arrive first, C (100) before step 2, D (40) before step 3.
    run(
        "continuous batching with chunked prefill",
        num_blocks=32,
        budget=64,
        prompts={"A": 15, "B": 33, "C": 100, "D": 40},
        arrivals={1: ["A", "B"], 2: ["C"], 3: ["D"]},
        num_steps=4,
    )
    # Three 30-token prompts fill a 6-block cache; at position 32 each needs a third block.
    run(
        "preemption",
        num_blocks=6,
        budget=96,
        prompts={"A": 30, "B": 30, "C": 30},
        arrivals={1: ["A", "B", "C"]},
        num_steps=4,
    )


if __name__ == "__main__":
    main()
