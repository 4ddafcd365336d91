"""Gluon: bad inputs and checkpoints are refused before any state changes."""

import re

import mxnet as mx
import numpy as np
import pytest
from mxnet.gluon import nn

import doconv_mx
from doconv_core import CheckpointError
from doconv_mx import DOConv2D
from checkpoint_files import as_int64, rewrite_npz


@pytest.mark.parametrize("hybridize", [False, True])
def test_a_bad_first_input_does_not_fix_in_channels(hybridize):
    layer = DOConv2D(4, 3, padding=1)
    layer.initialize()
    if hybridize:
        layer.hybridize()
    with pytest.raises(ValueError,
                       match=re.escape("input must be 4-D (NCHW), got shape (4, 8, 8)")):
        layer(mx.nd.ones((4, 8, 8)))
    assert layer.spec.in_channels is None and layer.W.shape[1] == 0  # nothing changed
    out = layer(mx.nd.ones((2, 4, 8, 8)))  # the correct input still works
    assert out.shape == (2, 4, 8, 8) and layer.spec.in_channels == 4


@pytest.mark.parametrize("nested", [False, True])
def test_a_bad_first_input_through_a_hybridized_parent_does_not_fix_in_channels(nested):
    """The parent infers the deferred shapes of its whole graph, in MXNet, with no Python
    call to the layer: a wrong input gets MXNet's own error there (a ValueError, as for
    nn.Conv2D), and nothing changed."""
    parent = nn.HybridSequential()
    inner = nn.HybridSequential()
    inner.add(DOConv2D(4, 3, padding=1, groups=2))
    parent.add(inner if nested else inner[0])
    parent.initialize()
    parent.hybridize()
    layer = inner[0]
    with pytest.raises(ValueError, match=r"Input data should be 4D"):
        parent(mx.nd.ones((4, 8, 8)))
    assert layer.spec.in_channels is None and layer.W.shape[1] == 0 and layer.D.shape[0] == 0
    with pytest.raises(ValueError, match=r"shape cannot be inferred"):
        parent(mx.nd.ones((2, 3, 8, 8)))  # 3 channels in 2 groups
    assert layer.spec.in_channels is None and layer.W.shape[1] == 0
    out = parent(mx.nd.ones((2, 4, 8, 8)))  # the correct input still works
    assert out.shape == (2, 4, 8, 8) and layer.spec.in_channels == 4


def test_a_bad_input_inside_a_hybridized_graph_changes_nothing():
    parent = nn.HybridSequential()
    parent.add(nn.Dense(8, flatten=False), DOConv2D(4, 3))
    parent.initialize()
    parent.hybridize()
    with pytest.raises(ValueError, match=r"Input data should be 4D"):
        parent(mx.nd.ones((2, 5, 6)))
    assert parent[1].spec.in_channels is None


def test_a_3d_input_to_a_known_layer_is_reported_as_3d():
    layer = DOConv2D(8, 3, in_channels=4)
    layer.initialize()
    with pytest.raises(ValueError,
                       match=re.escape("input must be 4-D (NCHW), got shape (4, 8, 8)")):
        layer(mx.nd.ones((4, 8, 8)))
    with pytest.raises(ValueError, match=re.escape(
            "input must have 4 channels (the layer's in_channels), got 8")):
        layer(mx.nd.ones((1, 8, 8, 8)))
    assert layer(mx.nd.ones((1, 4, 8, 8))).shape == (1, 8, 6, 6)


def net(initialize_second=True):
    block = nn.HybridSequential()
    block.add(DOConv2D(4, 3, padding=1, in_channels=3), DOConv2D(2, 3, padding=1, in_channels=4))
    block[0].initialize()
    if initialize_second:
        block[1].initialize()
    return block


def values(block):
    return {name: p.data().asnumpy().copy() for name, p in block.collect_params().items()
            if p._data is not None}


def assert_unchanged(block, before):
    after = values(block)
    assert sorted(after) == sorted(before)
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_import_params_into_a_partly_initialized_net_changes_nothing(tmp_path):
    path = tmp_path / "p.npz"
    doconv_mx.export_params(net(), path)
    target = net(initialize_second=False)
    before = values(target)
    with pytest.raises(CheckpointError, match=re.escape(
            f"cannot load {str(path)!r}: layers ['1'] are not initialized; call initialize() "
            "first")):
        doconv_mx.import_params(target, path)
    assert_unchanged(target, before)
    target[1].initialize()
    doconv_mx.import_params(target, path)  # usable afterwards


def test_import_params_with_an_integer_W_changes_nothing(tmp_path):
    path = tmp_path / "p.npz"
    doconv_mx.export_params(net(), path)
    rewrite_npz(path, as_int64("1/W"))
    target = net()
    before = values(target)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{str(path)!r}: layer '1': W must hold floating-point numbers (float16, float32 "
            "or float64), got dtype int64")):
        doconv_mx.import_params(target, path)
    assert_unchanged(target, before)


@pytest.mark.parametrize("load", ["import_params", "load_legacy"])
def test_imports_inside_autograd_record_with_a_frozen_first_layer(tmp_path, load):
    # Recording, MXNet refuses writes to arrays marked for autograd but not to frozen
    # (grad_req 'null') ones: the first layer used to take its values, the second to fail.
    source = net()
    source.initialize(mx.init.Normal(1), force_reinit=True)
    path = tmp_path / "p.safetensors"
    doconv_mx.export_params(source, path)
    target = net()
    target[0].collect_params().setattr("grad_req", "null")
    with mx.autograd.record():
        if load == "import_params":
            assert doconv_mx.import_params(target, path) == ["0", "1"]
        else:
            doconv_mx.load_legacy(target, legacy_weights(target))
    if load == "import_params":
        assert all(np.array_equal(a, b) for a, b in zip(values(target).values(),
                                                        values(source).values(), strict=True))
    else:  # both layers took the legacy arrays
        expected = legacy_weights(target)
        for name in ("0", "1"):
            np.testing.assert_allclose(target[int(name)].bias.data().asnumpy(),
                                       expected[f"{name}.bias"], rtol=1e-6)
    # Gradients still reach the trainable layer.
    x = mx.nd.ones((1, 3, 5, 5))
    with mx.autograd.record():
        y = target(x).sum()
    y.backward()
    assert target[1].W.grad().abs().sum().asscalar() > 0


def legacy_weights(block, dtype=np.float64):
    """Arrays the original Gluon layers of ``block`` would have saved (D_mul = M*N)."""
    rng = np.random.default_rng(0)
    weights = {}
    for name, layer in doconv_mx.doconv_layers(block).items():
        s = layer.spec
        prefix = f"{name}." if name else ""
        weights[prefix + "weight"] = rng.standard_normal(s.kernel_shape).astype(dtype)
        weights[prefix + "D"] = rng.standard_normal((s.mn, s.mn, s.in_channels)).astype(dtype)
        weights[prefix + "bias"] = rng.standard_normal(s.out_channels).astype(dtype)
    return weights


def test_load_legacy_with_an_integer_weight_changes_nothing():
    layer = DOConv2D(4, 3, in_channels=2)
    layer.initialize()
    before = values(layer)
    with pytest.raises(CheckpointError, match=re.escape(
            "the legacy checkpoint: layer 'layer': weight must hold floating-point "
            "numbers (float16, float32 or float64), got dtype int64")):
        doconv_mx.load_legacy(layer, {"weight": np.zeros((4, 2, 3, 3), dtype=np.int64),
                                      "D": np.zeros((9, 9, 2)), "bias": np.zeros(4)})
    assert_unchanged(layer, before)


def test_load_legacy_into_a_partly_initialized_net_changes_nothing():
    weights = legacy_weights(net())
    target = net(initialize_second=False)
    before = values(target)
    with pytest.raises(CheckpointError, match=re.escape(
            "cannot load the legacy checkpoint: layers ['1'] are not initialized; call "
            "initialize() first")):
        doconv_mx.load_legacy(target, weights)
    assert_unchanged(target, before)
    target[1].initialize()
    report = doconv_mx.load_legacy(target, weights)
    assert report.exact == ["0", "1"] and report.missing_keys == report.unexpected_keys == []


def test_load_legacy_with_a_bad_second_layer_changes_nothing():
    weights = legacy_weights(net())
    weights["1.D"] = weights["1.D"][:, :, :3]  # one channel too few
    target = net()
    before = values(target)
    with pytest.raises(CheckpointError, match=re.escape(
            "the legacy checkpoint: layer '1': D must have shape (9, 9, 4)")):
        doconv_mx.load_legacy(target, weights)
    assert_unchanged(target, before)


def test_load_legacy_strict_and_not():
    """Strict: every layer and no other key; otherwise both are reported."""
    weights = legacy_weights(net())
    partial = {k: v for k, v in weights.items() if not k.startswith("1.")}
    partial["head.weight"] = np.zeros(3)
    target = net()
    before = values(target)
    with pytest.raises(CheckpointError, match=re.escape(
            "the legacy checkpoint has no '1.weight' for layer '1'")):
        doconv_mx.load_legacy(target, partial)
    with pytest.raises(CheckpointError, match=re.escape(
            "holds keys that are not arrays of this model's DO-Conv layers: ['head.weight']")):
        doconv_mx.load_legacy(target, {**weights, "head.weight": np.zeros(3)})
    assert_unchanged(target, before)
    report = doconv_mx.load_legacy(target, partial, strict=False)
    assert list(report.layers) == ["0"] and report.exact == ["0"]
    assert report.missing_keys == ["1.weight"] and report.unexpected_keys == ["head.weight"]
    after = values(target)
    assert all(np.array_equal(after[k], before[k]) for k in before if k.startswith(
        target[1].prefix))
    assert not np.array_equal(after[target[0].W.name], before[target[0].W.name])
    with pytest.raises(ValueError, match="strict must be True or False"):
        doconv_mx.load_legacy(target, weights, strict=1)
