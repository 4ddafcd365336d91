"""Write counters of MXNet NDArrays: the version of the engine variable behind each array.

MXNet 1.x counts every completed write to an array's storage in the array's engine variable
(``Var::version_`` in include/mxnet/engine.h, incremented by ThreadedVar when a write completes
and by the NaiveEngine after each mutating push; MXNet's own MKL-DNN subgraph ops read it to
notice changed weights). Views (slices, reshapes, ``detach``) share the variable. The C API of
mxnet 1.9 has no call that returns it, so this module reads it through ctypes:

    NDArray handle -> NDArray { std::shared_ptr<Chunk> ptr_; ... }
    Chunk { Storage::Handle shandle (32 bytes); std::vector<Storage::Handle> aux_handles;
            [std::shared_ptr<MKLDNNMemory> mkl_mem_, MKL-DNN builds only]; Engine::VarHandle var }
    Var   { vtable; size_t version_ }

The layout belongs to one build, so ``available()`` first checks it on a probe array (data
pointer against the public ``MXNDArrayGetData``, device fields, empty aux storage, the
variable's vtable against the library's ThreadedVar/NaiveVar vtables; every address is checked
readable through a pipe write, which fails with EFAULT instead of crashing, before it is read)
and then checks that the counter moves on every kind of write and not on reads. Where any check
fails it is False and callers must compare values instead.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

import mxnet as mx
import numpy as np

_POINTER = ctypes.sizeof(ctypes.c_void_p)
_HANDLE_BYTES = 32  # Storage::Handle: dptr, size, Context (2 x int32), shared_pid, shared_id
_VECTOR_BYTES = 3 * _POINTER  # libstdc++/libc++ std::vector: begin, end, capacity
_SHARED_PTR_BYTES = 2 * _POINTER
_VTABLES = ("_ZTVN5mxnet6engine11ThreadedVarE", "_ZTVN5mxnet6engine8NaiveVarE")
_CPU = 1  # Context::kCPU

_var_offset: Optional[int] = None  # set by the probe when every check passed
_probed = False
reason = "not probed yet"  # why versions are unavailable (for tests and bug reports)


def _pointer_at(address: int) -> int:
    return ctypes.c_void_p.from_address(address).value or 0


def _stamp(array: mx.nd.NDArray, offset: int) -> Optional[tuple[int, int]]:
    """(engine variable address, its version) with the variable at ``offset`` in the chunk."""
    chunk = _pointer_at(array.handle.value)
    var = _pointer_at(chunk + offset) if chunk else 0
    return (var, ctypes.c_size_t.from_address(var + _POINTER).value) if var else None


def _readable(address: int, size: int) -> bool:
    """Whether ``size`` bytes at ``address`` can be read, without risking a crash: the kernel
    copies them into a pipe or answers EFAULT."""
    if not address:
        return False
    try:
        write = ctypes.CDLL(None, use_errno=True).write
    except (OSError, AttributeError):  # no C library to call (not a POSIX system)
        return False
    write.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
    write.restype = ctypes.c_ssize_t
    read_end, write_end = os.pipe()
    try:
        return write(write_end, address, size) == size
    finally:
        os.close(read_end)
        os.close(write_end)


def _vtables() -> set[int]:
    """Addresses ThreadedVar and NaiveVar objects hold as their vtable pointer."""
    found = set()
    for symbol in _VTABLES:
        try:
            table = ctypes.c_char.in_dll(mx.base._LIB, symbol)
        except ValueError:  # symbol not exported by this build
            continue
        found.add(ctypes.addressof(table) + 2 * _POINTER)  # past offset-to-top and typeinfo
    return found


def _probe() -> tuple[Optional[int], str]:
    """(the variable's offset in an NDArray chunk, '') if every check passes, else (None, why)."""
    if _POINTER != 8 or sys.byteorder != "little":
        return None, "not a 64-bit little-endian platform"
    mkldnn = mx.runtime.Features().is_enabled("MKLDNN")
    offset = _HANDLE_BYTES + _VECTOR_BYTES + (_SHARED_PTR_BYTES if mkldnn else 0)
    array = mx.nd.zeros((4,), ctx=mx.cpu(), dtype="float32")
    array.wait_to_read()
    if not _readable(array.handle.value, _POINTER):
        return None, "NDArray handle not readable"
    chunk = _pointer_at(array.handle.value)
    if not _readable(chunk, offset + _POINTER):
        return None, "NDArray chunk layout not recognised (chunk pointer)"
    data = ctypes.c_void_p()
    mx.base.check_call(mx.base._LIB.MXNDArrayGetData(array.handle, ctypes.byref(data)))
    if not data.value or _pointer_at(chunk) != data.value:
        return None, "NDArray chunk layout not recognised (data pointer)"
    if (ctypes.c_size_t.from_address(chunk + 8).value < 16
            or ctypes.c_int32.from_address(chunk + 16).value != _CPU
            or ctypes.c_int32.from_address(chunk + 20).value != 0):
        return None, "NDArray chunk layout not recognised (storage handle)"
    empty = range(_HANDLE_BYTES, offset, _POINTER)  # aux_handles (and mkl_mem_): all null here
    if any(_pointer_at(chunk + at) for at in empty):
        return None, "NDArray chunk layout not recognised (aux storage)"
    var = _pointer_at(chunk + offset)
    if not _readable(var, 2 * _POINTER) or _pointer_at(var) not in _vtables():
        return None, "engine variable not recognised (vtable)"
    # Behaviour: every kind of write moves the counter (views share it), a read does not.
    writes = (lambda a: a.__iadd__(1), lambda a: a[1:3].__iadd__(1),
              lambda a: a.__setitem__(slice(None), np.ones(4, np.float32)),
              lambda a: mx.nd.elemwise_add(a, a, out=a))
    before = _stamp(array, offset)
    for write in writes:
        write(array)
        array.wait_to_read()
        after = _stamp(array, offset)
        if after is None or after[0] != before[0] or after[1] <= before[1]:
            return None, "engine variable version does not count writes"
        before = after
    (array * 2).wait_to_read()
    if _stamp(array, offset) != before:
        return None, "engine variable version moves on reads"
    return offset, ""


def available() -> bool:
    """Whether ``version`` works on this build (probed once, on first use)."""
    global _var_offset, _probed, reason
    if not _probed:
        _var_offset, reason = _probe()
        _probed = True
    return _var_offset is not None


def version(array: mx.nd.NDArray) -> Optional[tuple[int, int]]:
    """(engine variable address, completed writes) of ``array``; None if unavailable.

    Waits for writes already pushed to ``array`` (only those: nothing else blocks), so the
    count includes every write issued before this call. Writes that bypass MXNet's engine
    (a DLPack consumer writing the memory, raw pointers) are not counted.
    """
    if not available():
        return None
    array.wait_to_read()
    return _stamp(array, _var_offset)
