"""The LM head's start-up pass over every row count (engine/model_runner.py `_warm_up_logits`)."""

from __future__ import annotations

import torch

from nanovllm import LLM


def test_lm_head_runs_once_at_every_row_count_a_step_samples(monkeypatch):
    # On CUDA the runner does this at start-up, so that cuBLAS loads each shape's kernel then and not inside
    # a step of the first generate. A CPU runner skips it, so it is called here directly.
    llm = LLM("qwen3-tiny", device="cpu", num_kvcache_blocks=64, max_model_len=256, max_num_seqs=5)
    try:
        runner = llm.engine.runner
        real_linear, calls = torch.nn.functional.linear, []

        def spy(x, weight, bias=None):
            calls.append((tuple(x.shape), weight is runner.model.lm_head.weight))
            return real_linear(x, weight, bias)

        monkeypatch.setattr(torch.nn.functional, "linear", spy)
        runner._warm_up_logits()
        hidden = runner.model.lm_head.weight.shape[1]
        assert calls == [((rows, hidden), True) for rows in range(1, 6)]
    finally:
        llm.shutdown()
