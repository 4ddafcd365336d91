"""benchmarks/bench_gluon.py runs end to end on tiny sizes (timings are not checked)."""

import mxnet as mx
import numpy as np
import pytest

import doconv_mx
from benchmarks import bench_gluon

MEASURES = ("train", "eval hybrid", "eval imperative", "fused")


def test_quick_benchmark_produces_every_row(tmp_path, capsys):
    markdown = tmp_path / "bench.md"
    rows = bench_gluon.main(["--quick", "--markdown", str(markdown)])
    by_key = {(row.case, row.measure): row for row in rows}
    assert len(by_key) == len(rows)  # no (case, measure) timed twice
    # The layer shapes (2-D, then 1-D and 3-D), then the networks.
    cases = ("3x3 8ch 8x8 b2", "dw 3x3 8ch 8x8 b2", "1-D k3 8ch L16 b2",
             "3-D 3x3x3 4ch 4x6x6 b2", "ResNet-18-style 32x32 b2", "1-D ResNet-10-style L32 b2",
             "R3D-10-style 4x16x16 b2")
    assert [row.case for row in rows if row.measure == "train"] == list(cases)
    for case in cases:
        for measure in MEASURES:
            row = by_key[(case, measure)]
            assert set(row.values) == {"native", "doconv"}
            assert all(value > 0 for value in row.values.values())
    assert len(rows) == len(cases) * len(MEASURES)
    text = markdown.read_text()
    assert "| case | measure | unit | native | doconv | doconv / native |" in text
    assert "Against the targets:" in text and "training ratio <= 1.30" in text
    assert "Against the targets" in capsys.readouterr().out


def test_converted_network_computes_the_native_function():
    """The whole-network variants start from the same weights (convert embeds them exactly)."""
    x = mx.nd.random.normal(shape=(1, 3, 32, 32))
    native, doconv = bench_gluon.network_pair(x, width=8, classes=10)
    assert len(doconv_mx.doconv_layers(doconv)) == 20  # stem, 16 3x3 convs, 3 shortcuts
    assert not doconv_mx.doconv_layers(native)
    np.testing.assert_allclose(doconv(x).asnumpy(), native(x).asnumpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank,shape", [(1, (1, 12, 32)), (3, (1, 3, 4, 16, 16))],
                         ids=["1d", "3d"])
def test_converted_small_networks_compute_the_native_function(rank, shape):
    x = mx.nd.random.normal(shape=shape)
    native, doconv = bench_gluon.rank_network_pair(rank, x, width=4, classes=10)
    layers = doconv_mx.doconv_layers(doconv)
    assert len(layers) == 12  # stem, 8 3-wide convs, 3 shortcuts
    assert all(type(layer) is getattr(doconv_mx, f"DOConv{rank}D") for layer in layers.values())
    assert not doconv_mx.doconv_layers(native)
    with mx.autograd.train_mode():  # batch statistics: outputs of order one
        np.testing.assert_allclose(doconv(x).asnumpy(), native(x).asnumpy(), rtol=1e-5,
                                   atol=1e-5)
