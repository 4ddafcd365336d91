"""The portable container against hostile files: JSON nested to exhaust the stack, .npz
members whose headers would exhaust the memory or the parser, corrupt zip archives, names
a container cannot hold."""

import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import doconv_core as dc
from checkpoint_files import rewrite_npz, rewrite_safetensors_metadata
from doconv_core.params import _META_KEY
from fuzz_files import params_of

LAYERS = {
    "stem.conv": params_of(dc.ConvSpec(3, 8, 3, 2, "same", D_mul=12), np.float32, 1),
    "head": params_of(dc.ConvSpec(16, 4, 1, groups=2), np.float32, 3),
}


DEEP = "[" * 100_000 + "]" * 100_000  # Python's json recursion stops near 1,000


def test_deeply_nested_layers_metadata_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    dc.save_params(path, LAYERS)
    rewrite_safetensors_metadata(path, lambda m: m.update(layers='{"head": ' + DEEP + "}"))
    with pytest.raises(dc.CheckpointError, match=re.escape(
            f"{str(path)!r} has corrupt metadata 'layers' (JSON nested 100001 levels deep, "
            "over the limit of 128)")):
        dc.load_params(path)
    npz = tmp_path / "model.npz"
    dc.save_params(npz, LAYERS)
    rewrite_npz(npz, lambda a: a.update({_META_KEY: np.array('{"layers": ' + DEEP + "}")}))
    with pytest.raises(dc.CheckpointError, match=r"has corrupt metadata \(JSON nested 100001 "):
        dc.load_params(npz)


def test_deeply_nested_safetensors_header_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    text = ('{"x": ' + DEEP + "}").encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text)
    with pytest.raises(dc.CheckpointError, match=r"has a corrupt safetensors header \(JSON "
                                                 r"nested 100001 levels deep"):
        dc.load_params(path)


def test_brackets_inside_json_strings_do_not_count_as_nesting(tmp_path):
    # A layer name full of brackets (and an escaped quote) is still one level of nesting.
    name = '[[[{"' * 100
    params = {name: LAYERS["head"]}
    for suffix in ("safetensors", "npz"):
        dc.save_params(tmp_path / f"m.{suffix}", params)
        assert list(dc.load_params(tmp_path / f"m.{suffix}")) == [name]


def npz_member(path, member, change):
    """Rewrite one member's raw bytes (``change(bytes) -> bytes``) in the .npz at ``path``."""
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    members[member] = change(members[member])
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def npy_header(data, header):
    """A version-1 .npy member ``data`` with its header text replaced by ``header``."""
    size = int.from_bytes(data[8:10], "little")
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return data[:8] + len(text).to_bytes(2, "little") + text + data[10 + size:]


@pytest.mark.parametrize("header, message", [
    # 10**12 float32 elements: NumPy's reader would allocate 4 TB before reading (MemoryError).
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }",
     r"member 'head/W.npy' holds 128 bytes of data, but its dtype float32 and shape "
     r"\(1000000, 1000000\) need 4000000000000"),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 9223372036854775808), }",
     r"has shape \(0, 9223372036854775808\), which cannot be read as a NumPy array"),
    # A header NumPy would hand to ast.literal_eval: a RecursionError 5,000 levels down.
    ("{'descr': '<f4', 'fortran_order': False, 'shape': " + "- " * 5000 + "1, }",
     r"member 'head/W.npy' has a .npy header doconv does not read"),
    ("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (64,), }",
     r"has a .npy header doconv does not read"),
    ("{'descr': '|O', 'fortran_order': False, 'shape': (4,), }", r"cannot be read safely"),
])
def test_hostile_npy_headers_are_refused_before_allocating(tmp_path, header, message):
    path = tmp_path / "model.npz"
    dc.save_params(path, LAYERS)
    npz_member(path, "head/W.npy", lambda data: npy_header(data, header))
    with pytest.raises(dc.CheckpointError, match=message):
        dc.load_params(path)


def test_corrupt_zip_archives_are_checkpoint_errors(tmp_path):
    path = tmp_path / "model.npz"
    dc.save_params(path, LAYERS)
    raw = bytearray(path.read_bytes())
    # An unknown compression method in the central directory (zipfile: NotImplementedError).
    central = raw.rindex(b"PK\x01\x02")
    raw[central + 10:central + 12] = (99).to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(dc.CheckpointError, match="uses zip compression method 99"):
        dc.load_params(path)
    # A deflated member whose data is garbage (zlib.error), and one claiming to inflate past
    # what deflate can do.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("head/W.npy", bytes(1000))
    raw = bytearray(path.read_bytes())
    start = raw.index(b"PK\x03\x04") + 30 + len("head/W.npy")
    raw[start:start + 4] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(raw))
    with pytest.raises(dc.CheckpointError, match="is not a readable .npz file"):
        dc.load_params(path)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("head/W.npy", bytes(10**7))
    raw = bytearray(path.read_bytes())
    central = raw.rindex(b"PK\x01\x02")
    raw[central + 24:central + 28] = (10**12 % 2**32).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(dc.CheckpointError, match="stored bytes can hold"):
        dc.load_params(path)


def test_npz_members_must_be_npy_arrays_named_once(tmp_path):
    path = tmp_path / "model.npz"
    dc.save_params(path, LAYERS)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("notes.txt", b"hello")
    with pytest.raises(dc.CheckpointError, match=r"member 'notes.txt' is not a .npy array"):
        dc.load_params(path)
    dc.save_params(path, LAYERS)
    with zipfile.ZipFile(path) as archive:
        again = archive.read("head/W.npy")
    with pytest.warns(UserWarning, match="Duplicate name"):
        with zipfile.ZipFile(path, "a") as archive:
            archive.writestr("head/W.npy", again)
    with pytest.raises(dc.CheckpointError, match=r"holds the members \['head/W.npy'\] more "
                                                 r"than once"):
        dc.load_params(path)


def test_npz_arrays_keep_dtype_byte_order_and_fortran_order(tmp_path):
    path = tmp_path / "model.npz"
    dc.save_params(path, LAYERS)
    W = LAYERS["head"].W
    rewrite_npz(path, lambda a: a.update({"head/W": np.asfortranarray(W.astype(">f8"))}))
    loaded = dc.load_params(path)["head"].W
    assert loaded.dtype == np.dtype(">f8") and loaded.flags.writeable
    np.testing.assert_array_equal(loaded, W)


def test_npz_refuses_layer_names_with_nul_characters(tmp_path):
    # zipfile ends a member name at a NUL: the layer's arrays would be written under
    # another name and the file could not be loaded. safetensors holds any name.
    layers = {"a\0b": LAYERS["head"]}
    with pytest.raises(ValueError, match=r"layer names in an .npz file cannot hold NUL "
                                         r"characters, got 'a\\x00b'"):
        dc.save_params(tmp_path / "m.npz", layers)
    assert os.listdir(tmp_path) == []
    dc.save_params(tmp_path / "m.safetensors", layers)
    assert list(dc.load_params(tmp_path / "m.safetensors")) == ["a\0b"]


# An unterminated run of escaped quotes: a string scan that retries from each quote is
# quadratic in it (about an hour for a 1 MB header); a linear one reads it in milliseconds.
ESCAPED_QUOTES = '{"' + '\\"' * 500_000


def _refused_in_a_child(tmp_path, path, read):
    """Run ``read(path)`` in a new process that must end within 60 s: on a quadratic scan it
    would run for hours (the file is 1 MB), so the limit is far from this test's normal time."""
    script = tmp_path / "read.py"
    script.write_text("import sys\nimport doconv_core as dc\n"
                      f"try:\n    {read}(sys.argv[1])\n"
                      "except dc.CheckpointError as error:\n    print('refused:', error)\n")
    done = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.startswith("refused:") and "invalid JSON" in done.stdout, done.stdout


def test_an_unterminated_run_of_escaped_quotes_is_refused_in_linear_time(tmp_path):
    assert dc.tensorfile.json_depth('{"' + '\\"' * 100 + "[[[") == 1  # inside the open string
    header = tmp_path / "header.safetensors"
    header.write_bytes(len(ESCAPED_QUOTES).to_bytes(8, "little") + ESCAPED_QUOTES.encode())
    _refused_in_a_child(tmp_path, header, "dc.read_safetensors")
    portable = tmp_path / "model.safetensors"
    dc.save_params(portable, LAYERS)
    rewrite_safetensors_metadata(portable, lambda m: m.update(layers=ESCAPED_QUOTES))
    _refused_in_a_child(tmp_path, portable, "dc.load_params")
