"""Online serving benchmark (after vLLM's benchmark_serving): Poisson arrivals against a running server.

    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --request-rate 4 16 inf \
        --num-prompts 200 --input-len 100 1024 --output-len 100 1024 --out results.json
    python benchmarks/serving.py --launch /path/to/model --serve-args "--max-num-seqs 256" ...

Each request is a streamed /v1/completions call with a random token-id prompt and ignore_eos, so the
output length is exactly what was drawn. Reports request throughput, output tok/s and TTFT / TPOT /
ITL (mean, p50, p90, p99) per request rate; writes everything as JSON to --out. ITL is the gap between
streamed chunks; when the server's HTTP side falls behind the engine it merges tokens into fewer
chunks, so compare ITL with TPOT (which is per token).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import random
import shlex
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TOKEN_ID_RANGE = (100, 2000)  # ordinary tokens in every vocabulary we serve (special ids sit above)


@dataclass
class RequestResult:
    input_len: int
    output_len: int  # tokens the server reported (usage)
    ok: bool = False
    error: str = ""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first


class _HTTPStatusError(Exception):
    pass


async def _post_events(url: str, body: bytes):
    """POST `body` and yield the server-sent events of the response, one `bytes` each.

    Plain asyncio streams and a few lines of HTTP/1.1: a Python HTTP client (httpx parses in pure
    Python) costs ~250 us per chunk, so one client process could not keep up with hundreds of streams
    and would measure itself instead of the server."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, got {url!r}")
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80, limit=1 << 22)
    try:
        head = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        if status != 200:
            raise _HTTPStatusError(f"HTTP {status}: {(await reader.read(1000)).decode(errors='replace')}")
        chunked = headers.get("transfer-encoding") == "chunked"
        buf = b""
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(1 << 16)
                if not data:
                    break
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                yield event
    finally:
        writer.close()


async def _one_request(url: str, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = RequestResult(len(prompt), 0)
    start = last = time.perf_counter()
    try:
        async for event in _post_events(url, json.dumps(body).encode()):
            now = time.perf_counter()
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            chunk = json.loads(event[6:])
            if "error" in chunk:
                result.error = chunk["error"]["message"]
                return result
            if chunk.get("usage"):
                result.output_len = chunk["usage"]["completion_tokens"]
            if not chunk["choices"]:
                continue
            if result.ttft_s == 0.0:
                result.ttft_s = now - start
            else:
                result.itl_s.append(now - last)
            last = now
        result.latency_s = time.perf_counter() - start
        result.ok = result.output_len > 0
        if not result.ok:
            result.error = "no usage chunk / no tokens"
    except (_HTTPStatusError, OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
        result.error = str(e) if isinstance(e, _HTTPStatusError) else repr(e)
    return result


def _percentiles(values: list[float], name: str) -> dict[str, float]:
    """mean / p50 / p90 / p99 of `values` (seconds) in milliseconds."""
    if not values:
        return {f"mean_{name}_ms": 0.0, f"p50_{name}_ms": 0.0, f"p90_{name}_ms": 0.0, f"p99_{name}_ms": 0.0}
    s = sorted(values)

    def q(p: float) -> float:  # linear interpolation, as numpy.percentile
        k = (len(s) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    out = {f"mean_{name}_ms": 1000 * sum(s) / len(s)}
    out.update({f"p{int(p * 100)}_{name}_ms": 1000 * q(p) for p in (0.5, 0.9, 0.99)})
    return out


async def run_rate(
    base_url: str,
    model: str,
    requests: list[tuple[list[int], int]],
    rate: float,
    seed: int,
    max_concurrency: int | None,
) -> dict:
    url = base_url.rstrip("/") + "/v1/completions"
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def limited(prompt, max_tokens):
        if semaphore is None:
            return await _one_request(url, model, prompt, max_tokens)
        async with semaphore:
            return await _one_request(url, model, prompt, max_tokens)

    tasks = []
    start = time.perf_counter()
    for prompt, max_tokens in requests:
        tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
        if rate != math.inf:
            await asyncio.sleep(rng.expovariate(rate))  # Poisson process: exponential gaps
    results: list[RequestResult] = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start

    ok = [r for r in results if r.ok]
    num_output = sum(r.output_len for r in ok)
    num_input = sum(r.input_len for r in ok)
    tpot = [(r.latency_s - r.ttft_s) / (r.output_len - 1) for r in ok if r.output_len > 1]
    summary = {
        "request_rate": "inf" if rate == math.inf else rate,
        "max_concurrency": max_concurrency,
        "duration_s": duration,
        "num_completed": len(ok),
        "num_failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "request_throughput": len(ok) / duration,
        "output_throughput": num_output / duration,
        "total_token_throughput": (num_input + num_output) / duration,
    }
    summary.update(_percentiles([r.ttft_s for r in ok], "ttft"))
    summary.update(_percentiles(tpot, "tpot"))
    summary.update(_percentiles([x for r in ok for x in r.itl_s], "itl"))
    summary.update(_percentiles([r.latency_s for r in ok], "e2el"))
    return summary


def make_requests(num: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int):
    rng = random.Random(seed)
    reqs = []
    for _ in range(num):
        n_in, n_out = rng.randint(*input_len), rng.randint(*output_len)
        reqs.append(([rng.randrange(*TOKEN_ID_RANGE) for _ in range(n_in)], n_out))
    return reqs


# ---- launching a server ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(model: str, serve_args: list[str], log_path: Path, timeout_s: float = 600.0):
    """Start `python -m nanovllm serve` on a free port; return (process, base_url) once /health is 200."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "nanovllm",
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *serve_args,
    ]
    log = open(log_path, "w")  # noqa: SIM115 (closed with the process)
    root = str(Path(__file__).resolve().parent.parent)  # so that `-m nanovllm` finds this checkout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log_file = log  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"the server did not become healthy in {timeout_s:.0f} s; log: {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = getattr(proc, "log_file", None)
    if log is not None:
        log.close()


# ---- main -------------------------------------------------------------------------------------------


def _range(values: list[int], name: str) -> tuple[int, int]:
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not 1 <= values[0] <= values[1]:
        raise SystemExit(f"--{name} takes one length or MIN MAX with 1 <= MIN <= MAX, got {values}")
    return values[0], values[1]


def _environment() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from nanovllm.benchmark.common import git_commit

    now = datetime.datetime.now(datetime.timezone.utc)
    return {"date": now.isoformat(timespec="seconds"), **git_commit()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--base-url", default="http://127.0.0.1:8000", help="a running server")
    where.add_argument("--launch", metavar="MODEL", help="start `nanovllm serve MODEL` on a free port")
    p.add_argument("--serve-args", default="", help="extra flags for the launched server (one string)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="requests/s (Poisson); 'inf' sends all at once; several: one run each",
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, nargs="+", default=[128], help="LEN or MIN MAX (uniform)")
    p.add_argument("--output-len", type=int, nargs="+", default=[128], help="LEN or MIN MAX (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the JSON results to this file or directory")
    args = p.parse_args(argv)
    input_len, output_len = _range(args.input_len, "input-len"), _range(args.output_len, "output-len")

    proc = None
    base_url = args.base_url
    if args.launch:
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"nanovllm-serve-{os.getpid()}.log"
        print(f"launching the server for {args.launch} (log: {log_path}) ...", flush=True)
        proc, base_url = launch_server(args.launch, shlex.split(args.serve_args), log_path)
    try:
        card = httpx.get(base_url + "/v1/models", timeout=10).json()["data"][0]
        model = args.model or card["id"]
        requests = make_requests(args.num_prompts, input_len, output_len, args.seed)
        # One short request first: the server works, and first-call costs stay out of the numbers.
        warm = asyncio.run(run_rate(base_url, model, requests[:1], math.inf, args.seed, None))
        if warm["num_failed"]:
            raise SystemExit(f"the warm-up request failed: {warm['errors']}")
        runs = []
        for rate in args.request_rate:
            summary = asyncio.run(run_rate(base_url, model, requests, rate, args.seed, args.max_concurrency))
            runs.append(summary)
            _print_summary(summary)
    finally:
        if proc is not None:
            stop_server(proc)

    report = {
        "benchmark": "serving",
        **_environment(),
        "base_url": None if args.launch else base_url,
        "model": model,
        "model_card": card,
        "workload": {
            "num_prompts": args.num_prompts,
            "input_len": input_len,
            "output_len": output_len,
            "seed": args.seed,
            "ignore_eos": True,
            "temperature": 0.0,
        },
        "runs": runs,
    }
    if args.out is not None:
        out = args.out
        if out.is_dir() or not out.suffix:  # a directory: name the file after the card and time
            slug = "".join(c if c.isalnum() else "-" for c in _device_name().lower()).strip("-")
            out = out / f"serving-{slug}-{time.strftime('%Y-%m-%d-%H%M%S')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 1 if any(r["num_failed"] for r in runs) else 0


def _device_name() -> str:
    """The local GPU's name (the server runs on this host with --launch), else "cpu"."""
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def _print_summary(s: dict) -> None:
    print(
        f"--- request rate {s['request_rate']} req/s: {s['num_completed']} ok, {s['num_failed']} failed "
        f"in {s['duration_s']:.2f} s"
    )
    print(
        f"  request throughput {s['request_throughput']:.2f} req/s, "
        f"output {s['output_throughput']:.1f} tok/s, total {s['total_token_throughput']:.1f} tok/s"
    )
    for name in ("ttft", "tpot", "itl", "e2el"):
        print(
            f"  {name.upper():5s} ms  mean {s[f'mean_{name}_ms']:9.2f}  p50 {s[f'p50_{name}_ms']:9.2f}  "
            f"p90 {s[f'p90_{name}_ms']:9.2f}  p99 {s[f'p99_{name}_ms']:9.2f}"
        )
    if s["errors"]:
        print(f"  errors: {s['errors']}")


if __name__ == "__main__":
    sys.exit(main())
