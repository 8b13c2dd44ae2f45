"""Build and load samplerkit's compiled matrix kernels (``kernels/blockmm.c``).

The kernels multiply GGUF block-quantized matrices by float32 activations with AVX2/FMA/F16C
(see the C file's header for the math). They are compiled on first use with the system C
compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) into samplerkit's cache directory, keyed by
the source, the flags and the compiler, and loaded with ctypes; a later start loads the
library it finds there. Two processes building at once each write a private temporary file and
rename it into place, so neither ever loads a half-written library.

Nothing here is required: :func:`kernels` returns None, and :func:`unavailable_reason` says why,
on a CPU without AVX2/FMA/F16C (or where torch was told not to use AVX2,
``ATEN_CPU_CAPABILITY=default``), without a C compiler, or when the built library fails its
start-up check; the backend then keeps torch's int4 kernel (``weights: packed``). A compiler
without OpenMP gets the kernels built without it (single-threaded). ``SAMPLERKIT_NATIVE=0``
switches the kernels off.

The library is linked against OpenMP's ``libgomp.so.1``: torch's CPU build loads a library of
that name first, so both share one OpenMP runtime; each call asks for ``torch.get_num_threads()``
threads, so ``torch.set_num_threads`` (the backend's ``threads`` option) sizes the kernels too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch

#: Compiler flags: AVX2 + FMA + F16C code, no floating-point contraction the source did not ask
#: for (the kernels' FMAs are explicit; implicit ones would change results between compilers).
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared")
#: The same without OpenMP, tried when the compiler has none (Apple's clang, a clang without
#: libomp): the kernels then run on one thread (the pragmas are ignored), still faster than
#: torch's int4 kernel on two (docs/performance.md).
SERIAL_FLAGS = tuple(f for f in FLAGS if f != "-fopenmp")
#: Libraries linked after the source (expf, sqrtf).
LIBS = ("-lm",)
#: The C functions' ABI version (``blockmm_abi()``), bumped with any signature change.
ABI = 2
#: Tile formats the library has: name -> bytes per tile (4 output rows x 32 inputs).
TILE_BYTES = {"q4h": 80, "q4f": 96, "q8h": 136}
#: The number the fused C functions take for each tile format (``mm_for`` in the C file).
FORMAT_IDS = {"q4h": 0, "q4f": 1, "q8h": 2}
#: Output rows per tile (the kernels' register blocking) and inputs per block.
TILE_ROWS, GROUP = 4, 32
#: CPU features the kernels need (names as Linux's /proc/cpuinfo spells them).
CPU_FLAGS = ("avx2", "fma", "f16c")

_reason: str | None = None
#: Whether ``_reason`` is one the user can fix here (compiler, build, self-test), not the
#: CPU, torch's capability or ``SAMPLERKIT_NATIVE=0`` (see :func:`fixable`).
_fixable = False


def _source() -> bytes:
    return resources.files("samplerkit.builtins.backends.llama").joinpath("kernels/blockmm.c").read_bytes()


def pack_tiles(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> tuple[np.ndarray, str]:
    """``(tiles uint8 [N/4, K/32, bytes], format)``, the kernels' layout (see the C file), from
    codes ``[N, K]`` (uint8 0..15 for ``bits=4``, int8 for 8), ``scale`` and ``zero`` ``[N, K/32]``
    float32 (``zero`` None for 8 bits; ``N`` a multiple of 4). Scales are stored as float16 where
    that is exact for every one of them, else as float32 (4 bits only)."""
    n, k = codes.shape
    t, g = n // TILE_ROWS, k // GROUP
    by_tile = codes.reshape(t, TILE_ROWS, g, GROUP).transpose(0, 2, 1, 3)          # [T, G, 4, 32]
    heads = [scale] if zero is None else [scale, zero]
    half = all(np.array_equal(h.astype(np.float16).astype(np.float32), h) for h in heads)
    if bits == 8:
        if not half:
            raise ValueError("8-bit tiles need scales that are exact in float16 (Q8_0's are)")
        body, fmt = by_tile.astype(np.int8).view(np.uint8).reshape(t, g, -1), "q8h"
    else:
        body = (by_tile[..., :16] | (by_tile[..., 16:] << 4)).astype(np.uint8).reshape(t, g, -1)
        fmt = "q4h" if half else "q4f"
    dtype = np.float16 if half else np.float32
    header = [np.ascontiguousarray(h.reshape(t, TILE_ROWS, g).transpose(0, 2, 1).astype(dtype)).view(np.uint8)
              for h in heads]
    tiles = np.ascontiguousarray(np.concatenate([*header, body], axis=2))
    assert tiles.shape[2] == TILE_BYTES[fmt]
    return tiles, fmt


def source_digest() -> str:
    """A short hash of the kernels' C source (what changes their results when it changes)."""
    return hashlib.sha256(_source()).hexdigest()[:12]


def _cpu_ok() -> str | None:
    """None if this CPU (as torch dispatches for it) runs the kernels, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are x86-64 (AVX2) code and this machine is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"torch runs this CPU at capability {capability} (AVX2 or better needed; ATEN_CPU_CAPABILITY set?)"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None                      # not Linux: torch's AVX2 capability implies AVX2 + FMA
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    missing = [f for f in CPU_FLAGS if f not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _cache_root() -> Path:
    from samplerkit.builtins.backends.llama.default_model import cache_dir

    return cache_dir() / "kernels"


class CompileError(OSError):
    """The C compiler rejected the kernels (as opposed to a cache directory that cannot be written)."""


def _compile(cc: str, source: bytes, target: Path, flags: tuple[str, ...]) -> None:
    """Compile ``source`` to ``target`` through :func:`~.default_model.write_atomic` (a private
    file renamed into place: a concurrent builder's rename wins or loses whole, never leaving
    half a library, and nothing planted in the cache directory is written through)."""
    from samplerkit.builtins.backends.llama.default_model import write_atomic

    def run_compiler(out: Path) -> None:
        try:
            run = subprocess.run([cc, *flags, str(src), "-o", str(out), *LIBS], capture_output=True, text=True,
                                 timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:     # the compiler cannot be run at all
            raise CompileError(f"{Path(cc).name} could not run: {exc}") from exc
        if run.returncode != 0:
            detail = (run.stderr or run.stdout).strip().splitlines()
            raise CompileError(f"{Path(cc).name} failed: {detail[-1] if detail else 'exit status ' + str(run.returncode)}")

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "blockmm.c"
        src.write_bytes(source)
        write_atomic(target, run_compiler)


def _build(cc: str, source: bytes, flags: tuple[str, ...] = FLAGS) -> Path:
    """The compiled library for ``source``: from the cache directory (built there now unless it
    has it), or, where that directory cannot be written, built into a private temporary
    directory for this process only (never a shared, guessable path another user could fill)."""
    key = hashlib.sha256(source + "\0".join((cc, *flags, *LIBS)).encode()).hexdigest()[:20]
    target = _cache_root() / f"blockmm-{key}.so"
    if target.is_file():
        return target
    try:
        _compile(cc, source, target, flags)
        return target
    except CompileError:
        raise
    except OSError:
        private = Path(tempfile.mkdtemp(prefix="samplerkit-kernels-")) / target.name
        _compile(cc, source, private, flags)
        return private


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for fmt in TILE_BYTES:
        mm = getattr(lib, f"{fmt}_mm")
        mm.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
        mm.restype = ctypes.c_int
        deq = getattr(lib, f"{fmt}_dequantize")
        deq.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
        deq.restype = None
    lib.blockmm_abi.restype = ctypes.c_int
    f32, i32 = ctypes.c_float, ctypes.c_int
    lib.rms_norm.argtypes, lib.rms_norm.restype = [ptr, i64, i64, ptr, f32, ptr], None
    lib.norm_mm.argtypes, lib.norm_mm.restype = [ptr, i64, i64, ptr, f32, i32, ptr, i64, ptr, i32], i32
    lib.mm_add.argtypes, lib.mm_add.restype = [ptr, i64, i64, i32, ptr, i64, ptr, i32], i32
    lib.mlp.argtypes, lib.mlp.restype = [ptr, i64, i64, ptr, f32, i32, ptr, i64, i32, ptr, i32], i32
    lib.attend_decode.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, i32]
    lib.attend_decode.restype = i32
    return lib


def _self_test(lib: ctypes.CDLL) -> str | None:
    """None if the library multiplies a random 4-bit tile matrix right for 1 to 9 rows, and gives
    each row the same bits alone as in the batch, else what went wrong."""
    rng = np.random.default_rng(0)
    n, k, m = 12, 96, 9
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    scale = (rng.random((n, k // GROUP)) + 0.5).astype(np.float16).astype(np.float32)
    zero = (rng.random((n, k // GROUP)) - 0.5).astype(np.float16).astype(np.float32)
    tiles, fmt = pack_tiles(codes, scale, zero, bits=4)
    w = (codes.reshape(n, -1, GROUP) * scale[..., None].astype(np.float64) + zero[..., None]).reshape(n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)

    def product(rows: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(rows)
        y = np.empty((rows.shape[0], n), dtype=np.float32)
        if getattr(lib, f"{fmt}_mm")(rows.ctypes.data, rows.shape[0], k, tiles.ctypes.data, n, y.ctypes.data, 1):
            raise MemoryError("the compiled kernel could not allocate its scratch memory")
        return y

    got = product(x)
    if not np.allclose(got, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-4):
        return "the compiled kernel's self-test gave wrong products"
    if not np.array_equal(np.concatenate([product(x[i:i + 1]) for i in range(m)]), got):
        return "the compiled kernel's self-test gave a row different bits alone and in a batch"
    return None


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (then :func:`unavailable_reason` says why)."""
    global _reason, _fixable
    _fixable = False
    if os.environ.get("SAMPLERKIT_NATIVE", "1") == "0":
        _reason = "SAMPLERKIT_NATIVE=0"
        return None
    _reason = _cpu_ok()
    if _reason is not None:
        return None
    _fixable = True                         # from here on, every cause is this machine's setup
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler found (set CC, or install gcc or clang)"
        return None
    try:
        try:
            path = _build(cc, _source())
        except CompileError:
            path = _build(cc, _source(), SERIAL_FLAGS)      # no OpenMP here: one thread
        lib = _bind(ctypes.CDLL(str(path)))
        if path.parent.name.startswith("samplerkit-kernels-"):    # a private build: loaded, so remove it
            shutil.rmtree(path.parent, ignore_errors=True)
        if lib.blockmm_abi() != ABI:
            _reason = f"the compiled kernels report ABI {lib.blockmm_abi()}, expected {ABI}"
            return None
    except (OSError, AttributeError, subprocess.SubprocessError) as exc:
        _reason = f"could not build the kernels: {exc}"
        return None
    _reason = _self_test(lib)
    return lib if _reason is None else None


def fixable() -> bool:
    """Whether the kernels are unavailable for a reason the user can fix on this machine (no
    compiler, a failed build or self-test), as opposed to the CPU, torch's capability or
    ``SAMPLERKIT_NATIVE=0``: only then is falling back worth a warning."""
    return kernels() is None and _fixable


def unavailable_reason() -> str | None:
    """Why :func:`kernels` is None (None while it is not, or before it was asked)."""
    kernels()
    return _reason


__all__ = ["ABI", "FLAGS", "SERIAL_FLAGS", "FORMAT_IDS", "GROUP", "LIBS", "TILE_BYTES", "TILE_ROWS", "fixable", "kernels", "pack_tiles",
           "source_digest", "unavailable_reason"]
