import os
import subprocess
import sys

import pytest

from nanovllm.utils.env import env_int


def test_env_int_reads_default_and_value(monkeypatch):
    monkeypatch.delenv("NANOVLLM_TEST_SWITCH", raising=False)
    assert env_int("NANOVLLM_TEST_SWITCH", 112) == 112
    monkeypatch.setenv("NANOVLLM_TEST_SWITCH", "0")
    assert env_int("NANOVLLM_TEST_SWITCH", 112) == 0
    monkeypatch.setenv("NANOVLLM_TEST_SWITCH", "256")
    assert env_int("NANOVLLM_TEST_SWITCH", 32, maximum=256) == 256


@pytest.mark.parametrize("bad", ["-1", "x", "²", "1.5", "", "257"])
def test_env_int_rejects_what_is_not_a_bounded_count(monkeypatch, bad):
    monkeypatch.setenv("NANOVLLM_TEST_SWITCH", bad)
    with pytest.raises(ValueError, match="NANOVLLM_TEST_SWITCH must be an integer in 0..256"):
        env_int("NANOVLLM_TEST_SWITCH", 32, maximum=256)
    if bad != "257":
        with pytest.raises(ValueError, match="must be a non-negative integer"):
            env_int("NANOVLLM_TEST_SWITCH", 32)


@pytest.mark.parametrize("value,ok", [("0", True), ("1", True), ("2", False), ("yes", False)])
def test_pdl_switch_takes_only_0_or_1(value, ok):
    # kernels/backend.py reads NANOVLLM_PDL at import: a fresh interpreter for each value.
    code = "import nanovllm.kernels.backend"
    env = {**os.environ, "NANOVLLM_PDL": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert (out.returncode == 0) == ok, out.stderr[-500:]
    if not ok:
        assert "NANOVLLM_PDL must be an integer in 0..1" in out.stderr
