"""scripts/gpu_suite.py's step runner, on the CPU: a step that hangs past its limit leaves the stacks of its
processes (its own and a child's) in the log, and none of them outlives it."""

from __future__ import annotations

import io
import os
import sys
import textwrap
import time
from pathlib import Path

from tests.scripts import load_script


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that never reaps it is not)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def test_a_hanging_step_is_dumped_and_stopped(tmp_path, monkeypatch):
    suite = load_script("scripts/gpu_suite.py")
    # The step prints its child's pid, then parent and child wait forever (as two TP ranks in a collective).
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        code = "import time\\ndef wait_forever():\\n    time.sleep(600)\\nwait_forever()"
        child = subprocess.Popen([sys.executable, "-c", code])
        print(f"child pid: {child.pid}", flush=True)
        def stuck_in_a_collective():
            time.sleep(600)
        stuck_in_a_collective()
        """
    )
    monkeypatch.setitem(suite.STEPS, "hang", ([sys.executable, "-c", script], 3))
    log = io.StringIO()
    start = time.perf_counter()
    result = suite.run_step("hang", [], tmp_path, log)
    assert result["rc"] == "timeout" and time.perf_counter() - start < 30
    text = log.getvalue()
    assert "stuck_in_a_collective" in text and "wait_forever" in text  # both stacks, from faulthandler
    child = int(next(line.split()[-1] for line in text.splitlines() if line.startswith("child pid: ")))
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the step's child outlived it"
