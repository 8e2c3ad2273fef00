"""Shard math of the tensor-parallel layers, without processes.

Each rank's layer is built inside `building_with(group)` for a simulated group; forwards run one
thread per rank, and the simulated collectives meet at a barrier, so the layers' own forward code
(masked embedding + all-reduce, row-parallel all-reduce, LM-head gather) is what is checked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig

import nanovllm.layers.linear as linear_layers
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from nanovllm.models import get_model_class
from nanovllm.utils.distributed import TensorParallelGroup, building_with, get_tp_rank, get_tp_size
from nanovllm.utils.loader import iter_checkpoint, iter_random_weights, load_weights, safetensors_files
from tests.checkpoints import build_checkpoint


class ThreadGroup:
    """One rank of a group whose ranks are threads of this process; collectives meet at a barrier."""

    peer_all_reduce = None
    _takes_peer = TensorParallelGroup._takes_peer

    def __init__(self, rank: int, size: int, shared: dict):
        self.rank, self.size, self.shared = rank, size, shared

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = x.clone()
        barrier.wait()
        parts = list(slots)
        barrier.wait()  # nobody overwrites a slot before everyone has read them
        return parts

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x.copy_(torch.stack(self._exchange(x)).sum(0))

    def gather(self, x: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
        parts = self._exchange(x)
        return parts if self.rank == dst else None


def build_ranks(size: int, make: Callable[[], torch.nn.Module]) -> list[torch.nn.Module]:
    shared = {"slots": [None] * size, "barrier": threading.Barrier(size, timeout=10)}
    layers = []
    for rank in range(size):
        with building_with(ThreadGroup(rank, size, shared)):
            layers.append(make())
    return layers


def run_ranks(layers: list[torch.nn.Module], *args) -> list:
    """Every rank's forward on the same input, concurrently (collectives need all of them)."""
    results: list = [None] * len(layers)
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            with torch.no_grad():
                results[rank] = layers[rank](*args)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(layers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def load(layers: list[torch.nn.Module], name: str, tensor: torch.Tensor, shard_id=None) -> None:
    for layer in layers:
        param = getattr(layer, name)
        param.weight_loader(param, tensor, *([] if shard_id is None else [shard_id]))


SIZES = [1, 2, 4]


def test_building_with_sets_rank_and_size_then_restores():
    assert (get_tp_rank(), get_tp_size()) == (0, 1)
    with building_with(ThreadGroup(3, 4, {})):
        assert (get_tp_rank(), get_tp_size()) == (3, 4)
    assert (get_tp_rank(), get_tp_size()) == (0, 1)


def test_single_rank_group_collectives_are_identities():
    g = TensorParallelGroup(0, 1)
    x = torch.randn(3)
    assert g.all_reduce(x) is x
    assert g.gather(x)[0] is x
    with pytest.raises(ValueError, match="rank"):
        TensorParallelGroup(2, 2)
    with pytest.raises(ValueError, match="backend"):
        TensorParallelGroup(0, 2)


@pytest.mark.parametrize("size", SIZES)
def test_column_parallel_splits_output_rows(size):
    w, b, x = torch.randn(16, 8), torch.randn(16), torch.randn(5, 8)
    layers = build_ranks(size, lambda: ColumnParallelLinear(8, 16, bias=True))
    load(layers, "weight", w)
    load(layers, "bias", b)
    shard = 16 // size
    for r, layer in enumerate(layers):
        assert torch.equal(layer.weight, w[r * shard : (r + 1) * shard])
        assert torch.equal(layer.bias, b[r * shard : (r + 1) * shard])
    torch.testing.assert_close(torch.cat(run_ranks(layers, x), dim=-1), F.linear(x, w, b))


@pytest.mark.parametrize("size", SIZES)
def test_merged_column_packs_gate_and_up_shards(size):
    gate, up, x = torch.randn(12, 8), torch.randn(12, 8), torch.randn(5, 8)
    layers = build_ranks(size, lambda: MergedColumnParallelLinear(8, [12, 12]))
    load(layers, "weight", gate, 0)
    load(layers, "weight", up, 1)
    s = 12 // size
    outs = run_ranks(layers, x)
    for r, layer in enumerate(layers):
        # rank r holds [gate shard r | up shard r]: forward_silu_mul splits it in halves locally
        assert torch.equal(layer.weight, torch.cat([gate[r * s : (r + 1) * s], up[r * s : (r + 1) * s]]))
    local_gates, local_ups = zip(*(o.chunk(2, dim=-1) for o in outs))
    torch.testing.assert_close(torch.cat(local_gates, -1), x @ gate.T)
    torch.testing.assert_close(torch.cat(local_ups, -1), x @ up.T)
    # forward_silu_mul: each rank's slice of silu(gate) * up, [5, 12 / size]
    acts = [layer.forward_silu_mul(x) for layer in layers]
    torch.testing.assert_close(torch.cat(acts, -1), F.silu(x @ gate.T) * (x @ up.T))


def test_forward_silu_mul_needs_two_equal_parts():
    with building_with(ThreadGroup(0, 1, {})), pytest.raises(ValueError, match="two equal outputs"):
        MergedColumnParallelLinear(8, [12, 4]).forward_silu_mul(torch.randn(2, 8))


def test_merged_column_rejects_parts_not_divisible():
    with building_with(ThreadGroup(0, 4, {})), pytest.raises(ValueError, match="not all divisible"):
        MergedColumnParallelLinear(8, [6, 2])  # the sum divides by 4, the parts do not


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,size",
    [(4, 2, 1), (4, 2, 2), (4, 4, 2), (4, 2, 4), (8, 1, 4), (8, 2, 8)],
    ids=lambda v: str(v),
)
def test_qkv_splits_heads_and_replicates_kv_when_fewer_than_ranks(num_heads, num_kv_heads, size):
    hidden, hd = 16, 4
    wq, wk, wv = (torch.randn(n * hd, hidden) for n in (num_heads, num_kv_heads, num_kv_heads))
    bq, bk, bv = (torch.randn(n * hd) for n in (num_heads, num_kv_heads, num_kv_heads))
    layers = build_ranks(size, lambda: QKVParallelLinear(hidden, hd, num_heads, num_kv_heads, bias=True))
    for shard_id, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
        load(layers, "weight", w, shard_id)
        load(layers, "bias", b, shard_id)
    heads = lambda t, idx: torch.cat([t[h * hd : (h + 1) * hd] for h in idx])  # rows of those heads
    group = num_heads // num_kv_heads  # query heads per KV head (GQA)
    q_per_rank = num_heads // size
    for r, layer in enumerate(layers):
        q_heads = list(range(r * q_per_rank, (r + 1) * q_per_rank))
        kv_heads = sorted({h // group for h in q_heads})  # the KV heads this rank's queries read
        assert layer.num_heads == q_per_rank and layer.num_kv_heads == len(kv_heads)
        # Locally, query head j reads KV head j // (local group size): the same pairing as globally.
        local_group = layer.num_heads // layer.num_kv_heads
        assert [kv_heads[j // local_group] for j in range(q_per_rank)] == [h // group for h in q_heads]
        q, k, v = layer.weight.split([q_per_rank * hd, len(kv_heads) * hd, len(kv_heads) * hd])
        assert torch.equal(q, heads(wq, q_heads))
        assert torch.equal(k, heads(wk, kv_heads)) and torch.equal(v, heads(wv, kv_heads))
        qb, kb, vb = layer.bias.split([q_per_rank * hd, len(kv_heads) * hd, len(kv_heads) * hd])
        assert torch.equal(qb, heads(bq, q_heads))
        assert torch.equal(kb, heads(bk, kv_heads)) and torch.equal(vb, heads(bv, kv_heads))


def test_qkv_rejects_heads_not_divisible():
    with building_with(ThreadGroup(0, 4, {})), pytest.raises(ValueError, match="num_heads=6"):
        QKVParallelLinear(16, 4, 6, 2)
    with building_with(ThreadGroup(0, 4, {})), pytest.raises(ValueError, match="num_kv_heads=3"):
        QKVParallelLinear(16, 4, 12, 3)


@pytest.mark.parametrize("size", SIZES)
def test_row_parallel_splits_input_columns_and_adds_bias_once(size):
    w, b, x = torch.randn(8, 16), torch.randn(8), torch.randn(5, 16)
    layers = build_ranks(size, lambda: RowParallelLinear(16, 8, bias=True))
    load(layers, "weight", w)
    load(layers, "bias", b)
    shard = 16 // size
    for r, layer in enumerate(layers):
        assert torch.equal(layer.weight, w[:, r * shard : (r + 1) * shard])
    # Rank r gets its slice of the input features (made by the column-parallel layer before it).
    for out in run_ranks([_InputSlice(layer, r, shard) for r, layer in enumerate(layers)], x):
        torch.testing.assert_close(out, F.linear(x, w, b))


@pytest.mark.parametrize("size", SIZES)
def test_row_parallel_add_counts_the_residual_and_the_bias_once(size):
    # forward_add, the decoder's residual add inside o_proj / down_proj: rank 0's partial sum carries both
    w, b, x, residual = torch.randn(8, 16), torch.randn(8), torch.randn(5, 16), torch.randn(5, 8)
    layers = build_ranks(size, lambda: RowParallelLinear(16, 8, bias=True))
    load(layers, "weight", w)
    load(layers, "bias", b)
    shard = 16 // size
    outs = run_ranks([_AddSlice(layer, r, shard) for r, layer in enumerate(layers)], x, residual)
    for out in outs:
        torch.testing.assert_close(out, residual + F.linear(x, w, b))


class _AddSlice(torch.nn.Module):
    """Rank r's forward_add of its slice of x onto its own copy of the residual (which it may write)."""

    def __init__(self, layer: RowParallelLinear, rank: int, shard: int):
        super().__init__()
        self.layer, self.rank, self.shard = layer, rank, shard

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        x = x[:, self.rank * self.shard : (self.rank + 1) * self.shard]
        return self.layer.forward_add(x, residual.clone())


class _InputSlice(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module, rank: int, shard: int):
        super().__init__()
        self.layer, self.rank, self.shard = layer, rank, shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x[:, self.rank * self.shard : (self.rank + 1) * self.shard])


@pytest.mark.parametrize("vocab,size", [(1001, 1), (1001, 2), (1001, 4), (5, 4)])
def test_vocab_parallel_embedding_pads_uneven_vocab(vocab, size):
    w = torch.randn(vocab, 8)
    layers = build_ranks(size, lambda: VocabParallelEmbedding(vocab, 8))
    load(layers, "weight", w)
    shard = -(-vocab // size)
    for r, layer in enumerate(layers):
        rows = w[r * shard : (r + 1) * shard]  # the last shard may be short, or empty
        assert layer.weight.shape == (shard, 8)
        assert torch.equal(layer.weight[: len(rows)], rows)
        assert not layer.weight[len(rows) :].any(), "padding rows must be zero"
    ids = torch.tensor(sorted({0, 1, shard - 1, min(shard, vocab - 1), vocab // 2, vocab - 2, vocab - 1}))
    for out in run_ranks(layers, ids):
        torch.testing.assert_close(out, F.embedding(ids, w))


@pytest.mark.parametrize("vocab,size", [(1001, 1), (1001, 2), (1001, 4), (5, 4)])
def test_lm_head_gathers_full_logits_on_rank0_only(vocab, size):
    w, hidden = torch.randn(vocab, 8), torch.randn(3, 8)
    layers = build_ranks(size, lambda: ParallelLMHead(vocab, 8))
    load(layers, "weight", w)
    outs = run_ranks(layers, hidden)
    torch.testing.assert_close(outs[0], hidden @ w.T)  # [3, vocab]: the padding columns dropped
    assert all(o is None for o in outs[1:])


@pytest.mark.parametrize("vocab,size", [(1001, 1), (1001, 2), (1001, 4), (5, 4)])
def test_lm_head_greedy_is_the_argmax_of_the_full_logits(vocab, size):
    # Row 0: random logits. Row 1: every logit negative, so a padding row (logit 0) would win if it were
    # not excluded. Row 2: a tie between the first and the last token (other ranks when size > 1): the
    # lower id wins, as argmax over the gathered row takes the first maximum.
    eye = torch.eye(8)
    hidden = torch.stack([torch.randn(8), eye[0], eye[1]])
    w = torch.randn(vocab, 8) * 0.1
    w[:, 0] = -(w[:, 0].abs() + 1)  # row 1 reads column 0: every logit <= -1
    w[0, 1] = w[vocab - 1, 1] = 5.0  # row 2 reads column 1: tokens 0 and vocab-1 tie at 5
    layers = build_ranks(size, lambda: ParallelLMHead(vocab, 8))
    load(layers, "weight", w)
    outs = run_ranks([_Greedy(layer) for layer in layers], hidden)
    want = (hidden @ w.T).argmax(dim=-1)
    assert (hidden[1] @ w.T).max() < 0 and want[2] == 0
    assert torch.equal(outs[0], want)
    assert outs[0].dtype == torch.int64
    assert all(o is None for o in outs[1:])


class _Greedy(torch.nn.Module):
    def __init__(self, head: ParallelLMHead):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.head.greedy(hidden)


def test_lm_head_writes_into_a_given_buffer_on_one_rank():
    # What the decode CUDA graphs do: logits into rows of one buffer that every graph shares.
    w, hidden = torch.randn(1001, 8), torch.randn(3, 8)
    (layer,) = build_ranks(1, lambda: ParallelLMHead(1001, 8))
    load([layer], "weight", w)
    buffer = torch.full((5, layer.weight.shape[0]), float("nan"))
    with torch.no_grad():  # (the engine runs under inference_mode)
        logits = layer(hidden, out=buffer[:3])
        assert logits.data_ptr() == buffer.data_ptr()
        assert torch.equal(logits, layer(hidden))  # the same matmul as without `out`
        assert buffer[3:].isnan().all()
        (layer2, _) = build_ranks(2, lambda: ParallelLMHead(1001, 8))
        with pytest.raises(ValueError, match="single rank"):
            layer2(hidden, out=buffer[:3])


# ---- loading a whole checkpoint: each rank reads only its shards --------------------------------


class CountingSlice:
    """A safetensors slice that counts the elements actually read through it."""

    counter = {"read": 0}

    def __init__(self, inner):
        self.inner = inner

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        t = self.inner[index]
        CountingSlice.counter["read"] += t.numel()
        return t


@pytest.mark.parametrize(
    "arch,rank,size,overrides",
    [
        ("qwen3", 1, 2, {}),
        ("llama", 3, 4, {}),  # 2 KV heads over 4 ranks: replicated
        ("qwen3", 0, 2, {"tie_word_embeddings": True, "vocab_size": 2047}),  # tied, uneven vocab
    ],
)
def test_each_rank_reads_only_its_shards_from_safetensors(tmp_path, arch, rank, size, overrides):
    ckpt = build_checkpoint(tmp_path, arch, tokenizer=False, **overrides)
    config = AutoConfig.from_pretrained(ckpt)
    with building_with(ThreadGroup(rank, size, {})):
        model = get_model_class(config)(config, 64)
    full = {}
    for file in safetensors_files(ckpt):
        with safe_open(str(file), framework="pt") as f:
            full.update({name: f.get_tensor(name) for name in f.keys()})
    # Poison the parameters: any that loading skips would keep NaNs.
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    CountingSlice.counter["read"] = 0
    load_weights(model, ((name, CountingSlice(s)) for name, s in iter_checkpoint(ckpt)))
    held = 0
    for name, p in model.named_parameters():  # each tied parameter once
        assert not p.isnan().any(), f"{name} was not loaded"
        held += p.numel()
    embed = model.model.embed_tokens
    padding_rows = embed.shard_size - max(0, min(embed.shard_size, config.vocab_size - embed.vocab_start))
    head_copies = 1 if model.tie_word_embeddings else 2
    assert CountingSlice.counter["read"] == held - padding_rows * config.hidden_size * head_copies
    assert CountingSlice.counter["read"] < sum(t.numel() for t in full.values()) / size * 1.5
    # And what was read is the right part: q_proj of layer 0 in this rank's slot.
    qkv = model.model.layers[0].self_attn.qkv_proj
    q_rows = qkv.num_heads * qkv.head_dim
    wq = full["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(qkv.weight[:q_rows], wq[rank * q_rows : (rank + 1) * q_rows])


def test_layers_take_f_linear_on_the_cpu(monkeypatch):
    # On CPU tensors (CI) every linear layer must run F.linear, not the kernel (which would run in the
    # interpreter and hide a dispatch bug behind equal numbers)
    def fail(*args, **kwargs):
        raise AssertionError("decode_linear launched on a CPU tensor")

    monkeypatch.setattr(linear_layers, "decode_linear", fail)
    x = torch.randn(3, 8)
    makers = (lambda: ColumnParallelLinear(8, 6, bias=True), lambda: RowParallelLinear(8, 6, bias=True),
              lambda: MergedColumnParallelLinear(8, [4, 4]))  # fmt: skip
    layers = [build_ranks(1, make)[0] for make in makers]
    for layer in layers:
        for p in layer.parameters():
            torch.nn.init.normal_(p)
        torch.testing.assert_close(run_ranks([layer], x)[0], F.linear(x, layer.weight, layer.bias))
    merged = layers[2]
    gate, up = F.linear(x, merged.weight).chunk(2, dim=-1)
    torch.testing.assert_close(merged.forward_silu_mul(x), F.silu(gate) * up)


def test_random_weights_take_any_engine_seed():
    # A preset's weights are seeded per tensor from the engine's seed: any seed the engine takes (torch's
    # range) works, and the same seed gives the same weights (every TP rank draws them alike).
    shapes = {"a.weight": (4, 4), "a.bias": (4,), "n.norm.weight": (4,)}
    for seed in (0, 7, 2**64 - 1, -(2**63)):
        one = dict(iter_random_weights(shapes, seed, torch.device("cpu")))
        two = dict(iter_random_weights(shapes, seed, torch.device("cpu")))
        assert torch.equal(one["a.weight"], two["a.weight"]) and one["a.weight"].abs().max() > 0
        assert not one["a.bias"].any() and torch.equal(one["n.norm.weight"], torch.ones(4))
