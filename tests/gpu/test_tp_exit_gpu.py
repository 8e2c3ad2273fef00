"""A TP=2 engine on 2 GPUs that is never shut down: the script still exits promptly (its finalizer stops
the workers and leaves the NCCL group to the process's exit; aborting NCCL there never returned)."""

from __future__ import annotations

import pytest
import torch

from tests.parity.test_tensor_parallel import _wait_gone, end_script_without_shutdown

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]

if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)


def test_tp_script_ending_without_shutdown_exits_promptly():
    kwargs = dict(max_model_len=1024, max_num_seqs=16, num_kvcache_blocks=1024)
    seconds, pids = end_script_without_shutdown("qwen3-0.6b", timeout_s=300, **kwargs)
    assert len(pids) == 1
    assert _wait_gone(pids), f"worker {pids} outlived its driver"
    assert seconds < 30, f"the script took {seconds:.1f} s to exit after its last line"
