"""Property tests of the ``doconv`` command's Gluon reader: ``mx.nd.save`` parameter files,
changed at the level of their arrays (shapes, dtypes, extra states, keys) and byte by byte;
every run either fuses to what ``mx.nd.load`` reads from the file, composed apart from the
command, or is one ``doconv: error:`` line, exit 1, with nothing written."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mxnet as mx
from hypothesis import given
from hypothesis import strategies as st

from strategies import fuzz_settings
from tests.cli_checks import check_fuse_property, mutated_states


def read_params(path: Path) -> dict:
    return {key: value.asnumpy() for key, value in mx.nd.load(str(path)).items()}


@st.composite
def gluon_byte_mutations(draw, raw: bytes) -> bytes:
    """``raw`` truncated, extended, or with a byte flipped in its array data (the end of the
    file): a flipped shape or count field makes mx.nd.load itself allocate what it claims,
    which no reader in front of it can see (left to MXNet)."""
    kind = draw(st.sampled_from(["truncate", "trailing", "flip data"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "trailing":
        return raw + draw(st.binary(min_size=1, max_size=16))
    at = len(raw) - 1 - draw(st.integers(0, min(64, len(raw) - 1)))
    return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]


@fuzz_settings(20)
@given(mutated_states(), st.data())
def test_fuse_of_a_mutated_parameter_file(case, data):
    state, _ = case
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "model.params"
        mx.nd.save(str(source), {key: mx.nd.array(value, dtype=value.dtype)
                                 for key, value in state.items()})
        if data.draw(st.booleans()):
            source.write_bytes(data.draw(gluon_byte_mutations(source.read_bytes())))
        check_fuse_property(source, Path(directory) / "plain.params", read_params,
                            read_params)
