"""Compile every Triton kernel of ``samplerkit.ops._triton`` for a CUDA GPU, without one.

    python tests/compile_triton_kernels.py [ARCH ...]     # default 90 (H100/H200); 80 is A100

Triton's interpreter (which runs the kernels in tests/test_triton_kernels.py) accepts code the
compiler rejects: globals that are not ``tl.constexpr``, ops the GPU backend lacks. This lowers
each kernel, for the shapes the library launches, through Triton's own pipeline down to a cubin
(Triton ships ptxas), and prints each kernel's registers and spill stack (``cuobjdump``), so
register pressure shows up before a GPU run. Exits non-zero if a kernel fails to compile or
spills. tests/test_triton_kernels.py runs it with ``TRITON_INTERPRET`` unset (with it set,
``@triton.jit`` makes interpreted functions, which do not compile). Importing it has no side
effects (pytest imports every module for doctests).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from samplerkit.ops import _triton
from samplerkit.ops.random import _BLOCK_STREAM, RACE_BLOCK, _stream_salt


@triton.jit
def _largest_by_sort_kernel(x_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    tl.store(out_ptr + tl.arange(0, K), _triton._largest_by_sort(x, N, K))


_FLOATS = {"x_ptr": "*fp32", "div_ptr": "*fp32"}
_SELECT = {**_FLOATS, "group_max_ptr": "*i64", "k_ptr": "*i64", "values_ptr": "*fp32", "ids_ptr": "*i64",
           "vocab": "i32", "stride_x": "i32", "k_max": "i32", "N_GROUPS": "constexpr", "HAS_DIV": "constexpr",
           "GROUP": "constexpr", "K": "constexpr"}
_RACE = {"values_ptr": "*fp32", "ids_ptr": "*i64", "keys_ptr": "*i64", "out_ptr": "*i64", "k": "i32",
         "stride_v": "i32", "stride_i": "i32"}

#: (kernel, signature, constexprs, num_warps): the launches of samplerkit.ops._triton.
CASES = [
    (_triton._row_keys_kernel, {"seeds_ptr": "*i64", "counters_ptr": "*i64", "out_ptr": "*i64", "n": "i32",
                                "BLOCK": "constexpr"}, {"BLOCK": 256}, 4),
    (_triton._race_kernel, {**_RACE, "BLOCK": "constexpr"}, {"BLOCK": 1024}, 4),
    (_triton._topk_keys_kernel, {**_FLOATS, "out_ptr": "*i64", "vocab": "i32", "stride_x": "i32",
                                 "HAS_DIV": "constexpr", "BLOCK": "constexpr"}, {"HAS_DIV": True, "BLOCK": 1024}, 4),
    (_triton._divide_kernel, {**_FLOATS, "out_ptr": "*fp32", "vocab": "i32", "stride_x": "i32",
                              "BLOCK": "constexpr"}, {"BLOCK": 1024}, 4),
    (_triton._group_max_kernel, {**_FLOATS, "out_ptr": "*i64", "vocab": "i32", "stride_x": "i32",
                                 "N_GROUPS": "constexpr", "HAS_DIV": "constexpr", "GROUP": "constexpr",
                                 "PER_PROGRAM": "constexpr"},
     {"N_GROUPS": 4096, "HAS_DIV": True, "GROUP": _triton.GROUP, "PER_PROGRAM": 128}, 4),
    (_triton._select_top_k_kernel, _SELECT, {"N_GROUPS": 4096, "HAS_DIV": True, "GROUP": _triton.GROUP, "K": 1}, 8),
    (_triton._select_top_k_kernel, _SELECT, {"N_GROUPS": 4096, "HAS_DIV": False, "GROUP": _triton.GROUP, "K": 64}, 8),
    (_triton._top_p_candidates_kernel, {"values_ptr": "*fp32", "p_ptr": "*fp32", "active_ptr": "*i8", "k": "i32",
                                        "stride_v": "i32", "HAS_ACTIVE": "constexpr", "BLOCK": "constexpr"},
     {"HAS_ACTIVE": True, "BLOCK": 1024}, 4),
    (_triton._race_blocks_kernel, {**_RACE, "BLOCK_STREAM_SALT": "constexpr", "RACE_BLOCK": "constexpr",
                                   "BLOCK": "constexpr"},
     {"BLOCK_STREAM_SALT": _stream_salt(_BLOCK_STREAM), "RACE_BLOCK": RACE_BLOCK, "BLOCK": 64}, 4),
    (_triton._candidates_valid_kernel, {"values_ptr": "*fp32", "out_ptr": "*i1", "k": "i32", "stride_v": "i32",
                                        "BLOCK": "constexpr"}, {"BLOCK": 64}, 4),
    (_largest_by_sort_kernel, {"x_ptr": "*i64", "out_ptr": "*i64", "N": "constexpr", "K": "constexpr"},
     {"N": 4096, "K": 64}, 8),
]


def resources(cubin: bytes) -> tuple[int, int]:
    """(registers, spill stack bytes) per thread, from cuobjdump (shipped with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-300:]}")
    return int(match.group(1)), int(match.group(2))


def main(archs: list[int]) -> int:
    if _triton.INTERPRETED:
        print("TRITON_INTERPRET=1 is set: unset it to compile the kernels", file=sys.stderr)
        return 2
    failures = 0
    for arch in archs:
        for kernel, signature, constexprs, warps in CASES:
            name = f"sm_{arch} {kernel.__name__} {constexprs}"
            try:
                compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                registers, stack = resources(compiled.asm["cubin"])
            except Exception as exc:  # noqa: BLE001 - report every kernel, then fail
                failures += 1
                print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
                continue
            failures += stack > 0
            print(f"{'ok  ' if stack == 0 else 'FAIL'} {name}: {registers} registers, {stack} bytes of spill stack",
                  flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90]))
