"""The server's engine process (`python -m nanovllm serve`, real server, real engine): shutting the
server down leaves no process behind, tensor-parallel workers included; an engine process killed
mid-request fails its clients promptly (no hang) and /health turns unhealthy."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.helpers import serving

MODEL = "qwen3-tiny"  # a preset: random weights; prompts are token ids
SERVE_ARGS = ["--max-model-len", "1024", "--num-kvcache-blocks", "256", "--kernel-backend", "torch"]
PROMPT = list(range(10, 40))


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a live process, None once it is gone (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[1]), fields[0]) if fields[0] != "Z" else None


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            parents[int(entry)] = stat[0]
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _wait_gone(pids: list[int], timeout_s: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if _proc_stat(p) is not None]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@pytest.fixture
def launch(tmp_path):
    procs = []

    def start(*extra: str):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("OMP_NUM_THREADS", "1")  # a small shared CPU: see helpers._serve
            proc, url = serving.launch_server(MODEL, SERVE_ARGS + list(extra), tmp_path / "server.log", 180)
        procs.append(proc)
        return proc, url

    yield start
    for proc in procs:
        serving.stop_server(proc)


def _body(max_tokens: int, stream: bool) -> dict:
    return {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


@pytest.mark.slow
def test_shutdown_leaves_no_process_behind(launch, tmp_path):
    proc, url = launch("--tensor-parallel-size", "2")
    r = httpx.post(url + "/v1/completions", json=_body(4, False), timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    family = _descendants(proc.pid)
    engines = [p for p in family if "spawn_main" in _cmdline(p)]
    assert len(engines) == 2, [_cmdline(p) for p in family]  # the engine process and its TP worker
    serving.stop_server(proc)
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()
    assert _wait_gone(family, timeout_s=10) == []


@pytest.mark.slow
def test_a_killed_engine_process_fails_requests_and_health(launch, tmp_path):
    proc, url = launch()
    (engine,) = [p for p in _descendants(proc.pid) if "spawn_main" in _cmdline(p)]
    family = _descendants(proc.pid)
    waiting: dict = {}

    def non_streamed() -> None:  # a request waiting for its full response when the engine dies
        r = httpx.post(url + "/v1/completions", json=_body(990, False), timeout=60)
        waiting["status"], waiting["body"] = r.status_code, r.json()

    http = httpx.Client(timeout=60)
    with http, http.stream("POST", url + "/v1/completions", json=_body(990, True)) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data:"))
        assert all(json.loads(next(lines)[5:])["choices"] for _ in range(3))
        thread = threading.Thread(target=non_streamed)
        thread.start()
        time.sleep(0.5)
        os.kill(engine, signal.SIGKILL)
        start = time.monotonic()
        rest = list(lines)  # the stream ends (an in-band error, then [DONE]) instead of hanging
        assert time.monotonic() - start < 10
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][5:])["error"]
    assert "engine process exited" in error["message"] and "SIGKILL" in error["message"], error
    thread.join(timeout=10)
    assert waiting["status"] == 503 and "SIGKILL" in waiting["body"]["error"]["message"], waiting
    health = httpx.get(url + "/health", timeout=5)
    assert health.status_code == 503
    r = httpx.post(url + "/v1/completions", json=_body(4, False), timeout=10)
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    serving.stop_server(proc)
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()
    assert _wait_gone(family, timeout_s=10) == []
