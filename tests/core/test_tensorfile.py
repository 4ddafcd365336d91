"""doconv_core.tensorfile: the safetensors format in NumPy alone (the reference
implementation's own checks are in tests/test_torch/test_safetensors_interop.py)."""

import json
import os
import re
import struct

import numpy as np
import pytest

import doconv_core as dc
from doconv_core.params import CheckpointError
from doconv_core.tensorfile import (
    MAX_HEADER_SIZE,
    MAX_JSON_DEPTH,
    json_depth,
    is_safetensors,
    read_safetensors,
    read_safetensors_header,
    write_safetensors,
)

SHAPES = [(), (3,), (2, 3), (2, 1, 3), (2, 3, 1, 2)]  # ranks 0-4


def raw_file(path, header, data=b"", pad=True):
    """A file of ``header`` (a dict, or bytes as they are) and ``data``, unchecked."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_of_every_float_dtype_and_rank(tmp_path, dtype, mmap):
    rng = np.random.default_rng(0)
    arrays = {f"rank{len(shape)}": rng.standard_normal(shape).astype(dtype) for shape in SHAPES}
    arrays["empty"] = np.zeros((0, 3), dtype)
    arrays["also.empty"] = np.zeros((2, 0), dtype)
    path = tmp_path / "t.safetensors"
    write_safetensors(path, arrays, {"a": "1", "b": "é ünïcode"})
    loaded, metadata = read_safetensors(path, mmap=mmap)
    assert metadata == {"a": "1", "b": "é ünïcode"}
    assert sorted(loaded) == sorted(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].flags.writeable is not mmap
    if mmap:
        assert isinstance(loaded["rank2"].base, np.memmap) or isinstance(
            loaded["rank2"].base.base, np.memmap)


def test_other_dtypes_round_trip_and_layout(tmp_path):
    arrays = {"b": np.array([True, False]), "i8": np.arange(3, dtype=np.int8),
              "u16": np.arange(3, dtype=np.uint16), "i32": np.arange(3, dtype=np.int32),
              "u64": np.arange(3, dtype=np.uint64), "c": np.ones(2, np.complex64),
              "big": np.arange(4, dtype=">f4"), "strided": np.arange(12.0).reshape(3, 4)[:, ::2]}
    path = tmp_path / "t.safetensors"
    write_safetensors(path, arrays)
    loaded, metadata = read_safetensors(path)
    assert metadata == {}
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
    assert loaded["big"].dtype == np.dtype("<f4")
    entries, _ = read_safetensors_header(path)
    # The reference writer's order: dtype, largest first, then name; offsets contiguous.
    assert list(entries) == ["u64", "strided", "c", "big", "i32", "u16", "i8", "b"]
    assert entries["strided"] == {"dtype": "F64", "shape": (3, 2), "data_offsets": (24, 72)}
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    assert size % 8 == 0 and raw[8:9] == b"{" and "__metadata__" not in json.loads(raw[8:8 + size])


def test_no_tensors_and_only_metadata(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {}, {"k": "v"})
    assert read_safetensors(path) == ({}, {"k": "v"})
    assert is_safetensors(path)


def test_header_is_read_without_data(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"x": np.zeros((2, 3), np.float32)}, {"m": "1"})
    entries, metadata = read_safetensors_header(path)
    assert entries == {"x": {"dtype": "F32", "shape": (2, 3), "data_offsets": (0, 24)}}
    assert metadata == {"m": "1"}


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"x": np.ones(2)})
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(path, {"x": np.zeros(3)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.safetensors"]  # the temporary file is gone
    monkeypatch.undo()
    umask = os.umask(0o022)
    try:
        write_safetensors(path, {"x": np.zeros(3)})
    finally:
        os.umask(umask)
    # The mode a plain open() gives, not the temporary file's private 0600.
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["t.safetensors"]


@pytest.mark.parametrize("arrays, metadata, message", [
    ({"": np.ones(1)}, None, "tensor names must be non-empty strings"),
    ({"__metadata__": np.ones(1)}, None, "tensor names must be non-empty strings"),
    ({1: np.ones(1)}, None, "tensor names must be non-empty strings"),
    ({"x": np.array(["a"])}, None, r"arrays\['x'\] has dtype <U1, which safetensors cannot"),
    ({"x": np.array([object()])}, None, r"has dtype object"),
    ({"x": np.ones(1, np.complex128)}, None, r"has dtype complex128"),
    ({"x": np.ones(1)}, {"k": 1}, "metadata must map strings to strings"),
    ({"x": np.ones(1)}, ["k"], "metadata must be a mapping"),
    ([np.ones(1)], None, "arrays must be a mapping"),
])
def test_write_refuses_bad_input_before_writing(tmp_path, arrays, metadata, message):
    with pytest.raises(ValueError, match=message):
        write_safetensors(tmp_path / "t.safetensors", arrays, metadata)
    assert os.listdir(tmp_path) == []


def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    write_safetensors(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                             "b": np.arange(2, dtype=np.float32)}, {"k": "v"})
    return path


def test_truncated_files(tmp_path):
    raw = good_file(tmp_path).read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    cases = {
        "empty": (b"", "fewer than the 8 of the header size"),
        "size-only": (raw[:5], "fewer than the 8 of the header size"),
        "in-header": (raw[:8 + size // 2], f"header size {size} goes beyond the file's"),
        "in-data": (raw[:-3], "is truncated or corrupt: the header describes 32 bytes of tensor "
                              "data, the file holds 29"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        for read in (read_safetensors, read_safetensors_header):
            with pytest.raises(CheckpointError, match=re.escape(f"{str(path)!r}")) as error:
                read(path)
            assert message in str(error.value), (name, str(error.value))


def test_trailing_bytes_are_refused(tmp_path):
    path = good_file(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(CheckpointError, match="describes 32 bytes of tensor data, the file "
                                              "holds 40"):
        read_safetensors(path)


def test_missing_file(tmp_path):
    for read in (read_safetensors, read_safetensors_header):
        with pytest.raises(CheckpointError, match=r"missing.safetensors' cannot be read: "
                                                  r"\[Errno 2\]"):
            read(tmp_path / "missing.safetensors")
    assert not is_safetensors(tmp_path / "missing.safetensors")


def test_header_size_limits(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}")
    with pytest.raises(CheckpointError, match=f"header size {MAX_HEADER_SIZE + 1} exceeds the "
                                              f"limit of {MAX_HEADER_SIZE} bytes"):
        read_safetensors(path)
    assert not is_safetensors(path)
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the limit"):
        read_safetensors_header(path)


A = entry("F32", (2,), 0, 8)


@pytest.mark.parametrize("header, data, message", [
    (b"not json", b"", "its header does not start with '{'"),
    (b" x{}", b"", "its header does not start with '{'"),
    (b"{not json}", b"", r"corrupt safetensors header \(invalid JSON\)"),
    (b"\xff{}", b"", "header that is not UTF-8 text"),
    (b'{"a": 1, "a": 2}', b"", "invalid JSON.*duplicate key 'a'"),
    (b"{\"x\":" + json.dumps(A).encode() + b",\"x\":" + json.dumps(A).encode() + b"}",
     bytes(8), "duplicate key 'x'"),
    (b"[]", b"", "does not start with '{'"),
    ({"x": A, "y": entry("F32", (2,), 4, 12)}, bytes(12),
     r"tensor 'y' has data_offsets \[4, 12\] that overlaps the tensor before it"),
    ({"x": A, "y": entry("F32", (2,), 12, 20)}, bytes(20),
     r"tensor 'y' has data_offsets \[12, 20\] that leaves a gap"),
    ({"x": entry("F32", (2,), 4, 12)}, bytes(12), r"tensor 'x' .* leaves a gap"),
    ({"x": entry("F32", (3,), 0, 8)}, bytes(8),
     r"tensor 'x' \(F32, shape \(3,\)\) needs 12 bytes, but its data_offsets \[0, 8\] hold 8"),
    ({"x": entry("F64", (2,), 0, 8)}, bytes(8), r"needs 16 bytes"),
    ({"x": entry("F99", (2,), 0, 8)}, bytes(8), r"tensor 'x' has unknown dtype 'F99'"),
    ({"x": entry("F32", (-2,), 0, 8)}, bytes(8), r"tensor 'x' has an invalid shape \[-2\]"),
    ({"x": entry("F32", (2.0,), 0, 8)}, bytes(8), r"invalid shape"),
    ({"x": {**A, "shape": "2"}}, bytes(8), r"invalid shape"),
    ({"x": {**A, "data_offsets": [8, 0]}}, bytes(8), r"tensor 'x' has invalid data_offsets"),
    ({"x": {**A, "data_offsets": [0, 8, 9]}}, bytes(8), r"invalid data_offsets"),
    ({"x": {**A, "data_offsets": [0, True]}}, bytes(8), r"invalid data_offsets"),
    ({"x": {"dtype": "F32", "shape": [2]}}, bytes(8), r"tensor 'x' has an invalid header "
                                                       r"entry: expected the keys"),
    ({"x": [1, 2]}, bytes(8), r"tensor 'x' has an invalid header entry"),
    ({"x": A, "__metadata__": {"k": 1}}, bytes(8), r"__metadata__ must map strings to strings"),
    ({"x": A, "__metadata__": ["k"]}, bytes(8), r"__metadata__ must map strings to strings"),
])
def test_corrupt_headers(tmp_path, header, data, message):
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    for read in (read_safetensors, read_safetensors_header):
        with pytest.raises(CheckpointError, match=message) as error:
            read(path)
        assert str(error.value).startswith(repr(str(path)))


def test_zero_sized_tensors_may_share_an_offset(tmp_path):
    path = raw_file(tmp_path / "t.safetensors",
                    {"x": A, "e": entry("F32", (0,), 8, 8), "f": entry("F16", (0, 2), 8, 8)},
                    np.ones(2, np.float32).tobytes())
    arrays, _ = read_safetensors(path)
    assert arrays["e"].shape == (0,) and arrays["f"].shape == (0, 2)
    np.testing.assert_array_equal(arrays["x"], [1, 1])


def test_null_metadata_is_empty(tmp_path):
    path = raw_file(tmp_path / "t.safetensors", {"x": A, "__metadata__": None}, bytes(8))
    assert read_safetensors(path)[1] == {}


def test_unpadded_header_reads(tmp_path):
    # The format does not require the padding (other writers may omit it).
    path = raw_file(tmp_path / "t.safetensors", {"x": A}, np.ones(2, np.float32).tobytes(),
                    pad=False)
    np.testing.assert_array_equal(read_safetensors(path)[0]["x"], [1, 1])


def test_extension_dtypes_need_ml_dtypes(tmp_path):
    path = raw_file(tmp_path / "bf16.safetensors", {"x": entry("BF16", (2,), 0, 4)}, bytes(4))
    assert read_safetensors_header(path)[0]["x"]["dtype"] == "BF16"  # inspectable always
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        with pytest.raises(CheckpointError, match=r"tensor 'x' has dtype BF16, which NumPy "
                                                  r"reads only with the ml_dtypes package"):
            read_safetensors(path)
    else:
        assert read_safetensors(path)[0]["x"].dtype.name == "bfloat16"
    path = raw_file(tmp_path / "f4.safetensors", {"x": entry("F4", (4,), 0, 2)}, bytes(2))
    assert read_safetensors_header(path)[0]["x"]["shape"] == (4,)
    with pytest.raises(CheckpointError, match=r"tensor 'x' has dtype F4, which cannot be read"):
        read_safetensors(path)
    path = raw_file(tmp_path / "f4odd.safetensors", {"x": entry("F4", (3,), 0, 2)}, bytes(2))
    with pytest.raises(CheckpointError, match=r"needs 1.5 bytes"):
        read_safetensors_header(path)


def test_other_files_given_as_safetensors(tmp_path):
    npz = tmp_path / "p.npz"
    np.savez(npz, a=np.ones(3))
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    text = tmp_path / "text.safetensors"
    text.write_text("hello, this is text")
    for path in (npz, noise, text):
        assert not is_safetensors(path)
        with pytest.raises(CheckpointError, match=re.escape(repr(str(path)))):
            read_safetensors(path)
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"\x02" + bytes(7) + b"{}")
    assert is_safetensors(small)
    assert read_safetensors(small) == ({}, {})


def test_is_safetensors_is_a_sniff(tmp_path):
    path = good_file(tmp_path)
    assert is_safetensors(path) and is_safetensors(str(path))
    path.write_bytes(path.read_bytes()[:20])  # truncated, still recognisably safetensors
    assert is_safetensors(path)
    (tmp_path / "dir.safetensors").mkdir()
    assert not is_safetensors(tmp_path / "dir.safetensors")


def test_memory_mapped_arrays_are_read_only_and_survive_replacement(tmp_path):
    path = good_file(tmp_path)
    arrays, _ = read_safetensors(path)
    with pytest.raises(ValueError, match="read-only"):
        arrays["a"][0, 0] = 1
    write_safetensors(path, {"a": np.zeros((2, 3), np.float32)})  # atomic: a new file
    np.testing.assert_array_equal(arrays["a"], np.arange(6).reshape(2, 3))


def test_exported_from_package():
    assert dc.read_safetensors is read_safetensors and dc.write_safetensors is write_safetensors
    assert dc.is_safetensors is is_safetensors
    assert dc.read_safetensors_header is read_safetensors_header


def test_deeply_nested_headers_are_refused_before_parsing(tmp_path):
    # Python's json recurses once per level: 100,000 levels would be a RecursionError.
    deep = "[" * 100_000 + "]" * 100_000
    for header, depth in (('{"x": ' + deep + "}", 100001),
                          ('{"__metadata__": {"k": ' + deep + "}}", 100002)):
        path = raw_file(tmp_path / "deep.safetensors", header.encode())
        for read in (read_safetensors, read_safetensors_header):
            with pytest.raises(CheckpointError, match=re.escape(
                    f"{str(path)!r} has a corrupt safetensors header (JSON nested {depth} levels "
                    f"deep, over the limit of {MAX_JSON_DEPTH})")):
                read(path)
    # At the limit, the header is parsed (and refused for what it is).
    path = raw_file(tmp_path / "limit.safetensors",
                    ('{"x": ' + "[" * 127 + "]" * 127 + "}").encode())
    with pytest.raises(CheckpointError, match="tensor 'x' has an invalid header entry"):
        read_safetensors(path)


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth('{"a": "[[{{", "b": ["\\"]]]", [1]]}') == 3
    assert json_depth("") == 0 and json_depth('"[[["') == 0
    assert json_depth("[" * 10 + "]" * 10 + "[[]]") == 10


def test_shapes_numpy_cannot_hold_are_checkpoint_errors(tmp_path):
    # Empty tensors of any shape are valid safetensors; NumPy caps the rank and dimensions.
    for shape in ([0, 2**63], [1] * 65 + [0], [2**31, 2**31, 0]):
        path = raw_file(tmp_path / "t.safetensors", {"x": entry("F32", shape, 0, 0)})
        assert read_safetensors_header(path)[0]["x"]["shape"] == tuple(shape)
        with pytest.raises(CheckpointError, match=r"tensor 'x' has shape .* which cannot be "
                                                  r"read as a NumPy array"):
            read_safetensors(path)


def test_json_whitespace_may_precede_the_header_object(tmp_path):
    # The reference reader accepts it (JSON allows it); a form feed is not JSON whitespace.
    path = raw_file(tmp_path / "t.safetensors", b" \n\t\r" + json.dumps({"x": A}).encode(),
                    np.ones(2, np.float32).tobytes())
    assert is_safetensors(path)
    np.testing.assert_array_equal(read_safetensors(path)[0]["x"], [1, 1])
    path = raw_file(tmp_path / "t.safetensors", b"\x0c{}")
    assert not is_safetensors(path)
    with pytest.raises(CheckpointError, match="does not start with"):
        read_safetensors(path)


def test_entries_may_hold_other_keys(tmp_path):
    # The reference reader ignores keys it does not know; so does this one.
    path = raw_file(tmp_path / "t.safetensors", {"x": {**A, "extra": [1]}},
                    np.ones(2, np.float32).tobytes())
    assert read_safetensors_header(path)[0]["x"] == {"dtype": "F32", "shape": (2,),
                                                     "data_offsets": (0, 8)}
