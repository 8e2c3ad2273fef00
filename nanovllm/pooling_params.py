"""Per-request embedding settings (vLLM's PoolingParams for the "embed" task), validated at construction.

An embedding request runs its prompt through the model (prefill only, in chunks like any prompt) and returns
one vector: the final hidden states pooled as the model's pooler says (`Config.pooler`: the last token,
the mean, or the first), cut to `dimensions` and L2-normalized (docs/embeddings.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from nanovllm.sampling_params import ParamError, _is_int, truncate_prompt


@dataclass(slots=True)
class PoolingParams:
    # keep only the prompt's last k tokens (-1: max_model_len of them; None: all), as SamplingParams'
    truncate_prompt_tokens: int | None = None
    # a Matryoshka model's embedding cut to its first `dimensions` values (before the normalization)
    dimensions: int | None = None
    # L2-normalize the embedding (None: the model's pooler decides, True unless its sentence-transformers
    # files leave the Normalize module out). vLLM's older name; `use_activation` is its newer one.
    normalize: bool | None = None
    use_activation: bool | None = None

    def __post_init__(self) -> None:
        keep = self.truncate_prompt_tokens
        if keep is not None and (not _is_int(keep) or not (keep >= 1 or keep == -1)):
            raise ParamError(
                f"truncate_prompt_tokens must be None, -1 or an int >= 1, got {keep!r}",
                "truncate_prompt_tokens",
            )
        if self.dimensions is not None and (not _is_int(self.dimensions) or self.dimensions < 1):
            raise ParamError(f"dimensions must be an int >= 1, got {self.dimensions!r}", "dimensions")
        for flag in ("normalize", "use_activation"):
            if getattr(self, flag) is not None and not isinstance(getattr(self, flag), bool):
                raise ParamError(f"{flag} must be a bool or None, got {getattr(self, flag)!r}", flag)
        if None not in (self.normalize, self.use_activation) and self.normalize != self.use_activation:
            raise ParamError(
                f"normalize={self.normalize} and use_activation={self.use_activation} disagree (they are one "
                "setting: give one)",
                "normalize",
            )

    def normalizes(self, default: bool) -> bool:
        """Whether the embedding is L2-normalized: the request's choice, else the model's `default`."""
        for choice in (self.normalize, self.use_activation):
            if choice is not None:
                return choice
        return default

    def truncated_prompt(self, token_ids: list[int], max_model_len: int) -> list[int]:
        return truncate_prompt(token_ids, self.truncate_prompt_tokens, max_model_len)
