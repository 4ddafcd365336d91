"""Property tests of the ``doconv`` command's NumPy-only readers (safetensors state dicts and
the portable container, safetensors and .npz): valid files, mutated at the level of their
arrays and byte by byte; every run either fuses to what the file holds, composed apart from
the command, or is one ``doconv: error:`` line, exit 1, with nothing written."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

import doconv_core as dc
from fuzz_files import byte_mutations, portable_files
from strategies import fuzz_settings
from tests.cli_checks import (assert_failed_cleanly, assert_same_entries, check_fuse_property,
                              mutated_states, run_in_process)


def read_output(path: Path) -> dict:
    return dc.read_safetensors(path, mmap=False)[0]


def read_input(path: Path) -> dict:
    return dc.read_safetensors(path, mmap=False)[0]


@fuzz_settings(40)
@given(mutated_states(), st.data())
def test_fuse_of_a_mutated_safetensors_state_dict(case, data):
    state, _ = case
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "model.safetensors"
        dc.write_safetensors(source, state)
        if data.draw(st.booleans()):
            raw, _ = data.draw(byte_mutations(source.read_bytes()))
            source.write_bytes(raw)
        check_fuse_property(source, Path(directory) / "plain.safetensors", read_input,
                            read_output)


@fuzz_settings(40)
@given(portable_files())
def test_fuse_of_a_mutated_portable_file(case):
    suffix, raw, unchanged, _ = case
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / f"model.{suffix}"
        source.write_bytes(raw)
        out = Path(directory) / "plain.safetensors"
        result = run_in_process("fuse", source, out)
        try:
            stored = dc.load_params(source)
        except dc.CheckpointError:
            stored = None
        if result[0] != 0:
            assert_failed_cleanly(result, Path(directory), [source])
            assert stored is None, "the command refused a file load_params reads"
            return
        assert stored is not None, "the command fused a file load_params refuses"
        if unchanged is not None:  # an unmutated file: what was saved
            assert sorted(stored) == sorted(unchanged)
        expected = {}
        for name, params in stored.items():
            expected[f"{name}.weight"] = params.kernel()
            if params.bias is not None:
                expected[f"{name}.bias"] = params.bias
        assert_same_entries(read_output(out), expected)
        assert run_in_process("inspect", source)[0] == 0
