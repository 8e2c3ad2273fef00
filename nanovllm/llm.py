"""The offline API: `LLM(model, ...).generate(prompts, sampling_params)`."""

from __future__ import annotations

from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.llm_engine import LLMEngine, Prompt
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams


class LLM:
    """Usage:

    llm = LLM("qwen3-0.6b")                       # a checkpoint directory or a preset name
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(outs[0].outputs[0].text)
    """

    def __init__(self, model: str, **engine_args):
        self.config = Config.from_kwargs(model, **engine_args)
        self.engine = LLMEngine(self.config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        # Validate everything before queuing anything: a bad prompt leaves the engine untouched.
        encoded = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            try:
                encoded.append(self.engine.encode_prompt(prompt, params))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        ids = [
            self.engine.add_request(p, sp, prompt_token_ids=tok)
            for p, sp, tok in zip(prompts, sampling_params, encoded)
        ]
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        try:
            while len(results) < len(ids):
                for out in self.engine.step():
                    # Requests added straight to the engine may finish here too: not ours to return.
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
                bar.set_postfix_str(f"{self.engine.num_generated_tokens} tokens", refresh=False)
        finally:
            bar.close()
            for rid in ids:
                if rid not in results:
                    self.engine.abort(rid)  # after an error: leave no request behind
        return [results[rid] for rid in ids]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _as_prompt_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, list | tuple):
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # one prompt of token ids
        return list(prompts)
    raise ValueError(
        f"prompts must be a string, a list of token ids, or a list of either; got {type(prompts).__name__}"
    )
