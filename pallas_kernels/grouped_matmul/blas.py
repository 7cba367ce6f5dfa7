"""Grouped matmul on CPU, opt-in (impl="blas"): an XLA FFI custom call over single-threaded BLAS sgemm.

XLA:CPU has no grouped matmul (`lax.ragged_dot` lowers to a dense product over every group), so the pure-JAX
MoE paths pad groups to static sizes. This one computes exactly each group's rows: the C++ handlers beside this
file (`blas.cc`) call a single-threaded sgemm one column block at a time on XLA's own intra-op
threads. The sgemm is that of the OpenBLAS numpy's wheels ship, from a private copy of the library (its thread
count is a process-wide setting, so numpy's own copy keeps its threads). The C++ source is compiled with the system
C++ compiler on first use; the library and the OpenBLAS copy are cached in `M1_JAX_CACHE_DIR` (default
~/.cache/m1_jax). Where any of this is not possible, `available()` is False and `unavailable_reason()` says why.

float32 only. Opt-in rather than the CPU default: it needs a C++ compiler at run time, XLA's cost analysis sees
no FLOPs inside it, and the pure-JAX `bucketed` path is faster for small experts (the tiny preset).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = pathlib.Path(__file__).with_suffix(".cc")
_GMM, _TGMM = "m1_jax_gmm", "m1_jax_tgmm"


def _cache_dir() -> pathlib.Path:
    cache = pathlib.Path(os.environ.get("M1_JAX_CACHE_DIR") or pathlib.Path.home() / ".cache" / "m1_jax")
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _publish(tmp: str, path: pathlib.Path) -> pathlib.Path:
    """Renames a finished temporary file into place: concurrent processes (pytest -n) never load a partial file."""
    os.replace(tmp, path)
    return path


def _private_openblas() -> ctypes.CDLL:
    """A copy of numpy's bundled OpenBLAS (ILP64; cblas symbols prefixed `scipy_`, suffixed `64_`), loaded as its
    own library instance and set to one thread."""
    libs_dir = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    found = sorted(glob.glob(os.path.join(libs_dir, "libscipy_openblas64_*.so")))
    if not found:
        raise RuntimeError(f"numpy's bundled OpenBLAS (libscipy_openblas64_*.so) is not in {libs_dir}; this numpy "
                           "was not installed from a manylinux wheel")
    source = pathlib.Path(found[0])
    # The wheel's file name already carries a hash of its contents; with the size, no need to read 25 MB per start.
    copy = _cache_dir() / f"m1_jax_{source.stat().st_size}_{source.name}"
    if not copy.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=copy.parent)
        os.close(fd)
        shutil.copyfile(source, tmp)
        _publish(tmp, copy)
    blas = ctypes.CDLL(str(copy))  # a different path: a second instance, with its own thread-count setting
    blas.scipy_openblas_set_num_threads64_(1)
    return blas


def _compile() -> pathlib.Path:
    """The shared library built from the .cc source, cached under a hash of the source and jaxlib's headers."""
    include = jax.ffi.include_dir()
    key = hashlib.sha256(_SOURCE.read_bytes() + include.encode() + jax.__version__.encode()).hexdigest()[:16]
    library = _cache_dir() / f"grouped_matmul_blas-{key}.so"
    if library.exists():
        return library
    compiler = os.environ.get("CXX", "c++")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", "-I", include, str(_SOURCE), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        raise RuntimeError(f"could not run the C++ compiler {compiler!r} (set CXX to choose one): {e}") from e
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {_SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return _publish(tmp, library)


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the custom calls once per process; None on success, else why not."""
    try:
        blas = _private_openblas()
        lib = ctypes.CDLL(str(_compile()))
    except (RuntimeError, OSError) as e:
        return str(e)
    lib.m1_jax_set_sgemm(ctypes.cast(blas.scipy_cblas_sgemm64_, ctypes.c_void_p))
    jax.ffi.register_ffi_target(_GMM, jax.ffi.pycapsule(lib.M1JaxGmm), platform="cpu")
    jax.ffi.register_ffi_target(_TGMM, jax.ffi.pycapsule(lib.M1JaxTgmm), platform="cpu")
    return None


def available() -> bool:
    """Whether the custom call is built and registered (builds it on the first call)."""
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def _check(*arrays):
    for x in arrays:
        if x.dtype != jnp.float32:
            raise ValueError(f"impl='blas' is float32 only; got {x.dtype} (use impl='bucketed' for other dtypes)")
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the CPU grouped matmul (impl='blas') is unavailable: {reason}; use impl='bucketed'")


def gmm(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs: bool = False):
    """The api's gmm contract (rhs [E, K, N], or [E, N, K] with transpose_rhs); float32 in and out."""
    _check(lhs_MxK, rhs)
    N = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out = jax.ShapeDtypeStruct((lhs_MxK.shape[0], N), jnp.float32)
    return jax.ffi.ffi_call(_GMM, out)(lhs_MxK, rhs, group_sizes_E.astype(jnp.int32), trans_rhs=transpose_rhs)


def tgmm(lhs_MxK, d_MxN, group_sizes_E, *, out_dtype=None):
    """The api's tgmm contract: [E, K, N] per-group lhs^T @ d, float32."""
    del out_dtype  # float32 only
    _check(lhs_MxK, d_MxN)
    out = jax.ShapeDtypeStruct((group_sizes_E.shape[0], lhs_MxK.shape[1], d_MxN.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(_TGMM, out)(lhs_MxK, d_MxN, group_sizes_E.astype(jnp.int32))
