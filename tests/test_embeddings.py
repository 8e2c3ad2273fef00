"""Embeddings (LLM.embed, PoolingParams) against transformers' base model on the same weights: the final
hidden states pooled (last token, mean, first), cut and normalized as vLLM does; through chunked prefill, the
prefix cache, preemption, overlapped and waiting steps, beside generation; checkpoints as embedding models
ship them (a bare decoder's flat tensor names, sentence-transformers' pooling files)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from nanovllm import LLM, EmbeddingRequestOutput, PoolingParams, PoolingRequestOutput, SamplingParams
from nanovllm.sampling_params import ParamError
from tests.checkpoints import build_checkpoint, hf_greedy, load_hf_model, mixed_prompts

PROMPT_LENS = [3, 90, 17, 64, 1, 45, 130]
# Chunked prefill: long prompts take several steps
CHUNKED = dict(max_num_batched_tokens=32, max_num_seqs=4)


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(PROMPT_LENS)  # (odd ones share a 40-token prefix: prefix-cache hits)


@pytest.fixture(scope="module")
def hidden(ckpt):
    """transformers' final hidden states (after the last norm) of a prompt: [len, hidden_size]."""
    model = transformers.AutoModel.from_pretrained(ckpt, dtype=torch.float32).eval()

    @torch.no_grad()
    def run(prompt: list[int]) -> torch.Tensor:
        return model(torch.tensor([prompt])).last_hidden_state[0]

    return run


@pytest.fixture(scope="module")
def llm(ckpt):
    with LLM(str(ckpt), **CHUNKED) as llm:
        yield llm


def _pool(h: torch.Tensor, kind: str, dims: int | None = None, normalize: bool = True) -> torch.Tensor:
    v = {"LAST": h[-1], "MEAN": h.mean(0), "CLS": h[0]}[kind]
    v = v[:dims] if dims is not None else v
    return torch.nn.functional.normalize(v, dim=-1) if normalize else v


def _vectors(outs: list[EmbeddingRequestOutput]) -> list[torch.Tensor]:
    return [torch.tensor(o.outputs.embedding) for o in outs]


def _assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, i
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=f"prompt {i}")


def test_last_token_embeddings_match_transformers_and_the_prefix_cache(llm, prompts, hidden):
    want = [_pool(hidden(p), "LAST") for p in prompts]
    first = llm.embed(prompts, use_tqdm=False)
    _assert_close(_vectors(first), want)
    assert [o.prompt_token_ids for o in first] == prompts and all(o.finished for o in first)
    again = llm.embed(prompts, use_tqdm=False)  # every full block but the last token's from the cache
    _assert_close(_vectors(again), want)
    assert [o.num_cached_tokens for o in again] == [(n - 1) // 16 * 16 for n in PROMPT_LENS]
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.num_kvcache_blocks


def test_embeddings_beside_generation_change_neither(llm, prompts, hidden, ckpt):
    """Embedding and generation requests in the same steps: each gets what it gets alone."""
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = llm.engine
    gen_ids = [engine.add_request(p, greedy) for p in prompts[:3]]
    emb_ids = [engine.add_request(p, PoolingParams()) for p in prompts[3:]]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert all(isinstance(done[i], PoolingRequestOutput) for i in emb_ids)
    _assert_close([done[i].outputs.data for i in emb_ids], [_pool(hidden(p), "LAST") for p in prompts[3:]])
    hf = load_hf_model(ckpt)
    assert [done[i].outputs[0].token_ids for i in gen_ids] == [hf_greedy(hf, p, 6) for p in prompts[:3]]


@pytest.mark.parametrize("kind", ["MEAN", "CLS"])
def test_mean_and_first_token_pooling(ckpt, prompts, hidden, kind):
    with LLM(str(ckpt), pooler_config={"pooling_type": kind}, **CHUNKED) as llm:
        want = [_pool(hidden(p), kind) for p in prompts]
        _assert_close(_vectors(llm.embed(prompts, use_tqdm=False)), want)
        again = llm.embed(prompts, use_tqdm=False)  # computed whole again: the cache would skip rows
        _assert_close(_vectors(again), want)
        assert all(o.num_cached_tokens == 0 for o in again)
        assert llm.engine.scheduler.block_manager.num_queried_tokens == 0  # (no query of the cache: no miss)


@pytest.mark.parametrize("kind", ["LAST", "MEAN"])
@pytest.mark.parametrize("overlap", [True, False])
def test_embeddings_survive_preemption(ckpt, hidden, kind, overlap):
    """A KV cache too small for everything at once: long generations preempt the embeddings mid-prompt, whose
    rows are pooled again from the recompute (rows of a step launched before the preemption are dropped)."""
    gen_prompts = mixed_prompts([60, 70, 50], seed=1)
    emb_prompts = mixed_prompts([100, 120, 90, 110], seed=2)
    args = dict(num_kvcache_blocks=22, max_num_batched_tokens=32, max_num_seqs=6, async_scheduling=overlap)
    with LLM(str(ckpt), pooler_config={"pooling_type": kind}, **args) as llm:
        engine = llm.engine
        greedy = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        gen_ids = [engine.add_request(p, greedy) for p in gen_prompts]
        emb_ids = [engine.add_request(p, PoolingParams()) for p in emb_prompts]
        emb_seqs = [engine.requests[i].seq for i in emb_ids]
        done = {}
        while engine.has_unfinished():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        assert any(seq.num_preemptions for seq in emb_seqs)  # (else this test shows nothing)
        _assert_close([done[i].outputs.data for i in emb_ids], [_pool(hidden(p), kind) for p in emb_prompts])
        hf = load_hf_model(ckpt)
        assert [done[i].outputs[0].token_ids for i in gen_ids] == [hf_greedy(hf, p, 50) for p in gen_prompts]
        assert engine.scheduler.block_manager.num_free_blocks == engine.num_kvcache_blocks


def test_pooling_params_normalize_truncate_and_dimensions(llm, prompts, hidden, tmp_path):
    p = prompts[1]
    raw = llm.embed([p], PoolingParams(normalize=False), use_tqdm=False)[0].outputs.embedding
    _assert_close([torch.tensor(raw)], [_pool(hidden(p), "LAST", normalize=False)])
    also_raw = llm.embed([p], PoolingParams(use_activation=False), use_tqdm=False)[0].outputs.embedding
    assert also_raw == raw
    short = llm.embed([p], use_tqdm=False, truncate_prompt_tokens=10)[0]
    assert short.prompt_token_ids == p[-10:]
    _assert_close(_vectors([short]), [_pool(hidden(p[-10:]), "LAST")])
    with pytest.raises(ParamError, match="Matryoshka"):
        llm.embed([p], PoolingParams(dimensions=16), use_tqdm=False)
    for bad in (dict(dimensions=0), dict(normalize=1), dict(truncate_prompt_tokens=0)):
        with pytest.raises(ParamError):
            PoolingParams(**bad)
    with pytest.raises(ParamError, match="disagree"):
        PoolingParams(normalize=True, use_activation=False)
    with pytest.raises(ValueError, match="prompt 1: .*max_model_len"):
        llm.embed([[5], [5] * 257], use_tqdm=False)
    assert llm.embed(prompts[:1], use_tqdm=False)[0].outputs.hidden_size == 64  # still usable


def test_params_of_the_other_kind_are_refused_before_anything_runs(llm, prompts):
    """SamplingParams given to embed (or PoolingParams to generate) is a ValueError naming them, not a
    generation whose outputs embed cannot read (nor a TypeError from len())."""
    engine = llm.engine
    num_generated = engine.num_generated_tokens
    for params in (SamplingParams(max_tokens=2), [SamplingParams(max_tokens=2)]):
        with pytest.raises(ValueError, match="pooling params must be a PoolingParams"):
            llm.embed(prompts[:1], params, use_tqdm=False)
        with pytest.raises(ValueError, match="pooling params must be a PoolingParams"):
            llm.encode(prompts[:1], params, use_tqdm=False)
    with pytest.raises(ValueError, match="sampling params must be a SamplingParams"):
        llm.generate(prompts[:1], PoolingParams(), use_tqdm=False)
    assert not engine.has_unfinished() and engine.num_generated_tokens == num_generated  # nothing ran
    assert llm.embed(prompts[:1], use_tqdm=False)[0].finished  # still usable


def test_matryoshka_dimensions(tmp_path, prompts):
    path = build_checkpoint(
        tmp_path / "m", "qwen3", max_position_embeddings=256, matryoshka_dimensions=[16, 32]
    )
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with LLM(str(path), max_num_seqs=4) as llm:
        out = llm.embed(prompts[:2], PoolingParams(dimensions=16), use_tqdm=False)
        with torch.no_grad():
            want = [_pool(model(torch.tensor([p])).last_hidden_state[0], "LAST", 16) for p in prompts[:2]]
        _assert_close(_vectors(out), want)
        with pytest.raises(ParamError, match=r"one of \[16, 32\]"):
            llm.embed(prompts[:1], PoolingParams(dimensions=20), use_tqdm=False)


def _bare_decoder_checkpoint(src: Path, dst: Path) -> Path:
    """`src` saved as an embedding model ships: transformers' base model (no LM head; tensor names without
    "model.", architectures ["Qwen3Model"]), with sentence-transformers' pooling files."""
    transformers.AutoModel.from_pretrained(src, dtype=torch.float32).save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, dst / f.name)
    return dst


def _sentence_transformers(path: Path, mode: str, normalize: bool, extra: list[dict] = ()) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    modules.append(
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
    )
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (path / "modules.json").write_text(json.dumps(modules + list(extra)))
    (path / "1_Pooling").mkdir(exist_ok=True)
    flags = {f"pooling_mode_{m}": m == mode for m in ("cls_token", "mean_tokens", "lasttoken", "max_tokens")}
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **flags}))


def test_an_embedding_checkpoint_runs_the_pooling_runner(ckpt, tmp_path, prompts, hidden):
    path = _bare_decoder_checkpoint(ckpt, tmp_path / "bare")
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Qwen3Model"]
    with LLM(str(path), **CHUNKED) as llm:
        assert llm.config.runner_type == "pooling" and llm.engine.runner.model.lm_head is None
        _assert_close(
            _vectors(llm.embed(prompts, use_tqdm=False)), [_pool(hidden(p), "LAST") for p in prompts]
        )
        with pytest.raises(ValueError, match="runner='pooling'"):
            llm.generate(prompts[:1], use_tqdm=False)
        assert llm.embed(prompts[:1], use_tqdm=False)[0].finished  # still usable
    with pytest.raises(ValueError, match="runner must be one of"):
        LLM(str(path), runner="draft")


@pytest.mark.parametrize(
    ("mode", "normalize", "kind"), [("mean_tokens", True, "MEAN"), ("lasttoken", False, "LAST")]
)
def test_sentence_transformers_pooling_files(ckpt, tmp_path, prompts, hidden, mode, normalize, kind):
    path = _bare_decoder_checkpoint(ckpt, tmp_path / "st")
    _sentence_transformers(path, mode, normalize)
    with LLM(str(path), **CHUNKED) as llm:
        assert (llm.config.pooler.pooling_type, llm.config.pooler.normalize) == (kind, normalize)
        want = [_pool(hidden(p), kind, normalize=normalize) for p in prompts]
        _assert_close(_vectors(llm.embed(prompts, use_tqdm=False)), want)


def test_unsupported_poolers_are_refused(ckpt, tmp_path):
    path = _bare_decoder_checkpoint(ckpt, tmp_path / "st")
    _sentence_transformers(path, "max_tokens", True)
    with pytest.raises(ValueError, match="pooling .*max_tokens"):
        LLM(str(path))
    dense = {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    _sentence_transformers(path, "lasttoken", True, [dense])
    with pytest.raises(ValueError, match="Dense"):
        LLM(str(path))
    with pytest.raises(ValueError, match="pooling_type must be one of"):
        LLM(str(ckpt), pooler_config={"pooling_type": "MAX"})
    with pytest.raises(ValueError, match="unknown key.*known: pooling_type, normalize, use_activation"):
        LLM(str(ckpt), pooler_config={"softmax": True})
    with pytest.raises(ValueError, match="normalize=True and use_activation=False disagree"):
        LLM(str(ckpt), pooler_config={"normalize": True, "use_activation": False})


def test_the_preset_embeds_without_a_download():
    with LLM("qwen3-tiny", runner="pooling") as llm:
        out = llm.embed(["Hello, my name is", [1, 2, 3]], use_tqdm=False)
        assert [len(o.outputs.embedding) for o in out] == [llm.config.hf_config.hidden_size] * 2
        assert all(abs(torch.tensor(o.outputs.embedding).norm().item() - 1) < 1e-4 for o in out)


def test_score_is_the_cosine_of_the_two_embeddings(llm, prompts, hidden):
    """LLM.score, as vLLM's for an embedding model: one text against N, or N against N element by element."""
    vec = [_pool(hidden(p), "LAST") for p in prompts[:4]]
    one_to_n = llm.score(prompts[0], prompts[1:4], use_tqdm=False)
    assert [o.outputs.score for o in one_to_n] == pytest.approx(
        [float(vec[0] @ v) for v in vec[1:4]], abs=1e-5
    )
    assert one_to_n[1].prompt_token_ids == prompts[0] + prompts[2]
    pairwise = llm.score(prompts[:2], prompts[2:4], use_tqdm=False)
    assert [o.outputs.score for o in pairwise] == pytest.approx(
        [float(vec[0] @ vec[2]), float(vec[1] @ vec[3])], abs=1e-5
    )
    raw = llm.score(prompts[0], prompts[1], use_tqdm=False, pooling_params=PoolingParams(normalize=False))
    assert raw[0].outputs.score == pytest.approx(float(vec[0] @ vec[1]), abs=1e-5)  # (a cosine either way)
    with pytest.raises(ValueError, match="one text with N"):
        llm.score(prompts[:2], prompts[:3], use_tqdm=False)
