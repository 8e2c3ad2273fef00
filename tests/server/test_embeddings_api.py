"""POST /v1/embeddings through the official `openai` client and raw HTTP: vectors equal transformers' base
model's pooled hidden states on the same weights, both encodings, usage, vLLM's extra fields, the 400s; and a
server on an embedding checkpoint (runner "pooling") that refuses generation."""

from __future__ import annotations

import base64
import shutil

import httpx
import numpy as np
import openai
import pytest
import torch
import transformers

from tests.server.helpers import MODEL, _error, _one_torch_thread, _serve, _wait_until_idle


@pytest.fixture(scope="module")
def base(ckpt):
    return transformers.AutoModel.from_pretrained(ckpt, dtype=torch.float32).eval()


def _expected(base, ids: list[int]) -> list[float]:
    with torch.no_grad(), _one_torch_thread():
        last = base(torch.tensor([ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(last, dim=-1).tolist()


def _close(got: list[float], want: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=2e-5, rtol=1e-4)


def test_openai_client_embeddings_equal_transformers(client, server, base, tokenizer):
    texts = ["The cat sat on the mat.", "Paris is the capital of France", "a"]
    out = client.embeddings.create(model=MODEL, input=texts)  # (the client asks for base64 and decodes it)
    ids = [tokenizer.encode(t) for t in texts]
    assert [d.index for d in out.data] == [0, 1, 2] and out.model == MODEL
    for d, i in zip(out.data, ids):
        _close(d.embedding, _expected(base, i))
    assert out.usage.prompt_tokens == out.usage.total_tokens == sum(map(len, ids))
    by_ids = client.embeddings.create(model=MODEL, input=ids[1], encoding_format="float")
    _close(by_ids.data[0].embedding, out.data[1].embedding)
    _wait_until_idle(server)


def test_float_and_base64_encodings_and_vllm_fields(server, base):
    ids = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    body = {"model": MODEL, "input": ids, "encoding_format": "float"}
    floats = httpx.post(server + "/v1/embeddings", json=body, timeout=60).json()
    assert floats["object"] == "list" and floats["id"].startswith("embd-")
    assert [d["object"] for d in floats["data"]] == ["embedding", "embedding"]
    for d, i in zip(floats["data"], ids):
        _close(d["embedding"], _expected(base, i))
    packed = httpx.post(
        server + "/v1/embeddings", json={**body, "encoding_format": "base64"}, timeout=60
    ).json()
    for d, f in zip(packed["data"], floats["data"]):
        assert np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist() == f["embedding"]
    raw = httpx.post(server + "/v1/embeddings", json={**body, "normalize": False}, timeout=60).json()
    with torch.no_grad():
        last = base(torch.tensor([ids[0]])).last_hidden_state[0, -1]
    _close(raw["data"][0]["embedding"], last.tolist())
    short = httpx.post(
        server + "/v1/embeddings", json={**body, "truncate_prompt_tokens": 2}, timeout=60
    ).json()
    _close(short["data"][0]["embedding"], _expected(base, ids[0][-2:]))
    assert short["usage"]["prompt_tokens"] == 4


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"dimensions": 16}, "dimensions"),  # not a Matryoshka model
        ({"encoding_format": "int8"}, "encoding_format"),
        ({"input": []}, "input"),
        ({"input": [[5, 99999]]}, "input"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),  # (with input)
        ({"add_generation_prompt": True}, "add_generation_prompt"),  # (without messages)
        ({"input": None, "messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"input": [[5] * 300]}, "input"),  # over max_model_len
    ],
)
def test_bad_embedding_requests_are_400s_that_name_the_field(client, extra, param):
    known = {k: v for k, v in extra.items() if k in ("input", "encoding_format", "dimensions")}
    vllm = {k: v for k, v in extra.items() if k not in known}
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(**{"model": MODEL, "input": "hi", **known}, extra_body=vllm)
    assert _error(e)["param"] == param, _error(e)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="hi")


@pytest.fixture(scope="module")
def pooling_server(ckpt, tmp_path_factory):
    """A server on the same weights saved as an embedding model ships (a bare Qwen3Model): runner pooling."""
    path = tmp_path_factory.mktemp("bare")
    transformers.AutoModel.from_pretrained(ckpt, dtype=torch.float32).save_pretrained(path)
    for f in ckpt.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, path / f.name)
    yield from _serve(path, tmp_path_factory)


def test_an_embedding_model_serves_embeddings_and_refuses_generation(pooling_server, base, tokenizer):
    client = openai.OpenAI(base_url=pooling_server + "/v1", api_key="none", max_retries=0, timeout=120)
    out = client.embeddings.create(model=MODEL, input="The cat sat on the mat.", encoding_format="float")
    _close(out.data[0].embedding, _expected(base, tokenizer.encode("The cat sat on the mat.")))
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
    assert "runner='pooling'" in _error(e)["message"]


def test_score_and_rerank_are_cosines_of_embeddings(server, base, tokenizer):
    texts = ["a cat on a mat", "a dog in the fog", "cats and mats", "nothing at all"]
    vec = [torch.tensor(_expected(base, tokenizer.encode(t))) for t in texts]
    cos = lambda i, j: float(vec[i] @ vec[j])  # noqa: E731 (unit vectors)
    score = httpx.post(
        server + "/v1/score", json={"model": MODEL, "text_1": texts[0], "text_2": texts[1:]}
    ).json()
    assert score["object"] == "list" and [d["object"] for d in score["data"]] == ["score"] * 3
    assert [d["score"] for d in score["data"]] == pytest.approx([cos(0, j) for j in (1, 2, 3)], abs=1e-5)
    assert score["usage"]["prompt_tokens"] == sum(len(tokenizer.encode(t)) for t in texts)
    pairs = httpx.post(
        server + "/score", json={"model": MODEL, "text_1": texts[:2], "text_2": texts[2:]}
    ).json()
    assert [d["score"] for d in pairs["data"]] == pytest.approx([cos(0, 2), cos(1, 3)], abs=1e-5)
    body = {"model": MODEL, "query": texts[0], "documents": texts[1:], "top_n": 2}
    rerank = httpx.post(server + "/v1/rerank", json=body).json()
    best = sorted((1, 2, 3), key=lambda j: -cos(0, j))[:2]
    assert [r["index"] for r in rerank["results"]] == [j - 1 for j in best]
    assert [r["relevance_score"] for r in rerank["results"]] == pytest.approx(
        [cos(0, j) for j in best], abs=1e-5
    )
    assert [r["document"]["text"] for r in rerank["results"]] == [texts[j] for j in best]
    no_docs = httpx.post(server + "/v2/rerank", json={**body, "top_n": 0, "return_documents": False}).json()
    assert len(no_docs["results"]) == 3 and all("document" not in r for r in no_docs["results"])


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2"),
        ("/v1/score", {"text_1": "a"}, "text_2"),
        ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
        ("/v1/rerank", {"query": "a", "documents": []}, "documents"),
        ("/v1/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n"),
        ("/v1/rerank", {"query": "a", "documents": ["b"], "instruction": "x"}, "instruction"),
    ],
)
def test_bad_score_and_rerank_requests_are_400s(server, path, body, param):
    resp = httpx.post(server + path, json={"model": MODEL, **body})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.json()


def test_a_conversation_embeds_as_the_chat_template_renders_it(client, server, base, tokenizer):
    """vLLM's chat-style embedding request: `messages` rendered with no generation prompt and no special
    tokens on top, unless asked."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    for extra, generation_prompt in (({}, False), ({"add_generation_prompt": True}, True)):
        body = {"model": MODEL, "messages": messages, "encoding_format": "float", **extra}
        out = httpx.post(server + "/v1/embeddings", json=body, timeout=60).json()
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        _close(out["data"][0]["embedding"], _expected(base, ids))
        assert out["usage"]["prompt_tokens"] == len(ids)
