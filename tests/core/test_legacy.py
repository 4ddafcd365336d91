"""Import of the authors' original checkpoints.

The original layers' kernels are recomputed here the way their code computes them
(the same reshapes and einsums, ported to NumPy), independently of the channel maps
in doconv_core.legacy.
"""

import itertools
import re

import numpy as np
import pytest

import doconv_core as dc
from doconv_core.testing.cases import channels_for

GROUP_KINDS = ("one", "between", "depthwise", "depthwise_multiplier")


def original_torch_kernel(D, W, D_diag, spec):
    C_out, I_g, (M, N) = spec.out_channels, spec.in_per_group, spec.kernel_size
    if D is None:
        return W.reshape(C_out, I_g, M, N)
    W_r = W.reshape(C_out // spec.groups, spec.in_channels, spec.D_mul)
    return np.einsum("ims,ois->oim", D + D_diag, W_r).reshape(C_out, I_g, M, N)


def original_tf_kernel(D, W, spec):
    """HWIO, as tf.nn.conv2d takes it."""
    (M, N), I_g, C_out = spec.kernel_size, spec.in_per_group, spec.out_channels
    if D is None:
        return W.reshape(M, N, I_g, C_out)
    mn = M * N
    D_diag = np.tile(np.eye(mn).reshape(mn, mn, 1), (1, spec.D_mul // mn, spec.in_channels))
    if spec.D_mul % mn:
        D_diag = np.concatenate([D_diag, np.zeros((mn, spec.D_mul % mn, spec.in_channels))], 1)
    W_r = W.reshape(spec.D_mul, spec.in_channels, -1)
    return np.einsum("msi,sio->mio", D + D_diag, W_r).reshape(M, N, I_g, C_out)


def original_gluon_kernel(D, weight, spec):
    """OIHW, as the original Gluon layer hands it to its conv."""
    if D is None:
        return weight
    M, N = spec.kernel_size
    W = np.transpose(weight, (2, 3, 1, 0)).reshape(M * N, spec.in_channels, -1)
    D_total = D + np.eye(M * N).reshape(M * N, M * N, 1)
    DoW = np.sum(D_total[..., None] * W[None], axis=1)
    return np.transpose(DoW.reshape(M, N, spec.in_per_group, spec.out_channels), (3, 2, 0, 1))


def specs(gluon=False):
    for kind, kernel, extra in itertools.product(GROUP_KINDS, [(3, 3), (1, 1), (1, 3)], (0, 4)):
        if gluon and extra:
            continue
        C_in, C_out, groups = channels_for(kind, 2, 3, 2)
        D_mul = None if kernel == (1, 1) else kernel[0] * kernel[1] + extra
        yield kind, dc.ConvSpec(C_in, C_out, kernel, groups=groups, D_mul=D_mul)


def spec_id(item):
    kind, spec = item
    return f"{kind}-{spec.kernel_size[0]}x{spec.kernel_size[1]}-D_mul{spec.D_mul}"


def random_arrays(spec, shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {name: None if shape is None else rng.standard_normal(shape)
            for name, shape in shapes.items()}


@pytest.mark.parametrize("item", list(specs()), ids=spec_id)
def test_torch_import(item):
    kind, spec = item
    arrays = random_arrays(spec, {"W": spec.W_shape, "D": spec.D_shape, "bias": (spec.out_channels,)})
    D_diag = dc.identity_d(spec.in_channels, spec.mn, spec.D_mul) if spec.has_D else None
    result = dc.import_legacy_torch(spec, D_diag=D_diag, **arrays)
    expected = original_torch_kernel(arrays["D"], arrays["W"], D_diag, spec)
    np.testing.assert_allclose(result.params.kernel(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(result.params.bias, arrays["bias"])
    # The original PyTorch mapping equals the paper's when g == 1 or C_out == g (plain depthwise).
    should_be_exact = spec.groups == 1 or spec.out_channels == spec.groups or not spec.has_D
    assert result.exact == should_be_exact
    if should_be_exact:
        assert result.method == "identical"
        np.testing.assert_array_equal(result.params.W, arrays["W"])
        np.testing.assert_array_equal(result.params.D, arrays["D"])
    else:
        assert result.method == "embedded composed kernel"
        assert not result.params.D.any()


@pytest.mark.parametrize("item", list(specs()), ids=spec_id)
def test_tf_import_is_always_exact(item):
    kind, spec = item
    shapes = {"W": (spec.D_mul, spec.in_per_group, spec.out_channels),
              "D": (spec.mn, spec.D_mul, spec.in_channels) if spec.has_D else None,
              "bias": (spec.out_channels,)}
    arrays = random_arrays(spec, shapes)
    result = dc.import_legacy_tf(spec, **arrays)
    expected = dc.hwio_to_oihw(original_tf_kernel(arrays["D"], arrays["W"], spec))
    np.testing.assert_allclose(result.params.kernel(), expected, rtol=1e-12, atol=1e-12)
    assert result.exact
    # The paper's mapping matches TensorFlow's for g == 1 and depthwise (with multiplier);
    # in between, TensorFlow's is a relabelling of D's channels.
    expected_method = "permuted D channels" if kind == "between" and spec.has_D else "identical"
    assert result.method == expected_method
    # Exact means the very parameters: W unchanged (canonical layout), D only permuted.
    np.testing.assert_array_equal(result.params.W, arrays["W"].transpose(2, 1, 0))
    if spec.has_D:
        original_D = arrays["D"].transpose(2, 0, 1)
        assert sorted(map(bytes, result.params.D)) == sorted(map(bytes, original_D))


@pytest.mark.parametrize("item", list(specs(gluon=True)), ids=spec_id)
def test_gluon_import_is_exact(item):
    kind, spec = item
    shapes = {"weight": spec.kernel_shape,
              "D": (spec.mn, spec.mn, spec.in_channels) if spec.has_D else None,
              "bias": (spec.out_channels,)}
    arrays = random_arrays(spec, shapes)
    result = dc.import_legacy_gluon(spec, **arrays)
    expected = original_gluon_kernel(arrays["D"], arrays["weight"], spec)
    np.testing.assert_allclose(result.params.kernel(), expected, rtol=1e-12, atol=1e-12)
    assert result.exact


def test_legacy_import_errors():
    spec = dc.ConvSpec(4, 4, 3, groups=2)
    W = np.zeros(spec.W_shape)
    D = np.zeros(spec.D_shape)
    with pytest.raises(dc.CheckpointError, match=r"W must have shape \(4, 2, 9\) in the original PyTorch layout"):
        dc.import_legacy_torch(spec, W=W[:, :1], D=D, bias=np.zeros(4))
    with pytest.raises(dc.CheckpointError, match=r"needs D with shape \(4, 9, 9\)"):
        dc.import_legacy_torch(spec, W=W, bias=np.zeros(4))
    with pytest.raises(dc.CheckpointError, match="D_diag is not the fixed identity"):
        dc.import_legacy_torch(spec, W=W, D=D, D_diag=D, bias=np.zeros(4))
    with pytest.raises(dc.CheckpointError, match="bias was given but this layer has none"):
        dc.import_legacy_tf(dc.ConvSpec(4, 4, 3, bias=False), W=np.zeros((9, 4, 4)),
                            D=np.zeros((9, 9, 4)), bias=np.zeros(4))
    with pytest.raises(dc.CheckpointError, match="supports only D_mul = M\\*N = 9"):
        dc.import_legacy_gluon(dc.ConvSpec(4, 4, 3, D_mul=10), weight=np.zeros((4, 4, 3, 3)))
    assert issubclass(dc.CheckpointError, ValueError)


@pytest.mark.parametrize("layout,array", [("torch-legacy", "W"), ("tf-legacy", "W"),
                                          ("gluon-legacy", "weight")])
def test_prepare_legacy_is_two_dimensional_only(layout, array):
    layers = {"flat": dc.ConvSpec(2, 4, 3, rank=1), "image": dc.ConvSpec(2, 4, 1, bias=False),
              "volume": dc.ConvSpec(2, 4, 3, rank=3)}
    with pytest.raises(dc.CheckpointError, match=re.escape(
            f"cannot fill the model's 1-D/3-D layers ['flat', 'volume']: the original DO-Conv "
            f"layers were 2-D only")):
        dc.prepare_legacy({}, layers, layout=layout, strict=True, loads_other_keys=False)
    for strict in (True, False):
        with pytest.raises(dc.CheckpointError, match=re.escape(
                f"has arrays ['volume.{array}'] for layer 'volume', a 3-D layer")):
            dc.prepare_legacy({f"volume.{array}": np.zeros(3)}, layers, layout=layout,
                              strict=strict, loads_other_keys=False)
    shape = {"torch-legacy": (4, 2, 1), "tf-legacy": (1, 2, 4), "gluon-legacy": (4, 2, 1, 1)}
    weights = {f"image.{array}": np.ones(shape[layout])}
    results, remaining, missing = dc.prepare_legacy(weights, layers, layout=layout,
                                                    strict=False, loads_other_keys=False)
    assert list(results) == ["image"] and remaining == {}
    assert missing == [f"flat.{array}", f"volume.{array}"]


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("importer", ["torch", "tf"])
def test_16_bit_checkpoints_import_composed_in_float32(half, importer):
    # A grouped torch checkpoint embeds its composed kernel (which NumPy's einsum cannot
    # compute in bfloat16); the kernel is composed in float32 and stored in the input dtype.
    dtype = np.dtype(np.float16) if half == "float16" else np.dtype(
        pytest.importorskip("ml_dtypes").bfloat16)
    spec = dc.ConvSpec(4, 8, 3, groups=2)
    rng = np.random.default_rng(0)
    if importer == "torch":
        W = rng.standard_normal(spec.W_shape).astype(dtype)
        D = rng.standard_normal(spec.D_shape).astype(dtype)
        D_diag = dc.identity_d(spec.in_channels, spec.mn, spec.D_mul)
        result = dc.import_legacy_torch(spec, W=W, D=D, bias=np.zeros(8, dtype))
        expected = original_torch_kernel(D.astype(np.float32), W.astype(np.float32), D_diag,
                                         spec)
        assert result.method == "embedded composed kernel"
    else:
        W = rng.standard_normal((spec.D_mul, spec.in_per_group, 8)).astype(dtype)
        D = rng.standard_normal((spec.mn, spec.D_mul, spec.in_channels)).astype(dtype)
        result = dc.import_legacy_tf(spec, W=W, D=D, bias=np.zeros(8, dtype))
        expected = dc.hwio_to_oihw(original_tf_kernel(D.astype(np.float32),
                                                      W.astype(np.float32), spec))
    params = result.params
    assert params.W.dtype == dtype and params.D.dtype == dtype
    assert params.kernel().dtype == dtype
    np.testing.assert_allclose(params.kernel().astype(np.float32), expected,
                               rtol=1e-2, atol=1e-2)
