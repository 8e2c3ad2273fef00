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
