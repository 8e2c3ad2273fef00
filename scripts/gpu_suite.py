"""Everything a GPU check needs, in one call: GPU-marked tests, kernel micro-benchmarks, throughput,
latency and serving benchmarks (and, on 2 GPUs, tensor-parallel scaling and the all-reduce). Each step
runs as a subprocess with its own time limit; results land as JSON in --out (default $OUT), the full log
in suite.log, and a short table is printed last.

    PYTHONPATH=. python scripts/gpu_suite.py --out "$OUT" [--steps tests,throughput,...]  (default: --help)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # nanovllm from this checkout

# step -> (command, time limit in seconds)
STEPS = {
    "tests": (
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            "-v",  # a line per test as it ends: a step killed at its limit still shows which failed
            "-rfE",
            "-p",
            "no:cacheprovider",
            "tests/gpu",
            "tests/kernels",
            "tests/test_leak.py",
        ],
        480,  # ~200 s on one H100; a 2-GPU machine runs the 2-GPU tests too (their TP exit tests alone ~80 s)
    ),
    "card_peaks": ([sys.executable, "scripts/card_peaks.py"], 60),
    "kernels": ([sys.executable, "benchmarks/kernels.py"], 200),
    "throughput": ([sys.executable, "benchmarks/throughput.py"], 420),
    "latency": ([sys.executable, "benchmarks/latency.py"], 240),
    "embeddings": ([sys.executable, "benchmarks/embeddings.py"], 240),
    "serving": (
        [
            sys.executable,
            "benchmarks/serving.py",
            "--launch",
            "qwen3-0.6b",
            "--request-rate",
            "8",
            "32",
            "inf",
            "--num-prompts",
            "200",
            "--input-len",
            "100",
            "1024",
            "--output-len",
            "100",
            "512",
        ],
        240,
    ),
    "decode_splits": ([sys.executable, "benchmarks/decode_splits.py"], 150),
    "decode_breakdown": ([sys.executable, "scripts/decode_breakdown.py"], 200),
    "step_timeline": ([sys.executable, "scripts/step_timeline.py", "--runs", "2"], 200),
    "two_stream_decode": ([sys.executable, "benchmarks/two_stream_decode.py"], 200),
    "sampling": ([sys.executable, "benchmarks/sampling.py"], 120),
    "tp": ([sys.executable, "benchmarks/tp_scaling.py"], 420),  # 2 GPUs
    "all_reduce": ([sys.executable, "benchmarks/all_reduce.py"], 120),  # 2 GPUs
    "profile": ([sys.executable, "scripts/profile_step.py"], 300),
    # last: what the compiler made of every kernel the steps before compiled (Triton's cache)
    "kernel_audit": ([sys.executable, "-m", "nanovllm.benchmark.kernel_audit"], 120),
}


def run_step(name: str, extra: list[str], out_dir: Path, log) -> dict:
    cmd, limit = STEPS[name]
    step_dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    cmd = [*cmd, *extra] + (
        ["--junitxml", str(step_dir / "junit.xml")] if name == "tests" else ["--out", str(step_dir)]
    )
    # PYTHONFAULTHANDLER: a step that runs past its limit gets SIGABRT first, and every Python process of
    # it (tensor-parallel workers included: its own process group) prints where each thread was.
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1"}
    env["PYTHONFAULTHANDLER"] = "1"
    log.write(f"\n===== {name}: {' '.join(cmd)}\n")
    log.flush()
    start = time.perf_counter()
    output_file = step_dir / "output.log"  # written as the step runs: kept whatever happens to it
    with open(output_file, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            stop_group(proc)
    elapsed = time.perf_counter() - start
    output = output_file.read_text(errors="replace")
    log.write(output)
    log.write(f"\n===== {name}: rc={rc} in {elapsed:.1f} s\n")
    log.flush()
    if name == "tests" and (step_dir / "junit.xml").exists():
        write_test_report(step_dir / "junit.xml", step_dir, " ".join(cmd[1:]))
    results = {}
    for f in sorted(step_dir.glob("*.json")):
        results[f.name] = json.loads(f.read_text())
        shutil.copy(f, out_dir / f.name)
    tail = output.strip().splitlines()[-25:]
    return {"rc": rc, "seconds": round(elapsed, 1), "tail": tail, "results": results}


def stop_group(proc: subprocess.Popen) -> None:
    """SIGABRT to the step's process group (faulthandler prints every thread's stack), ten seconds for the
    dumps, then SIGKILL to whatever of the group is left."""
    for sig in (signal.SIGABRT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone
            break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def write_test_report(junit: Path, out_dir: Path, command: str) -> None:
    """gpu-tests-<card>-<date>.json: card, date, commit and every test's outcome, from pytest's XML."""
    import torch

    from nanovllm.benchmark.common import run_info, write_report

    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[test_id] = kinds[0] if kinds else "passed"
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failure", "error", "skipped")}
    report = {"benchmark": "gpu-tests", **run_info(), "command": command, "counts": counts, "tests": outcomes}
    report["cuda_available"] = torch.cuda.is_available()
    write_report("gpu-tests", report, out_dir)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--steps", default="tests,kernels,throughput,latency,kernel_audit")
    for name in STEPS:
        parser.add_argument(f"--{name}-args", default="", help=f"extra arguments for the {name} step")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    with open(out_dir / "suite.log", "w") as log:
        try:
            info = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm", "--format=csv"],
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            info = subprocess.CompletedProcess([], 1, "", "nvidia-smi: not found (no NVIDIA driver)\n")
        log.write(info.stdout + info.stderr)
        for name in args.steps.split(","):
            extra = getattr(args, f"{name}_args").split()
            summary[name] = run_step(name, extra, out_dir, log)
            print(f"[{name}] rc={summary[name]['rc']} {summary[name]['seconds']} s", flush=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n=== summary ===")
    for name, s in summary.items():
        print(f"--- {name}: rc={s['rc']} ({s['seconds']} s)")
        print("\n".join(s["tail"][-12:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
