"""Fuzzing doconv_core.tensorfile against the reference reader (the ``safetensors`` package,
which this env installs; its absence fails here, never skips): for every drawn file, valid or
mutated (tests/fuzz_files.py), both readers accept it with the same tensors and metadata, or
the reference refuses it and doconv raises ``CheckpointError``.

Budgets follow tests/conftest.py's hypothesis profiles: a fixed, derandomized budget under
the default "ci"; ``HYPOTHESIS_PROFILE=long`` (times DOCONV_FUZZ_SCALE, 100 by default) for
long local runs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from safetensors import safe_open  # the reference; installed by tox's torch env

from doconv_core.params import CheckpointError
from doconv_core.tensorfile import DTYPES, read_safetensors, read_safetensors_header
from fuzz_files import mutated_safetensors
from strategies import fuzz_settings

# The dtypes the reference's NumPy reader makes arrays of (safetensors.numpy's table).
REFERENCE_NUMPY = {"F64", "F32", "F16", "I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8",
                   "BOOL", "C64"}
# Deliberate differences, each a file the reference reads and doconv refuses:
# - a key twice in a JSON object (the reference keeps the last; doconv refuses: another
#   reader may keep the first);
# - in read_safetensors only, a shape NumPy cannot hold (over 64 dimensions, or non-zero
#   dimensions spanning 2**63 bytes or more, in an empty tensor), which the format allows
#   (the reference's NumPy reader fails on it with a ValueError).


def has_repeated_key(raw: bytes) -> bool:
    size = int.from_bytes(raw[:8], "little")
    try:
        json.loads(raw[8:8 + size], object_pairs_hook=_no_repeats)
    except _Repeated:
        return True
    except ValueError:
        pass
    return False


class _Repeated(Exception):
    pass


def _no_repeats(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Repeated
    return dict(pairs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-reference")


def reference(path):
    """(entries {name: (dtype, shape)}, metadata), or the exception the reference raised
    reading the header."""
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            entries = {}
            for name in handle.keys():
                view = handle.get_slice(name)
                entries[name] = (view.get_dtype(), tuple(view.get_shape()))
    except Exception as error:  # noqa: BLE001 - any refusal is the reference's verdict
        return error
    return entries, metadata


def reference_data(path, names):
    with safe_open(str(path), framework="np") as handle:
        return {name: handle.get_tensor(name).tobytes() for name in names}


def numpy_cannot_hold(entry) -> bool:
    spans = math.prod(n for n in entry["shape"] if n) * max(DTYPES[entry["dtype"]][0] // 8, 1)
    return len(entry["shape"]) > 64 or spans >= 2**63


@fuzz_settings(250)
@given(case=mutated_safetensors())
def test_doconv_and_the_reference_agree_on_every_file(folder, case):
    raw, _, mutations = case
    path = folder / "fuzz.safetensors"
    path.write_bytes(raw)
    expected = reference(path)
    try:
        entries, metadata = read_safetensors_header(path)
    except CheckpointError as error:
        if "duplicate key" in str(error):
            assert has_repeated_key(raw)
            return
        assert isinstance(expected, Exception), (
            f"doconv refused a file the reference reads ({mutations}): {error}")
        return
    assert not isinstance(expected, Exception), (
        f"doconv read a file the reference refuses ({mutations}): {expected!r}")
    assert metadata == expected[1]
    assert {name: (e["dtype"], e["shape"]) for name, e in entries.items()} == expected[0]
    if any(numpy_cannot_hold(e) for e in entries.values()):
        with pytest.raises(CheckpointError, match="cannot be read as a NumPy array"):
            read_safetensors(path)
        return
    # Every dtype but the sub-byte ones reads here (this env has ml_dtypes).
    if all(DTYPES[e["dtype"]][0] % 8 == 0 for e in entries.values()):
        arrays, _ = read_safetensors(path, mmap=False)
        names = [name for name, e in entries.items() if e["dtype"] in REFERENCE_NUMPY]
        for name, data in reference_data(path, names).items():
            assert arrays[name].tobytes() == data
            assert arrays[name].dtype == np.dtype(DTYPES[entries[name]["dtype"]][1])
