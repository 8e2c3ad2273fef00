"""What both benchmarks share: the workload, the run's provenance, the JSON report and the printed table."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import random
import re
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT_DIR = REPO_ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class CardPeaks:
    """The ceilings a card's floors are computed from, as measured by scripts/card_peaks.py."""

    bandwidth_bytes_per_s: float  # device-to-device copy, read + write counted
    bf16_flop_per_s: float  # bf16 matmul, random data
    source: str


# By the name torch gives the card. H100: shared/GPU.md (2026-11-27); H200: card_peaks-nvidia-h200-2026-11-28-
# 090743.json. Any other card (or none) is measured against the H100's numbers, and the report says so.
CARD_PEAKS = {
    "H100": CardPeaks(3.0e12, 804e12, "H100 80GB HBM3, shared/GPU.md, 2026-11-27"),
    "H200": CardPeaks(4.27e12, 788e12, "H200, scripts/card_peaks.py, 2026-11-28"),
}

# Physical floor of nano-vllm's bench.py workload on Qwen3-0.6B shapes on the H100 (issue 8, shared/GPU.md):
# 5.20 s for 133,966 tokens = 0.17 s of compute-bound prefill + 5.03 s of bandwidth-bound decode reads.
THROUGHPUT_FLOOR_TOK_PER_S = 25_747
_WORKLOAD_OUTPUT_TOKENS = 133_966
_H100 = CARD_PEAKS["H100"]
_WORKLOAD_PREFILL_S = 0.17
_WORKLOAD_PREFILL_FLOP = _WORKLOAD_PREFILL_S * _H100.bf16_flop_per_s
_WORKLOAD_DECODE_S = _WORKLOAD_OUTPUT_TOKENS / THROUGHPUT_FLOOR_TOK_PER_S - _WORKLOAD_PREFILL_S
_WORKLOAD_DECODE_BYTES = _WORKLOAD_DECODE_S * _H100.bandwidth_bytes_per_s


def card_peaks(card: str) -> tuple[str, CardPeaks]:
    """(key, peaks) of the card named `card` (torch.cuda.get_device_name()); the H100's when unknown."""
    for key, peaks in CARD_PEAKS.items():
        if key in card.upper():
            return key, peaks
    return "H100", CARD_PEAKS["H100"]


def throughput_floor_tok_per_s(peaks: CardPeaks) -> float:
    """The default workload's floor on a card with these peaks: the same FLOPs and bytes as the H100's
    5.20 s, at this card's rates (25,747 tok/s for the H100 itself)."""
    prefill_s = _WORKLOAD_PREFILL_FLOP / peaks.bf16_flop_per_s
    return _WORKLOAD_OUTPUT_TOKENS / (prefill_s + _WORKLOAD_DECODE_BYTES / peaks.bandwidth_bytes_per_s)


@dataclass(frozen=True)
class Workload:
    """Random prompts of token ids and their output lengths, drawn like nano-vllm's bench.py:
    one RNG seeded once; first every prompt (its length, then its ids), then every max_tokens."""

    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)

    @property
    def max_seq_len(self) -> int:
        return max((len(p) + m for p, m in zip(self.prompts, self.max_tokens)), default=0)

    def head(self, n: int) -> Workload:
        """The first n requests (a subset with exactly the same prompts and lengths)."""
        return Workload(self.prompts[:n], self.max_tokens[:n])


def make_workload(
    num_requests: int,
    min_input_len: int,
    max_input_len: int,
    min_output_len: int,
    max_output_len: int,
    max_token_id: int = 10_000,
    seed: int = 0,
) -> Workload:
    """With the defaults of nano-vllm's bench.py (256 requests, lengths in [100, 1024], ids in [0, 10000],
    seed 0) this draws exactly its workload: 133,966 output tokens, 142,827 prompt tokens."""
    for name, lo, hi in (("input", min_input_len, max_input_len), ("output", min_output_len, max_output_len)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} lengths must satisfy 1 <= min <= max, got [{lo}, {hi}]")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    rng = random.Random(seed)
    prompts = [
        [rng.randint(0, max_token_id) for _ in range(rng.randint(min_input_len, max_input_len))]
        for _ in range(num_requests)
    ]
    max_tokens = [rng.randint(min_output_len, max_output_len) for _ in range(num_requests)]
    return Workload(prompts, max_tokens)


# ---- provenance ------------------------------------------------------------------------------------


def card_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_commit() -> dict[str, Any]:
    """Short commit and whether tracked files differ from it. Where .git is absent (the GPU machine
    gets the working tree only) the commit comes from $NANOVLLM_GIT_COMMIT, which
    scripts/gpu_suite.py's caller sets. Read-only: GIT_OPTIONAL_LOCKS=0 keeps git from refreshing
    the index."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, env=env
            )
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "--short", "HEAD")
    if head is None or head.returncode != 0:
        return {"git_commit": os.environ.get("NANOVLLM_GIT_COMMIT"), "git_dirty": None}
    diff = git("diff", "--quiet", "HEAD", "--")
    dirty = None if diff is None or diff.returncode not in (0, 1) else diff.returncode == 1
    return {"git_commit": head.stdout.strip(), "git_dirty": dirty}


def run_info() -> dict[str, Any]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module in ("transformers", "triton"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "card": card_name(),
        "date": now.isoformat(timespec="seconds"),
        **git_commit(),
        "versions": versions,
        "cuda": torch.version.cuda,
    }


def write_report(kind: str, report: dict[str, Any], out_dir: str | Path) -> Path:
    """Write `<kind>-<card-slug>-<UTC date and time>.json` into out_dir and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
    path = out / f"{kind}-{card_slug(report.get('card', card_name()))}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return repr(obj)


# ---- measuring -------------------------------------------------------------------------------------


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def now() -> float:
    """Host clock after the device has finished everything queued so far."""
    synchronize()
    return time.perf_counter()


def median_graph_us(fns: list, min_calls: int, replays: int = 5) -> float:
    """Median microseconds per call of the calls in fns, cycled through at least min_calls times in one CUDA
    graph (each warmed up once before the capture), over `replays` replays."""
    rounds = -(-min_calls // len(fns))
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for fn in fns:
                fn()
    graph.replay()
    torch.cuda.synchronize()
    times = sorted(graph_replay_ms(graph, 1) * 1000 / (rounds * len(fns)) for _ in range(replays))
    return times[len(times) // 2]


def graph_replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """GPU milliseconds per replay of a captured CUDA graph, `replays` of them back to back between two
    CUDA events (warm it up first)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


@contextlib.contextmanager
def recording_triton_compiles() -> Iterator[list[str]]:
    """Yields a list that collects, for each new Triton specialization inside the block (one not yet in
    the process's memory: compiled, or loaded from Triton's disk cache), its name, launch options and
    argument types; empty without Triton's hooks (`triton.knobs`). A compile inside a timed run costs it
    ~0.2-1 s, so the benchmarks record them (session 12 found sampling kernels recompiling mid-run)."""
    compiled: list[str] = []
    try:
        import triton

        hooks = triton.knobs.runtime
    except (ImportError, AttributeError):  # no Triton, or one without its knobs
        yield compiled
        return

    def record(*args, **kwargs) -> None:
        compiled.append(kwargs.get("repr", "?"))  # "name[num_warps=..., ...](argument types and values)"

    previous = hooks.jit_post_compile_hook
    hooks.jit_post_compile_hook = record
    try:
        yield compiled
    finally:
        hooks.jit_post_compile_hook = previous


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def memory_stats() -> dict[str, int | None]:
    if not torch.cuda.is_available():
        return {"peak_memory_allocated_bytes": None, "memory_allocated_bytes": None}
    return {
        "peak_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
        "memory_allocated_bytes": torch.cuda.memory_allocated(),
    }


class Skipped(Exception):
    """A part of a benchmark that cannot run here (a CUDA-only setting on the CPU): recorded as skipped."""


def guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one part of a benchmark; a failure becomes {"error": ...} in the report, not the end of the run."""
    start = time.perf_counter()
    try:
        return fn()
    except Exception as e:
        if isinstance(e, Skipped):
            return {"skipped": str(e)}  # anything: the other parts of the run still count
        traceback.print_exc()
        print(f"[{name}] failed after {time.perf_counter() - start:.1f} s: {e!r}")
        return {"error": f"{type(e).__name__}: {e}", "seconds_before_error": time.perf_counter() - start}
    finally:
        free_device_memory()


def free_device_memory() -> None:
    """Give the GPU memory of dead objects back (before the next engine sizes its cache from what is
    free). Nothing on the CPU, where a full garbage collection only costs time."""
    if torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


# ---- printing --------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )  # noqa: E731
    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))


def gib(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**30
