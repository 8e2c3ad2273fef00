"""Turn a batch of logits into next tokens (vLLM's sampling semantics).

Per row, in order: allowed_token_ids -> logit_bias -> min_tokens ban -> penalties -> greedy argmax, or
temperature -> min-p -> top-k -> top-p -> a random draw. `SamplingBatch.build` (layers/sampling_batch.py)
turns the per-request settings into device tensors once per step and records which stages any row needs,
so `Sampler.forward` skips the rest.

The random draw has two implementations that sample the same distribution from different random
streams (a seed gives different tokens on the two):
- CUDA with Triton: Gumbel-max in two kernels (a tile of the vocabulary, then a column of it) over the
  logits in their own dtype (kernels/sampling.py), each row with its own Philox seed;
- elsewhere (CPU, or kernel backend "torch"): an exponential race over the probabilities, with torch
  generators.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nanovllm.kernels.backend import use_triton
from nanovllm.kernels.sampling import gumbel_argmax
from nanovllm.kernels.token_logprobs import token_logprobs
from nanovllm.layers.sampling_batch import SamplingBatch, row_seed_array
from nanovllm.utils.transfer import to_device

# top-p keeps a token while the mass ranked above it is below top_p. Float32 softmax/cumsum error
# would make the exact boundary (mass above == top_p) a coin flip, so mass within this of top_p
# counts as having reached it.
TOP_P_TOLERANCE = 1e-6


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    # SamplingParams.logprobs (None unless some row asked for them):
    logprobs: torch.Tensor | None = None  # [B] fp32: raw logprob of the sampled token
    top_logprob_ids: torch.Tensor | None = None  # [B, N] int64, N = min(max_num_logprobs, V), best first
    top_logprobs: torch.Tensor | None = None  # [B, N] fp32
    ranks: torch.Tensor | None = None  # [B] int64: the number of tokens at least as likely as the sampled one


@dataclass
class PromptLogprobs:
    """SamplingParams.prompt_logprobs for a step's scored rows: each row's logits score the prompt token
    that follows it."""

    logprobs: torch.Tensor  # [R] fp32: raw logprob of the prompt token
    top_ids: torch.Tensor  # [R, N] int64, best first
    top_logprobs: torch.Tensor  # [R, N] fp32
    ranks: torch.Tensor  # [R] int64: the number of tokens at least as likely as the prompt token

    def to_host(self) -> PromptLogprobs:
        """Copies on the host, queued behind the step (pinned on CUDA, so the caller waits on an event)."""
        return PromptLogprobs(*(x.to("cpu", non_blocking=True) for x in vars(self).values()))


def score_tokens(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompt_logprobs of a slice of rows: logits [R, V] (raw), token_ids [R] -> (the token's raw logprob
    [R] fp32, top ids [R, N] int64, top logprobs [R, N] fp32, the token's rank [R] int64). One pass over the
    logits (kernels/token_logprobs.py) and, for N > 0, a top-k of the logits themselves: log_softmax keeps
    their order, so the top logprobs are the top logits minus the row's log-sum-exp."""
    chosen, ranks, lse = token_logprobs(logits, token_ids)
    if num_top == 0:
        empty = torch.empty(len(token_ids), 0, device=logits.device)
        return chosen, empty.long(), empty, ranks
    top_logits, top_ids = logits.topk(min(num_top, logits.shape[-1]), dim=-1)
    return chosen, top_ids, top_logits.float() - lse[:, None], ranks


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
        if batch.writes_logits or (not batch.all_greedy and (batch.has_filters or not fused)):
            logits = logits.to(torch.float32, copy=True)
        if batch.blocked is not None:
            logits.masked_fill_(batch.blocked, float("-inf"))
        if batch.bias_rows is not None:
            logits[batch.bias_rows, batch.bias_token_ids] += batch.bias_values
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
            return SamplerOutput(token_ids)
        logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [B]
        ranks = (raw_logprobs >= logprobs[:, None]).sum(dim=-1)  # [B]: vLLM's rank, ties at their last place
        top_logprobs, top_ids = raw_logprobs.topk(min(batch.max_num_logprobs, batch.vocab_size), dim=-1)
        return SamplerOutput(token_ids, logprobs, top_ids, top_logprobs, ranks)

    def _gumbel_draw(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        # The kernels do temperature, noise and argmax (greedy rows: plain argmax). Top-p and min-p
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
        seeds = row_seed_array(base, np.arange(batch.num_rows, dtype=np.uint64))  # [B] uint64
        for row, row_seed in batch.seeded_rows:
            seeds[row] = row_seed
        if batch.staging is not None:
            return batch.staging.put("seeds", seeds.view(np.int64))
        return to_device(seeds.view(np.int64), device)

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
    """Probabilities a random row samples from: temperature, min-p, top-k, top-p, softmax.

    Modifies `logits` [B, V] fp32 in place. Greedy rows carry neutral settings.
    """
    return filtered_logits(logits, batch).softmax(dim=-1)


def filtered_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Logits divided by the temperature, with tokens outside min-p, top-k and top-p at -inf.

    Modifies `logits` [B, V] fp32 in place. Greedy rows carry neutral settings. Min-p comes first, as in
    vLLM V1 (an argmax-invariant logits processor, run before top-k/top-p): top-p then measures its mass
    on the distribution renormalized over the tokens min-p kept.
    """
    if batch.temperatures is not None:
        logits.div_(batch.temperatures[:, None])
    if batch.min_p is not None:
        logits = apply_min_p(logits, batch.min_p)
    return apply_top_k_top_p(logits, batch.top_k, batch.top_p, batch.max_top_k)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, max_top_k: int = 0
) -> torch.Tensor:
    """Set logits outside each row's top-k, then outside its top-p nucleus, to -inf.

    top_k: [B] int64 in [1, V] (V = off); top_p: [B] fp32 in (0, 1] (1 = off). Tokens tied with the
    k-th largest logit are all kept. top-p keeps the smallest prefix of the (top-k-renormalized)
    distribution whose mass reaches top_p, and always the most likely token. `max_top_k` (largest
    k below V) lets the top-k-only path use torch.topk instead of a full sort. Logits already at -inf
    (min-p's) stay there and have no mass.
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
