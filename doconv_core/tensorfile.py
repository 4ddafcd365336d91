"""The safetensors file format, read and written with NumPy alone.

safetensors (https://huggingface.co/docs/safetensors) is the framework-neutral tensor
format NumPy, PyTorch, TensorFlow, JAX and Flax all read: an 8-byte little-endian unsigned
header size N, N bytes of UTF-8 JSON ``{name: {"dtype": "F32", "shape": [...],
"data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}`` (padded with spaces),
then the data: each tensor's little-endian, C-ordered bytes at ``data_offsets`` relative
to the end of the header. Tensors are contiguous, in offset order, and cover the data
exactly; nothing in the file is ever executed.

doconv_core stays NumPy-only, so this module implements the format itself, with the
reference implementation's validation rules (header at most 100 MB, a JSON object, which
JSON whitespace may precede, nested at most 128 deep, checked before it is parsed; offsets
in order and without gaps or overlaps, each byte range the size its dtype and shape give,
metadata strings only) and one rule more: no key twice in a JSON object (the reference
keeps the last, another reader may keep the first, so such a file is refused). Files it
writes lay out tensors as the reference writer does (sorted by dtype, largest first, then
by name), so they are byte-identical to its files but for the order of metadata keys
(sorted here; the reference's follows a hash map). BF16 and the 8-bit float dtypes read as
``ml_dtypes`` arrays when ``ml_dtypes`` is installed; the sub-byte F4/F6 dtypes can be
inspected, not read.

Every problem reading a file is a :class:`~doconv_core.params.CheckpointError` naming the
file and, where it is about one tensor, the tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from typing import Any, Mapping, Optional, Union

import numpy as np

from .params import CheckpointError

__all__ = ["read_safetensors", "read_safetensors_header", "write_safetensors",
           "is_safetensors", "parse_json", "json_depth", "check_numpy_shape",
           "MAX_HEADER_SIZE", "MAX_JSON_DEPTH", "DTYPES"]

PathLike = Union[str, os.PathLike]

MAX_HEADER_SIZE = 100_000_000  # the reference implementation's limit (100 MB)
# serde_json's nesting limit, which the reference implementation parses under; Python's json
# recurses once per level and would raise RecursionError on a hostile file.
MAX_JSON_DEPTH = 128
# NumPy's limit on array dimensions (32 before NumPy 2).
_MAX_DIMS = 64 if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else 32
_METADATA = "__metadata__"
_ALIGNMENT = 8  # the header is padded so that the data starts 8-byte aligned

# safetensors dtype -> (bits per element, NumPy dtype name or None, ml_dtypes name or None),
# in the reference implementation's order, which its writer sorts by (largest last here).
DTYPES: dict[str, tuple[int, Optional[str], Optional[str]]] = {
    "BOOL": (8, "bool", None),
    "F4": (4, None, None),
    "F6_E2M3": (6, None, None),
    "F6_E3M2": (6, None, None),
    "U8": (8, "u1", None),
    "I8": (8, "i1", None),
    "F8_E5M2": (8, None, "float8_e5m2"),
    "F8_E4M3": (8, None, "float8_e4m3fn"),
    "F8_E8M0": (8, None, "float8_e8m0fnu"),
    "I16": (16, "<i2", None),
    "U16": (16, "<u2", None),
    "F16": (16, "<f2", None),
    "BF16": (16, None, "bfloat16"),
    "I32": (32, "<i4", None),
    "U32": (32, "<u4", None),
    "F32": (32, "<f4", None),
    "C64": (64, "<c8", None),
    "F64": (64, "<f8", None),
    "I64": (64, "<i8", None),
    "U64": (64, "<u8", None),
}
_RANK = {name: rank for rank, name in enumerate(DTYPES)}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _where(path: PathLike) -> str:
    return repr(os.fspath(path))


def _numpy_dtype(code: str, where: str, name: str) -> np.dtype:
    """The NumPy dtype of safetensors ``code``; a CheckpointError when NumPy has none."""
    _, plain, extension = DTYPES[code]
    if plain is not None:
        return np.dtype(plain)
    if extension is not None:
        try:
            import ml_dtypes  # optional: only foreign files hold these dtypes
        except ImportError:
            raise CheckpointError(
                f"{where}: tensor {name!r} has dtype {code}, which NumPy reads only with the "
                "ml_dtypes package; install ml_dtypes or convert the file to F16/F32/F64"
            ) from None
        dtype = getattr(ml_dtypes, extension, None)
        if dtype is not None:
            return np.dtype(dtype).newbyteorder("<")
    raise CheckpointError(f"{where}: tensor {name!r} has dtype {code}, which cannot be read "
                          "as a NumPy array (sub-byte elements)")


def check_numpy_shape(shape: tuple[int, ...], itemsize: int, where: str, name: str) -> None:
    """A CheckpointError unless NumPy can make an array of ``shape``: the format allows any
    rank and, for an empty tensor, any dimensions; NumPy caps the rank and the bytes its
    non-zero dimensions would span."""
    if len(shape) > _MAX_DIMS or math.prod(n for n in shape if n) * itemsize >= 2**63:
        raise CheckpointError(f"{where}: tensor {name!r} has shape {shape}, which cannot be "
                              f"read as a NumPy array (at most {_MAX_DIMS} dimensions, whose "
                              "non-zero ones span under 2**63 bytes)")


def _safetensors_dtype(dtype: np.dtype) -> Optional[str]:
    """The safetensors code of a NumPy dtype, None when the format has none."""
    if dtype.kind in "biufc":
        for code, (_, plain, _) in DTYPES.items():
            if plain is not None and np.dtype(plain) == dtype.newbyteorder("<"):
                return code
        return None
    for code, (_, _, extension) in DTYPES.items():
        if extension is not None and dtype.name == extension:
            return code
    return None


def _reject_duplicates(pairs: list) -> dict:
    # JSON allows repeated keys and json.loads keeps the last; a repeated tensor name
    # would make two readers disagree about a file, so it is an error.
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_JSON_SPACE = " \t\n\r"  # JSON's whitespace, which the reference reader allows before '{'
_SNIFF = 64  # how far into the header is_safetensors looks for the '{'
# A JSON string, or an unterminated one up to the end of the text: with the closing quote
# optional every match succeeds from where it starts, so the scan is linear (a required quote
# made an unterminated run of escaped quotes retry from each quote: quadratic time).
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_CHUNK = 1 << 20


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in the JSON ``text``, ignoring brackets
    inside strings; linear time and no recursion, so it is safe on any input."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    codes = np.frombuffer(brackets, dtype=np.uint8)
    deepest = level = 0
    for start in range(0, codes.size, _DEPTH_CHUNK):  # bounded memory on a 100 MB header
        chunk = codes[start:start + _DEPTH_CHUNK]
        levels = level + np.cumsum(np.where((chunk == 0x7B) | (chunk == 0x5B), 1, -1),
                                   dtype=np.int64)
        deepest = max(deepest, int(levels.max()))
        level = int(levels[-1])
    return deepest


def parse_json(text: str, where: str, problem: str, *, unique_keys: bool = True) -> Any:
    """``text`` parsed as JSON, else a CheckpointError ``"{where} {problem} (...)"``, where
    ``where`` names the file and ``problem`` the part ("has a corrupt safetensors header"):
    for invalid JSON, a repeated key in an object (with ``unique_keys``: two readers would
    disagree about which one counts) or nesting deeper than MAX_JSON_DEPTH, which is
    checked before parsing."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(f"{where} {problem} (JSON nested {depth} levels deep, over the "
                              f"limit of {MAX_JSON_DEPTH})")
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates if unique_keys else None)
    except ValueError as error:  # json.JSONDecodeError included
        raise CheckpointError(f"{where} {problem} (invalid JSON): {error}") from None


def _parse_header(raw: bytes, where: str, data_size: int
                  ) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate the JSON header ``raw`` against ``data_size`` bytes of data."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{where} has a header that is not UTF-8 text: {error}") from None
    if not text.lstrip(_JSON_SPACE).startswith("{"):
        raise CheckpointError(f"{where} is not a safetensors file: its header does not start "
                              f"with '{{' (starts with {text[:16]!r})")
    header = parse_json(text, where, "has a corrupt safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{where} has a corrupt safetensors header: expected a JSON "
                              f"object, got {type(header).__name__}")
    metadata = header.pop(_METADATA, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str)
                                                 for value in metadata.values()):
        raise CheckpointError(f"{where} has invalid safetensors metadata: {_METADATA} must "
                              f"map strings to strings, got {json.dumps(metadata)[:200]}")
    entries: dict[str, dict] = {}
    for name, entry in header.items():
        # Other keys are ignored, as the reference implementation ignores them.
        if not isinstance(entry, dict) or not _ENTRY_KEYS <= set(entry):
            keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise CheckpointError(f"{where}: tensor {name!r} has an invalid header entry: "
                                  f"expected the keys {sorted(_ENTRY_KEYS)}, got {keys}")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r} has unknown dtype {code!r} "
                                  f"(safetensors dtypes: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}: "
                                  "expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_count(n) for n in offsets) or offsets[0] > offsets[1]):
            raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets "
                                  f"{offsets!r}: expected [begin, end] with 0 <= begin <= end")
        bits = math.prod(shape) * DTYPES[code][0]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise CheckpointError(
                f"{where}: tensor {name!r} ({code}, shape {tuple(shape)}) needs "
                f"{bits / 8:g} bytes, but its data_offsets {offsets} hold "
                f"{offsets[1] - offsets[0]}")
        entries[name] = {"dtype": code, "shape": tuple(shape),
                         "data_offsets": (offsets[0], offsets[1])}
    end = 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = entry["data_offsets"]
        if begin != end:
            problem = "overlaps the tensor before it" if begin < end else "leaves a gap"
            raise CheckpointError(f"{where}: tensor {name!r} has data_offsets "
                                  f"[{begin}, {stop}] that {problem} (the data before it "
                                  f"ends at {end}); tensors must be contiguous")
        end = stop
    if end != data_size:
        raise CheckpointError(
            f"{where} is truncated or corrupt: the header describes {end} bytes of tensor "
            f"data, the file holds {data_size}")
    return entries, {str(key): value for key, value in metadata.items()}


def _read_header(handle: Any, where: str, file_size: int
                 ) -> tuple[dict[str, dict], dict[str, str], int]:
    """(entries, metadata, start of the data) of the open file ``handle``."""
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{where} is not a safetensors file: it has {file_size} bytes, "
                              "fewer than the 8 of the header size")
    (size,) = struct.unpack("<Q", prefix)
    if size > MAX_HEADER_SIZE:
        raise CheckpointError(f"{where} is not a readable safetensors file: its header size "
                              f"{size} exceeds the limit of {MAX_HEADER_SIZE} bytes")
    if 8 + size > file_size:
        raise CheckpointError(f"{where} is truncated or not a safetensors file: its header "
                              f"size {size} goes beyond the file's {file_size} bytes")
    raw = handle.read(size)
    if len(raw) != size:
        raise CheckpointError(f"{where} is truncated: its header could not be read whole")
    entries, metadata = _parse_header(raw, where, file_size - 8 - size)
    return entries, metadata, 8 + size


def _open(path: PathLike, where: str) -> Any:
    try:
        return open(path, "rb")
    except OSError as error:
        raise CheckpointError(f"{where} cannot be read: {error}") from None


def read_safetensors_header(path: PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries and metadata of the safetensors file ``path``, validated, without
    reading any tensor data (for inspection).

    Returns ``(entries, metadata)``: ``entries`` maps each tensor name, in offset order, to
    ``{"dtype": "F32", "shape": (2, 3), "data_offsets": (begin, end)}`` (the safetensors
    dtype code; offsets relative to the start of the data); ``metadata`` is the file's
    ``__metadata__`` ({} when absent). Every problem is a CheckpointError naming the file
    and, where relevant, the tensor.
    """
    where = _where(path)
    with _open(path, where) as handle:
        try:
            file_size = os.fstat(handle.fileno()).st_size
            entries, metadata, _ = _read_header(handle, where, file_size)
        except OSError as error:
            raise CheckpointError(f"{where} cannot be read: {error}") from None
    return entries, metadata


def read_safetensors(path: PathLike, *, mmap: bool = True
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of the safetensors file ``path``.

    Returns ``(arrays, metadata)``: ``arrays`` maps each tensor name, in offset order, to a
    NumPy array of its dtype and shape; ``metadata`` is the file's ``__metadata__`` ({} when
    absent). With ``mmap`` (the default) the arrays are read-only views of one
    ``np.memmap`` of the file: nothing is read until used, and the mapping stays open while
    any array lives (replace such a file atomically, never rewrite it in place). With
    ``mmap=False`` the file is read once and closed; the arrays are writable, in native byte
    order. The whole header is validated before any array is made; every problem (missing,
    truncated, corrupt or foreign file; unknown dtype; a dtype NumPy cannot hold, such as
    BF16 without ``ml_dtypes``) is a CheckpointError naming the file and, where relevant,
    the tensor.
    """
    where = _where(path)
    with _open(path, where) as handle:
        try:
            file_size = os.fstat(handle.fileno()).st_size
            entries, metadata, start = _read_header(handle, where, file_size)
            dtypes = {name: _numpy_dtype(entry["dtype"], where, name)
                      for name, entry in entries.items()}
            for name, entry in entries.items():
                check_numpy_shape(entry["shape"], dtypes[name].itemsize, where, name)
            if mmap and file_size > start:
                buffer = np.memmap(handle, dtype=np.uint8, mode="r")
            else:
                data = bytearray(file_size - start)
                if handle.readinto(data) != len(data):
                    raise CheckpointError(f"{where} is truncated: its tensor data could not "
                                          "be read whole")
                buffer = np.frombuffer(data, dtype=np.uint8)
                start = 0
        except OSError as error:
            raise CheckpointError(f"{where} cannot be read: {error}") from None
    arrays = {}
    for name, entry in entries.items():
        begin, end = entry["data_offsets"]
        array = buffer[start + begin:start + end].view(dtypes[name]).reshape(entry["shape"])
        if not mmap and not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        arrays[name] = array
    return arrays, metadata


def is_safetensors(path: PathLike) -> bool:
    """Whether ``path`` looks like a safetensors file: a header size in the format's range
    followed by ``{`` (after any JSON whitespace, within the first 64 bytes of the header).
    A cheap sniff, not a validation: a truncated or corrupt safetensors file passes
    (``read_safetensors`` then says what is wrong); an unreadable or missing file is False."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8 + _SNIFF)
    except OSError:
        return False
    if len(prefix) < 9:
        return False
    (size,) = struct.unpack("<Q", prefix[:8])
    start = prefix[8:8 + size].lstrip(_JSON_SPACE.encode())
    return 2 <= size <= MAX_HEADER_SIZE and start.startswith(b"{")


def _check_arrays(arrays: Any) -> dict[str, tuple[str, np.ndarray]]:
    if not isinstance(arrays, Mapping):
        raise ValueError(f"arrays must be a mapping of names to arrays, got "
                         f"{type(arrays).__name__}")
    checked = {}
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or name == _METADATA:
            raise ValueError(f"tensor names must be non-empty strings other than "
                             f"{_METADATA!r}, got {name!r}")
        array = np.asarray(value)
        code = _safetensors_dtype(array.dtype)
        if code is None:
            raise ValueError(f"arrays[{name!r}] has dtype {array.dtype}, which safetensors "
                             "cannot store (bool, integers, float16/32/64, complex64, "
                             "bfloat16 and float8 only)")
        checked[name] = (code, array)
    return checked


def _check_metadata(metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping of strings to strings, got "
                         f"{type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map strings to strings, got {key!r}: "
                             f"{type(value).__name__}")
    return dict(metadata)


def write_safetensors(path: PathLike, arrays: Mapping[str, np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``arrays`` ({name: array}) and ``metadata`` ({str: str}) to the safetensors
    file ``path``, atomically.

    Tensors are stored little-endian and C-ordered, sorted as the reference writer sorts
    them (by dtype, largest first, then by name), so the file matches
    ``safetensors.numpy.save_file``'s byte for byte but for the order of metadata keys
    (sorted here). A ValueError for a name that is not a non-empty
    string (or is ``"__metadata__"``), a dtype the format cannot store (object, string,
    complex128, ...) or metadata that is not strings, before anything is written. The file
    is written to a temporary file in the same directory, flushed to disk and renamed over
    ``path``, so ``path`` is either left as it was or replaced whole; the temporary file is
    removed on any failure.
    """
    checked = _check_arrays(arrays)
    metadata = _check_metadata(metadata)
    header: dict[str, Any] = {}
    if metadata:
        header[_METADATA] = dict(sorted(metadata.items()))
    chunks = []
    offset = 0
    for name, (code, array) in sorted(checked.items(),
                                      key=lambda item: (-_RANK[item[1][0]], item[0])):
        data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _ALIGNMENT)
    if len(text) > MAX_HEADER_SIZE:
        raise ValueError(f"the safetensors header would be {len(text)} bytes, over the "
                         f"format's limit of {MAX_HEADER_SIZE}: too many tensors")
    _write_atomic(path, [struct.pack("<Q", len(text)), text, *chunks])


def _write_atomic(path: PathLike, chunks: list) -> None:
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    descriptor, temporary = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); give it the mode open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, target)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    # The rename is durable only once the directory is flushed; not every platform can
    # open a directory (Windows), so this is best effort.
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
