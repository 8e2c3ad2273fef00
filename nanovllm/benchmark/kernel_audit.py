"""What the compiler made of every Triton kernel a run compiled, read from Triton's on-disk cache: warps,
registers, spills, shared memory, and how wide each global load and store is.

    python -m nanovllm.benchmark.kernel_audit [--cache DIR] [--out DIR]

Run it after a benchmark on the GPU machine (the cache is TRITON_CACHE_DIR, else ~/.triton/cache); it needs
no GPU itself. A load or store of one element per thread where a thread holds several adjacent ones is the
thing to look for: Triton vectorizes only what it can prove aligned and evenly masked, and says nothing when
it cannot. In session 15 this found the peer all-reduce sending its rows over NVLink 2 bytes at a time
(its buffers come from an address table Triton cannot see into) and the sampler reading logits the same
way (an alignment hint on a loop variable, which Triton drops); both now move 16 bytes per access.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

# one global memory access per PTX instruction: ld.global.v4.b32, st.global.b16, ld.volatile.global.b32, ...
_GLOBAL_OP = re.compile(r"\b(?:ld|st)\.(?:volatile\.|relaxed\.gpu\.|acquire\.gpu\.)?global[.a-z0-9]*")
_SCALAR_ELEMENT = re.compile(r"\.(?:b|u|s|f)(?:8|16|32)$")  # an element of <= 4 bytes
_VECTOR = re.compile(r"\.v[248]\.")


def memory_ops(ptx: str) -> dict[str, int]:
    """Global loads and stores by PTX instruction: {"ld.global.v4.b32": 4, "st.global.b16": 32, ...}."""
    return dict(collections.Counter(_GLOBAL_OP.findall(ptx)))


def scalar_ops(ops: dict[str, int]) -> dict[str, int]:
    """The ops that move one element of <= 4 bytes per thread (per-program scalars, or unvectorized data)."""
    return {op: n for op, n in ops.items() if _SCALAR_ELEMENT.search(op) and not _VECTOR.search(op)}


def cuda_tool(name: str) -> str:
    """Path of a CUDA binary utility (cuobjdump, nvdisasm) as shipped inside the triton package."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resource_usage(cubin_path: str | Path) -> dict[str, int]:
    """cuobjdump -res-usage of a cubin file: {"REG": 110, "STACK": 0, "SHARED": 1024, "LOCAL": 0, ...}"""
    usage = subprocess.run(
        [cuda_tool("cuobjdump"), "-res-usage", str(cubin_path)], capture_output=True, text=True, check=True
    ).stdout
    return {key: int(value) for key, value in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", usage)}


def audit(cache_dir: str | Path) -> list[dict[str, Any]]:
    """One record per compiled kernel (a cache entry with PTX), sorted by name."""
    records = []
    for ptx_path in sorted(Path(cache_dir).glob("*/*.ptx")):
        ptx = ptx_path.read_text()
        meta_path = ptx_path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        cubin_path = ptx_path.with_suffix(".cubin")
        usage = resource_usage(cubin_path) if cubin_path.exists() else {}
        ops = memory_ops(ptx)
        records.append(
            {
                "kernel": ptx_path.stem,
                "cache_entry": ptx_path.parent.name,
                "arch": meta.get("target", {}).get("arch"),
                "num_warps": meta.get("num_warps"),
                "num_stages": meta.get("num_stages"),
                "shared_bytes": meta.get("shared"),
                "registers": usage.get("REG"),
                "stack_bytes": usage.get("STACK"),
                "local_bytes": usage.get("LOCAL"),
                "memory_ops": ops,
                "scalar_ops": scalar_ops(ops),
            }
        )
    return sorted(records, key=lambda r: (r["kernel"], r["cache_entry"]))


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def main(argv: list[str] | None = None) -> int:
    from nanovllm.benchmark.common import DEFAULT_OUT_DIR, print_table, run_info, write_report

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=str(default_cache_dir()), help="Triton cache to read")
    p.add_argument("--out", default=os.environ.get("OUT", str(DEFAULT_OUT_DIR)), help="folder for the JSON")
    args = p.parse_args(argv)
    kernels = audit(args.cache)
    rows = [
        [r["kernel"][:40], r["num_warps"], r["registers"], r["local_bytes"], r["shared_bytes"],
         " ".join(f"{op}x{n}" for op, n in sorted(r["scalar_ops"].items()))]
        for r in kernels
    ]  # fmt: skip
    headers = ["kernel", "warps", "regs", "spill B", "smem B", "one-element global loads/stores (op x count)"]
    print_table(f"{len(kernels)} kernels in {args.cache}", headers, rows)
    path = write_report("kernel_audit", {**run_info(), "cache": args.cache, "kernels": kernels}, args.out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
