"""vLLM's `use_beam_search` on the server: the offline search's loop (nanovllm/beam_search.py), each step
run as one-token sub-requests on the AsyncEngine.

Every step submits all live beams of the request (of all its prompts) at once, each a one-token request
asking for 2 * beam_width logprobs, and awaits them; the prefix cache serves what each beam has computed
before. The event loop stays free between and during steps, so other requests run beside the search (and
join its steps' batches). Cancelling the coroutine (the client went away) aborts the step in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from nanovllm.beam_search import BeamSearch, BeamSearchSequence, shown_tokens
from nanovllm.outputs import Logprob
from nanovllm.sampling_params import BeamSearchParams
from nanovllm.server.async_engine import AsyncEngine, RequestDelta, SubRequest


async def run_beam_search(
    engine: AsyncEngine,
    request_id: str,
    prompts: list[list[int]],
    params: BeamSearchParams,
    eos_token_ids: Collection[int],
    priority: int = 0,
) -> list[list[BeamSearchSequence]]:
    """Per prompt, its best params.beam_width beams, best first; every step's requests at the request's
    priority. Raises what submit raises (ValueError for a prompt the engine refuses, EngineDeadError) and a
    failed step's error."""
    search = BeamSearch(prompts, params, eos_token_ids)
    step_params = params.step_params()
    while beams := search.next_beams():
        subs = [
            SubRequest(
                f"{request_id}-step{search.num_steps}-beam{i}",
                None,
                tokens,
                step_params,
                priority=priority,
                internal=True,  # (the server counts the search, not its steps: metrics.py)
            )
            for i, tokens in enumerate(beams)
        ]
        stream = await engine.submit(subs, incremental=False)
        results: list[Logprob | None] = [None] * len(subs)
        try:
            async for index, delta in stream:  # (not incremental: one finished delta per beam)
                results[index] = delta.logprobs[0]
        finally:
            stream.close()
        search.advance(results)  # type: ignore[arg-type]
    return [out.sequences for out in search.outputs()]


def as_choice(
    request_id: str,
    beam: BeamSearchSequence,
    num_prompt_tokens: int,
    params: BeamSearchParams,
    decode: Callable,
    logprobs: bool = False,
) -> RequestDelta:
    """A finished beam as a finished choice: its generated tokens, a final EOS only with
    include_stop_str_in_output (as vLLM's server: then the EOS counts in the usage too), their text with
    special tokens shown, the beam's finish and stop reasons and, with `logprobs`, each shown token's
    Logprob record (its 2 * beam_width alternatives at that step)."""
    token_ids = shown_tokens(beam, params)[num_prompt_tokens:]
    return RequestDelta(
        request_id,
        token_ids,
        decode(token_ids),
        beam.logprobs[: len(token_ids)] if logprobs else None,
        finished=True,
        finish_reason=beam.finish_reason,
        stop_reason=beam.stop_reason,
    )
