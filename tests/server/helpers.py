"""What the server tests share besides fixtures (those are in conftest.py): the served model's name and
sizes, a launcher of the real server (`python -m nanovllm serve`, a subprocess on a free port, through the
serving benchmark's own launcher), and readers of its errors and metrics."""

from __future__ import annotations

import contextlib
import os
import re
import time

import httpx
import torch

from tests.scripts import load_script

MODEL = "tiny"
MAX_MODEL_LEN = 256
EOS = 2
MAX_NEW_TOKENS = 32  # the checkpoint's generation_config.json: a chat request's default max_tokens

serving = load_script("benchmarks/serving.py", "serving_benchmark")


def _serve(ckpt, tmp_path_factory, *extra_args: str):
    """Start a server with these extra flags (they win over the defaults); yields its base URL, then stops
    it."""
    serve_args = [
        "--served-model-name",
        MODEL,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--num-kvcache-blocks",
        "512",
        "--kernel-backend",
        "torch",
        *extra_args,
    ]
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    # One torch thread: on a small shared CPU, intra-op threads fight the server's own threads (10x slower).
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        proc, url = serving.launch_server(str(ckpt), serve_args, log, timeout_s=120)
    finally:
        os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)
    yield url
    serving.stop_server(proc)
    # uvicorn re-raises the SIGTERM it handled, so the exit code is -15 after a clean shutdown
    assert "Application shutdown complete" in log.read_text(), log.read_text()[-3000:]


def _error(excinfo) -> dict:
    return excinfo.value.body  # the client unwraps {"error": {...}}


def _metrics(server) -> dict[str, float]:
    """Parse the Prometheus text: {'name{labels}': value}; every sample line must be well formed."""
    text = httpx.get(server + "/metrics").text
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_]+="[^"]*",?)*\})? (\S+)', line)
        assert m, f"bad metrics line: {line!r}"
        samples[m[1] + (m[2] or "")] = float(m[3])
    return samples


def _metric(samples: dict[str, float], name: str, label: str = "") -> float:
    hits = [v for k, v in samples.items() if k.split("{")[0] == "nanovllm:" + name and label in k]
    assert len(hits) == 1, (name, label, hits)
    return hits[0]


def _wait_until_idle(server, timeout_s: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = _metrics(server)
        idle = _metric(samples, "num_requests_running") == 0 and _metric(samples, "kv_cache_usage_perc") == 0
        if idle or time.monotonic() > deadline:
            assert idle, samples
            return samples
        time.sleep(0.05)


@contextlib.contextmanager
def _one_torch_thread():
    """transformers in this process: one thread is much faster on a small, shared CPU."""
    num = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(num)
