"""Fixtures of the server tests: a tiny random checkpoint with a trained tokenizer and chat template, a real
server on it started once per module (helpers.py's launcher), the official `openai` client to it, and the
same weights in transformers. This `ckpt` (module-scoped; its generation_config.json sets max_new_tokens)
takes the place of the root conftest's under tests/server."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from transformers import AutoTokenizer

from tests.checkpoints import build_checkpoint, load_hf_model
from tests.server.helpers import EOS, MAX_NEW_TOKENS, _one_torch_thread, _serve


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("server-ckpt"), "qwen3")
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": MAX_NEW_TOKENS}))
    return path


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """The base URL of a server started once for the module (the benchmark's own launcher)."""
    yield from _serve(ckpt, tmp_path_factory)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return AutoTokenizer.from_pretrained(str(ckpt))


@pytest.fixture(scope="module")
def hf(ckpt):
    return load_hf_model(ckpt)


@pytest.fixture(scope="module")
def eos_prompt(hf) -> list[int]:
    """A one-token prompt whose greedy next token is EOS (found with transformers on the same weights)."""
    with torch.no_grad(), _one_torch_thread():
        first = hf(torch.arange(3, 2048)[:, None]).logits[:, -1].argmax(-1)  # [2045]
    hits = (first == EOS).nonzero().flatten().tolist()
    if not hits:
        pytest.skip("no one-token prompt of this checkpoint greedily ends with EOS")
    return [3 + hits[0]]
