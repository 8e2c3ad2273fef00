"""HostInputs.build: the prefill attention work list travels with every step that is not all decode."""

import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_input import HostInputs
from nanovllm.kernels.paged_attention import prefill_tile_tokens, prefill_work_items


def test_steps_carry_the_prefill_work_list():
    llm = LLM("qwen3-tiny", device="cpu", max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)
    try:
        runner = llm.engine.runner
        hf = llm.engine.config.hf_config
        assert runner.tile_tokens == prefill_tile_tokens(hf.num_attention_heads, hf.num_key_value_heads)
        steps = []
        prepare = runner.prepare

        def record(batch):  # (checked at once: the host buffers are reused two steps later)
            inp = prepare(batch)
            num_new = list(batch.num_new_tokens)
            if inp.is_decode:
                assert inp.work_seq is None and inp.work_tile is None
            else:
                seq, tile = prefill_work_items(np.array(num_new), runner.tile_tokens)
                assert inp.work_seq.dtype == inp.work_tile.dtype == torch.int32
                assert inp.work_seq.tolist() == seq.tolist() and inp.work_tile.tolist() == tile.tolist()
            steps.append((num_new, inp.is_decode))
            return inp

        runner.prepare = record
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        llm.generate([list(range(3, 43)), list(range(200, 300))], params, use_tqdm=False)  # 40 and 100 tokens
    finally:
        llm.shutdown()
    # the 40-token prompt and a 24-token chunk of the other; its sampled token and 63 more; then the rest
    assert steps[:3] == [([40, 24], False), ([1, 63], False), ([1, 13], False)]
    assert steps[-1][1]  # decode steps after


def test_a_token_budget_beyond_the_prefill_grid_is_refused():
    # group 2: 64-token tiles; 65,535 work items per step at most (the grid's second axis)
    with pytest.raises(ValueError, match="max_num_batched_tokens=4194304 is too large"):
        LLM("qwen3-tiny", device="cpu", max_num_batched_tokens=4194304, max_model_len=256)


def test_a_step_reads_only_the_block_ids_added_since_the_last():
    """A decode step converts the block ids a sequence got since its previous step, not its whole table
    (O(context) per sequence, every step); a table that is freed and allocated again is read anew."""
    config = Config("qwen3-tiny", device="cpu", max_num_seqs=2, max_model_len=256)
    inputs = HostInputs(config, torch.device("cpu"), max_blocks_per_seq=16, tile_tokens=64)
    seq = Sequence(list(range(3, 35)), SamplingParams())  # 32 tokens: two full blocks
    seq.num_computed_tokens, seq.block_table = 31, [7, 3]

    def decode_tables() -> list[list[int]]:
        inp = inputs.build(ScheduledBatch([seq], [1]))
        assert inp.is_decode
        return inp.block_tables.tolist()

    assert decode_tables() == [[7, 3]]
    seq.token_ids.append(40)
    seq.num_computed_tokens, seq.block_table[0] = 32, "read again"  # (an id read before: never again)
    seq.block_table.append(9)  # (in place, as BlockManager.append_slots grows it)
    assert decode_tables() == [[7, 3, 9]]
    seq.block_table = [4, 5, 6]  # (preempted and admitted again: a new table)
    assert decode_tables() == [[4, 5, 6]]
