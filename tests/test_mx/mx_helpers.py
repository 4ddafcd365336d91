"""Helpers for the MXNet adapter tests."""

import mxnet as mx

import doconv_core
from doconv_mx._blocks import walk
from doconv_mx.layer import LAYER_CLASSES, _gluon_padding


def gluon_padding(spec):
    """The explicit padding Gluon's conv would need for ``spec``, or None if Gluon has none."""
    try:
        return _gluon_padding(spec)
    except ValueError:
        return None


def unsupported_reason(spec):
    """Why Gluon has no layer for ``spec`` (the adapter's own message), or None."""
    try:
        _gluon_padding(spec)
    except ValueError as error:
        return str(error)
    return None


def blocks(net):
    """Every block under ``net`` (each position of a shared one)."""
    return [child for _, _, _, child in walk(net)]


def count(net, kind):
    return sum(isinstance(block, kind) for block in blocks(net))


def make_layer(spec, arrays, *, hybridize=False, deferred=False, dtype="float64"):
    """The DO-Conv layer of the spec's rank for a core case, holding the case's arrays."""
    layer = LAYER_CLASSES[spec.rank](
        spec.out_channels, spec.kernel_size, spec.stride, gluon_padding(spec), spec.dilation,
        spec.groups, use_bias=spec.bias, in_channels=0 if deferred else spec.in_channels,
        D_mul=spec.D_mul)
    layer.initialize()
    layer.cast(dtype)
    if hybridize:
        layer.hybridize()
    x = mx.nd.array(arrays["x"], dtype=dtype)
    layer(x)  # completes a deferred in_channels
    full = doconv_core.DOConvParams(layer.spec, arrays["W"], arrays["D"], arrays["bias"])
    layer.set_params(full)
    return layer, x
