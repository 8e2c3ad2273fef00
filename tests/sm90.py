"""Compiling kernels for an H100 (sm_90) on any machine: Triton compiles only outside its interpreter, which
the test conftests switch on for this process, so the compiling script runs in a subprocess without it."""

from __future__ import annotations

import json
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


# A kernel compiled for sm_90 with the 16-divisible arguments a real launch specializes on. The spec travels
# as JSON; a constant written "tl.<name>" is that triton.language attribute (a dtype).
_COMPILE = """
import importlib, json, os, re, sys, tempfile
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nanovllm.benchmark.kernel_audit import memory_ops, resource_usage

spec = json.loads(sys.argv[1])
kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
names = kernel.arg_names
constants = {k: getattr(tl, v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
             for k, v in spec["constants"].items()}
signature = {n: "constexpr" if n in constants else spec["types"][n] for n in names}
source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constants.items()},
                   {(names.index(n),): [["tt.divisibility", 16]] for n in spec["divisible"]})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec["options"])
with tempfile.TemporaryDirectory() as tmp:
    cubin = os.path.join(tmp, "k.cubin")
    open(cubin, "wb").write(compiled.asm["cubin"])
    usage = resource_usage(cubin)
print(json.dumps({
    "registers": usage["REG"],
    "stack": usage["STACK"],
    "barriers": len(re.findall(r"bar\\.sync", compiled.asm["ptx"])),
    "memory_ops": memory_ops(compiled.asm["ptx"]),
}))
"""


def compile_sm90(
    kernel,  # a @triton.jit function
    constants: dict[str, object],
    types: dict[str, str] | None = None,
    divisible: list[str] | None = None,
    cache_dir: str | None = None,
    **options: int,
) -> dict:
    """Compile `kernel` for an H100 with `constants` as its constexprs. Its other arguments are "*bf16" if
    named *_ptr, else "i32", unless `types` says otherwise ("*fp32", "fp32", ...); `divisible` names those a
    launch would see as multiples of 16 (default: the pointers and the strides); options are num_warps etc.;
    cache_dir: the Triton cache the build lands in (default: the usual one).
    -> {"registers", "stack", "barriers" (bar.sync in the PTX),
    "memory_ops" (global loads and stores by PTX instruction: {"ld.global.v4.b32": n, ...})}"""
    names = [n for n in kernel.arg_names if n not in constants]
    types = {n: (types or {}).get(n, "*bf16" if n.endswith("_ptr") else "i32") for n in names}
    if divisible is None:
        divisible = [n for n, t in types.items() if t.startswith("*") or "stride" in n]
    spec = dict(module=kernel.fn.__module__, kernel=kernel.fn.__name__, types=types, constants=constants)
    spec |= dict(divisible=divisible, options=options)
    env = {"TRITON_CACHE_DIR": cache_dir} if cache_dir else None
    return json.loads(run_outside_interpreter(_COMPILE, json.dumps(spec), env=env).strip().splitlines()[-1])
