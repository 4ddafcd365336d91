"""benchmarks/bench_torch.py runs end to end on tiny sizes (timings are not checked)."""

import pytest
import torch

from benchmarks import bench_torch

LAYER_CASES = ("3x3 8ch 8x8 b2", "dw 3x3 8ch 8x8 b2", "1-D k3 8ch L16 b2",
               "3-D 3x3x3 4ch 4x6x6 b2")
NETWORK_CASES = ("ResNet-18-style 32x32 b2", "1-D ResNet-10-style L32 b2",
                 "R3D-10-style 4x16x16 b2")


def test_quick_benchmark_produces_every_row(tmp_path, capsys):
    markdown = tmp_path / "bench.md"
    rows = bench_torch.main(["--quick", "--markdown", str(markdown)])
    measures = {(row.case, row.measure) for row in rows}
    for case in LAYER_CASES + NETWORK_CASES:
        for measure in ("train", "peak MiB", "eval", "fused"):
            assert (case, measure) in measures
    for case in LAYER_CASES:
        assert (case, "compose fwd+bwd") in measures
    # Layer shapes first, then the networks.
    assert [row.case for row in rows if row.measure == "train"] == list(
        LAYER_CASES + NETWORK_CASES)
    train = next(r for r in rows if r.measure == "train")
    assert set(train.values) == {"native", "doconv", "einsum"}
    assert all(v > 0 for v in train.values.values())
    text = markdown.read_text()
    assert "| case | measure | unit | native | doconv | doconv / native |" in text
    compose = next(r for r in rows if r.measure == "compose fwd+bwd")
    assert compose.baseline == "einsum" and all(v > 0 for v in compose.values.values())
    assert set(train.paired) == {"doconv", "einsum"}
    overhead = text.split("overhead doconv / einsum")[1].split("Against the targets")[0]
    for case in LAYER_CASES:
        assert f"| {case} | " in overhead
    for case in NETWORK_CASES:
        assert f"| {case} | " not in overhead
    targets = text.split("Against the targets")[1]
    assert "| ResNet-18-style 32x32 b2 train <= 1.15 | " in targets
    assert "R3D" not in targets and "1-D" not in targets  # the targets are 2-D


@pytest.mark.parametrize("rank, make", [(1, lambda: bench_torch.doconv_torch.DOConv1d(
    4, 6, 3, padding=1, groups=2, D_mul=5)), (2, lambda: bench_torch.doconv_torch.DOConv2d(
        4, 6, 3, padding=1, groups=2, D_mul=11)), (3, lambda: bench_torch.doconv_torch.DOConv3d(
            4, 6, 3, padding=1, groups=2, D_mul=28))])
def test_einsum_variant_computes_the_same_function(rank, make):
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.D.normal_()
    x = torch.randn((2, 4) + (5, 4, 3)[:rank])
    torch.testing.assert_close(bench_torch.EinsumDOConv(layer)(x), layer(x))


def test_the_networks_convert_to_every_rank():
    for model, rank in ((bench_torch.resnet1d(12, 8), 1), (bench_torch.r3d(4), 3)):
        converted = bench_torch.doconv_torch.convert(model)
        kinds = {type(m).__name__ for m in converted.modules() if "Conv" in type(m).__name__}
        assert kinds == {f"DOConv{rank}d"}
