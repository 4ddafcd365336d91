"""The CPU fast path of the kernel composition: a C kernel compiled at first use.

``c_forward(W, D, groups, M, N)`` returns the same kernel as the layers' einsum
(``K[o, i, :] = (D + D_diag)[c(o, i)] @ W[o, i, :]``, doconv-math.md; the kernel adds the fixed
identity D_diag on the fly) and ``c_backward`` the fused backward (dW and dD in one pass).
``_ops`` registers both as the CPU implementation of the ``doconv::compose`` operator.
It exists because einsum runs the product as a batch of tiny MN x MN matrix products, far below
the CPU's speed; docs/benchmarks.md measures both.

How the library gets compiled, and why it is safe to load:
* The source, ``_compose_kernel.c``, ships with the package; ``cc`` (or ``$CC``, split into
  words as a shell would, so ``CC="ccache gcc"`` works) builds it once per machine into a
  private cache directory: ``$DOCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/doconv``, else
  ``~/.cache/doconv``. Loading a shared library runs its code, so the directory must be
  owned by the current user and writable by no one else (it is created with mode 0700, as
  are missing parents), and so must the library file; every directory above it (symlinks
  followed) must be owned by the user or root and not group/other writable unless sticky,
  as /tmp is, so that no one else can swap the path; otherwise nothing is loaded.
* The cache key hashes the source, compiler, flags and CPU (``-march=native`` binaries are
  CPU specific), so a shared home directory on mixed machines gets one library per CPU.
* One process builds at a time: a missing library is built under an exclusive ``flock``
  of ``build.lock`` in the cache directory; concurrent processes (DDP ranks) wait for it,
  then look again and load the finished library. Where there is no flock (not POSIX, some
  network file systems) or its holder is stuck for 20 minutes, they build too, which is
  only slower.
* Each build runs in a temporary directory named with the host and PID, which is removed
  when the build ends, fails or is interrupted; one left by a killed process (its PID dead
  on this host, or an hour old) is removed by the next build. Libraries are renamed into
  place atomically, so no process ever sees a half-written file.
* The library links ``libgomp.so.1``; the dynamic loader resolves that soname to the OpenMP
  runtime torch has already loaded, so the process keeps one thread pool. The thread count
  follows ``torch.get_num_threads()``.

``DOCONV_CKERNEL``: ``auto`` (default: use the kernel when it builds, else einsum with one
warning), ``0`` (always einsum, no warning), ``1`` (required: raise if it cannot be built;
the test suite runs this way so that the fast path cannot silently go missing).
The kernel serves CPU float32/float64 with a kernel volume (M*N in 2-D, K in 1-D, K_d*K_h*K_w
in 3-D) and D_mul up to 32, for every rank (it sees the volume only); everything else composes
with einsum.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import Tensor

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialized (still safe: atomic rename)
    fcntl = None

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
LOCK_NAME = "build.lock"  # in the cache directory: one process builds, the others wait
LOCK_WAIT_S = 1200.0  # 4 flag sets of at most 300 s each; then build without the lock
STALE_AFTER_S = 3600.0  # a build directory this old is a leftover whatever its PID says
# Build directories: tmp-<host tag>-<pid>-<random>; tmpXXXXXXXX from earlier versions.
_TEMP_NAME = re.compile(r"tmp-([0-9a-f]{8})-([0-9]+)-.*|tmp[a-z0-9_]{8}")


class Backend(NamedTuple):
    """Which composition the DO-Conv layers use on CPU, and why."""
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


def _me() -> str:
    return f"uid {os.getuid()}" if hasattr(os, "getuid") else "you"


def _not_private(path: str, directory: bool) -> Optional[str]:
    """What was found instead of a private ``path`` (owned by this user, of the expected
    kind, not writable by group or others), or None where it is private."""
    try:
        st = os.lstat(path)  # lstat: a symlink is neither a directory nor a file here
    except OSError as error:
        return f"found nothing usable ({error.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "found a symlink"
    if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
        return f"found no {'directory' if directory else 'regular file'}"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"found owner uid {st.st_uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"found mode {stat.S_IMODE(st.st_mode):04o}"
    return None


def _private(path: str, directory: bool) -> bool:
    """Owned by this user, of the expected kind, not writable by group or others."""
    return _not_private(path, directory) is None


def _unsafe_ancestor(directory: Path) -> Optional[str]:
    """Why another user could swap a directory on the way to ``directory``, or None.

    Every directory that resolving ``directory``'s parent passes through (symlinks followed
    by hand, so each directory a link leads through is checked too) must be owned by this
    user or root and not writable by group or others unless sticky (a sticky directory
    such as /tmp lets only an entry's owner rename or remove it); each symlink must be owned
    by this user or root. OpenSSH's StrictModes rule, with sticky directories allowed.
    Directories that do not exist yet are not checked: the caller creates them (mode 0700)
    and checks again. POSIX only (elsewhere None)."""
    if not hasattr(os, "getuid"):
        return None
    uid = os.getuid()
    absolute = directory if directory.is_absolute() else Path(os.getcwd(), directory)
    pending = list(reversed(absolute.parent.parts))  # a stack of names, the root last
    current = Path(pending.pop())
    path, links = current, 0
    while True:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as error:
            return f"{path} cannot be inspected ({error.strerror})"
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (uid, 0):
                return f"symlink {path} is owned by uid {st.st_uid}, expected uid {uid} or root"
            links += 1
            if links > 40:
                return f"{path}: too many levels of symlinks"
            target = Path(os.readlink(path))
            if target.is_absolute():
                current = Path(target.anchor)  # the root: checked first
                pending.extend(reversed(target.parts[1:]))
            else:
                pending.extend(reversed(target.parts))
        elif not stat.S_ISDIR(st.st_mode):
            return f"{path} is not a directory"
        elif st.st_uid not in (uid, 0):
            return f"{path} is owned by uid {st.st_uid}, expected uid {uid} or root"
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            return (f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, expected no group/other "
                    "write unless sticky (as /tmp's 1777)")
        else:
            current = path
        while pending and pending[-1] in ("..", "."):
            current = current.parent if pending.pop() == ".." else current
        if not pending:
            return None
        path = current / pending.pop()


def _prepare(directory: Path) -> None:
    """Create ``directory`` (and missing parents, mode 0700); raise RuntimeError saying why
    it is not safe to load a library from it."""
    problem = _unsafe_ancestor(directory)
    if problem is None:
        missing = []
        step = directory
        while not os.path.lexists(step) and step != step.parent:
            missing.append(step)
            step = step.parent
        for step in reversed(missing):
            try:
                os.mkdir(step, 0o700)
            except FileExistsError:
                pass
        problem = _unsafe_ancestor(directory)  # again: what exists now is what counts
    if problem is not None:
        raise RuntimeError(f"cache directory {directory} is not safe: {problem}")
    problem = _not_private(str(directory), directory=True)
    if problem is not None:
        raise RuntimeError(f"cache directory {directory} is not private to this user: expected "
                           f"a directory owned by {_me()}, not group/other writable; {problem}")


def _compiler() -> tuple[list[str], str]:
    """``$CC`` split as a shell would (``CC="ccache gcc"``), else ``cc``; and how messages
    name it. Raises RuntimeError for a ``$CC`` that names no command."""
    configured = os.environ.get("CC")
    if configured is None:
        return ["cc"], "'cc'"
    described = f"$CC={configured!r}"
    try:
        command = shlex.split(configured)
    except ValueError as error:
        raise RuntimeError(f"{described} is not a valid command line ({error})") from None
    if not command:
        raise RuntimeError(f"{described} names no compiler; unset CC to use cc")
    return command, described


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


def _host_tag() -> str:
    """This host and PID namespace, in temporary names: a PID is only checked where it means
    the same process (a cache directory may be shared by several machines or containers)."""
    try:
        pid_namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{pid_namespace}".encode()).hexdigest()[:8]


def _temp_prefix(pid: int) -> str:
    return f"tmp-{_host_tag()}-{pid}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


def _remove_stale(directory: Path, check_pids: bool) -> None:
    """Remove build directories that a killed process left: ones of a dead process of this
    host (``check_pids``: only under the lock, on POSIX) and ones older than an hour
    (including the pid-less ``tmpXXXXXXXX`` names of earlier versions)."""
    tag, now = _host_tag(), time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        dead = check_pids and match.group(1) == tag and not _alive(int(match.group(2)))
        if dead or age > STALE_AFTER_S:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _lock(directory: Path) -> Optional[int]:
    """A descriptor holding the build lock of ``directory`` (released when closed, or when
    the process dies), or None where there is none to take: no fcntl (not POSIX), a file
    system without flock, or a holder stuck for LOCK_WAIT_S. Building without it is still
    safe (atomic rename), only repeated."""
    if fcntl is None:
        return None
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
    except OSError:
        return None
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        except OSError:  # ENOLCK, EOPNOTSUPP on some network file systems
            break
    os.close(fd)
    return None


def _build(command: list[str], described: str, flags: tuple[str, ...], source: str,
           directory: Path, library: Path) -> Optional[str]:
    """Compile ``library`` in a temporary directory (always removed) and rename it into place;
    None, or why these flags failed. Raises RuntimeError when the compiler cannot run."""
    scratch = Path(tempfile.mkdtemp(prefix=_temp_prefix(os.getpid()), dir=directory))
    try:
        c_file = scratch / "compose.c"
        c_file.write_text(source)
        built = scratch / "compose.so"
        try:
            result = subprocess.run(
                [*command, *flags, "-std=gnu99", "-fPIC", "-shared", str(c_file), "-o",
                 str(built)],
                capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.SubprocessError) as error:
            raise RuntimeError(f"C compiler {described} could not run: {error}") from error
        if result.returncode != 0:
            return (f"{' '.join(flags)}: "
                    f"{result.stderr.strip()[-300:] or f'exit status {result.returncode}'}")
        if not built.is_file():
            return f"{' '.join(flags)}: exit status 0 but no library written"
        built.chmod(0o700)
        os.replace(built, library)  # atomic; the same name means the same content
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _compile_and_load(source: str, directory: Path) -> tuple[ctypes.CDLL, str]:
    """The loaded library and a description; raises OSError/RuntimeError saying why not."""
    _prepare(directory)
    command, described = _compiler()
    compiler = shlex.join(command)
    errors = []
    lock, lock_tried = None, False
    try:
        for flags in FLAG_SETS:
            key = hashlib.sha256("\0".join((source, compiler, *flags, platform.machine(),
                                            _cpu_id())).encode()).hexdigest()[:16]
            library = directory / f"doconv_compose_{key}.so"
            if not library.exists():
                if not lock_tried:  # one build at a time; the others wait, then load it
                    lock, lock_tried = _lock(directory), True
                    _remove_stale(directory, check_pids=lock is not None)
                if not library.exists():  # it may have been built while this one waited
                    error = _build(command, described, flags, source, directory, library)
                    if error is not None:
                        errors.append(error)
                        continue
            problem = _not_private(str(library), directory=False)
            if problem is not None:
                raise RuntimeError(f"{library} is not a private regular file (expected owned "
                                   f"by {_me()}, not group/other writable; {problem}); "
                                   "not loading it")
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
            lib.doconv_fwd.argtypes = [int_, ptr, ptr, ptr, long_, long_, long_, long_, long_,
                                       int_]
            lib.doconv_bwd.argtypes = [int_, ptr, ptr, ptr, ptr, ptr, long_, long_, long_,
                                       long_, long_, int_]
            lib.doconv_fwd.restype = lib.doconv_bwd.restype = ctypes.c_int
            return lib, f"{library} ({compiler} {' '.join(flags)})"
    finally:
        if lock is not None:
            os.close(lock)
    raise RuntimeError(f"the C kernel did not compile with {described} and any flag set: "
                       + "; ".join(errors))


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
                    "the DO-Conv layers compose their kernels with einsum, which trains "
                    "slower on CPU. "
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
