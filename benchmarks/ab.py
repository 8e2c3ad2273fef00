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
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanovllm.benchmark.common import print_table, run_info, write_report  # noqa: E402

SETTING_NAME = re.compile(r"[A-Za-z0-9_.-]+")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    """'name=VAR=value,VAR2=value2' (or 'name=' for the environment as it is) -> (name, {VAR: value})."""
    name, sep, rest = text.partition("=")
    if not sep or not SETTING_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(
            f"a setting is NAME=[VAR=value,...] with NAME of [A-Za-z0-9_.-], got {text!r}"
        )
    env = {}
    for item in filter(None, rest.split(",")):
        var, sep, value = item.partition("=")
        if not sep or not ENV_NAME.fullmatch(var):
            raise argparse.ArgumentTypeError(f"setting {name!r}: {item!r} is not VAR=value")
        env[var] = value
    return name, env


def read_metric(report: dict, path: str) -> float:
    """The number at dotted `path` in a JSON report (KeyError / TypeError / ValueError if it is not one)."""
    value = report
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return float(value)


def run_once(command: list[str], env: dict[str, str], out_dir: Path, metric: str, timeout_s: float) -> dict:
    """One run of `command --out out_dir` with `env` added: its metric, seconds and JSON (or its error)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.glob("*.json"))
    start = time.perf_counter()
    run = {"env": env}
    try:
        proc = subprocess.run(
            [*command, "--out", str(out_dir)],
            env=os.environ | env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return run | {"seconds": time.perf_counter() - start, "error": f"timed out after {timeout_s:g} s"}
    run["seconds"] = time.perf_counter() - start
    new = sorted(set(out_dir.glob("*.json")) - before, key=lambda p: p.stat().st_mtime)
    if proc.returncode != 0 or not new:
        why = f"exit status {proc.returncode}" if proc.returncode else "no new JSON in --out"
        return run | {"error": f"{why}: {proc.stderr.strip()[-500:]}"}
    run["json"] = str(new[-1])
    try:
        run["value"] = read_metric(json.loads(new[-1].read_text()), metric)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        run["error"] = f"no number at {metric!r} in {new[-1].name}: {e!r}"
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


def dash(value: float | None) -> float | str:
    return "-" if value is None else value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default=os.environ.get("OUT", "out"), help="folder for every run's JSON and the report"
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
    if command[0].endswith(".py"):
        command = [sys.executable, *command]
    out = Path(args.out)
    runs = []
    for round_ in range(args.rounds):
        for name, env in args.setting:
            run = {"round": round_, "setting": name} | run_once(
                command, env, out / name, args.metric, args.timeout_s
            )
            runs.append(run)
            shown = f"{run['value']:.3f}" if "value" in run else f"failed: {run['error'][:200]}"
            print(f"round {round_ + 1} {name}: {shown} ({run['seconds']:.0f} s)", flush=True)
    summary = summarize(names, runs)
    report = {**run_info(), "command": command, "metric": args.metric, "rounds": args.rounds}
    report |= {"settings": dict(args.setting), "runs": runs, "summary": summary}
    path = write_report("ab", report, out)
    print_table(
        f"{args.metric}, {args.rounds} alternating rounds (medians; the first setting is the baseline)",
        ["setting", "runs", "median", "minus first"],
        [
            [
                name,
                " / ".join(f"{v:.2f}" for v in s["values"]) or "-",
                *(dash(s[k]) for k in ("median", "minus_first")),
            ]
            for name, s in summary.items()
        ],
    )
    print(f"\n{report['card']}  {report['date']}  commit {report.get('git_commit')}  -> {path}")
    return 0 if all("value" in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
