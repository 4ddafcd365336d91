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


def test_load_legacy_params_with_an_integer_weight_changes_nothing():
    layer = DOConv2D(4, 3, in_channels=2)
    layer.initialize()
    before = values(layer)
    with pytest.raises(CheckpointError, match=re.escape(
            f"the original Gluon arrays: layer {layer.name!r}: weight must hold floating-point "
            "numbers (float16, float32 or float64), got dtype int64")):
        doconv_mx.load_legacy_params(layer, weight=np.zeros((4, 2, 3, 3), dtype=np.int64),
                                     D=np.zeros((9, 9, 2)), bias=np.zeros(4))
    assert_unchanged(layer, before)
