"""The soak (scripts/soak.py) on the tiny preset on the CPU: a few hundred mixed requests through one
engine, in waves of LLM.generate and of add_request/step/abort, with a cache small enough to preempt
all along. The GPU run of 10,000 requests uses the same code (see docs/reliability.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

ENGINE = [
    "--model",
    "qwen3-tiny",
    "--device",
    "cpu",
    "--max-model-len",
    "256",
    "--num-kvcache-blocks",
    "32",  # 512 tokens for up to 8 requests of up to 256: preemption all along
    "--max-num-seqs",
    "8",
    "--max-num-batched-tokens",
    "64",  # prompts of up to ~250 tokens are prefilled in chunks
]


soak = load_script("scripts/soak.py")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster than two fighting on a busy host
    yield
    torch.set_num_threads(threads)


def _report(out_dir: Path) -> dict:
    (path,) = out_dir.glob("soak-cpu-*.json")
    return json.loads(path.read_text())


def test_soak_on_cpu(tmp_path):
    assert soak.main([*ENGINE, "--num-requests", "300", "--num-waves", "4", "--out", str(tmp_path)]) == 0
    r = _report(tmp_path)
    assert r["card"] == "cpu" and r["date"] and "git_commit" in r and r["versions"]["torch"]
    assert r["passed"] and all(c["passed"] for c in r["checks"].values()), r["checks"]
    assert r["num_finished"] + r["num_aborted"] == 300 and not r["failures"]
    # The run exercised what it claims to: both APIs, aborts wherever requests are, preemption,
    # prefix hits, and every way of finishing.
    assert r["num_via_generate"] > 0 and r["num_via_engine"] > 0
    assert set(r["abort_stages"]) == {"waiting", "prefilling", "decoding", "preempted"}, r["abort_stages"]
    assert r["num_preemptions"] > 0 and r["prefix_cache_hit_rate"] > 0
    assert set(r["finish_reasons"]) == {"stop", "length"}
    assert {"string", "token id"} <= set(r["stop_causes"]), r["stop_causes"]


def test_a_failed_check_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(soak, "check_output", lambda engine, req, out: "injected")
    assert soak.main([*ENGINE, "--num-requests", "20", "--num-waves", "1", "--out", str(tmp_path)]) == 1
    r = _report(tmp_path)
    assert not r["passed"] and not r["checks"]["outputs_correct"]["passed"]
    assert r["failures"][0]["problem"] == "injected"
