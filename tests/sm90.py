"""Compiling kernels for an H100 (sm_90) on any machine: Triton compiles only outside its interpreter, which
the test conftests switch on for this process, so the compiling script runs in a subprocess without it."""

from __future__ import annotations

import os
import subprocess
import sys


def run_outside_interpreter(code: str, *args: str, env: dict[str, str] | None = None) -> str:
    """stdout of `python -c code *args` with TRITON_INTERPRET unset (and `env` added); fails the test with
    the script's stderr if it exits non-zero."""
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    result = subprocess.run([sys.executable, "-c", code, *args], env=full_env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
