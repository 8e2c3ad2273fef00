"""Turn a batch of logits into next tokens (vLLM's sampling semantics).

Per row, in order: min_tokens ban -> penalties -> greedy argmax, or temperature -> top-k -> top-p ->
min-p -> a random draw. `SamplingBatch.build` turns the per-request settings into device tensors once
per step (in the engine: a `SamplingStaging`'s persistent buffers) and records which stages any row
needs, so `Sampler.forward` skips the rest.

The random draw has two implementations that sample the same distribution from different random
streams (a seed gives different tokens on the two):
- CUDA with Triton: one Gumbel-max kernel pass over the logits in their own dtype
  (kernels/sampling.py), each row with its own Philox seed;
- elsewhere (CPU, or kernel backend "torch"): an exponential race over the probabilities, with torch
  generators.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nanovllm.kernels.backend import use_triton
from nanovllm.kernels.sampling import gumbel_argmax
from nanovllm.sampling_params import GREEDY_EPS, SamplingParams

# top-p keeps a token while the mass ranked above it is below top_p. Float32 softmax/cumsum error
# would make the exact boundary (mass above == top_p) a coin flip, so mass within this of top_p
# counts as having reached it.
TOP_P_TOLERANCE = 1e-6

_MASK_64 = (1 << 64) - 1


class SamplingStaging:
    """Persistent buffers for the per-row settings of a step (the hot loop allocates no tensor): values
    are written into pinned host arrays, two sets used in turn (the runner waits for a step before the
    next-but-one is built), and copied without blocking into device arrays that the step's kernels read
    (a later step's copy is queued behind them)."""

    DTYPES = {
        "greedy": torch.bool,
        "temperatures": torch.float32,
        "top_k": torch.int64,
        "top_p": torch.float32,
        "min_p": torch.float32,
        "repetition": torch.float32,
        "frequency": torch.float32,
        "presence": torch.float32,
        "seeds": torch.int64,
    }

    def __init__(self, max_rows: int, device: torch.device):
        pin = device.type == "cuda"
        self.max_rows, self.device = max_rows, device
        self._host = [
            {k: torch.zeros(max_rows, dtype=dt, pin_memory=pin) for k, dt in self.DTYPES.items()}
            for _ in range(2)
        ]
        self._device = {k: torch.zeros(max_rows, dtype=dt, device=device) for k, dt in self.DTYPES.items()}
        self._turn = 0

    def next_step(self) -> None:
        self._turn ^= 1

    def put(self, name: str, values: list | np.ndarray) -> torch.Tensor:
        """values -> the device buffer `name`'s first len(values) rows, returned."""
        n = len(values)
        host = self._host[self._turn][name][:n]
        host.numpy()[:] = values
        return self._device[name][:n].copy_(host, non_blocking=True)


@dataclass(slots=True)
class SamplingRequest:
    """One row of the batch: a sequence that needs its next token."""

    params: SamplingParams
    prompt_token_ids: list[int]  # read only for repetition_penalty
    output_token_ids: list[int]  # tokens generated so far; read only for penalties
    eos_token_ids: tuple[int, ...]  # banned with params.stop_token_ids while output < min_tokens
    # Tokens generated so far: the seed position and the min_tokens count. None: len(output_token_ids).
    num_output_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.num_output_tokens is None:
            self.num_output_tokens = len(self.output_token_ids)

    @classmethod
    def for_sequence(
        cls,
        params: SamplingParams,
        token_ids: list[int],
        num_prompt_tokens: int,
        eos_token_ids: tuple[int, ...],
    ) -> SamplingRequest:
        """The row of a sequence whose `token_ids` are its prompt then its output. The token lists are
        copied only for the penalties that read them (repetition: prompt and output; presence and
        frequency: output); otherwise they are left empty."""
        prompt = token_ids[:num_prompt_tokens] if params.repetition_penalty != 1.0 else []
        output = token_ids[num_prompt_tokens:] if params.has_penalties else []
        return cls(params, prompt, output, eos_token_ids, len(token_ids) - num_prompt_tokens)


@dataclass
class SamplingBatch:
    """Device tensors for one step. A `None` tensor means no row needs that stage."""

    num_rows: int
    vocab_size: int
    all_greedy: bool
    greedy_mask: torch.Tensor | None  # [B] bool; None unless greedy and random rows are mixed
    temperatures: torch.Tensor | None  # [B] fp32, 1.0 on greedy rows; None when all are 1.0
    top_k: torch.Tensor | None  # [B] int64 in [1, V], V = off
    max_top_k: int  # largest enabled top_k (0 when top_k is None)
    top_p: torch.Tensor | None  # [B] fp32, 1.0 = off
    min_p: torch.Tensor | None  # [B] fp32, 0.0 = off
    repetition_penalties: torch.Tensor | None  # [B] fp32, 1.0 = off
    frequency_penalties: torch.Tensor | None  # [B] fp32, 0.0 = off
    presence_penalties: torch.Tensor | None  # [B] fp32, 0.0 = off
    prompt_token_ids: torch.Tensor | None  # [B, max_prompt_len] int64, padded with vocab_size
    output_token_ids: torch.Tensor | None  # [B, max_output_len] int64, padded with vocab_size
    banned_rows: torch.Tensor | None  # [num_banned] int64 } pairs (row, token) set to -inf
    banned_token_ids: torch.Tensor | None  # [num_banned] int64 } by min_tokens
    seeded_rows: list[tuple[int, int]]  # (row, row seed) for random rows with params.seed
    max_num_logprobs: int | None  # max params.logprobs over the batch; None when no row asked
    staging: SamplingStaging | None = None  # where the step's settings live (None: fresh tensors)

    @property
    def has_penalties(self) -> bool:
        return self.output_token_ids is not None

    @property
    def has_filters(self) -> bool:
        return self.top_k is not None or self.top_p is not None or self.min_p is not None

    @classmethod
    def build(
        cls,
        requests: list[SamplingRequest],
        vocab_size: int,
        device: torch.device | str,
        staging: SamplingStaging | None = None,
    ) -> SamplingBatch:
        num_rows = len(requests)
        if staging is not None and num_rows > staging.max_rows:
            raise ValueError(f"{num_rows} sampling rows, more than the staging buffers' {staging.max_rows}")
        params = [r.params for r in requests]
        greedy = [p.temperature < GREEDY_EPS for p in params]
        all_greedy = all(greedy)
        device = torch.device(device)
        # Every tensor is built on the host, in pinned memory for a GPU, and copied without blocking:
        # a pageable copy would make the CPU wait for the GPU to finish the step's forward.
        pin = device.type == "cuda"

        if staging is not None:
            staging.next_step()

        def to_device(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, pin_memory=pin).to(device, non_blocking=True)

        def staged(name: str, values: list) -> torch.Tensor:
            if staging is None:
                return to_device(values, SamplingStaging.DTYPES[name])
            return staging.put(name, values)

        # Sampling settings. Greedy rows get neutral values: their token is the argmax either way.
        greedy_mask = temperatures = top_k = top_p = min_p = None
        max_top_k = 0
        seeded_rows: list[tuple[int, int]] = []
        if not all_greedy:
            if any(greedy):
                greedy_mask = staged("greedy", greedy)
            sampled = [p for p, g in zip(params, greedy) if not g]
            if any(p.temperature != 1.0 for p in sampled):
                temperatures = staged(
                    "temperatures", [1.0 if g else p.temperature for p, g in zip(params, greedy)]
                )
            ks = [
                p.top_k if not g and 0 < p.top_k < vocab_size else vocab_size for p, g in zip(params, greedy)
            ]
            max_top_k = max((k for k in ks if k < vocab_size), default=0)
            if max_top_k:
                top_k = staged("top_k", ks)
            if any(p.top_p < 1.0 for p in sampled):
                top_p = staged("top_p", [1.0 if g else p.top_p for p, g in zip(params, greedy)])
            if any(p.min_p > 0.0 for p in sampled):
                min_p = staged("min_p", [0.0 if g else p.min_p for p, g in zip(params, greedy)])
            seeded_rows = [
                (i, _row_seed(r.params.seed, r.num_output_tokens))
                for i, (r, g) in enumerate(zip(requests, greedy))
                if not g and r.params.seed is not None
            ]

        # Penalties (greedy rows too). Token lists are sent only for rows that use them.
        repetition = frequency = presence = prompt_ids = output_ids = None
        penalized = [p.has_penalties for p in params]
        if any(penalized):
            outputs = [r.output_token_ids if pen else [] for r, pen in zip(requests, penalized)]
            output_ids = _pad(outputs, vocab_size, pin).to(device, non_blocking=True)
            if any(p.repetition_penalty != 1.0 for p in params):
                repetition = staged("repetition", [p.repetition_penalty for p in params])
                prompts = [
                    r.prompt_token_ids if p.repetition_penalty != 1.0 else []
                    for r, p in zip(requests, params)
                ]
                prompt_ids = _pad(prompts, vocab_size, pin).to(device, non_blocking=True)
            if any(p.frequency_penalty != 0.0 for p in params):
                frequency = staged("frequency", [p.frequency_penalty for p in params])
            if any(p.presence_penalty != 0.0 for p in params):
                presence = staged("presence", [p.presence_penalty for p in params])

        # min_tokens: ban the stop tokens (EOS too unless ignore_eos, as in vLLM) until enough are out.
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for i, r in enumerate(requests):
            if r.num_output_tokens < r.params.min_tokens:
                stops = set(r.params.stop_token_ids or ())
                if not r.params.ignore_eos:
                    stops.update(r.eos_token_ids)
                ids = sorted(t for t in stops if t < vocab_size)  # larger ids can never be sampled
                ban_rows += [i] * len(ids)
                ban_ids += ids
        banned_rows = banned_token_ids = None
        if ban_rows:
            banned_rows = to_device(ban_rows, torch.int64)
            banned_token_ids = to_device(ban_ids, torch.int64)

        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            num_rows=num_rows,
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            greedy_mask=greedy_mask,
            temperatures=temperatures,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalties=repetition,
            frequency_penalties=frequency,
            presence_penalties=presence,
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            banned_rows=banned_rows,
            banned_token_ids=banned_token_ids,
            seeded_rows=seeded_rows,
            max_num_logprobs=max(asked) if asked else None,
            staging=staging,
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] fp32: raw logprob of the sampled token
    top_logprob_ids: torch.Tensor | None  # [B, N] int64, N = min(max_num_logprobs, V), best first
    top_logprobs: torch.Tensor | None  # [B, N] fp32


class Sampler(nn.Module):
    """Samples one token per row.

    Rows with `params.seed` draw with a seed made from (seed, number of tokens already generated), so
    their tokens don't depend on the rest of the batch or on preemption and recompute. Rows without
    draw from the sampler's generators (seeded with `seed`), so a run is reproducible from it. On
    either kind of row, the Triton path and the torch path give different tokens (see the module
    docstring).

    Logprobs are "raw": log_softmax of the model's logits before the min_tokens ban, penalties,
    temperature and top-k/top-p/min-p (vLLM's default), for every row when any row asked.
    """

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seeded_generators: dict[torch.device, torch.Generator] = {}
        # The Triton path's unseeded rows: one draw per step on the host, mixed with the row index.
        self._seed_generator = torch.Generator().manual_seed(seed)

    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # logits: [B, V], any float dtype; never modified (stages that write work on an fp32 copy).
        assert logits.shape == (batch.num_rows, batch.vocab_size), (logits.shape, batch.num_rows)
        fused = not batch.all_greedy and use_triton(logits)
        raw_logprobs = None
        if batch.max_num_logprobs is not None:
            raw_logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)

        # The fused draw and argmax read the logits in their own dtype: copy only if a stage writes.
        writes = batch.banned_rows is not None or batch.has_penalties
        if writes or (not batch.all_greedy and (batch.has_filters or not fused)):
            logits = logits.to(torch.float32, copy=True)
        if batch.banned_rows is not None:
            logits[batch.banned_rows, batch.banned_token_ids] = float("-inf")
        if batch.has_penalties:
            logits = apply_penalties(
                logits,
                batch.prompt_token_ids,
                batch.output_token_ids,
                batch.repetition_penalties,
                batch.frequency_penalties,
                batch.presence_penalties,
            )

        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
        elif fused:
            token_ids = self._gumbel_draw(logits, batch)
        else:
            greedy_ids = logits.argmax(dim=-1) if batch.greedy_mask is not None else None
            probs = sampling_probs(logits, batch)
            token_ids = self._exponential_race(probs, batch)
            if greedy_ids is not None:
                token_ids = torch.where(batch.greedy_mask, greedy_ids, token_ids)

        if raw_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        top_logprobs, top_ids = raw_logprobs.topk(min(batch.max_num_logprobs, batch.vocab_size), dim=-1)
        return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs)

    def _gumbel_draw(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # One kernel pass: temperature, noise and argmax (greedy rows: plain argmax). Top-p and min-p
        # act on the tempered distribution, so with filters the temperature is applied before them.
        inv_temperatures = None
        if batch.has_filters:
            logits = filtered_logits(logits, batch)
        elif batch.temperatures is not None:
            inv_temperatures = batch.temperatures.reciprocal()
        seeds = self._row_seeds(batch, logits.device)
        return gumbel_argmax(logits, inv_temperatures, seeds, batch.greedy_mask)

    def _row_seeds(self, batch: SamplingBatch, device: torch.device) -> torch.Tensor:
        """[B] int64 Philox seeds: (seed, tokens generated) for seeded rows, as on the torch path;
        for the others, one draw from the sampler's generator mixed with the row index."""
        base = int(torch.randint(1 << 62, (), generator=self._seed_generator))
        seeds = _row_seed_array(base, np.arange(batch.num_rows, dtype=np.uint64))  # [B] uint64
        for row, row_seed in batch.seeded_rows:
            seeds[row] = row_seed
        if batch.staging is not None:
            return batch.staging.put("seeds", seeds.view(np.int64))
        host = torch.from_numpy(seeds.view(np.int64))
        if device.type == "cuda":
            host = host.pin_memory()
        return host.to(device, non_blocking=True)

    def _exponential_race(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # argmax(p_i / E_i) with E_i ~ Exp(1) picks token i with probability p_i.
        noise = torch.empty_like(probs)  # [B, V]
        if len(batch.seeded_rows) < batch.num_rows:
            noise.exponential_(generator=self._generator(probs.device))
        if batch.seeded_rows:
            gen = self._seeded_generators.get(probs.device)
            if gen is None:
                gen = self._seeded_generators[probs.device] = torch.Generator(device=probs.device)
            for row, row_seed in batch.seeded_rows:
                gen.manual_seed(row_seed)
                noise[row].exponential_(generator=gen)
        # exponential_ can return exactly 0; 0/0 would be NaN, which argmax would pick.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return probs.div_(noise).argmax(dim=-1)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        return gen


def apply_penalties(
    logits: torch.Tensor,
    prompt_token_ids: torch.Tensor | None,
    output_token_ids: torch.Tensor,
    repetition_penalties: torch.Tensor | None,
    frequency_penalties: torch.Tensor | None,
    presence_penalties: torch.Tensor | None,
) -> torch.Tensor:
    """Apply vLLM's penalties to fp32 `logits` [B, V] (partly in place) and return the result.

    Token-id tensors are [B, L] padded with V. Repetition penalty (tokens in prompt or output):
    positive logits are divided by it, negative ones multiplied. Then frequency_penalty * count and
    presence_penalty * (count > 0) are subtracted, counting the output only.
    """
    num_rows, vocab_size = logits.shape
    # counts: [B, V] occurrences in the output; the extra column absorbs the padding.
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=logits.device)
    counts.scatter_add_(1, output_token_ids, torch.ones_like(output_token_ids, dtype=torch.float32))
    counts = counts[:, :vocab_size]
    in_output = counts > 0  # [B, V]
    if repetition_penalties is not None:
        seen = torch.zeros(num_rows, vocab_size + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, prompt_token_ids, True)
        seen = seen[:, :vocab_size] | in_output
        penalty = repetition_penalties[:, None]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if frequency_penalties is not None:
        logits.sub_(frequency_penalties[:, None] * counts)
    if presence_penalties is not None:
        logits.sub_(presence_penalties[:, None] * in_output)
    return logits


def sampling_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Probabilities a random row samples from: temperature, top-k, top-p, min-p, softmax.

    Modifies `logits` [B, V] fp32 in place. Greedy rows carry neutral settings.
    """
    return filtered_logits(logits, batch).softmax(dim=-1)


def filtered_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logits divided by the temperature, with tokens outside top-k, top-p and min-p at -inf.

    Modifies `logits` [B, V] fp32 in place. Greedy rows carry neutral settings.
    """
    if batch.temperatures is not None:
        logits.div_(batch.temperatures[:, None])
    logits = apply_top_k_top_p(logits, batch.top_k, batch.top_p, batch.max_top_k)
    if batch.min_p is not None:
        logits = apply_min_p(logits, batch.min_p)
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, max_top_k: int = 0
) -> torch.Tensor:
    """Set logits outside each row's top-k, then outside its top-p nucleus, to -inf.

    top_k: [B] int64 in [1, V] (V = off); top_p: [B] fp32 in (0, 1] (1 = off). Tokens tied with the
    k-th largest logit are all kept. top-p keeps the smallest prefix of the (top-k-renormalized)
    distribution whose mass reaches top_p, and always the most likely token. `max_top_k` (largest
    k below V) lets the top-k-only path use torch.topk instead of a full sort.
    """
    if top_k is None and top_p is None:
        return logits
    neg_inf = float("-inf")
    if top_p is None:
        vocab_size = logits.shape[1]
        max_top_k = max_top_k or int(top_k[top_k < vocab_size].max())
        top_values = logits.topk(max_top_k, dim=-1).values  # [B, max_top_k], descending
        kth = top_values.gather(1, (top_k.clamp(max=max_top_k) - 1)[:, None])  # [B, 1]
        kth = kth.masked_fill_((top_k > max_top_k)[:, None], neg_inf)  # rows with top-k off
        return logits.masked_fill_(logits < kth, neg_inf)

    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [B, V]
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1)[:, None])  # [B, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, neg_inf)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1)
    mass_above = torch.cat([torch.zeros_like(mass_above[:, :1]), mass_above[:, :-1]], dim=1)  # exclusive
    drop = mass_above >= (top_p - TOP_P_TOLERANCE)[:, None]
    drop &= (top_p < 1.0)[:, None]  # rounding must not cut the tail of an unfiltered row
    drop[:, 0] = False
    sorted_logits.masked_fill_(drop, neg_inf)
    return logits.scatter_(1, sorted_ids, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf the logits of tokens with prob < min_p * max prob (min_p: [B] fp32, 0 = off).

    Compared in logit space (l < l_max + log min_p), which is the same test and needs no softmax.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log()[:, None]  # [B, 1]
    return logits.masked_fill_(logits < threshold, float("-inf"))


def _pad(rows: list[list[int]], pad_id: int, pin_memory: bool = False) -> torch.Tensor:
    """[len(rows), max_len] int64 on the CPU, rows right-padded with pad_id."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    max_len = max(max(map(len, rows), default=0), 1)  # one column even when all rows are empty
    out = torch.full((len(rows), max_len), pad_id, dtype=torch.int64, pin_memory=pin_memory)
    out[torch.arange(out.shape[1]) < lengths[:, None]] = torch.tensor(
        list(itertools.chain.from_iterable(rows)), dtype=torch.int64
    )
    return out


def _row_seed(seed: int, position: int) -> int:
    """A 64-bit generator seed from a request seed and the index of the token being sampled."""
    return _splitmix64((_splitmix64(seed & _MASK_64) + position) & _MASK_64)


def _row_seed_array(seed: int, positions: np.ndarray) -> np.ndarray:
    """`_row_seed(seed, p)` for every p of the uint64 array `positions`, as a uint64 array."""
    with np.errstate(over="ignore"):
        return _splitmix64_array(np.uint64(_splitmix64(seed & _MASK_64)) + positions)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    # uint64 arithmetic wraps, as the & _MASK_64 of _splitmix64 does.
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK_64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return x ^ (x >> 31)
