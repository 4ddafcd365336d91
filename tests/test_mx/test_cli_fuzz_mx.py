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
from tests.cli_checks import (assert_failed_cleanly, check_fuse_property, mutated_states,
                              run_in_process)


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


def exported(directory: Path) -> tuple[Path, Path]:
    """A small exported model (net.export): PREFIX-0000.params and PREFIX-symbol.json."""
    from doconv_mx import DOConv2D
    net = mx.gluon.nn.HybridSequential()
    with net.name_scope():
        net.add(DOConv2D(4, 3, groups=2, in_channels=2), DOConv2D(2, (1, 3), in_channels=4))
    net.initialize()
    net.hybridize()
    net(mx.nd.ones((1, 2, 6, 6)))
    net.export(str(directory / "net"))
    return directory / "net-0000.params", directory / "net-symbol.json"


JSON_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.text(max_size=5),
                      st.lists(st.integers(-2, 9), max_size=3), st.dictionaries(
                          st.sampled_from(["kernel", "num_group", "op", "name"]),
                          st.text(max_size=5), max_size=2))


@fuzz_settings(20)
@given(st.data())
def test_fuse_of_an_exported_model_with_a_mutated_symbol(data):
    import json
    with tempfile.TemporaryDirectory() as directory:
        params, symbol = exported(Path(directory))
        graph = json.loads(symbol.read_text())
        for _ in range(data.draw(st.integers(1, 3))):
            node = data.draw(st.sampled_from(graph["nodes"]))
            where = data.draw(st.sampled_from(["attrs", "inputs", "op", "name", "graph"]))
            if where == "attrs" and isinstance(node.get("attrs"), dict) and node["attrs"]:
                key = data.draw(st.sampled_from(sorted(node["attrs"])))
                node["attrs"][key] = data.draw(JSON_JUNK)
            elif where == "graph":
                graph[data.draw(st.sampled_from(sorted(graph)))] = data.draw(JSON_JUNK)
                break
            else:
                node[where] = data.draw(JSON_JUNK)
        symbol.write_text(json.dumps(graph))
        out = Path(directory) / "plain-0000.params"
        result = run_in_process("fuse", params, out, "--symbol", symbol)
        if result[0] != 0:
            assert_failed_cleanly(result, Path(directory), [params, symbol])
        else:
            assert sorted(p.name for p in Path(directory).iterdir()) == sorted(
                [params.name, symbol.name, out.name, "plain-symbol.json"])
            json.loads((Path(directory) / "plain-symbol.json").read_text())
