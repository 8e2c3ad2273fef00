"""nanovllm.benchmark.kernel_audit: the PTX parsing on a snippet, and the whole tool on a Triton cache that
holds one kernel built for sm_90 on this machine (the peer all-reduce without its alignment hint, which moves
bf16 rows one element at a time: what the tool exists to catch)."""

import json

import pytest

from nanovllm.benchmark import kernel_audit
from nanovllm.kernels import all_reduce
from tests.kernels.test_all_reduce import _compiled as compiled_all_reduce

PTX = """
    ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];
    ld.global.b64 %rd2, [%rd3];
    @%p1 st.global.b16 [%rd4], %rs1;
    @%p1 st.global.b16 [%rd5], %rs2;
    ld.volatile.global.b32 %r5, [%rd6];
    st.global.v2.b32 [%rd7], {%r6, %r7};
    ld.shared.b32 %r8, [%r9];
"""


def test_memory_ops_counts_global_accesses_by_instruction():
    ops = kernel_audit.memory_ops(PTX)
    assert ops == {"ld.global.v4.b32": 1, "ld.global.b64": 1, "st.global.b16": 2, "ld.volatile.global.b32": 1,
                   "st.global.v2.b32": 1}  # fmt: skip
    # one element of <= 4 bytes per thread: vectors and 8-byte scalars are not
    assert kernel_audit.scalar_ops(ops) == {"st.global.b16": 2, "ld.volatile.global.b32": 1}


@pytest.mark.slow
def test_audit_reads_a_triton_cache(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    built = compiled_all_reduce(4096, dtype="bf16", aligned=False, cache_dir=str(cache))
    assert kernel_audit.main(["--cache", str(cache), "--out", str(out)]) == 0
    (report,) = [json.loads(p.read_text()) for p in out.glob("kernel_audit-*.json")]
    (kernel,) = report["kernels"]
    assert kernel["kernel"] == "_peer_all_reduce_kernel" and kernel["arch"] == 90
    assert kernel["num_warps"] == all_reduce.NUM_WARPS and kernel["registers"] == built["registers"] > 0
    assert kernel["memory_ops"] == built["memory_ops"]
    # 4,096 bf16 over 256 threads: each thread sends its 16 elements with 16 two-byte stores
    assert kernel["scalar_ops"]["st.global.b16"] >= 16 and kernel["local_bytes"] == 0
