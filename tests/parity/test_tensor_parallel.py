"""Tensor parallelism on the CPU (gloo): TP=2 against TP=1 and transformers on tiny random
checkpoints, and the life of the worker processes (two engines at once, shutdown, garbage
collection, a killed worker, a killed driver).

Every LLM here spawns a worker process (several seconds each), so the engines are module fixtures.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanovllm import LLM, PoolingParams, SamplingParams
from nanovllm.config import Config
from nanovllm.engine.step_input import HostInputs, LaunchedStep, ModelInput
from nanovllm.engine.tp_worker import decode_message, encode_message
from nanovllm.layers.embed_head import ParallelLMHead
from tests.checkpoints import build_checkpoint, hf_greedy, load_hf_model, mixed_prompts

MAX_TOKENS = 8
PROMPT_LENS = [3, 90, 17, 64, 1, 45]
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Chunked prefill: long prompts take several steps, mixed with other requests' decodes.
CHUNKED = dict(max_num_batched_tokens=32, max_num_seqs=4)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(PROMPT_LENS)


def _checkpoint(tmp_path_factory, arch: str, **overrides) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp(arch), arch, **overrides)


def _expected(ckpt: Path, prompts) -> list[list[int]]:
    hf = load_hf_model(ckpt)
    return [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]


def _tokens(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    # 4 attention heads, 2 KV heads (tests/checkpoints defaults): one KV head per rank at TP=2. qwen2: q/k/v
    # biases, sharded, added after the folded input norm's scale.
    return {
        "qwen3": _checkpoint(tmp_path_factory, "qwen3"),
        "llama": _checkpoint(tmp_path_factory, "llama"),
        "qwen2": _checkpoint(tmp_path_factory, "qwen2"),
    }


@pytest.fixture(scope="module")
def expected(ckpts, prompts):
    return {arch: _expected(path, prompts) for arch, path in ckpts.items()}


@pytest.fixture(scope="module")
def engines(ckpts):
    """One TP=2 engine per architecture, alive together for the whole module."""
    llms = {}
    try:
        for arch, path in ckpts.items():
            llms[arch] = LLM(str(path), tensor_parallel_size=2, **CHUNKED)
        yield llms
    finally:
        for llm in llms.values():
            llm.shutdown()


def _workers(llm: LLM) -> list[mp.process.BaseProcess]:
    return llm.engine.runner.workers.procs


def _gone(pid: int) -> bool:
    """True once pid has exited (a zombie counts: it runs nothing, whoever reaps it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def _wait_gone(pids: list[int], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


# ---- the step record that crosses the pipe --------------------------------------------------


def _step_input(**pending) -> ModelInput:
    """A two-sequence step record (a prefill chunk of 2 tokens and a decode), as rank 0 sends it."""
    return ModelInput(
        input_ids=torch.tensor([5, 6, 7]),
        positions=torch.tensor([0, 1, 9]),
        slot_mapping=torch.tensor([32, 33, 41]),
        cu_seqlens_q=torch.tensor([0, 2, 3], dtype=torch.int32),
        seq_lens=torch.tensor([2, 10], dtype=torch.int32),
        block_tables=torch.tensor([[2, 0], [2, 1]], dtype=torch.int32),
        logits_indices=torch.tensor([1, 2]),
        max_query_len=2,
        max_seq_len=10,
        work_seq=torch.tensor([0, 1], dtype=torch.int32),
        work_tile=torch.tensor([0, 0], dtype=torch.int32),
        **pending,
    )


def test_step_message_round_trip():
    inp = _step_input()
    kind, got = decode_message(encode_message("step", inp))
    assert kind == "step" and (got.max_query_len, got.max_seq_len) == (2, 10)
    names = ("input_ids", "positions", "slot_mapping", "cu_seqlens_q", "seq_lens", "block_tables", "work_seq")
    for name in names:
        a, b = getattr(inp, name), getattr(got, name)
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert decode_message(encode_message("shutdown")) == ("shutdown", None)


def test_worker_stages_the_step_in_its_host_buffers():
    """What a GPU worker does with the decoded step (HostInputs.stage): every tensor copied into the
    next buffer set (pinned on a GPU; here the CPU buffers stand in), same values, dtypes and shapes."""
    config = Config("qwen3-tiny", device="cpu", max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)
    inputs = HostInputs(config, torch.device("cpu"), max_blocks_per_seq=4, tile_tokens=64)
    inputs._next_set()  # allocate the (unpinned) sets, then take the path a pinned worker takes
    inputs.pinned = True
    inp = _step_input(pending_rows=torch.tensor([2]), pending_src=torch.tensor([0]))
    _, got = decode_message(encode_message("step", inp))
    staged = inputs.stage(got)
    buffers = inputs._sets[inputs._turn][1]
    for name, value in vars(inp).items():
        if isinstance(value, torch.Tensor):
            out = getattr(staged, name)
            assert out.dtype == value.dtype and out.shape == value.shape and torch.equal(out, value)
            assert out.data_ptr() == buffers[name].data_ptr()  # a view of the host buffer, not a copy
        else:
            assert getattr(staged, name) == value


def test_tensor_parallel_size_must_fit_the_heads(ckpts):
    with pytest.raises(ValueError, match="tensor_parallel_size=3"):
        LLM(str(ckpts["qwen3"]), tensor_parallel_size=3)  # raised before any process starts


# ---- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
def test_tp2_greedy_equals_tp1_and_transformers(arch, ckpts, expected, engines, prompts, monkeypatch):
    tp1 = _tokens(LLM(str(ckpts[arch]), **CHUNKED), prompts)
    assert tp1 == expected[arch]
    # Greedy steps exchange each rank's best (logit, id) instead of gathering the logits (rank 0 is
    # this process, so its calls are counted; the workers make the same collective calls).
    calls = []
    greedy = ParallelLMHead.greedy
    monkeypatch.setattr(ParallelLMHead, "greedy", lambda self, h: calls.append(len(h)) or greedy(self, h))
    assert _tokens(engines[arch], prompts) == expected[arch]
    assert sum(calls) == len(prompts) * MAX_TOKENS


def test_tp2_overlapped_steps_feed_every_rank_the_sampled_ids(engines, prompts):
    """Overlapped scheduling under TP: each step is queued before the previous one's tokens are read
    back; every rank takes those input tokens from the ids rank 0 broadcast, and rank 0's penalized rows
    their pending output token. Seeded sampling must give what waiting for every step gives."""
    llm = engines["qwen3"]
    assert llm.engine.overlap
    penalties = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=12, ignore_eos=True, **penalties)
        if i % 2
        else SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=12, ignore_eos=True)
        for i in range(6)
    ]
    overlapped = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.engine.overlap = False
    try:
        waited = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.engine.overlap = True
    assert overlapped == waited


def test_tp2_greedy_and_sampled_steps_mixed_and_in_turn(engines, expected, prompts):
    """A step whose every row is greedy gathers each rank's best (logit, id) to rank 0; a step with a sampled
    row gathers the logits. Either way rank 0 broadcasts the ids every rank feeds to the next step. Steps of
    both kinds, within one batch and from one generate call to the next, give the greedy rows the tokens
    of an all-greedy run."""
    llm = engines["qwen3"]
    sampled = SamplingParams(temperature=0.8, seed=3, max_tokens=MAX_TOKENS, ignore_eos=True)
    mixed = [GREEDY if i % 2 == 0 else sampled for i in range(len(prompts))]
    for _ in range(2):
        out = llm.generate(prompts, mixed, use_tqdm=False)
        for i in range(0, len(prompts), 2):
            assert out[i].outputs[0].token_ids == expected["qwen3"][i]
        assert _tokens(llm, prompts) == expected["qwen3"]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tp2_greedy_with_prefix_cache_hits(arch, expected, engines, prompts):
    llm = engines[arch]
    _tokens(llm, prompts)  # (again, if the parity test ran): the prompts' full blocks are now cached
    again = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected[arch]
    assert all(o.num_cached_tokens > 0 for o in again if len(o.prompt_token_ids) > 16)
    assert llm.engine.scheduler.block_manager.hit_rate > 0


def test_tp2_steps_of_prefill_chunks_only(expected, engines, prompts):
    # One 90-token prompt in 32-token chunks: two steps sample nothing, yet every rank must agree
    # on whether the LM head (a collective) runs.
    assert _tokens(engines["qwen3"], [prompts[1]]) == [expected["qwen3"][1]]


def test_tp2_prompt_logprobs_and_token_settings_equal_tp1(ckpts, engines, prompts):
    """prompt_logprobs runs the LM head (a collective) over the scored rows of every chunk, on every rank,
    also in steps that sample nothing and next to greedy rows that gather only each rank's best."""
    scored = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2)
    # (and greedy rows that cannot take the shards' plain argmax: logit_bias, allowed_token_ids)
    biased = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logit_bias={9: 5.0})
    allowed = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, allowed_token_ids=[9, 10, 11])
    params = [scored, biased, scored, allowed, scored, GREEDY][: len(prompts)]
    tp1 = LLM(str(ckpts["qwen3"]), **CHUNKED).generate(prompts, params, use_tqdm=False)
    tp2 = engines["qwen3"].generate(prompts, params, use_tqdm=False)
    for one, two in zip(tp1, tp2):
        assert two.outputs[0].token_ids == one.outputs[0].token_ids
        if one.prompt_logprobs is None:
            assert two.prompt_logprobs is None
            continue
        assert len(two.prompt_logprobs) == len(one.prompt_token_ids) and two.prompt_logprobs[0] is None
        for a, b in zip(one.prompt_logprobs[1:], two.prompt_logprobs[1:]):
            assert (b.token_id, list(b.top_logprobs)) == (a.token_id, list(a.top_logprobs))
            assert abs(b.rank - a.rank) <= 1  # (a near tie may order either way)
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)


def test_tp2_embeddings_equal_transformers_beside_generation(ckpts, engines, expected, prompts):
    """Embeddings pool rank 0's hidden states (whole on every rank): in chunks, in steps that also sample."""
    import transformers

    base = transformers.AutoModel.from_pretrained(ckpts["qwen3"], dtype=torch.float32).eval()
    engine = engines["qwen3"].engine
    gen = {engine.add_request(p, GREEDY): i for i, p in enumerate(prompts[:3])}
    emb = {engine.add_request(p, PoolingParams()): p for p in prompts[3:]}
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert [done[rid].outputs[0].token_ids for rid in gen] == expected["qwen3"][:3]
    for rid, p in emb.items():
        with torch.no_grad():
            last = base(torch.tensor([p])).last_hidden_state[0, -1]
        torch.testing.assert_close(
            done[rid].outputs.data, torch.nn.functional.normalize(last, dim=-1), atol=2e-5, rtol=1e-4
        )


# ---- processes ------------------------------------------------------------------------------


def test_two_engines_alive_at_once_do_not_collide(engines, expected, prompts):
    a, b = engines["qwen3"], engines["llama"]
    addresses = {llm.engine.runner.rendezvous for llm in (a, b)}
    pids = {p.pid for llm in (a, b) for p in _workers(llm)}
    assert len(addresses) == 2 and len(pids) == 2
    for _ in range(2):  # interleaved steps of both engines
        assert _tokens(a, prompts[:3]) == expected["qwen3"][:3]
        assert _tokens(b, prompts[:3]) == expected["llama"][:3]


def test_context_manager_shuts_workers_down_kv_heads_replicated(tmp_path_factory, prompts):
    # One KV head for two ranks: both ranks hold (and cache) the same KV head.
    ckpt = _checkpoint(tmp_path_factory, "qwen3", num_key_value_heads=1)
    want = _expected(ckpt, prompts)
    with LLM(str(ckpt), tensor_parallel_size=2) as llm:
        procs = _workers(llm)
        assert all(p.is_alive() for p in procs)
        assert _tokens(llm, prompts) == want
    assert [p.exitcode for p in procs] == [0]
    assert not set(procs) & set(mp.active_children())
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(prompts[:1], GREEDY, use_tqdm=False)


def test_worker_that_cannot_start_raises_its_own_error(ckpt, monkeypatch):
    # An LLM built inside a daemonic process (a multiprocessing.Pool worker, say) cannot start its workers:
    # the user must see why, not shutdown()'s AssertionError about joining a process never started.
    monkeypatch.setitem(mp.current_process()._config, "daemon", True)
    threads = torch.get_num_threads()
    with pytest.raises(AssertionError, match="daemonic processes are not allowed to have children"):
        LLM(str(ckpt), tensor_parallel_size=2)
    assert torch.get_num_threads() == threads  # (the CPU ranks' thread share is given back)


def test_garbage_collected_engine_stops_its_workers(ckpts):
    llm = LLM(str(ckpts["qwen3"]), tensor_parallel_size=2)
    procs = _workers(llm)
    del llm
    gc.collect()
    assert [p.exitcode for p in procs] == [0]
    assert not set(procs) & set(mp.active_children())


@pytest.mark.parametrize("end", ["shutdown", "collected"])
def test_cuda_graphs_are_freed_before_the_group(ckpts, end):
    """NCCL's abort waits for every graph that captured one of its calls: rank 0's graphs must be freed before
    its group is released, however the engine ends. (A CPU engine has no graphs: a stand-in records it.)"""
    llm = LLM(str(ckpts["qwen3"]), tensor_parallel_size=2)
    events = []
    workers = llm.engine.runner.workers
    workers.graphs = SimpleNamespace(release=lambda: events.append("graphs released"))
    destroy = workers.group.destroy
    workers.group.destroy = lambda: events.append("group released") or destroy()
    if end == "shutdown":
        llm.shutdown()
    else:
        del llm
        gc.collect()
    assert events == ["graphs released", "group released"]


def test_killed_worker_raises_runtime_error_not_hang(ckpts, prompts):
    llm = LLM(str(ckpts["qwen3"]), tensor_parallel_size=2)
    procs = _workers(llm)
    try:
        (proc,) = procs
        assert len(_tokens(llm, prompts[:2])) == 2
        os.kill(proc.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"worker rank 1 .*SIGKILL"):
            llm.generate(prompts, GREEDY, use_tqdm=False)
        with pytest.raises(RuntimeError, match="unusable"):  # and every later call, at once
            llm.generate(prompts[:1], GREEDY, use_tqdm=False)
        assert not llm.engine.has_unfinished()
    finally:
        llm.shutdown()
    assert not set(procs) & set(mp.active_children())


def test_killed_worker_mid_step_raises_runtime_error(ckpts, prompts):
    """The worker dies while rank 0 is inside the step's collectives (not between steps)."""
    llm = LLM(str(ckpts["qwen3"]), tensor_parallel_size=2)
    try:
        (proc,) = _workers(llm)
        driver = llm.engine.runner.driver
        send = driver.send

        def send_then_kill(inp):
            send(inp)
            os.kill(proc.pid, signal.SIGKILL)  # the worker has the step; rank 0 is about to run it

        driver.send = send_then_kill
        with pytest.raises(RuntimeError, match=r"worker rank 1 .*SIGKILL"):
            llm.generate(prompts[:2], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


def test_step_stuck_in_a_collective_raises_runtime_error_not_hang(ckpts, prompts, monkeypatch):
    """A step whose collective never completes (every worker alive; on GPUs, a peer all-reduce waiting for
    rows that never come) fails after the step timeout: the watcher aborts the group, which ends the wait."""
    llm = LLM(str(ckpts["qwen3"]), tensor_parallel_size=2)
    workers = llm.engine.runner.workers
    try:
        assert len(_tokens(llm, prompts[:2])) == 2
        workers.step_timeout_s = 1.0
        read_back = LaunchedStep.wait

        def stuck(step):  # as a device sync on a step that cannot finish until the group is aborted
            give_up = time.monotonic() + 20  # (so that a missing watchdog fails the test, not hangs it)
            while not workers.aborted and time.monotonic() < give_up:
                time.sleep(0.05)
            return read_back(step)

        monkeypatch.setattr(LaunchedStep, "wait", stuck)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"did not finish within 1 s: a collective is stuck"):
            llm.generate(prompts[:2], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 30
        with pytest.raises(RuntimeError, match="unusable"):
            llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert not set(workers.procs) & set(mp.active_children())


def end_script_without_shutdown(model: str, timeout_s: float, **llm_kwargs) -> tuple[float, list[int], str]:
    """Run a script that builds a TP=2 LLM, generates, and ends without shutting it down (the finalizer
    stops the workers at interpreter exit); returns (seconds from its last line to its exit, the
    workers' pids, its stderr). Fails if the script fails or does not exit within timeout_s."""
    script = textwrap.dedent(
        f"""
        import time
        from nanovllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM({model!r}, tensor_parallel_size=2, **{llm_kwargs!r})
            llm.generate([[5, 6, 7]] * 3, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
            print(*[p.pid for p in llm.engine.runner.workers.procs], flush=True)
            print(time.time(), flush=True)
        """
    )
    lines, stderr = run_script(script, timeout_s)
    pids, last_line = lines[-2:]
    return time.time() - float(last_line), [int(p) for p in pids.split()], stderr


def run_script(script: str, timeout_s: float) -> tuple[list[str], str]:
    """Run `script` in a fresh Python that imports this checkout; (its stdout lines, its stderr). Fails if the
    script fails or runs past timeout_s."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.splitlines(), out.stderr


def test_script_ending_without_shutdown_exits_and_stops_its_workers(ckpts):
    # (The exit hang this guards against was NCCL's, tests/gpu/test_tp_exit_gpu.py; here, the lifecycle.)
    seconds, pids, _ = end_script_without_shutdown(str(ckpts["qwen3"]), timeout_s=120)
    assert len(pids) == 1
    assert _wait_gone(pids), f"workers {pids} outlived their driver"
    assert seconds < 30


def test_workers_exit_when_the_driver_is_killed(ckpts):
    script = textwrap.dedent(
        f"""
        import os, signal
        from nanovllm import LLM
        if __name__ == "__main__":
            llm = LLM({str(ckpts["qwen3"])!r}, tensor_parallel_size=2)
            print(*[p.pid for p in llm.engine.runner.workers.procs], flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 1
    assert _wait_gone(pids), f"workers {pids} outlived their driver"
