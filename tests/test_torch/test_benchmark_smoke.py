"""benchmarks/bench_torch.py runs end to end on tiny sizes (timings are not checked)."""

import torch

from benchmarks import bench_torch


def test_quick_benchmark_produces_every_row(tmp_path, capsys):
    markdown = tmp_path / "bench.md"
    rows = bench_torch.main(["--quick", "--markdown", str(markdown)])
    measures = {(row.case, row.measure) for row in rows}
    for case in ("3x3 8ch 8x8 b2", "dw 3x3 8ch 8x8 b2", "ResNet-18-style 32x32 b2"):
        for measure in ("train", "peak MiB", "eval", "fused"):
            assert (case, measure) in measures
    train = next(r for r in rows if r.measure == "train")
    assert set(train.values) == {"native", "doconv", "einsum"}
    assert all(v > 0 for v in train.values.values())
    text = markdown.read_text()
    assert "| case | measure | unit | native | doconv | doconv / native |" in text
    compose = next(r for r in rows if r.measure == "compose fwd+bwd")
    assert compose.baseline == "einsum" and all(v > 0 for v in compose.values.values())
    assert set(train.paired) == {"doconv", "einsum"}
    assert "| 3x3 8ch 8x8 b2 | " in text.split("overhead doconv / einsum")[1]
    assert "| ResNet-18-style 32x32 b2 train <= 1.15 | " in text.split("Against the targets")[1]


def test_einsum_variant_computes_the_same_function():
    torch.manual_seed(0)
    layer = bench_torch.doconv_torch.DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=11)
    with torch.no_grad():
        layer.D.normal_()
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(bench_torch.EinsumDOConv2d(layer)(x), layer(x))
