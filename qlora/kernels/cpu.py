"""Build and call the native CPU kernels in qlora_cpu.c.

The C file is compiled on first use with the system C compiler (about a second) into
a per-user cache (`$QLORA_CACHE`, default ~/.cache/qlora), keyed by a hash of the
source and flags, and loaded with ctypes. No torch headers, no ninja. `load()` returns
None when no compiler is found or the build fails; callers then use the reference.

Threads: built with -fopenmp, the kernels run on OpenMP. Loaded after torch, the library's
libgomp.so.1 is torch's own (the loader matches the soname), so the kernels use torch's
thread pool. Otherwise their threads would compete for the cores with torch's OpenMP
workers, which spin for a while after every op: in a training step the seeded dropout took
2x longer that way (docs/benchmarks.md). Where -fopenmp does not build, pthreads.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("qlora_cpu.c")
FLAGS = ["-O3", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math", "-pthread"]
OPENMP = ["-fopenmp"]
_lib: ctypes.CDLL | None = None
_error: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora")) / "kernels"


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    return cc


def build(flags: list[str]) -> Path:
    """The library compiled with `flags` (cached by source, flags and compiler)."""
    cc = compiler()
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + cc.encode()).hexdigest()[:16]
    target = cache_dir() / f"qlora_cpu-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([cc, *flags, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}:\n{result.stderr[-2000:]}")
        os.replace(built, target)  # atomic: concurrent builders never see a half-written library
    return target


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set the argument and result types of the library's functions."""
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.qlora_decode_4bit.argtypes = [ptr, ptr, ptr, ptr, ptr, ctypes.c_float, ptr, ptr, i64, i64, i32, i32, i32, i32]
    lib.qlora_quantize_4bit.argtypes = [ptr, i32, i64, i64, ptr, ptr, ptr, ptr, i32]
    lib.qlora_quantize_4bit.restype = i64
    lib.qlora_has_simd.restype = i32
    lib.qlora_dropout2.argtypes = [ptr, ptr, ptr, ptr, i64, i32, ptr, ctypes.c_uint32, ctypes.c_float, ctypes.c_float,
                                   i32, i32]
    lib.qlora_rotary.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, i64,
                                 i64, i64, i32, i32, i32, i32]
    return lib


def load() -> ctypes.CDLL | None:
    """The loaded kernel library (OpenMP build first, then pthreads), or None (reason: `error()`)."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    errors = []
    for flags in (FLAGS + OPENMP, FLAGS):  # no OpenMP (e.g. clang without libomp): pthreads
        try:
            _lib = declare(ctypes.CDLL(str(build(flags))))
            return _lib
        except (OSError, RuntimeError) as e:
            errors.append(str(e))
    _error = "\n".join(errors)
    return None


def error() -> str | None:
    return _error
