"""Sampler: exact distributions, penalties, min_tokens, seeds, logprobs (CPU, tiny vocab).

Tests of the random draw run twice (the `draw_path` fixture): on the CPU path (exponential race), and
on the CUDA path's logic (temperature folded into a Gumbel-max draw with per-row seeds), with the
kernel's torch reference standing in for the Triton kernel. tests/kernels/test_sampling_kernel.py
checks the kernel itself.

Statistical tests draw NUM_DRAWS tokens as one batch of identical rows and compare each token's
count with the exactly computed (float64) target distribution. Per token, a deviation larger than
the Bernstein bound below has probability < 1e-9 when the sampler is right; with ~10 tokens in ~12
tests, a correct sampler fails with probability < 2e-7. Seeds are fixed, so runs are deterministic.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanovllm.layers import sampler as sampler_module
from nanovllm.layers.sampler import Sampler, apply_penalties, apply_top_k_top_p
from nanovllm.layers.sampling_batch import (
    SamplingBatch,
    SamplingRequest,
    row_seed,
    row_seed_array,
    takes_plain_argmax,
)
from nanovllm.sampling_params import SamplingParams
from tests.stats import assert_matches

CPU = torch.device("cpu")
NUM_DRAWS = 20_000
# Unsorted, no ties, so filters must map sorted positions back to token ids.
LOGITS = [1.2, 0.9, 2.0, -0.3, 0.4, -1.5, 0.0, 1.6]
VOCAB = len(LOGITS)


@pytest.fixture(params=["exponential race", "gumbel-max"])
def draw_path(request, monkeypatch) -> str:
    if request.param == "gumbel-max":
        monkeypatch.setattr(sampler_module, "use_triton", lambda x: True)
    return request.param


def request(params: SamplingParams, prompt=(), output=(), eos=()) -> SamplingRequest:
    return SamplingRequest(params, list(prompt), list(output), tuple(eos))


def sample(logits: torch.Tensor, requests: list[SamplingRequest], sampler: Sampler | None = None):
    batch = SamplingBatch.build(requests, logits.shape[1], CPU)
    return (sampler or Sampler(seed=1234))(logits, batch)


def reference_probs(logits, temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0) -> list[float]:
    """Float64 transcription of the spec: temperature, min-p, top-k, top-p, renormalize."""
    z = [x / temperature for x in logits]
    m = max(z)
    p = [math.exp(x - m) for x in z]
    order = sorted((i for i in range(len(p)) if p[i] >= min_p * max(p)), key=lambda i: -p[i])
    keep = set(order[:top_k] if top_k > 0 else order)
    total = sum(p[i] for i in keep)
    mass_above, kept = 0.0, set()
    for i in order:
        if i in keep and (not kept or mass_above < top_p):
            kept.add(i)
            mass_above += p[i] / total
    total = sum(p[i] for i in kept)
    return [p[i] / total if i in kept else 0.0 for i in range(len(p))]


def nucleus_mass(logits, size: int) -> float:
    """Mass of the `size` most likely tokens: a top_p that sits exactly on the boundary."""
    return sum(sorted(reference_probs(logits), reverse=True)[:size])


def draw(params: SamplingParams, logits=LOGITS, n: int = NUM_DRAWS) -> torch.Tensor:
    rows = torch.tensor([logits], dtype=torch.float32).expand(n, -1)
    return sample(rows, [request(params)] * n).token_ids


# --- distributions ---------------------------------------------------------------------------------

SETTINGS = {
    "temperature 0.5": dict(temperature=0.5),
    "temperature 1": dict(temperature=1.0),
    "temperature 2": dict(temperature=2.0),
    "top_k 3": dict(top_k=3),
    "top_k 1": dict(top_k=1),
    "top_k >= vocab": dict(top_k=VOCAB + 5),
    "top_p 0.6": dict(top_p=0.6),
    "top_p on boundary": dict(top_p=nucleus_mass(LOGITS, 3)),
    "top_p just above boundary": dict(top_p=nucleus_mass(LOGITS, 3) + 1e-3),
    "top_p tiny": dict(top_p=1e-9),
    "min_p 0.2": dict(min_p=0.2),
    "combined": dict(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1),
    "top_k + top_p": dict(temperature=1.5, top_k=4, top_p=0.7),
    # top-p over what min-p left (vLLM V1's order): token 1 passes min-p, then falls outside the nucleus
    "min_p then top_p": dict(top_p=0.8, min_p=0.3),
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_distribution_matches_exact_target(settings, draw_path):
    assert_matches(draw(SamplingParams(**settings)), reference_probs(LOGITS, **settings))


def test_boundary_and_tiny_top_p_keep_the_intended_sets():
    # Guards the reference itself: the statistical test above is only as good as the target.
    assert sum(p > 0 for p in reference_probs(LOGITS, top_p=nucleus_mass(LOGITS, 3))) == 3
    assert sum(p > 0 for p in reference_probs(LOGITS, top_p=nucleus_mass(LOGITS, 3) + 1e-3)) == 4
    assert set(draw(SamplingParams(top_p=1e-9), n=500).tolist()) == {LOGITS.index(max(LOGITS))}


def test_greedy_is_argmax_and_ignores_filters():
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, top_k=3, top_p=0.1, min_p=0.5)]
    out = sample(logits, [request(params[i % 2]) for i in range(64)])
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.top_logprob_ids is None and out.top_logprobs is None


def test_top_k_only_path_matches_sort_path():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 200, generator=gen)
    top_k = torch.randint(1, 201, (32,), generator=gen)
    top_k[::4] = 200  # off
    max_top_k = int(top_k[top_k < 200].max())
    via_topk = apply_top_k_top_p(logits.clone(), top_k, None, max_top_k)
    via_sort = apply_top_k_top_p(logits.clone(), top_k, torch.ones(32), max_top_k)
    assert torch.equal(via_topk, via_sort)
    assert torch.equal((via_topk > float("-inf")).sum(dim=-1), top_k)


def test_build_skips_stages_no_row_needs():
    batch = SamplingBatch.build([request(SamplingParams(temperature=0.0))] * 3, VOCAB, CPU)
    assert batch.all_greedy and not batch.has_penalties and batch.max_num_logprobs is None
    batch = SamplingBatch.build([request(SamplingParams())] * 3, VOCAB, CPU)
    assert not batch.all_greedy and batch.greedy_mask is None and batch.temperatures is None
    assert batch.top_k is batch.top_p is batch.min_p is None and not batch.seeded_rows
    batch = SamplingBatch.build(
        [request(SamplingParams(top_k=2)), request(SamplingParams(temperature=0))], 8, CPU
    )
    assert batch.top_k.tolist() == [2, 8] and batch.max_top_k == 2 and batch.top_p is None
    assert batch.greedy_mask.tolist() == [False, True]


# --- penalties and min_tokens ------------------------------------------------------------------------


def test_penalties_change_logits_exactly():
    #          token:   0     1    2     3    4
    logits = torch.tensor([[2.0, -1.0, 0.5, -2.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # Token 0 only in the prompt; token 1 in the output three times; token 2 in both; 3 and 4 unseen.
    batch = SamplingBatch.build([request(params, prompt=[0, 2], output=[1, 2, 1, 1])], 5, CPU)
    out = apply_penalties(
        logits.clone(),
        batch.prompt_token_ids,
        batch.output_token_ids,
        batch.repetition_penalties,
        batch.frequency_penalties,
        batch.presence_penalties,
    )
    expected = [
        2.0 / 2,  # prompt only: repetition only
        -1.0 * 2 - 0.5 * 3 - 0.25,  # negative: multiplied; 3 output occurrences
        0.5 / 2 - 0.5 * 1 - 0.25,
        -2.0,
        1.0,
    ]
    assert out.tolist() == [expected]


def reference_penalties(logits: list[float], prompt, output, rep, freq, pres) -> list[float]:
    out = []
    for token, x in enumerate(logits):
        if token in prompt or token in output:
            x = x / rep if x > 0 else x * rep
        n = output.count(token)
        out.append(x - freq * n - pres * (n > 0))
    return out


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.lists(st.integers(0, 9), max_size=6),
            st.lists(st.integers(0, 9), max_size=6),
            st.sampled_from([1.0, 0.5, 1.3]),
            st.sampled_from([0.0, 0.7, -1.1]),
            st.sampled_from([0.0, 0.4, -0.9]),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_penalties_match_reference_for_any_batch(rows):
    logits = torch.randn(len(rows), 10, generator=torch.Generator().manual_seed(len(rows)))
    requests = [
        request(
            SamplingParams(temperature=0, repetition_penalty=r, frequency_penalty=f, presence_penalty=p),
            pr,
            o,
        )
        for pr, o, r, f, p in rows
    ]
    batch = SamplingBatch.build(requests, 10, CPU)
    expected = [reference_penalties(logits[i].tolist(), *row) for i, row in enumerate(rows)]
    if not batch.has_penalties:
        assert all(r == 1.0 and f == 0.0 and p == 0.0 for _, _, r, f, p in rows)
        return
    got = apply_penalties(
        logits.clone(),
        batch.prompt_token_ids,
        batch.output_token_ids,
        batch.repetition_penalties,
        batch.frequency_penalties,
        batch.presence_penalties,
    )
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)


def test_penalties_apply_before_greedy_argmax():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, [request(params, prompt=[0])]).token_ids.tolist() == [1]  # 3/2 < 2


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    eos, stop = 7, 5
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0, 4.0, 0.0, 5.0]])  # eos best, stop second
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop, 99])  # 99 >= vocab
    before = request(params, output=[1, 1], eos=(eos,))
    after = request(params, output=[1, 1, 1], eos=(eos,))
    assert sample(logits.expand(2, -1), [before, after]).token_ids.tolist() == [2, eos]
    # ignore_eos: EOS ends nothing, yet (as vLLM's all_stop_token_ids) min_tokens still bans it.
    ignore = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[eos - 1, stop], ignore_eos=True)
    assert sample(logits, [request(ignore, output=[1], eos=(eos,))]).token_ids.tolist() == [2]
    assert sample(logits, [request(ignore, output=[1, 1, 1], eos=(eos,))]).token_ids.tolist() == [eos]


def test_min_tokens_ban_holds_for_random_rows(draw_path):
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0]]).expand(2000, -1)
    params = SamplingParams(min_tokens=1, stop_token_ids=[3])
    assert 3 not in sample(logits, [request(params)] * 2000).token_ids.tolist()


def test_logit_bias_and_allowed_token_ids_move_greedy_rows():
    logits = torch.tensor([LOGITS]).expand(4, -1)  # argmax: token 2
    rows = [
        request(SamplingParams(temperature=0.0, logit_bias={5: 4.0})),  # -1.5 + 4 = 2.5 > 2.0
        request(SamplingParams(temperature=0.0, allowed_token_ids=[3, 4, 6])),  # best allowed: 4
        request(SamplingParams(temperature=0.0, logit_bias={2: -100.0}, allowed_token_ids=[1, 2])),
        request(SamplingParams(temperature=0.0)),  # untouched by its neighbours' settings
    ]
    out = sample(logits, rows)
    assert out.token_ids.tolist() == [5, 4, 1, 2]
    assert torch.equal(logits[0], torch.tensor(LOGITS))  # (the caller's logits are never modified)


def test_logit_bias_and_allowed_token_ids_shape_the_draw(draw_path):
    bias = {0: 1.0, 3: -2.0}
    params = SamplingParams(logit_bias=bias, allowed_token_ids=[0, 1, 3, 6])
    out = sample(torch.tensor([LOGITS]).expand(NUM_DRAWS, -1), [request(params)] * NUM_DRAWS)
    target = [LOGITS[t] + bias.get(t, 0.0) if t in (0, 1, 3, 6) else -math.inf for t in range(VOCAB)]
    assert_matches(out.token_ids, reference_probs(target))


def test_logprobs_stay_raw_under_logit_bias():
    logits = torch.tensor([LOGITS])
    out = sample(logits, [request(SamplingParams(temperature=0.0, logit_bias={5: 4.0}, logprobs=1))])
    raw = logits.log_softmax(-1)[0]
    assert out.token_ids.tolist() == [5] and out.logprobs.item() == pytest.approx(raw[5].item())
    assert out.top_logprob_ids.tolist() == [[2]]  # the model's own best, not the biased one


@pytest.mark.parametrize(
    "field, value",
    [
        ("logit_bias", {1: 101}),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {"1": 1.0}),
        ("logit_bias", [1, 2]),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [1, -2]),
        ("allowed_token_ids", [1.0]),
    ],
)
def test_bad_token_settings_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


# --- seeds -------------------------------------------------------------------------------------------


def run_seeded(seed: int, companions: int, steps: int = 30, vocab: int = 50) -> list[int]:
    """Generate `steps` tokens for a seeded request, placed among `companions` other rows."""
    rng = random.Random(companions)
    row_logits = torch.randn(vocab, generator=torch.Generator().manual_seed(99)) * 0.3  # near uniform
    sampler = Sampler(seed=companions)
    others = [
        SamplingParams(),
        SamplingParams(seed=seed + 1, top_p=0.5),
        SamplingParams(temperature=0.0, repetition_penalty=1.5),
        SamplingParams(top_k=3, logprobs=2),
    ]
    tokens: list[int] = []
    for _ in range(steps):
        rows = [
            request(rng.choice(others), prompt=[1, 2], output=[3] * rng.randrange(5))
            for _ in range(companions)
        ]
        position = rng.randrange(companions + 1)
        rows.insert(
            position, request(SamplingParams(seed=seed, temperature=0.8), prompt=[1, 2], output=tokens)
        )
        logits = torch.randn(
            len(rows), vocab, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))
        )
        logits[position] = row_logits
        tokens = tokens + [sample(logits, rows, sampler).token_ids[position].item()]
    return tokens


def test_seeded_request_is_independent_of_its_batch(draw_path):
    alone = run_seeded(seed=7, companions=0)
    assert run_seeded(seed=7, companions=3) == alone
    assert run_seeded(seed=7, companions=9) == alone
    assert len(set(alone)) > 5  # the seed varies with position; it is not one repeated draw


def test_different_seeds_give_different_tokens(draw_path):
    assert run_seeded(seed=7, companions=0) != run_seeded(seed=8, companions=0)


def test_seeded_draw_depends_only_on_seed_and_position(draw_path):
    # A preempted request recomputes with the same output length: same draw, even with another prompt.
    logits = torch.zeros(1, 1000)
    first = sample(logits, [request(SamplingParams(seed=3), prompt=[1], output=[4, 5])]).token_ids
    again = sample(logits, [request(SamplingParams(seed=3), prompt=[9, 9], output=[6, 7])], Sampler(seed=5))
    later = sample(logits, [request(SamplingParams(seed=3), prompt=[1], output=[4, 5, 6])]).token_ids
    assert torch.equal(first, again.token_ids) and not torch.equal(first, later)


def test_unseeded_rows_reproducible_from_sampler_seed(draw_path):
    logits = torch.zeros(16, 1000)
    rows = [request(SamplingParams())] * 16

    def two_steps(seed: int) -> list[list[int]]:
        sampler = Sampler(seed=seed)
        return [sample(logits, rows, sampler).token_ids.tolist() for _ in range(2)]

    assert two_steps(11) == two_steps(11)
    assert two_steps(11) != two_steps(12)
    steps = two_steps(11)
    assert steps[0] != steps[1]  # the generator advances between steps


# --- logprobs, dtypes, mixed batch -------------------------------------------------------------------


def test_logprobs_are_raw_and_top_n_sorted(draw_path):
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    params = [
        SamplingParams(temperature=0.3, top_k=5, logprobs=4, repetition_penalty=1.7),
        SamplingParams(logprobs=0, min_p=0.3),
        SamplingParams(temperature=0.0, presence_penalty=1.0),
        SamplingParams(logprobs=2, top_p=0.5),
    ]
    out = sample(logits, [request(p, prompt=[0, 1], output=[2, 3]) for p in params])
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_logprob_ids.shape == out.top_logprobs.shape == (4, 4)
    assert out.top_logprob_ids.dtype == torch.int64 and out.top_logprobs.dtype == torch.float32
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_logprob_ids))
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    torch.testing.assert_close(out.top_logprobs, raw.topk(4, dim=-1).values)
    assert torch.equal(out.ranks, (raw >= out.logprobs[:, None]).sum(-1))  # vLLM's rank of the sampled token
    assert out.ranks[2] == 1  # the greedy row's argmax (the penalty lowered it in sampling, not in raw)


def test_logprobs_zero_gives_sampled_token_only():
    out = sample(torch.randn(2, 8), [request(SamplingParams(logprobs=0))] * 2)
    assert out.logprobs.shape == (2,) and out.top_logprob_ids.shape == (2, 0)


def test_any_float_dtype_and_input_untouched(draw_path):
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(4))
    original = logits.clone()
    params = SamplingParams(temperature=0.5, top_p=0.9, repetition_penalty=1.2, logprobs=1)
    out = sample(logits, [request(params, prompt=[0, 1])] * 3)
    assert torch.equal(logits, original) and out.token_ids.dtype == torch.int64
    greedy = [request(SamplingParams(temperature=0.0))] * 3
    half = sample(logits.to(torch.bfloat16), greedy).token_ids
    assert torch.equal(half, logits.to(torch.bfloat16).float().argmax(dim=-1))


def test_mixed_batch_in_one_call(draw_path):
    vocab = 40
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(5))
    logits[5, 9] = 10.0  # EOS dominates row 5
    rows = [
        request(SamplingParams(temperature=0.0, frequency_penalty=2.0), prompt=[0], output=[7, 7]),
        request(SamplingParams(top_k=2)),
        request(SamplingParams(seed=42, top_p=0.3, temperature=0.7, logprobs=3)),
        request(SamplingParams(min_p=0.9, presence_penalty=0.5), output=[1, 2]),
        request(SamplingParams(temperature=1.3, repetition_penalty=1.1, logprobs=1), prompt=[3, 4]),
        request(SamplingParams(temperature=0.0, min_tokens=2), output=[5], eos=(9,)),
    ]
    out = sample(logits, rows)
    assert out.token_ids.shape == (6,) and out.top_logprob_ids.shape == (6, 3)
    tokens = out.token_ids.tolist()
    penalized = logits[0].clone()
    penalized[7] -= 4.0
    assert tokens[0] == penalized.argmax().item()
    assert tokens[1] in logits[1].topk(2).indices.tolist()
    assert tokens[5] == logits[5].topk(2).indices[1].item()  # EOS banned: second best
    # The seeded row gets the same token alone.
    alone = sample(logits[2:3], [rows[2]], Sampler(seed=77)).token_ids.item()
    assert tokens[2] == alone


# --- requests built from a sequence --------------------------------------------------------------------


def test_for_sequence_copies_token_lists_only_for_penalties():
    token_ids = [5, 6, 7, 1, 2]  # a 3-token prompt, 2 tokens generated
    plain = SamplingRequest.for_sequence(SamplingParams(seed=1, min_tokens=4), token_ids, 3, (9,))
    assert plain.prompt_token_ids == [] and plain.output_token_ids == [] and plain.num_output_tokens == 2
    assert plain.eos_token_ids == (9,)
    for params in (SamplingParams(presence_penalty=0.5), SamplingParams(frequency_penalty=-1.0)):
        row = SamplingRequest.for_sequence(params, token_ids, 3, ())
        assert list(row.prompt_token_ids) == [] and list(row.output_token_ids) == [1, 2]
        assert row.num_output_tokens == 2
    row = SamplingRequest.for_sequence(SamplingParams(repetition_penalty=1.2), token_ids, 3, ())
    assert list(row.prompt_token_ids) == [5, 6, 7] and list(row.output_token_ids) == [1, 2]
    row.output_token_ids[0] = 3
    assert token_ids == [5, 6, 7, 1, 2]  # copies, not views
    prompt_only = SamplingRequest.for_sequence(SamplingParams(repetition_penalty=1.2), [5, 6], 2, ())
    assert list(prompt_only.output_token_ids) == [] and prompt_only.num_output_tokens == 0


def test_for_sequence_builds_the_same_batch_as_full_lists():
    params = [
        SamplingParams(temperature=0.5, seed=3, min_tokens=3),
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.2),
        SamplingParams(temperature=0.0, frequency_penalty=0.4, min_tokens=5),
        SamplingParams(top_k=2, seed=11),
    ]
    sequences = [([1, 2, 3, 4], 2), ([4, 5, 6], 1), ([7, 8, 8, 9, 9], 3), ([3], 1)]
    full = [SamplingRequest(p, ids[:n], ids[n:], (0,)) for p, (ids, n) in zip(params, sequences)]
    sliced = [SamplingRequest.for_sequence(p, ids, n, (0,)) for p, (ids, n) in zip(params, sequences)]
    a, b = (SamplingBatch.build(rows, 10, CPU) for rows in (full, sliced))
    assert a.seeded_rows == b.seeded_rows and len(a.seeded_rows) == 2
    for name in ("output_token_ids", "repetition_penalties", "banned_rows", "banned_token_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # Only the repetition row sends its prompt; the pad id (10) fills the other rows.
    assert b.prompt_token_ids.tolist() == [[10], [4], [10], [10]]
    assert torch.equal(a.prompt_token_ids, b.prompt_token_ids)


def test_num_output_tokens_drives_seed_and_min_tokens(draw_path):
    logits = torch.zeros(1, 1000)
    logits[0, 7] = 5.0  # EOS, banned only while fewer than min_tokens are out
    params = SamplingParams(seed=3, min_tokens=4, temperature=0.0)
    counted = SamplingRequest(params, [], [], (7,), num_output_tokens=4)
    listed = SamplingRequest(params, [], [1, 2, 3], (7,))
    assert sample(logits, [counted]).token_ids.item() == 7
    assert sample(logits, [listed]).token_ids.item() != 7
    seeded = SamplingParams(seed=3)
    zeros = torch.zeros(1, 1000)
    by_count = sample(zeros, [SamplingRequest(seeded, [], [], (), num_output_tokens=6)]).token_ids
    by_list = sample(zeros, [request(seeded, output=range(6))]).token_ids
    other = sample(zeros, [SamplingRequest(seeded, [], [], (), num_output_tokens=5)]).token_ids
    assert torch.equal(by_count, by_list) and not torch.equal(by_count, other)


def test_row_seed_array_matches_row_seed():
    import numpy as np

    for seed in (0, 7, -1, (1 << 64) + 5, 1 << 62):
        positions = np.array([0, 1, 2, 1000, (1 << 64) - 1], dtype=np.uint64)
        assert row_seed_array(seed, positions).tolist() == [row_seed(seed, int(p)) for p in positions]


def test_staging_buffers_are_reused_and_change_nothing(draw_path):
    """The engine's SamplingStaging: the same tokens as freshly built tensors, from the same device
    buffers every step (no per-step allocation), for every stage that has per-row settings."""
    from nanovllm.layers.sampling_batch import SamplingStaging

    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    rows = [
        request(SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.2)),
        request(SamplingParams(temperature=0.7, top_k=5, seed=11, frequency_penalty=0.4)),
        request(SamplingParams(temperature=1.3, top_p=0.8, min_p=0.05, seed=12)),
        request(SamplingParams(temperature=0.9, seed=13)),
    ]
    staging = SamplingStaging(max_rows=8, device=CPU)
    pointers = None
    for _ in range(3):
        fresh = Sampler(seed=5)(logits, SamplingBatch.build(rows, VOCAB, CPU)).token_ids
        batch = SamplingBatch.build(rows, VOCAB, CPU, staging)
        staged = Sampler(seed=5)(logits, batch).token_ids
        assert torch.equal(fresh, staged)
        now = [
            t.data_ptr()
            for t in (batch.temperatures, batch.top_k, batch.top_p, batch.min_p, batch.greedy_mask)
        ]
        assert pointers is None or now == pointers
        pointers = now
    with pytest.raises(ValueError, match="more than the staging buffers"):
        SamplingBatch.build(rows * 3, VOCAB, CPU, staging)


def test_takes_plain_argmax_only_when_the_sampler_would():
    def req(num_output=5, **kw):
        return SamplingRequest(SamplingParams(**{"temperature": 0, **kw}), [], [], (2,), num_output)

    assert takes_plain_argmax([req(), req(max_tokens=3, ignore_eos=True)])
    assert takes_plain_argmax([])
    for other in (
        req(temperature=0.7),
        req(logprobs=0),
        req(repetition_penalty=1.1),
        req(presence_penalty=0.5),
        req(num_output=2, min_tokens=3),  # EOS still banned
    ):
        assert not takes_plain_argmax([req(), other])
    assert takes_plain_argmax([req(num_output=3, min_tokens=3)])
