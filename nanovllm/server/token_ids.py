"""vLLM's `return_token_ids`: the token ids behind a response, beside its text.

RL and agent frameworks train on, or continue from, exactly the tokens the model saw and sampled; encoding
the text again does not give them back (a word can be split more than one way, special tokens are not in
the text, a stop string cuts the text but not the tokens). So, as vLLM's server:
  completions  each choice: `prompt_token_ids` (its prompt's, as run: after truncate_prompt_tokens) and
               `token_ids` (what it generated, a final EOS included as the engine generated it; with echo
               still the generated ones only; for echo with max_tokens 0, []);
  chat         the response: `prompt_token_ids` (the rendered conversation's), each choice `token_ids`.
Streamed, every chunk's choice carries its new `token_ids`; a completion choice's first chunk carries its
`prompt_token_ids`, and the chat response's very first chunk (choice 0's role) the conversation's. Without
the field none of these keys appear (vLLM writes them as null).
"""

from __future__ import annotations

from nanovllm.server.protocol import GenerateRequest


def token_id_fields(
    req: GenerateRequest, token_ids: list[int] | None = None, prompt_ids: list[int] | None = None
) -> dict:
    """The keys to add to a choice, chunk or response: `prompt_token_ids` when prompt_ids is given,
    `token_ids` when token_ids is; none unless the request asked for them."""
    if not req.return_token_ids:
        return {}
    fields = {}
    if prompt_ids is not None:
        fields["prompt_token_ids"] = list(prompt_ids)
    if token_ids is not None:
        fields["token_ids"] = list(token_ids)
    return fields
