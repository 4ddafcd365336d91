"""benchmarks/bench_gluon.py runs end to end on tiny sizes (timings are not checked)."""

import mxnet as mx
import numpy as np

import doconv_mx
from benchmarks import bench_gluon

MEASURES = ("train", "eval hybrid", "eval imperative", "fused")


def test_quick_benchmark_produces_every_row(tmp_path, capsys):
    markdown = tmp_path / "bench.md"
    rows = bench_gluon.main(["--quick", "--markdown", str(markdown)])
    by_key = {(row.case, row.measure): row for row in rows}
    assert len(by_key) == len(rows)  # no (case, measure) timed twice
    for case in ("3x3 8ch 8x8 b2", "dw 3x3 8ch 8x8 b2", "ResNet-18-style 32x32 b2"):
        for measure in MEASURES:
            row = by_key[(case, measure)]
            assert set(row.values) == {"native", "doconv"}
            assert all(value > 0 for value in row.values.values())
    assert len(rows) == 3 * len(MEASURES)
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
