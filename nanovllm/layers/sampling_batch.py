"""A step's sampling settings as device tensors: `SamplingRequest` (one row's settings and token
history), `SamplingBatch.build` (all rows at once, built once per step, recording which sampler stages
any row needs) and `SamplingStaging` (the engine's persistent pinned buffers the batch is built in, and
its per-sequence mirrors of known token ids for penalties). The sampler that consumes a batch is
layers/sampler.py.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from nanovllm.layers.constraint_masks import ConstraintMasks
from nanovllm.sampling_params import GREEDY_EPS, SamplingParams
from nanovllm.utils.transfer import to_device

if TYPE_CHECKING:
    from nanovllm.structured.grammar import GrammarMatcher

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
        # params -> its allowed_token_ids on the device, for the requests of the last max_rows params
        self._allowed: OrderedDict[int, tuple[SamplingParams, torch.Tensor]] = OrderedDict()
        # token_ids list -> its known ids as int64 (penalties), for the lists of the last max_rows sequences
        self._known: OrderedDict[int, _TokenMirror] = OrderedDict()
        # structured outputs: each grammar's allowed-token table on the device
        self.constraints = ConstraintMasks(device)

    def next_step(self) -> None:
        self._turn ^= 1

    def put(self, name: str, values: list | np.ndarray) -> torch.Tensor:
        """values -> the device buffer `name`'s first len(values) rows, returned."""
        n = len(values)
        host = self._host[self._turn][name][:n]
        host.numpy()[:] = values
        return self._device[name][:n].copy_(host, non_blocking=True)

    def allowed_ids(self, params: SamplingParams) -> torch.Tensor:
        """params.allowed_token_ids as a device tensor, copied once and reused by the request's later
        steps (a list of 100k ids would otherwise cost ~10 ms of host time a row, every step)."""
        hit = self._allowed.get(id(params))
        if hit is not None and hit[0] is params:
            self._allowed.move_to_end(id(params))
            return hit[1]
        ids = to_device(params.allowed_token_ids, self.device, torch.int64)
        self._allowed[id(params)] = (params, ids)  # (holding params: its id is not reused meanwhile)
        if len(self._allowed) > self.max_rows:
            self._allowed.popitem(last=False)
        return ids

    def known_tokens(self, token_ids: list[int], num_known: int) -> np.ndarray:
        """token_ids[:num_known] as an int64 array: a view of a mirror kept for that list, extended by
        the ids that became known since the last call (O(new tokens), where slicing the list and
        converting it would cost O(length) a row, every step). This relies on a sequence's known ids never
        changing (engine/scheduler.py: pending ids sit after them and are replaced in place; finish deletes
        only pending ones; preemption keeps them). The view stays valid: later calls write only past it."""
        mirror = self._known.get(id(token_ids))
        if mirror is None or mirror.token_ids is not token_ids:
            mirror = _TokenMirror(token_ids)
            self._known[id(token_ids)] = mirror  # (holding the list: its id is not reused meanwhile)
            if len(self._known) > self.max_rows:
                self._known.popitem(last=False)
        else:
            self._known.move_to_end(id(token_ids))
        return mirror.extend(num_known)


class _TokenMirror:
    """A sequence's known token ids as a growing int64 array (SamplingStaging.known_tokens)."""

    __slots__ = ("token_ids", "ids", "num_ids")

    def __init__(self, token_ids: list[int]):
        self.token_ids = token_ids
        self.ids = np.empty(0, dtype=np.int64)  # [capacity]; the first num_ids mirror token_ids
        self.num_ids = 0

    def extend(self, num_known: int) -> np.ndarray:
        """The first num_known ids (a view), copying in those not mirrored yet."""
        if num_known > self.num_ids:
            if num_known > len(self.ids):  # double: amortized O(1) a token
                grown = np.empty(max(2 * num_known, 64), dtype=np.int64)
                grown[: self.num_ids] = self.ids[: self.num_ids]
                self.ids = grown
            self.ids[self.num_ids : num_known] = self.token_ids[self.num_ids : num_known]
            self.num_ids = num_known
        return self.ids[:num_known]


@dataclass(slots=True)
class SamplingRequest:
    """One row of the batch: a sequence that needs its next token."""

    params: SamplingParams
    # Token ids as a list or an int64 array (a view of SamplingStaging's mirror), read only by:
    prompt_token_ids: list[int] | np.ndarray  # repetition_penalty
    output_token_ids: list[int] | np.ndarray  # the known generated ids: all for penalties, the last few
    eos_token_ids: tuple[int, ...]  # banned with params.stop_token_ids while output < min_tokens
    # Tokens generated so far, pending included: the seed position and the min_tokens count. None:
    # len(output_token_ids), plus one if pending_src is set.
    num_output_tokens: int | None = None
    # Penalties and structured outputs under overlapped scheduling: the token after output_token_ids is still
    # on the device, row pending_src of the previous step's sampled ids (SamplingBatch.build reads it there).
    pending_src: int | None = None
    # Structured outputs: the sequence's place in its constraint, which decides the row's allowed tokens
    matcher: GrammarMatcher | None = None

    def __post_init__(self) -> None:
        if self.num_output_tokens is None:
            self.num_output_tokens = len(self.output_token_ids) + (self.pending_src is not None)

    @classmethod
    def for_sequence(
        cls,
        params: SamplingParams,
        token_ids: list[int],
        num_prompt_tokens: int,
        eos_token_ids: tuple[int, ...],
        num_pending_tokens: int = 0,
        pending_src: int | None = None,
        staging: SamplingStaging | None = None,
        matcher: GrammarMatcher | None = None,
    ) -> SamplingRequest:
        """The row of a sequence whose `token_ids` are its prompt then its output, the last
        num_pending_tokens of which are still on the device (overlapped scheduling: at most one, row
        pending_src of the previous step's sampled ids). Token ids are read only for what reads them
        (repetition: prompt and output; presence and frequency: output; bad words: the output's last
        tokens); otherwise they are left empty. Penalties take them from `staging`'s mirror of the
        sequence, which costs O(new tokens) a step (without staging: an O(length) copy). `matcher`: the
        sequence's structured-output matcher, at the state of the known output (a pending token's successor
        state is picked on the device: layers/constraint_masks.py)."""
        num_known = len(token_ids) - num_pending_tokens
        num_output = len(token_ids) - num_prompt_tokens
        if num_pending_tokens and (num_pending_tokens > 1 or pending_src is None):
            raise RuntimeError(f"{num_pending_tokens} pending tokens (source row {pending_src}), not one")
        if num_pending_tokens and params.bad_word_context:
            raise RuntimeError("multi-token bad words read the latest token on the host: it must be known")
        pending = pending_src if num_pending_tokens else None
        if params.has_penalties:
            if staging is not None:
                known = staging.known_tokens(token_ids, num_known)
            else:
                known = np.asarray(token_ids[:num_known], dtype=np.int64)
            prompt = known[:num_prompt_tokens] if params.repetition_penalty != 1.0 else []
            return cls(
                params,
                prompt,
                known[num_prompt_tokens:],
                eos_token_ids,
                num_output,
                pending,
                matcher,
            )
        output = []
        if params.bad_words_token_ids:
            output = token_ids[max(num_prompt_tokens, num_known - params.bad_word_context) : num_known]
        return cls(params, [], output, eos_token_ids, num_output, pending if matcher else None, matcher)


def takes_plain_argmax(requests: list[SamplingRequest]) -> bool:
    """Whether the sampler would take each row's argmax over its raw logits (`SamplingBatch.build`'s
    all_greedy with no penalties, no min_tokens ban and no logprobs): then the argmax is all it needs."""
    return all(
        r.params.temperature < GREEDY_EPS
        and not r.params.has_penalties
        and r.params.logprobs is None
        and r.params.logit_bias is None
        and r.params.allowed_token_ids is None
        and r.params.bad_words_token_ids is None
        and r.matcher is None
        and r.num_output_tokens >= r.params.min_tokens
        for r in requests
    )


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
    banned_token_ids: torch.Tensor | None  # [num_banned] int64 } by min_tokens and bad words
    bias_rows: torch.Tensor | None  # [num_biased] int64    } logit_bias: (row, token) pairs and
    bias_token_ids: torch.Tensor | None  # [num_biased] int64 } what is added to their logits
    bias_values: torch.Tensor | None  # [num_biased] fp32     }
    blocked: torch.Tensor | None  # [B, V] bool: True where allowed_token_ids or a constraint rule a token out
    seeded_rows: list[tuple[int, int]]  # (row, row seed) for random rows with params.seed
    max_num_logprobs: int | None  # max params.logprobs over the batch; None when no row asked
    staging: SamplingStaging | None = None  # where the step's settings live (None: fresh tensors)

    @property
    def has_penalties(self) -> bool:
        return self.output_token_ids is not None

    @property
    def writes_logits(self) -> bool:
        """A stage before the draw changes logits: the ban, logit_bias, allowed_token_ids, penalties."""
        return (
            self.banned_rows is not None
            or self.bias_rows is not None
            or self.blocked is not None
            or self.has_penalties
        )

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
        prev_tokens: torch.Tensor | None = None,
    ) -> SamplingBatch:
        """prev_tokens: [num_prev] int64 on the device, the previous step's sampled ids (ModelRunner's
        `_prev_tokens`), which rows with a `pending_src` read; None when no row has one."""
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

        def staged(name: str, values: list) -> torch.Tensor:
            if staging is None:
                return to_device(values, device, SamplingStaging.DTYPES[name])
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
                (i, row_seed(r.params.seed, r.num_output_tokens))
                for i, (r, g) in enumerate(zip(requests, greedy))
                if not g and r.params.seed is not None
            ]

        # Penalties (greedy rows too). Token lists are sent only for rows that use them.
        repetition = frequency = presence = prompt_ids = output_ids = None
        penalized = [p.has_penalties for p in params]
        if any(penalized):
            outputs = [r.output_token_ids if pen else [] for r, pen in zip(requests, penalized)]
            # A pending token (overlapped scheduling) takes the column after its row's known output: padding
            # on the host, filled on the device from the previous step's sampled ids, as the pending input
            # ids are (ModelRunner._fill_pending).
            pending = [(i, len(r.output_token_ids), r.pending_src) for i, r in enumerate(requests)]
            pending = [p for p, pen in zip(pending, penalized) if pen and p[2] is not None]
            width = 1 + max((col for _, col, _ in pending), default=-1)
            output_host = _pad(outputs, vocab_size, pin, width)
            output_ids = output_host.to(device, non_blocking=True)  # [B, width]
            if pending:
                rows, cols, src = zip(*pending)
                if prev_tokens is None or max(src) >= len(prev_tokens):
                    num_prev = None if prev_tokens is None else len(prev_tokens)
                    raise RuntimeError(f"pending output tokens from rows {src} of {num_prev} sampled ids")
                flat = [row * output_host.shape[1] + col for row, col in zip(rows, cols)]
                sampled = prev_tokens.index_select(0, to_device(src, device, torch.int64))  # [num_pending]
                output_ids.view(-1).index_copy_(0, to_device(flat, device, torch.int64), sampled)
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

        # min_tokens: ban the stop tokens and every EOS id until enough are out, with ignore_eos too (vLLM
        # bans its all_stop_token_ids, which hold the EOS ids whatever ignore_eos); and the bad words.
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        for i, r in enumerate(requests):
            if r.num_output_tokens < r.params.min_tokens:
                stops = set(r.params.stop_token_ids or ()).union(r.eos_token_ids)
                ids = sorted(t for t in stops if t < vocab_size)  # larger ids can never be sampled
                ban_rows += [i] * len(ids)
                ban_ids += ids
            if r.params.bad_words_token_ids:  # a word's last token, once the output ends with the rest
                for word in r.params.bad_words_token_ids:
                    if len(word) == 1 or _ends_with(r.output_token_ids, word[:-1]):
                        ban_rows.append(i)
                        ban_ids.append(word[-1])
        banned_rows = banned_token_ids = None
        if ban_rows:
            banned_rows = to_device(ban_rows, device, torch.int64)
            banned_token_ids = to_device(ban_ids, device, torch.int64)

        # logit_bias: sparse (row, token, bias) triples. allowed_token_ids: a [B, V] mask (rows without
        # the setting block nothing), from each request's ids kept on the device.
        steered = [i for i, p in enumerate(params) if p.logit_bias or p.allowed_token_ids]
        bias = [(i, t, b) for i in steered for t, b in (params[i].logit_bias or {}).items()]
        bias_rows = bias_token_ids = bias_values = None
        if bias:
            rows, ids, values = zip(*bias)
            bias_rows, bias_token_ids = (
                to_device(rows, device, torch.int64),
                to_device(ids, device, torch.int64),
            )
            bias_values = to_device(values, device, torch.float32)
        blocked = None
        restricted = [i for i in steered if params[i].allowed_token_ids is not None]
        guided = [i for i, r in enumerate(requests) if r.matcher is not None]
        if restricted or guided:
            blocked = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)
        if restricted:
            blocked[to_device(restricted, device, torch.int64)] = True
            for i in restricted:
                p = params[i]
                ids = (
                    staging.allowed_ids(p)
                    if staging is not None
                    else to_device(p.allowed_token_ids, device, torch.int64)
                )
                blocked[i].index_fill_(0, ids, False)
        if guided:  # (a pending token's successor state is picked on the device: no wait)
            masks = staging.constraints if staging is not None else ConstraintMasks(device)
            masks.block(blocked, requests, guided, prev_tokens)

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
            bias_rows=bias_rows,
            bias_token_ids=bias_token_ids,
            bias_values=bias_values,
            blocked=blocked,
            seeded_rows=seeded_rows,
            max_num_logprobs=max(asked) if asked else None,
            staging=staging,
        )


def _pad(
    rows: list[list[int] | np.ndarray], pad_id: int, pin_memory: bool = False, min_len: int = 1
) -> torch.Tensor:
    """[len(rows), max_len] int64 on the CPU, rows right-padded with pad_id; max_len >= min_len >= 1 (one
    column even when all rows are empty)."""
    max_len = max(max(map(len, rows), default=0), min_len, 1)
    out = torch.empty((len(rows), max_len), dtype=torch.int64, pin_memory=pin_memory)
    # Row by row through numpy, each element written once: a memcpy for the engine's rows, int64 arrays
    # (SamplingStaging.known_tokens); lists convert element by element (64 rows x 3,000 tokens on a small
    # CPU: ~4 ms a step).
    padded = out.numpy()
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
        padded[i, len(row) :] = pad_id
    return out


def row_seed(seed: int, position: int) -> int:
    """A 64-bit generator seed from a request seed and the index of the token being sampled."""
    return _splitmix64((_splitmix64(seed & _MASK_64) + position) & _MASK_64)


def row_seed_array(seed: int, positions: np.ndarray) -> np.ndarray:
    """`row_seed(seed, p)` for every p of the uint64 array `positions`, as a uint64 array."""
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


def _ends_with(tokens: list[int] | np.ndarray, tail: list[int]) -> bool:
    # (tokens is an int64 array on a row with penalties: compare as lists)
    return len(tokens) >= len(tail) and list(tokens[len(tokens) - len(tail) :]) == list(tail)
