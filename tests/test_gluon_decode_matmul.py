"""benchmarks/gluon_decode_matmul.py (an experimental Gluon matmul, not used by the engine) on the CPU: its
launch plans keep the kernel's invariants for every shape it measures, two configs compile for sm_90 without
spills, within the H100's shared memory and with every weight TMA load before the PDL wait, and without a
GPU it says so and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

from tests.scripts import ROOT, load_script
from tests.sm90 import run_outside_interpreter

SCRIPT = "benchmarks/gluon_decode_matmul.py"
PATH = ROOT / SCRIPT


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("triton.experimental.gluon")
    return load_script(SCRIPT)


def _fits(g, chunks: int, split: int, mp: int, smem_kb: int) -> bool:
    num_k = chunks // split
    free = smem_kb * 1024 - num_k * g.W_CHUNK_BYTES - 1024
    return free // (mp * g.BLOCK_K * 2) >= min(2, num_k)


@pytest.mark.slow
def test_plans_keep_the_kernels_invariants(bench):
    g = bench
    configs = g.all_configs(quick=False)
    configs += [
        (mo, na, *g.SHAPES[mo][1][na], m, None, None) for (mo, na), ms in g.ODD_ROWS.items() for m in ms
    ]
    assert len(configs) > 90
    for model, name, n, k, m, split, kb in configs:
        p = g.plan(n, k, m, split, kb)
        where = (model, name, m, split, kb, p)
        chunks = -(-k // g.BLOCK_K)
        assert p["mp"] >= m and p["mp"] in (16, 32, 64, 128, 256), where
        assert p["n_tiles"] * g.BLOCK_N >= n > (p["n_tiles"] - 1) * g.BLOCK_N, where
        # every program gets whole K chunks, none a TMA box wholly past K (its mbarrier would never complete)
        assert chunks % p["split"] == 0 and p["num_k"] * p["split"] == chunks, where
        # the W slice and the x ring fit the budget beside 1 KB for the mbarriers, within the H100's limit
        assert p["smem_kb"] == (kb or g.SMEM_KB) and p["smem_kb"] * 1024 <= g.MAX_SMEM_PER_BLOCK_BYTES, where
        x_bytes = p["mp"] * g.BLOCK_K * 2
        assert p["smem_est"] == p["num_k"] * g.W_CHUNK_BYTES + p["x_stages"] * x_bytes, where
        assert p["smem_est"] + 1024 <= p["smem_kb"] * 1024, where
        assert min(2, p["num_k"]) <= p["x_stages"] <= p["num_k"], where
        if p["n_tiles"] * p["split"] > g.NUM_SMS:  # several waves: small x rings, more programs per SM
            assert p["x_stages"] <= max(2, 32768 // x_bytes), where
        # the split asked for (or about NUM_SMS programs) is raised only as far as shared memory requires
        want = max(1, round(g.NUM_SMS / p["n_tiles"])) if split is None else split
        assert p["split"] >= min(want, chunks), where
        smaller = [s for s in range(min(want, chunks), p["split"]) if chunks % s == 0]
        assert not any(_fits(g, chunks, s, p["mp"], p["smem_kb"]) for s in smaller), where
        if split is None:
            assert p["n_tiles"] * p["split"] >= g.NUM_SMS // 2, where  # at least about one wave
            if p["split"] == want:
                assert abs(p["n_tiles"] * p["split"] - g.NUM_SMS) <= p["n_tiles"] / 2, where


_COMPILE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("gluon_decode_matmul", sys.argv[1])
g = importlib.util.module_from_spec(spec)
spec.loader.exec_module(g)
out = []
for n, k, m, kb in ((1024, 2048, 16, None), (6144, 1024, 16, g.SMEM_KB_BIG)):  # 0.6B o; gate_up at 220 KB
    p, shared, regs, stack, secs, checks = g.compile_sm90(n, k, m, smem_kb=kb)
    out.append(dict(plan=p, shared=shared, regs=regs, stack=stack, checks=checks))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_two_configs_compile_for_sm90(bench, tmp_path):
    # TRITON_INTERPRET must be unset to compile; a fresh cache so the compiler really runs.
    stdout = run_outside_interpreter(_COMPILE, str(PATH), env={"TRITON_CACHE_DIR": str(tmp_path)})
    compiled = json.loads(stdout.strip().splitlines()[-1])
    splits = [c["plan"]["split"] for c in compiled]
    assert splits[0] > 1 and splits[1] == 1  # the split-K reduction and the direct store are both built
    for c in compiled:
        p, checks = c["plan"], c["checks"]
        assert "res_usage_error" not in checks, checks
        assert c["stack"] == 0 and 0 < c["regs"] <= 255, c  # no local memory: nothing spilled
        assert c["shared"] + 1024 <= min(p["smem_kb"] * 1024, bench.MAX_SMEM_PER_BLOCK_BYTES), c
        assert checks["wait"] == 1 and checks["launch"] == 1, checks  # PDL: one griddepcontrol each
        # griddepcontrol.wait is ACQBULK in the SASS: all num_k weight loads (UTMALDG) are issued before it
        assert checks["sass_tma_before_wait"] == p["num_k"], c
        assert checks["wgmma"] > 0, checks


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_it_says_so_and_writes_nothing(bench, tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
