"""benchmarks/ab.py: settings run in turn, each run read back from the JSON it writes, medians against the
first setting, failures recorded without stopping the others, and user mistakes refused clearly."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest

from tests.scripts import load_script

ab = load_script("benchmarks/ab.py", "ab_script")

# A stand-in benchmark: writes a report whose number is AB_VALUE plus its run count in --out, so the order
# and the environment of every run can be read back; AB_FAIL=1 exits with an error instead.
FAKE = """
import json, os, subprocess, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1])
if os.environ.get("AB_FAIL") == "1":
    sys.exit("fake benchmark failed")
if os.environ.get("AB_HANG"):  # a worker of its own, then hang: the timeout must take both
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Path(os.environ["AB_HANG"]).write_text(str(worker.pid))
    time.sleep(60)
if os.environ.get("AB_SAME_FILE") == "1":  # one report file, rewritten by every run
    (out / "report.json").write_text(json.dumps({"nanovllm": {"pct_of_floor": 1.0}}))
    sys.exit()
n = len(list(out.glob("*.json")))
report = {"nanovllm": {"pct_of_floor": float(os.environ["AB_VALUE"]) + n}}
(out / f"fake-{n}.json").write_text(json.dumps(report))
"""


@pytest.fixture
def fake_bench(tmp_path):
    path = tmp_path / "fake_bench.py"
    path.write_text(FAKE)
    return str(path)


def test_settings_alternate_and_medians_compare_to_the_first(tmp_path, fake_bench, monkeypatch, capsys):
    monkeypatch.setenv("AB_VALUE", "70")
    out = tmp_path / "out"
    argv = [
        "--out",
        str(out),
        "--rounds",
        "3",
        "--setting",
        "base=",
        "--setting",
        "up=AB_VALUE=72.5,UNUSED=x",
    ]
    assert ab.main([*argv, "--", fake_bench]) == 0
    (report_path,) = out.glob("ab-*.json")
    report = json.loads(report_path.read_text())
    assert [(r["round"], r["setting"]) for r in report["runs"]] == [
        (1, "base"), (1, "up"), (2, "base"), (2, "up"), (3, "base"), (3, "up")
    ]  # fmt: skip
    assert [r["value"] for r in report["runs"]] == [70, 72.5, 71, 73.5, 72, 74.5]
    assert report["summary"]["base"] == {"values": [70, 71, 72], "median": 71, "minus_first": 0}
    assert report["summary"]["up"] == {"values": [72.5, 73.5, 74.5], "median": 73.5, "minus_first": 2.5}
    assert report["settings"] == {"base": {}, "up": {"AB_VALUE": "72.5", "UNUSED": "x"}}
    assert all(Path(r["json"]).parent == out / r["setting"] for r in report["runs"])  # its own --out
    table = capsys.readouterr().out.split("minus first")[-1]
    assert [line.split() for line in table.splitlines() if line.startswith("up")] == [
        ["up", "72.50", "/", "73.50", "/", "74.50", "73.5", "2.5"]
    ]


def test_a_failing_setting_is_recorded_and_the_rest_run(tmp_path, fake_bench, monkeypatch):
    monkeypatch.setenv("AB_VALUE", "70")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--setting", "base=", "--setting", "broken=AB_FAIL=1", "--", fake_bench]
    assert ab.main(argv) == 1  # not every run gave a number
    report = json.loads(next(out.glob("ab-*.json")).read_text())
    assert [r.get("value") for r in report["runs"]] == [70, None, 71, None]
    assert all("fake benchmark failed" in r["error"] for r in report["runs"] if r["setting"] == "broken")
    assert report["summary"]["broken"] == {"values": [], "median": None, "minus_first": None}


def test_a_missing_metric_is_an_error_of_that_run(tmp_path, fake_bench, monkeypatch):
    monkeypatch.setenv("AB_VALUE", "70")
    argv = [
        "--out",
        str(tmp_path),
        "--metric",
        "nanovllm.nope",
        "--setting",
        "a=",
        "--setting",
        "b=",
        "--",
        fake_bench,
    ]
    assert ab.main(argv) == 1
    report = json.loads(next(tmp_path.glob("ab-*.json")).read_text())
    assert all("no number at 'nanovllm.nope'" in r["error"] for r in report["runs"])


def test_values_may_hold_commas():
    assert ab.parse_setting("tp=CUDA_VISIBLE_DEVICES=0,1,NCCL_DEBUG=WARN") == (
        "tp",
        {"CUDA_VISIBLE_DEVICES": "0,1", "NCCL_DEBUG": "WARN"},
    )


def test_a_run_past_its_time_is_killed_with_its_workers(tmp_path, fake_bench, monkeypatch):
    monkeypatch.setenv("AB_VALUE", "70")
    pid_file = tmp_path / "worker.pid"
    settings = ["--setting", "base=", "--setting", f"hang=AB_HANG={pid_file}"]
    argv = ["--out", str(tmp_path / "out"), "--rounds", "1", "--timeout-s", "3", *settings, "--", fake_bench]
    assert ab.main(argv) == 1
    report = json.loads(next((tmp_path / "out").glob("ab-*.json")).read_text())
    assert report["runs"][1]["error"] == "timed out after 3 s"
    assert report["runs"][1]["seconds"] < 20  # (a worker left alive would hold its stderr pipe for 60 s)
    worker = Path(f"/proc/{pid_file.read_text()}/status")
    for _ in range(50):  # gone, or a zombie left for init to reap
        if not worker.exists() or "State:\tZ" in worker.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the hung run's worker outlived the timeout")


def test_a_rewritten_report_counts_and_commands_need_not_be_python_files(tmp_path, fake_bench, monkeypatch):
    monkeypatch.setenv("AB_SAME_FILE", "1")
    settings = ["--setting", "a=", "--setting", "b=", "--rounds", "2"]
    for name in ("a", "b"):  # the same file name in each setting's folder, round after round
        (tmp_path / name).mkdir()
    assert ab.main(["--out", str(tmp_path), *settings, "--", sys.executable, fake_bench]) == 0


def test_a_command_that_cannot_start_is_an_error_of_each_run(tmp_path):
    argv = ["--out", str(tmp_path), "--setting", "a=", "--setting", "b=", "--", "no-such-command-here"]
    assert ab.main(argv) == 1
    report = json.loads(next(tmp_path.glob("ab-*.json")).read_text())
    assert all(r["error"].startswith("could not run 'no-such-command-here'") for r in report["runs"])


@pytest.mark.parametrize("text", ["noequals", "bad name=", "x=NOTPAIR", "x=1VAR=2", ".=", "..=", "-x="])
def test_bad_settings_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        ab.parse_setting(text)


@pytest.mark.parametrize(
    "argv",
    [
        ["--setting", "a=", "--setting", "b="],  # no command
        ["--setting", "a=", "--", "x.py"],  # one setting
        ["--setting", "a=", "--setting", "a=V=1", "--", "x.py"],  # the same name twice
        ["--rounds", "0", "--setting", "a=", "--setting", "b=", "--", "x.py"],
        ["--timeout-s", "0", "--setting", "a=", "--setting", "b=", "--", "x.py"],
    ],
)
def test_bad_command_lines_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        ab.main(argv)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_read_metric_follows_dotted_paths():
    report = {"a": {"b": [1, {"c": "2.5"}]}}
    assert ab.read_metric(report, "a.b.1.c") == 2.5
    with pytest.raises(KeyError):
        ab.read_metric(report, "a.x")
