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


class BeamSearch:
    """The search for some prompts (token ids, checked to leave room for max_tokens), all prompts' beams
    running together in each step. Whoever runs the steps drives it, synchronously (`search`) or from an
    event loop (the server's, server/beam_search.py):

        while beams := bs.next_beams():
            bs.advance(run_one_token_each(beams))
        outputs = bs.outputs()
    """

    def __init__(self, prompts: list[list[int]], params: BeamSearchParams, eos_token_ids: Collection[int]):
        self.params = params
        self.eos_token_ids = eos_token_ids
        self._live = [[BeamSearchSequence(list(prompt))] for prompt in prompts]  # [num_prompts][<= width]
        self._complete: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self.num_steps = 0  # steps advanced so far

    def score(self, beam: BeamSearchSequence) -> float:
        return beam_score(beam, self.eos_token_ids, self.params.length_penalty)

    def next_beams(self) -> list[list[int]]:
        """The token ids of every live beam, to run one token each; [] once the search is over."""
        if self.num_steps == self.params.max_tokens:
            return []
        return [beam.tokens for group in self._live for beam in group]

    def advance(self, results: list[Logprob]) -> None:
        """One step: `results` holds the Logprob record of each beam's one new token, in next_beams' order."""
        results_iter = iter(results)
        for i, group in enumerate(self._live):
            candidates = []
            for beam in group:
                for child in _children(beam, next(results_iter)):
                    if child.tokens[-1] in self.eos_token_ids and not self.params.ignore_eos:
                        child.finish_reason, child.stop_reason = "stop", child.tokens[-1]
                        self._complete[i].append(child)  # (every one: the final ranking decides)
                    else:
                        candidates.append(child)
            self._live[i] = sorted(candidates, key=self.score, reverse=True)[: self.params.beam_width]
        self.num_steps += 1

    def outputs(self) -> list[BeamSearchOutput]:
        """Per prompt, the best beam_width of its complete and live beams, best first (text not filled)."""
        outputs = []
        for group, done in zip(self._live, self._complete):
            for beam in group:
                beam.finish_reason = "length"
            outputs.append(
                BeamSearchOutput(sorted(done + group, key=self.score, reverse=True)[: self.params.beam_width])
            )
        return outputs


def shown_tokens(beam: BeamSearchSequence, params: BeamSearchParams) -> list[int]:
    """The beam's tokens as its text shows them: a final EOS only with include_stop_str_in_output."""
    hide_eos = beam.finish_reason == "stop" and not params.include_stop_str_in_output
    return beam.tokens[:-1] if hide_eos else beam.tokens


def search(
    prompts: list[list[int]],
    params: BeamSearchParams,
    step: StepFn,
    eos_token_ids: Collection[int],
    decode: Callable[[list[int]], str],
) -> list[BeamSearchOutput]:
    """Beam search for each prompt, each step run by `step`. `decode` spells the returned beams' tokens."""
    bs = BeamSearch(prompts, params, eos_token_ids)
    while beams := bs.next_beams():
        bs.advance(step(beams))
    outputs = bs.outputs()
    for out in outputs:
        for beam in out.sequences:
            beam.text = decode(shown_tokens(beam, params))
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
