"""benchmarks/bench_keras.py runs end to end on tiny sizes, on this env's backend (timings
are not checked), and its networks compare like with like."""

import keras
import numpy as np
import pytest
from kutils import BACKEND

import doconv_tf

if BACKEND == "torch":
    pytest.skip("benchmarks/bench_keras.py measures the tensorflow and jax backends only",
                allow_module_level=True)

from benchmarks import bench_keras  # noqa: E402

# "eval eager" exists on JAX only, where an eager DOConv2D call reuses its composed kernel.
MEASURES = ("train", "eval", "fused") + (("eval eager",) if BACKEND == "jax" else ())


@pytest.mark.slow
def test_quick_benchmark_produces_every_row(tmp_path, capsys):
    markdown = tmp_path / "bench.md"
    rows = bench_keras.main(["--quick", "--markdown", str(markdown)])
    cases = ("3x3 8ch 8x8 b2", "dw 3x3 8ch 8x8 b2", "ResNet-18-style 32x32 b2",
             "k3 8ch L32 b2", "3x3x3 8ch 4x8x8 b2", "1-D ResNet-10-style 64 b2",
             "R3D-10-style 4x16x16 b2")
    assert sorted((r.case, r.measure) for r in rows) == sorted(
        (case, measure) for case in cases for measure in MEASURES)
    for row in rows:
        assert set(row.values) == {"native", "doconv"}, row
        assert all(value > 0 for value in row.values.values()), row
    text = markdown.read_text()
    assert "| case | measure | unit | native | doconv | doconv / native |" in text
    assert f"backend {BACKEND}; " in text and f"jit_compile {bench_keras.JIT_COMPILE}" in text
    assert "| ResNet-18-style training ratio <= 1.30 |" in text
    for name in ("1-D ResNet-10-style", "R3D-10-style"):
        # The N-d issue's targets: the 2-D network's training ratio + 0.05, eager 1.02.
        assert f"| {name} training ratio <= ResNet-18-style's + 0.05 (" in text
        assert (f"| {name} eval unfused <= 1.02, eager (kernel cached) | " in text) == \
            (BACKEND == "jax")
    if BACKEND == "jax":  # eager rows: the median per-round ratio and its 95% interval
        eager = [r for r in rows if r.measure == "eval eager"]
        assert eager and all(set(r.intervals) == {"doconv"} for r in eager)
        assert all(r.ratio("doconv") == r.intervals["doconv"][0] for r in eager)
    assert "largest training ratio (no Keras target) | " in text
    worst = text.split("largest training ratio (no Keras target) | ")[1].split("\n")[0]
    assert "ResNet" not in worst and "R3D" not in worst  # per layer: layer shapes only
    assert "Against the targets" in capsys.readouterr().out


def test_networks_compute_the_same_function():
    """Every conv of the native network is a DOConv2D after convert and a Conv2D after fuse,
    and all three predict the same: the timings compare equal functions."""
    keras.utils.set_random_seed(0)
    native = bench_keras.resnet18(32, width=8, classes=10)
    doconv = doconv_tf.convert(native)
    fused = doconv_tf.fuse(doconv)

    def count(model, cls):
        return sum(type(layer) is cls for layer in model.layers)

    convs = count(native, keras.layers.Conv2D)
    assert convs == 20  # stem, 16 in the blocks, 3 projection shortcuts
    assert count(doconv, doconv_tf.DOConv2D) == convs
    assert count(fused, keras.layers.Conv2D) == convs
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")
    expected = native.predict_on_batch(x)
    for model in (doconv, fused):
        np.testing.assert_allclose(model.predict_on_batch(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("build,kwargs,rank,convs", [
    (bench_keras.resnet10_1d, dict(length=64, width=8), 1, 12),
    (bench_keras.r3d10, dict(frames=4, size=16, width=4), 3, 12),
])
def test_rank_networks_compute_the_same_function(build, kwargs, rank, convs):
    keras.utils.set_random_seed(0)
    native = build(**kwargs)
    doconv = doconv_tf.convert(native)
    fused = doconv_tf.fuse(doconv)
    conv_class = getattr(keras.layers, f"Conv{rank}D")
    doconv_class = getattr(doconv_tf, f"DOConv{rank}D")

    def count(model, cls):
        return sum(type(layer) is cls for layer in model.layers)

    # stem, 8 in the blocks, 3 projection shortcuts
    assert count(native, conv_class) == convs == count(doconv, doconv_class) == \
        count(fused, conv_class)
    x = np.random.default_rng(0).standard_normal(
        (2, *native.inputs[0].shape[1:])).astype("float32")
    expected = native.predict_on_batch(x)
    for model in (doconv, fused):
        np.testing.assert_allclose(model.predict_on_batch(x), expected, rtol=1e-4, atol=1e-5)


def test_rank_layer_shapes_are_the_issue_s():
    assert bench_keras.RANK_LAYERS == {
        1: (16, [("k3 256ch L1024", 256, 256, 3, 1, 1, 1, (1024,))]),
        3: (4, [("3x3x3 64ch 16x28x28", 64, 64, 3, 1, 1, 1, (16, 28, 28))])}


def test_depthwise_shape_is_timed_against_depthwise_conv2d():
    # The Keras layer a depthwise conv is written with, which doconv_tf.convert replaces.
    native = bench_keras._native_layer(8, 8, 3, 1, "same", 8)
    assert type(native) is keras.layers.DepthwiseConv2D
    assert type(bench_keras._native_layer(8, 16, 3, 1, "same", 2)) is keras.layers.Conv2D
