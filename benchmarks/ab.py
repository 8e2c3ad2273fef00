"""Same-machine A/B of engine settings: one benchmark command run under several environment settings,
alternating them round by round, and one number read from the JSON each run writes.

    PYTHONPATH=. python benchmarks/ab.py --out DIR --rounds 2 \
        --setting base= --setting rows64=NANOVLLM_DECODE_LINEAR_ROWS=64 \
        -- benchmarks/throughput.py --hf-mode none --repeats 1

Why alternate: two machines of one kind differ by about a point of the floor, and one machine drifts a
little over minutes, so only runs taken in turn on one machine compare (docs/performance.md, session 28).
Each run gets `--out DIR/<setting>` appended and is read back from the newest JSON it writes there;
--metric is a dotted path into it (default: the throughput benchmark's percent of the floor). The report,
`ab-<card>-<time>.json` in DIR, lists every run and each setting's median and its difference from the
first setting's; a short table is printed last. A run that fails or times out is recorded and the others
go on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanovllm.benchmark.common import print_table, run_info, write_report  # noqa: E402

SETTING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a folder name under --out (not "." or "..")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    """'name=VAR=value,VAR2=value2' (or 'name=' for the environment as it is) -> (name, {VAR: value}). A value
    may hold commas (CUDA_VISIBLE_DEVICES=0,1): the items are cut only before a ',VAR='."""
    name, sep, rest = text.partition("=")
    if not sep or not SETTING_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"a setting is NAME=[VAR=value,...] (NAME: a folder name), got {text!r}"
        )
    env = {}
    for item in filter(None, re.split(r",(?=[A-Za-z_][A-Za-z0-9_]*=)", rest)):
        var, sep, value = item.partition("=")
        if not sep or not ENV_NAME.fullmatch(var):
            raise argparse.ArgumentTypeError(f"setting {name!r}: {item!r} is not VAR=value")
        env[var] = value
    return name, env


def read_metric(report: dict, path: str) -> float:
    """The number at dotted `path` in a JSON report (KeyError, IndexError, TypeError or ValueError if there is
    none)."""
    value = report
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return float(value)


def json_files(folder: Path) -> dict[Path, int]:
    """The JSON files in `folder` and their modification times (ns): a run's report is one it added or
    rewrote."""
    return {p: p.stat().st_mtime_ns for p in folder.glob("*.json")}


def run_command(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """(exit status, stderr) of `command` with `env` added. It runs in a session of its own, so that a run
    past timeout_s is killed with every process it started (a TP benchmark's workers hold GPU memory)."""
    proc = subprocess.Popen(command, env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, stderr


def run_once(command: list[str], env: dict[str, str], out_dir: Path, metric: str, timeout_s: float) -> dict:
    """One run of `command --out out_dir` with `env` added: its metric, seconds and JSON (or its error)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = json_files(out_dir)
    start = time.perf_counter()
    run = {"env": env}
    try:
        returncode, stderr = run_command([*command, "--out", str(out_dir)], env, timeout_s)
    except subprocess.TimeoutExpired:
        return run | {"seconds": time.perf_counter() - start, "error": f"timed out after {timeout_s:g} s"}
    except OSError as e:  # e.g. no such command
        return run | {"seconds": time.perf_counter() - start, "error": f"could not run {command[0]!r}: {e}"}
    run["seconds"] = time.perf_counter() - start
    written = sorted((t, p) for p, t in json_files(out_dir).items() if before.get(p) != t)
    if returncode != 0 or not written:
        why = f"exit status {returncode}" if returncode else "no new JSON in --out"
        tail = stderr.strip()[-500:]
        return run | {"error": f"{why}: {tail}" if tail else why}
    path = written[-1][1]  # the newest
    run["json"] = str(path)
    try:
        run["value"] = read_metric(json.loads(path.read_text()), metric)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        run["error"] = f"no number at {metric!r} in {path.name}: {e!r}"
    return run


def summarize(settings: list[str], runs: list[dict]) -> dict[str, dict]:
    """Per setting: its values in run order, their median, and the median's difference from the first
    setting's (None where a setting has no value)."""
    summary = {}
    for name in settings:
        values = [r["value"] for r in runs if r["setting"] == name and "value" in r]
        summary[name] = {"values": values, "median": statistics.median(values) if values else None}
    base = summary[settings[0]]["median"]
    for s in summary.values():
        s["minus_first"] = None if base is None or s["median"] is None else s["median"] - base
    return summary


def print_summary(title: str, summary: dict[str, dict]) -> None:
    """Each setting's runs, median and difference from the first setting's median, as a table."""
    dash = lambda value: "-" if value is None else value  # noqa: E731
    rows = [
        [name, " / ".join(f"{v:.2f}" for v in s["values"]) or "-", dash(s["median"]), dash(s["minus_first"])]
        for name, s in summary.items()
    ]
    print_table(title, ["setting", "runs", "median", "minus first"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default=os.environ.get("OUT", "out"), help="folder for the runs' JSON and the report"
    )
    p.add_argument("--setting", action="append", type=parse_setting, required=True,
                   help="NAME=[VAR=value,...]; give two or more, the first is the baseline")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2, help="each setting runs once per round, in turn")
    p.add_argument("--metric", default="nanovllm.pct_of_floor", help="dotted path of the number in each JSON")
    p.add_argument("--timeout-s", type=float, default=300.0, help="time limit of one run")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark script and its flags")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    names = [name for name, _ in args.setting]
    if not command:
        p.error("give the benchmark after --, e.g. -- benchmarks/throughput.py --hf-mode none")
    if len(names) < 2 or len(set(names)) != len(names):
        p.error(f"give two or more --setting with distinct names, got {names}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.timeout_s <= 0:
        p.error(f"--timeout-s must be > 0, got {args.timeout_s:g}")
    if command[0].endswith(".py"):
        command = [sys.executable, *command]
    out = Path(args.out)
    runs = []
    for round_ in range(1, args.rounds + 1):
        for name, env in args.setting:
            run = run_once(command, env, out / name, args.metric, args.timeout_s)
            runs.append({"round": round_, "setting": name} | run)
            shown = f"{run['value']:.3f}" if "value" in run else f"failed: {run['error'][:200]}"
            print(f"round {round_} {name}: {shown} ({run['seconds']:.0f} s)", flush=True)
    summary = summarize(names, runs)
    report = {**run_info(), "command": command, "metric": args.metric, "rounds": args.rounds}
    report |= {"settings": dict(args.setting), "runs": runs, "summary": summary}
    path = write_report("ab", report, out)
    title = f"{args.metric}, {args.rounds} alternating rounds (medians; the first setting is the baseline)"
    print_summary(title, summary)
    print(f"\n{report['card']}  {report['date']}  commit {report.get('git_commit')}  -> {path}")
    return 0 if all("value" in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
