"""The benchmarks run end to end on the tiny preset on the CPU (so they don't rot), and their
transformers baseline really is the same model: same weights, and a paged attention that matches."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.benchmark import hf_baseline
from nanovllm.benchmark.common import CARD_PEAKS, card_peaks, make_workload, throughput_floor_tok_per_s
from tests.scripts import load_script

ENGINE = ["--model", "qwen3-tiny", "--device", "cpu", "--num-kvcache-blocks", "256", "--max-num-seqs", "8"]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on a busy CI host are faster on one thread than fighting over several.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _report(out_dir, kind: str) -> dict:
    (path,) = out_dir.glob(f"{kind}-cpu-*.json")
    return json.loads(path.read_text())


def test_workload_is_nano_vllm_bench():
    w = make_workload(256, 100, 1024, 100, 1024, max_token_id=10_000, seed=0)
    assert (w.num_output_tokens, w.num_prompt_tokens) == (133_966, 142_827)
    assert w.head(64).prompts == w.prompts[:64] and w.head(64).max_tokens == w.max_tokens[:64]


def test_throughput_floor_per_card():
    # The H100's floor is issue 8's 25,747 tok/s; another card's is the same work at its measured rates.
    assert throughput_floor_tok_per_s(CARD_PEAKS["H100"]) == pytest.approx(25_747, abs=0.5)
    h200 = CARD_PEAKS["H200"]
    assert card_peaks("NVIDIA H200") == ("H200", h200) and card_peaks("cpu")[0] == "H100"
    # decode (5.03 s on the H100) scales with the bandwidth, prefill (0.17 s) with the matmul rate
    expected_s = 0.17 * 804e12 / h200.bf16_flop_per_s + (133_966 / 25_747 - 0.17) * 3.0e12 / 4.27e12
    assert throughput_floor_tok_per_s(h200) == pytest.approx(133_966 / expected_s)


def test_workload_floor_is_one_gpus_in_16_bits():
    # The floor's bytes and FLOPs are one GPU's in bf16: a TP run or float32 weights gets none (a TP=2 run
    # was put at up to ~200% of one card's floor).
    from nanovllm.benchmark.throughput import workload_floor
    from nanovllm.config import Config

    def floor(**kwargs):
        config = Config.from_kwargs("qwen3-0.6b", device="cpu", **kwargs)
        return workload_floor("NVIDIA H100 80GB HBM3", config)

    assert floor(dtype="bfloat16")["tok_per_s"] == pytest.approx(25_747, abs=0.5)
    assert floor(dtype="bfloat16")["card"] == "H100"
    assert floor(dtype="bfloat16", tensor_parallel_size=2) is None
    assert floor(dtype="float32") is None


def test_throughput_benchmark(tmp_path):
    from nanovllm.benchmark.throughput import main

    args = ["--num-requests", "4", "--max-input-len", "32", "--max-output-len", "8", "--hf-num-requests", "2"]
    assert main([*ENGINE, *args, "--hf-mode", "both", "--hf-static-subset", "3", "--out", str(tmp_path)]) == 0
    r = _report(tmp_path, "throughput")
    assert r["card"] == "cpu" and r["date"] and "git_commit" in r and r["versions"]["torch"]
    assert r["workload"]["num_requests"] == 4 and r["workload"]["ignore_eos"] is True
    nano = r["nanovllm"]
    assert nano["full"]["output_tokens"] == r["workload"]["num_output_tokens"]
    assert nano["full"]["tok_per_s"] > 0 and nano["kv_cache_tokens"] == 256 * nano["block_size"]
    speeds = sorted(x["tok_per_s"] for x in nano["full_runs"])  # --repeats 3 by default: the median
    assert len(speeds) == 3 and nano["full"]["tok_per_s"] == speeds[1]
    assert nano["triton_compiles_in_timed_runs"] == []  # recorded (empty: the CPU path runs no Triton kernel)
    assert set(nano["subsets"]) == {"2", "3"}
    hf = r["hf"]
    for key in ("default", "static", "tuned"):  # a number, or the reason there is none
        assert hf[key].get("tok_per_s", 0) > 0 or hf[key].get("error"), (key, hf[key])
    # Transformers runs exactly the requests nanovllm's subset row counts.
    assert hf["default"]["output_tokens"] == nano["subsets"]["2"]["output_tokens"]
    assert hf["static"]["useful_tokens"] == nano["subsets"]["3"]["output_tokens"]
    assert hf["tuned"]["candidate"] == "varlen"  # the others need CUDA: recorded as skipped
    assert hf["tuned_candidates"]["varlen-async"]["skipped"]
    assert r["ratios"]["nanovllm_over_hf_default"] > 0


def test_throughput_no_hf(tmp_path):
    from nanovllm.cli import main

    args = ["--num-requests", "2", "--max-input-len", "8", "--max-output-len", "4", "--hf-mode", "none"]
    assert main(["bench", *ENGINE, *args, "--repeats", "1", "--out", str(tmp_path)]) == 0
    r = _report(tmp_path, "throughput")
    assert r["hf"] == {} and r["nanovllm"]["subsets"] == {}
    assert r["nanovllm"]["full_runs"] == [r["nanovllm"]["full"]]
    assert main(["bench", *ENGINE, *args, "--repeats", "0", "--out", str(tmp_path)]) == 2


def test_default_workload_on_a_small_vocabulary(monkeypatch):
    # qwen3-tiny's 2,048 ids draw other prompts than bench.py's ids in [0, 10000]: a custom workload, where
    # it stopped with "workload drew 144881 output tokens, expected 133,966" before the engine was built.
    import nanovllm
    from nanovllm.benchmark.throughput import build_parser, run

    class EngineBuilt(Exception):
        pass

    def engine(*args, **kwargs):
        raise EngineBuilt

    monkeypatch.setattr(nanovllm, "LLM", engine)
    with pytest.raises(EngineBuilt):
        run(build_parser().parse_args(ENGINE), {})


def test_short_hf_time_cap(tmp_path):
    # A cap under 10 s is a cap: the run takes it (it was skipped, "--hf-budget-s (240 s) used up").
    from nanovllm.benchmark.throughput import main

    args = ["--num-requests", "2", "--max-input-len", "8", "--max-output-len", "4", "--repeats", "1"]
    args += ["--hf-mode", "default", "--hf-static-subset", "0", "--hf-time-cap-s", "5"]
    assert main([*ENGINE, *args, "--out", str(tmp_path)]) == 0
    default = _report(tmp_path, "throughput")["hf"]["default"]
    assert default["tok_per_s"] > 0 and default["time_cap_s"] == 5


def test_recording_triton_compiles():
    # Triton calls its post-compile hook with these keywords after each new specialization (never on a
    # cache hit); a CPU cannot compile, so the call is made here as Triton's JIT makes it.
    from nanovllm.benchmark.common import recording_triton_compiles

    triton = pytest.importorskip("triton")
    hooks = triton.knobs.runtime
    before = hooks.jit_post_compile_hook
    name = "_decode_split_kernel[num_warps=4, num_ctas=1](q_ptr: *bf16)"
    with recording_triton_compiles() as compiled:
        hook = hooks.jit_post_compile_hook
        hook(key=None, repr=name, fn=None, compile={}, is_manual_warmup=False, already_compiled=False)
    assert compiled == [name] and hooks.jit_post_compile_hook is before
    with pytest.raises(RuntimeError), recording_triton_compiles():
        raise RuntimeError  # the hook is put back on the way out of a failing block too
    assert hooks.jit_post_compile_hook is before


def test_step_timeline_runs_twice_on_one_engine():
    # scripts/step_timeline.py --runs 2 (a GPU script) on the tiny preset: both runs see every step,
    # the second prefills its prompts again (prefix cache emptied), each step has its floor.
    from nanovllm.benchmark.latency import model_sizes

    timeline = load_script("scripts/step_timeline.py").timeline
    llm = LLM("qwen3-tiny", device="cpu", num_kvcache_blocks=256, max_num_seqs=8)
    try:
        work = make_workload(6, 8, 40, 2, 6, max_token_id=100, seed=0)
        sizes = model_sizes(llm.engine.config)
        runs = [timeline(llm.engine, work, sizes, 3.0e12, 804e12) for _ in range(2)]
    finally:
        llm.shutdown()
    for run in runs:
        assert run["output_tokens"] == work.num_output_tokens and run["tok_per_s"] > 0
        assert sum(v["steps"] for v in run["buckets"].values()) == len(run["steps"]) > 0
        assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in run["steps"])
        assert all(r["cuda_mallocs"] == r["alloc_retries"] == 0 for r in run["steps"])  # (no CUDA here)
        assert sum(r["prefill_tokens"] for r in run["steps"]) == work.num_prompt_tokens  # no cache hit
        assert run["triton_compiles"] == []  # recorded (empty: the CPU path runs no Triton kernel)
        assert isinstance(run["full_collections_ms"], list)


def test_step_timeline_records_full_collections_only():
    import gc

    recording = load_script("scripts/step_timeline.py").recording_collections
    callbacks = list(gc.callbacks)
    with recording() as pauses:
        gc.collect(0)
        gc.collect(1)
        assert pauses == []  # young generations are not the pauses it looks for
        gc.collect()
    assert len(pauses) == 1 and pauses[0] >= 0
    assert gc.callbacks == callbacks  # the callback is removed on the way out


def test_median_run():
    from nanovllm.benchmark.throughput import median_run

    runs = [{"tok_per_s": v} for v in (3.0, 1.0, 2.0, 5.0)]
    assert median_run(runs)["tok_per_s"] == 2.0  # the slower middle one of an even count
    assert median_run(runs[:3])["tok_per_s"] == 2.0 and median_run(runs[:1]) is runs[0]


def test_latency_benchmark(tmp_path):
    from nanovllm.cli import main

    args = ["--contexts", "16,40", "--batches", "2,3", "--batch-context", "16", "--decode-steps", "3"]
    args += ["--prefill-batches", "3x20,1x50"]
    assert main(["bench", "latency", *ENGINE, *args, "--ttft-repeats", "2", "--out", str(tmp_path)]) == 0
    r = _report(tmp_path, "latency")
    assert [(x["num_prompts"], x["prompt_len"]) for x in r["prefill"]] == [(3, 20), (1, 50)]
    assert all(x["ms_median"] > 0 and x["tflop_per_s"] > 0 and x["floor_ms"] > 0 for x in r["prefill"])
    assert all(x["scored_ms_median"] > 0 and x["scored_floor_ms"] > x["floor_ms"] for x in r["prefill"])
    assert [x["context"] for x in r["ttft"]] == [16, 40]
    assert [(x["batch"], x["context"]) for x in r["tpot_batch1"]] == [(1, 16), (1, 40)]
    assert [x["batch"] for x in r["tpot_batched"]] == [2, 3]
    for x in r["tpot_batch1"] + r["tpot_batched"]:
        assert x["tpot_ms_median"] > 0 and 0 < x["floor_weights_ms"] < x["floor_ms"]
        assert x["num_preemptions"] == 0
    assert all(x["ttft_ms_median"] > 0 and x["floor_ms"] > 0 for x in r["ttft"])
    assert r["kv_cache_tokens"] == 256 * r["block_size"] and r["model_sizes"]["weight_bytes"] > 0


def test_latency_lengths_the_model_cannot_hold_are_reported(tmp_path, capsys):
    # qwen3-tiny allows 4,096 tokens; the default lengths need 4,864. The error named max_model_len, a flag
    # the user had not given: it must name the flags that asked for that length.
    from nanovllm.cli import main

    assert main(["bench", "latency", *ENGINE, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "max_model_len=4864 exceeds 4096" in err and "--contexts" in err and "--decode-steps" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--bandwidth-tbs", "--peak-tflops"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_latency_bad_peaks_are_reported(tmp_path, capsys, flag, value):
    # -1 gave negative floors; 0 silently used the card's peaks
    from nanovllm.cli import main

    assert main(["bench", "latency", *ENGINE, flag, value, "--out", str(tmp_path)]) == 2
    assert f"error: {flag} must be > 0" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_bad_arguments_are_reported(tmp_path, capsys):
    from nanovllm.benchmark.throughput import main

    assert main([*ENGINE, "--hf-tuned", "warp-drive", "--out", str(tmp_path)]) == 2
    assert "unknown --hf-tuned candidate" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--hf-num-requests", "-1"),  # ran transformers on all but the last request, as "first -1"
        ("--hf-static-subset", "-1"),
        ("--hf-time-cap-s", "0"),  # skipped every transformers run, blaming --hf-budget-s
        ("--hf-budget-s", "-5"),
        ("--max-token-id", "-1"),  # "empty range for randrange()"
        ("--num-requests", "0"),  # named num_requests, not the flag
        ("--warmup-requests", "0"),  # silently ran one
    ],
)
def test_bad_numbers_are_reported(tmp_path, capsys, flag, value):
    from nanovllm.benchmark.throughput import main

    assert main([*ENGINE, "--num-requests", "2", flag, value, "--out", str(tmp_path)]) == 2
    assert f"error: {flag} must be" in capsys.readouterr().err and not list(tmp_path.iterdir())


# ---- the transformers baseline is the same model -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    llm = LLM("qwen3-tiny", device="cpu", num_kvcache_blocks=64, max_model_len=256)
    model = hf_baseline.build_hf_model(llm.config)
    yield llm, model
    llm.shutdown()


def test_hf_model_has_nanovllm_weights(tiny):
    llm, model = tiny
    ours = dict(llm.engine.runner.model.named_parameters())
    theirs = dict(model.named_parameters())
    layer = "model.layers.1."

    # (each norm's weight is folded into the matmul after it: DecoderLayer.fold_norm_weights)
    def folded(weight, norm):
        return (weight.float() * theirs[layer + f"{norm}.weight"].float()).to(weight.dtype)

    qkv = torch.cat([theirs[layer + f"self_attn.{p}_proj.weight"] for p in "qkv"])
    qkv = folded(qkv, "input_layernorm")
    torch.testing.assert_close(ours[layer + "self_attn.qkv_proj.weight"], qkv, rtol=0, atol=0)
    gate_up = torch.cat([theirs[layer + f"mlp.{p}_proj.weight"] for p in ("gate", "up")])
    gate_up = folded(gate_up, "post_attention_layernorm")
    torch.testing.assert_close(ours[layer + "mlp.gate_up_proj.weight"], gate_up, rtol=0, atol=0)
    assert bool((ours[layer + "input_layernorm.weight"] == 1).all())
    torch.testing.assert_close(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])


@pytest.mark.parametrize("attn", ["paged|sdpa", hf_baseline.VARLEN_ATTENTION])
def test_hf_continuous_batching_matches_nanovllm_greedy(tiny, attn):
    from transformers import GenerationConfig

    llm, model = tiny
    w = make_workload(5, 3, 60, 6, 6, max_token_id=2047, seed=3)
    ours = [o.outputs[0].token_ids for o in llm.generate(w.prompts, GREEDY, use_tqdm=False)]
    if attn == hf_baseline.VARLEN_ATTENTION:
        hf_baseline.register_varlen_attention()
    model.set_attn_implementation(attn)
    try:
        with hf_baseline._cpu_cache_budget(model.device):
            out = model.generate_batch(
                w.prompts,
                generation_config=GenerationConfig(do_sample=False, max_new_tokens=6, eos_token_id=-1),
            )
    finally:
        model.set_attn_implementation("sdpa")
    theirs = [o.generated_tokens for o in out.values()]
    assert theirs == ours


GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_varlen_reference_is_causal_with_a_cached_prefix():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    cu_q, cu_k = torch.tensor([0, 1, 3]), torch.tensor([0, 2, 7])  # seq 0: 1 query, 2 keys; seq 1: 2 of 5
    out = hf_baseline.causal_varlen_attention_reference(q, k, v, cu_q, cu_k, scale=0.5)
    # The last query of each sequence sees all of its keys: plain attention over them.
    for qi, (k0, k1) in ((0, (0, 2)), (2, (2, 7))):
        kk, vv = k[k0:k1].repeat_interleave(2, dim=1), v[k0:k1].repeat_interleave(2, dim=1)
        weights = torch.softmax(torch.einsum("hd,khd->hk", q[qi], kk) * 0.5, dim=-1)
        torch.testing.assert_close(out[qi], torch.einsum("hk,khd->hd", weights, vv))
    # The first query of sequence 1 sees 4 of its 5 keys.
    kk, vv = k[2:6].repeat_interleave(2, dim=1), v[2:6].repeat_interleave(2, dim=1)
    weights = torch.softmax(torch.einsum("hd,khd->hk", q[1], kk) * 0.5, dim=-1)
    torch.testing.assert_close(out[1], torch.einsum("hk,khd->hd", weights, vv))


def test_reset_prefix_cache_forgets_free_blocks_only():
    from nanovllm.engine.block_manager import BlockManager
    from nanovllm.engine.sequence import Sequence

    bm = BlockManager(num_blocks=8, block_size=4)
    done, running = Sequence(list(range(9)), GREEDY), Sequence(list(range(100, 109)), GREEDY)
    for seq in (done, running):
        bm.allocate(seq, bm.find_cached_prefix(seq), seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
    bm.free_seq(done)
    bm.reset_prefix_cache()
    bm.check_consistency()
    assert bm.find_cached_prefix(Sequence(list(range(9)), GREEDY)) == []  # forgotten
    assert len(bm.find_cached_prefix(Sequence(list(range(100, 109)), GREEDY))) == 2  # still in use: kept


def test_decode_linear_chain_benchmark_without_a_gpu(tmp_path, capsys, monkeypatch):
    # GPU-only: on a CPU it says so and writes nothing; its tile sweep stays within what the launcher accepts
    chain = load_script("benchmarks/decode_linear_chain.py")
    candidates = chain.tile_candidates(5)
    assert candidates and all(c[0] == 16 for c in candidates)  # 5 rows: BLOCK_M 16 only
    wide = chain.tile_candidates(256)
    assert max(c[0] for c in wide) == 256 and all(c[0] * c[1] <= 128 * 128 for c in wide)
    if not torch.cuda.is_available():
        monkeypatch.setattr(sys, "argv", ["decode_linear_chain.py", "--out", str(tmp_path)])
        chain.main()
        assert "needs a CUDA GPU" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_embeddings_benchmark(tmp_path):
    """benchmarks/embeddings.py on the tiny preset: both sides run, and give the same vectors."""
    bench = load_script("benchmarks/embeddings.py", "embeddings_benchmark")
    args = [
        "--model",
        "qwen3-tiny",
        "--device",
        "cpu",
        "--num-prompts",
        "12",
        "--min-len",
        "5",
        "--max-len",
        "40",
    ]
    result = bench.main([*args, "--hf-batch-size", "5", "--out", str(tmp_path)])
    assert result["workload"]["num_prompt_tokens"] == sum(map(len, bench.make_prompts(12, 5, 40, 2048)))
    assert result["nanovllm"]["tok_per_s"] > 0 and result["transformers"]["tok_per_s"] > 0
    assert result["cosine"]["min"] > 0.9999  # (float32 on the CPU: the same vectors)
    assert _report(tmp_path, "embeddings")["speedup"] == result["speedup"]
