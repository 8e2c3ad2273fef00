"""Beam search, as vLLM's `LLM.beam_search` runs it: outside the engine, one token per step.

Each step runs every live beam (prompt + its tokens so far) as a one-token request that asks for the
2 * beam_width most likely next tokens; the prefix cache serves the part of each beam already computed, so a
step costs about one new token per beam. Every (beam, candidate token) pair is a candidate beam. Those that
end in EOS are complete; the best beam_width others live on. After max_tokens steps (or when none lives) the
complete and the live beams are ranked by their length-penalised score and the best beam_width returned.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from nanovllm.outputs import Logprob
from nanovllm.sampling_params import BeamSearchParams

# Runs one step: each beam's token ids -> the Logprob record of its one new token (in the same order).
StepFn = Callable[[list[list[int]]], list[Logprob]]


@dataclass
class BeamSearchSequence:
    """One beam (vLLM's record). finish_reason and stop_reason are filled as vLLM's server fills them (its
    offline beam search leaves them None)."""

    tokens: list[int]  # the prompt's, then the generated ones (as vLLM's: the prompt included)
    # one per generated token: its logprob, rank and the 2 * beam_width best alternatives at that step
    logprobs: list[Logprob] = field(default_factory=list)
    cum_logprob: float = 0.0  # the sum of the generated tokens' logprobs
    text: str | None = None  # the tokens decoded (prompt included), filled for the beams returned
    finish_reason: str | None = None  # "stop" (it drew EOS) or "length" (max_tokens)
    stop_reason: int | None = None  # the EOS id that ended it


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # the best beam_width beams (fewer if fewer exist), best first


def beam_score(beam: BeamSearchSequence, eos_token_ids: Collection[int], length_penalty: float) -> float:
    """cum_logprob / length ** length_penalty, the length counting the prompt but not a final EOS (vLLM's
    score, after transformers'): length_penalty > 0 favours longer beams, < 0 shorter ones."""
    length = len(beam.tokens) - (beam.tokens[-1] in eos_token_ids)
    return beam.cum_logprob / length**length_penalty


def search(
    prompts: list[list[int]],
    params: BeamSearchParams,
    step: StepFn,
    eos_token_ids: Collection[int],
    decode: Callable[[list[int]], str],
) -> list[BeamSearchOutput]:
    """Beam search for each prompt (token ids, checked to leave room for max_tokens), all prompts' beams
    running together in each step. `decode` spells the returned beams' tokens."""

    def score(beam: BeamSearchSequence) -> float:
        return beam_score(beam, eos_token_ids, params.length_penalty)

    live = [[BeamSearchSequence(list(prompt))] for prompt in prompts]  # [num_prompts][<= beam_width]
    complete: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        beams = [beam for group in live for beam in group]
        if not beams:
            break
        results = iter(step([beam.tokens for beam in beams]))
        for i, group in enumerate(live):
            candidates = []
            for beam in group:
                for child in _children(beam, next(results)):
                    if child.tokens[-1] in eos_token_ids and not params.ignore_eos:
                        child.finish_reason, child.stop_reason = "stop", child.tokens[-1]
                        complete[i].append(child)  # (every one: the final ranking decides)
                    else:
                        candidates.append(child)
            live[i] = sorted(candidates, key=score, reverse=True)[: params.beam_width]
    outputs = []
    for group, done in zip(live, complete):
        for beam in group:
            beam.finish_reason = "length"
        best = sorted(done + group, key=score, reverse=True)[: params.beam_width]
        for beam in best:
            hide_eos = beam.finish_reason == "stop" and not params.include_stop_str_in_output
            beam.text = decode(beam.tokens[:-1] if hide_eos else beam.tokens)
        outputs.append(BeamSearchOutput(best))
    return outputs


def _children(beam: BeamSearchSequence, step: Logprob) -> list[BeamSearchSequence]:
    """The beam extended by each of its step's candidates: the best alternatives and the drawn token (the
    same as the best at temperature 0; maybe another above it)."""
    candidates = {**step.top_logprobs, step.token_id: step.logprob}
    children = []
    for token, logprob in candidates.items():
        # rank: tokens at least as likely (the engine's for the drawn token; else counted among the best)
        rank = step.rank if token == step.token_id else sum(v >= logprob for v in step.top_logprobs.values())
        record = Logprob(token, logprob, step.top_logprobs, rank)
        children.append(
            BeamSearchSequence(beam.tokens + [token], beam.logprobs + [record], beam.cum_logprob + logprob)
        )
    return children
