"""How a TP=2 engine on 2 GPUs ends: llm.shutdown() after CUDA graphs that captured NCCL calls returns
promptly (NCCL's abort waits for those graphs to be freed), and a script that never shuts down still exits
promptly (its finalizer stops the workers and leaves the NCCL group to the process's exit; aborting NCCL
there never returned)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.parity.test_tensor_parallel import _wait_gone, end_script_without_shutdown
from tests.scripts import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]

if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)


def test_tp_script_ending_without_shutdown_exits_promptly():
    kwargs = dict(max_model_len=1024, max_num_seqs=16, num_kvcache_blocks=1024)
    seconds, pids = end_script_without_shutdown("qwen3-0.6b", timeout_s=300, **kwargs)
    assert len(pids) == 1
    assert _wait_gone(pids), f"worker {pids} outlived its driver"
    assert seconds < 30, f"the script took {seconds:.1f} s to exit after its last line"


def test_tp_shutdown_after_cuda_graphs_is_prompt():
    # Prompts of up to 300 tokens: their prefill steps replay graphs of 1,024+ tokens, whose all-reduces
    # are too large for peer memory and were captured as NCCL calls.
    script = textwrap.dedent(
        """
        import random, time
        from nanovllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM("qwen3-0.6b", tensor_parallel_size=2, max_model_len=1024, max_num_seqs=16,
                      num_kvcache_blocks=1024)
            assert llm.engine.runner.driver.cuda_graphs.prefill, "no prefill graphs were captured"
            rng = random.Random(0)
            prompts = [[rng.randrange(3, 9000) for _ in range(rng.randint(16, 300))] for _ in range(8)]
            params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
            llm.generate(prompts, params, use_tqdm=False)
            pids = [p.pid for p in llm.engine.runner.workers.procs]
            start = time.monotonic()
            llm.shutdown()
            print(*pids, flush=True)
            print(time.monotonic() - start, flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    pids, seconds = out.stdout.splitlines()[-2:]
    assert float(seconds) < 30, f"llm.shutdown() took {float(seconds):.1f} s"
    assert _wait_gone([int(p) for p in pids.split()])
