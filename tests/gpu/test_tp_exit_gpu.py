"""How a TP=2 engine on 2 GPUs ends: llm.shutdown() after CUDA graphs that captured NCCL calls returns
promptly (NCCL's abort waits for those graphs to be freed), and a script that never shuts down still exits
promptly (its finalizer stops the workers and leaves the NCCL group to the process's exit; aborting NCCL
there never returned). Either way, with the peer all-reduce, no process ends with a CUDA IPC handle still
counted as open (torch's "Producer process has been terminated before all shared CUDA tensors released")."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from tests.parity.test_tensor_parallel import _wait_gone, end_script_without_shutdown, run_script

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]

if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("needs two CUDA GPUs", allow_module_level=True)


IPC_LEFT_OPEN = "Producer process has been terminated before all shared CUDA tensors released"


def test_tp_script_ending_without_shutdown_exits_promptly():
    kwargs = dict(max_model_len=1024, max_num_seqs=16, num_kvcache_blocks=1024)
    seconds, pids, stderr = end_script_without_shutdown("qwen3-0.6b", timeout_s=300, **kwargs)
    assert len(pids) == 1
    assert _wait_gone(pids), f"worker {pids} outlived its driver"
    assert seconds < 30, f"the script took {seconds:.1f} s to exit after its last line"
    assert IPC_LEFT_OPEN not in stderr, stderr[-2000:]


def _run_tp2(body: str, **llm_kwargs) -> tuple[dict, str]:
    """Run `body` in a fresh Python once it has built `llm`, a TP=2 engine on qwen3-0.6b with llm_kwargs;
    `body` sets `result`, which comes back with the script's stderr. A hang prints the driver's stacks after
    100 s and exits (its worker follows it)."""
    head = f"""
        import faulthandler, json, os, signal, time
        from nanovllm import LLM, SamplingParams
        if __name__ == "__main__":
            faulthandler.dump_traceback_later(100, exit=True)
            llm = LLM("qwen3-0.6b", tensor_parallel_size=2, **{llm_kwargs!r})
        """
    tail = "print(json.dumps(result), flush=True)\n"
    script = textwrap.dedent(head) + textwrap.indent(textwrap.dedent(body) + tail, "    ")
    lines, stderr = run_script(script, timeout_s=150)
    return json.loads(lines[-1]), stderr


def test_tp_shutdown_with_the_peer_all_reduce_leaves_no_ipc_handle_open():
    body = """
        driver = llm.engine.runner.driver
        assert driver.tp_group.peer_all_reduce is not None, "the peer all-reduce is not in use"
        llm.generate([[5, 6, 7]] * 3, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        pids = [p.pid for p in llm.engine.runner.workers.procs]
        llm.shutdown()
        result = {"pids": pids}
        """
    result, stderr = _run_tp2(body, max_model_len=1024, max_num_seqs=16, num_kvcache_blocks=1024)
    assert _wait_gone(result["pids"])
    assert IPC_LEFT_OPEN not in stderr, stderr[-2000:]


def test_tp_shutdown_after_cuda_graphs_is_prompt():
    # Without the peer all-reduce the graphs capture NCCL's all-reduces (with it, TP keeps NCCL out of every
    # graph: engine/cuda_graphs.py `graph_sizes`).
    body = """
        driver = llm.engine.runner.driver
        assert driver.tp_group.peer_all_reduce is None and driver.cuda_graphs.decode, "no NCCL in a graph"
        llm.generate([[5, 6, 7]] * 3, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        pids = [p.pid for p in llm.engine.runner.workers.procs]
        start = time.monotonic()
        llm.shutdown()
        result = {"pids": pids, "shutdown_s": time.monotonic() - start}
        """
    result, _ = _run_tp2(
        body, max_model_len=1024, max_num_seqs=16, num_kvcache_blocks=1024, disable_custom_all_reduce=True
    )
    assert result["shutdown_s"] < 30, f"llm.shutdown() took {result['shutdown_s']:.1f} s"
    assert _wait_gone(result["pids"])


def test_tp_worker_killed_mid_step_with_cuda_graphs_raises_not_hangs():
    # On the CPU (tests/parity/test_tensor_parallel.py) a killed worker surfaces as a RuntimeError. Here the
    # step is a decode graph's replay whose all-reduces wait for the dead peer, or the sampled ids' NCCL
    # broadcast, after a 1,800-token prefill step. That step once ran in a graph holding NCCL all-reduces, and
    # NCCL's abort then waited for the graph to be freed while rank 0 waited in the broadcast: a hang. Now no
    # graph holds an NCCL call: the abort ends the wait, and shutdown returns.
    body = """
        group, graphs = llm.engine.runner.driver.tp_group, llm.engine.runner.driver.cuda_graphs
        assert group.peer_all_reduce is not None, "no peer all-reduce on these GPUs"
        assert max(graphs.prefill) == 1024, "a prefill graph holds NCCL calls"  # 2 MiB / (1,024 x 2 bytes)
        (proc,) = llm.engine.runner.workers.procs
        driver = llm.engine.runner.driver
        send, steps = driver.send, []

        def send_then_kill(inp):
            send(inp)
            steps.append(inp.is_decode)
            if len(steps) == 3:  # a decode step: rank 0 is about to replay its graph
                os.kill(proc.pid, signal.SIGKILL)

        driver.send = send_then_kill
        start = time.monotonic()
        try:
            llm.generate([[5, 6, 7] * 600], SamplingParams(max_tokens=50), use_tqdm=False)
            error = None
        except RuntimeError as e:
            error = str(e)
        raised_s = time.monotonic() - start
        start = time.monotonic()
        llm.shutdown()
        result = dict(error=error, raised_s=raised_s, shutdown_s=time.monotonic() - start, steps=steps)
        """
    result, _ = _run_tp2(body, max_model_len=4096, max_num_seqs=16, num_kvcache_blocks=1024)
    assert result["error"] is not None and "SIGKILL" in result["error"], result
    assert result["steps"][0] is False and result["steps"][2] is True, result  # a 1,800-token prefill first
    assert result["raised_s"] < 60 and result["shutdown_s"] < 30, result
