"""The CPU fast path of the kernel composition: a C kernel compiled at first use.

``c_forward(W, D, groups, M, N)`` returns the same kernel as DOConv2d's einsum
(``K[o, i, :] = (D + D_diag)[c(o, i)] @ W[o, i, :]``, doconv-math.md; the kernel adds the fixed
identity D_diag on the fly) and ``c_backward`` the fused backward (dW and dD in one pass).
``_ops`` registers both as the CPU implementation of the ``doconv::compose`` operator.
On this project's CPU it composes forward plus backward in 0.2-0.4x of einsum's time
(docs/benchmarks.md): einsum runs the product as a batch of tiny 9x9 matrix products, far
below the CPU's speed.

How the library gets compiled, and why it is safe to load:
* The source, ``_compose_kernel.c``, ships with the package; ``cc`` (or ``$CC``) builds it
  once per machine into a private cache directory: ``$DOCONV_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/doconv``, else ``~/.cache/doconv``. Loading a shared library runs its
  code, so the directory must be owned by the current user and writable by no one else
  (it is created with mode 0700), and so must the library file; otherwise nothing is loaded.
* The cache key hashes the source, compiler, flags and CPU (``-march=native`` binaries are
  CPU specific), so a shared home directory on mixed machines gets one library per CPU.
* Sources and libraries are written under per-process temporary names and renamed into
  place atomically, so concurrent processes (DDP ranks) never see a half-written file.
* The library links ``libgomp.so.1``; the dynamic loader resolves that soname to the OpenMP
  runtime torch has already loaded, so the process keeps one thread pool. The thread count
  follows ``torch.get_num_threads()``.

``DOCONV_CKERNEL``: ``auto`` (default: use the kernel when it builds, else einsum with one
warning), ``0`` (always einsum, no warning), ``1`` (required: raise if it cannot be built;
the test suite runs this way so that the fast path cannot silently go missing).
The kernel serves CPU float32/float64 with M*N and D_mul up to 32; everything else composes
with einsum.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import stat
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["Backend", "backend", "c_backward", "c_forward", "c_kernel_applies"]

ABI_VERSION = 8  # doconv_abi_version() of _compose_kernel.c
MAX_SIZE = 32  # the kernel's padded rows hold at most 32 elements (M*N and D_mul)
SOURCE = Path(__file__).with_name("_compose_kernel.c")
# Tried in order; the first that compiles and loads wins (no OpenMP, no -march last).
FLAG_SETS = (
    ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"),
    ("-O3", "-ffp-contract=fast", "-fopenmp"),
    ("-O3", "-march=native", "-ffp-contract=fast"),
    ("-O2",),
)
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


class Backend(NamedTuple):
    """Which composition DOConv2d uses on CPU, and why."""
    name: str  # "c" or "einsum"
    detail: str  # the library and its flags, or why the kernel is not used


class _State:
    lock = threading.Lock()
    tried = False
    lib: Optional[ctypes.CDLL] = None
    backend = Backend("einsum", "not loaded yet")
    warned = False


def _mode() -> str:
    value = os.environ.get("DOCONV_CKERNEL", "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise ValueError(f"DOCONV_CKERNEL must be 'auto', '0' or '1', got {value!r}")
    return value


def _private(path: str, directory: bool) -> bool:
    """Owned by this user, of the expected kind, not writable by group or others."""
    try:
        st = os.lstat(path)  # lstat: a symlink is neither a directory nor a file here
    except OSError:
        return False
    kind_ok = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    owner_ok = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return kind_ok and owner_ok and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def cache_dir() -> Path:
    configured = os.environ.get("DOCONV_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "doconv"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            lines = {line.strip() for line in handle
                     if line.startswith(("model name", "flags", "Features", "CPU part"))}
        return "\n".join(sorted(lines))
    except OSError:
        return platform.processor()


def _compile_and_load(source: str, directory: Path) -> tuple[ctypes.CDLL, str]:
    """The loaded library and a description; raises OSError/RuntimeError saying why not."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(str(directory), directory=True):
        raise RuntimeError(f"cache directory {directory} is not private to this user "
                           "(it must be owned by you and not group/other writable)")
    compiler = os.environ.get("CC", "cc")
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256("\0".join((source, compiler, *flags, platform.machine(),
                                        _cpu_id())).encode()).hexdigest()[:16]
        library = directory / f"doconv_compose_{key}.so"
        if not library.exists():
            with tempfile.TemporaryDirectory(dir=directory) as scratch:
                c_file = Path(scratch) / "compose.c"
                c_file.write_text(source)
                built = Path(scratch) / "compose.so"
                try:
                    result = subprocess.run(
                        [compiler, *flags, "-std=gnu99", "-fPIC", "-shared", str(c_file),
                         "-o", str(built)],
                        capture_output=True, text=True, timeout=300, check=False)
                except (OSError, subprocess.SubprocessError) as error:
                    raise RuntimeError(f"C compiler {compiler!r} could not run: {error}") \
                        from error
                if result.returncode != 0:
                    errors.append(f"{' '.join(flags)}: {result.stderr.strip()[-300:]}")
                    continue
                built.chmod(0o700)
                os.replace(built, library)  # atomic; the same name means the same content
        if not _private(str(library), directory=False):
            raise RuntimeError(f"{library} is not a private regular file; not loading it")
        try:
            lib = ctypes.CDLL(str(library))
        except OSError as error:
            errors.append(f"{' '.join(flags)}: {error}")
            continue
        lib.doconv_abi_version.restype = ctypes.c_int
        if lib.doconv_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{library} has ABI {lib.doconv_abi_version()}, "
                               f"expected {ABI_VERSION}")
        ptr, long_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        lib.doconv_fwd.argtypes = [int_, ptr, ptr, ptr, long_, long_, long_, long_, long_, int_]
        lib.doconv_bwd.argtypes = [int_, ptr, ptr, ptr, ptr, ptr, long_, long_, long_, long_,
                                   long_, int_]
        lib.doconv_fwd.restype = lib.doconv_bwd.restype = ctypes.c_int
        return lib, f"{library} ({compiler} {' '.join(flags)})"
    raise RuntimeError("the C kernel did not compile with any flag set: " + "; ".join(errors))


def _library() -> Optional[ctypes.CDLL]:
    if _State.tried:
        return _State.lib
    with _State.lock:
        if _State.tried:
            return _State.lib
        mode = _mode()
        if mode == "0":
            _State.backend = Backend("einsum", "DOCONV_CKERNEL=0")
        else:
            try:
                _State.lib, detail = _compile_and_load(SOURCE.read_text(), cache_dir())
                _State.backend = Backend("c", detail)
            except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                if mode == "1":
                    raise RuntimeError(f"DOCONV_CKERNEL=1 but the C composition kernel is "
                                       f"unavailable: {error}") from error
                _State.backend = Backend("einsum", str(error))
                warnings.warn(
                    f"doconv_torch: the C composition kernel is unavailable ({error}); "
                    "DOConv2d composes its kernel with einsum, which trains slower on CPU. "
                    "Set DOCONV_CKERNEL=0 to choose einsum without this warning.",
                    RuntimeWarning, stacklevel=4)
        _State.tried = True
        return _State.lib


def backend() -> Backend:
    """The CPU composition in use (builds the kernel on first call, as a first step would)."""
    _library()
    return _State.backend


def _reset() -> None:
    """Forget the loaded state, so that the next use decides again (tests)."""
    with _State.lock:
        _State.tried, _State.lib = False, None
        _State.backend = Backend("einsum", "not loaded yet")


def _functorch_active() -> bool:
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check and check())


def c_kernel_applies(W: Tensor, D: Tensor, M: int, N: int) -> bool:
    """Whether the C kernel serves these CPU tensors (it builds the library on first call)."""
    if W.device.type != "cpu" or D.device.type != "cpu" or W.dtype != D.dtype or \
            W.dtype not in _DTYPE_CODES:
        return False
    if M * N > MAX_SIZE or W.shape[-1] > MAX_SIZE:
        return False
    return _library() is not None


def _threads(numel: int) -> int:
    # Waking OpenMP workers costs more than a small composition: one thread per 16k elements.
    return max(1, min(torch.get_num_threads(), numel // 16384))


class _Calls:
    """How often the C kernel ran (tests check which path a layer took)."""
    forward = 0
    backward = 0


def c_forward(W: Tensor, D: Tensor, groups: int, M: int, N: int) -> Tensor:
    """The contiguous (C_out, C_in/groups, M, N) kernel; only where ``c_kernel_applies``."""
    W, D = W.contiguous(), D.contiguous()
    out_channels, in_per_group, D_mul = W.shape
    # device= explicitly: under torch.device("meta") or set_default_device a bare empty()
    # would hand the kernel a pointer to nothing.
    kernel = torch.empty((out_channels, in_per_group, M, N), dtype=W.dtype, device=W.device)
    status = _State.lib.doconv_fwd(
        _DTYPE_CODES[W.dtype], W.data_ptr(), D.data_ptr(), kernel.data_ptr(), out_channels,
        in_per_group, groups, M * N, D_mul, _threads(W.numel()))
    if status != 0:
        raise RuntimeError(f"doconv_fwd refused W {tuple(W.shape)}, D {tuple(D.shape)}, "
                           f"groups={groups}")
    _Calls.forward += 1
    return kernel


def c_backward(grad_kernel: Tensor, W: Tensor, D: Tensor,
               groups: int) -> tuple[Tensor, Tensor]:
    """(dL/dW, dL/dD) in one fused pass; only where ``c_kernel_applies``."""
    W, D, grad_kernel = W.contiguous(), D.contiguous(), grad_kernel.contiguous()
    grad_W = torch.empty(W.shape, dtype=W.dtype, device=W.device)
    grad_D = torch.empty(D.shape, dtype=D.dtype, device=D.device)
    out_channels, in_per_group, D_mul = W.shape
    status = _State.lib.doconv_bwd(
        _DTYPE_CODES[W.dtype], W.data_ptr(), D.data_ptr(), grad_kernel.data_ptr(),
        grad_W.data_ptr(), grad_D.data_ptr(), out_channels, in_per_group, groups,
        D.shape[1], D_mul, _threads(W.numel()))
    if status != 0:
        raise RuntimeError("doconv_bwd refused its arguments")
    _Calls.backward += 1
    return grad_W, grad_D
