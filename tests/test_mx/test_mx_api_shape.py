"""doconv_mx offers the adapters' common API (doconv_core.testing.api) with its semantics:
convert and fuse return a new net and leave the given one as it was."""

import re
import warnings

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon
from mxnet.gluon import nn

import doconv_core
import doconv_mx
from doconv_core.testing.api import COPYING_FUNCTIONS, api_problems
from doconv_mx import DOConv1D, DOConv2D, DOConv3D
from mx_helpers import blocks


def test_the_common_api():
    assert api_problems(doconv_mx) == []


class Net(nn.HybridBlock):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.stem = nn.Conv2D(6, 3, padding=1, in_channels=3, activation="relu")
            self.body = nn.HybridSequential()
            self.body.add(nn.Conv2D(6, 3, padding=1, groups=2, in_channels=6),
                          nn.BatchNorm(in_channels=6), nn.Conv2D(4, 1, in_channels=6))
            self.head = nn.Conv2D(2, 3, in_channels=4)

    def hybrid_forward(self, F, x):
        return self.head(self.body(self.stem(x)))


X = mx.nd.array(np.random.default_rng(0).standard_normal((2, 3, 8, 8)), dtype="float32")


def make_net(hybridize=True):
    net = Net()
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize()
    net(X)
    return net


def snapshot(net):
    """What convert and fuse must leave as it was: block types, parameters and their values,
    settings, hybridization."""
    params = {name: (p.data().asnumpy().copy(), p.grad_req, p.lr_mult, p.wd_mult,
                     tuple(p.list_ctx())) for name, p in net.collect_params().items()}
    return ([type(b) for b in [net] + blocks(net)], params,
            [getattr(b, "_active", None) for b in [net] + blocks(net)])


def assert_unchanged(net, before):
    types, params, active = snapshot(net)
    assert types == before[0] and active == before[2]
    assert sorted(params) == sorted(before[1])
    for name, (value, *settings) in params.items():
        np.testing.assert_array_equal(value, before[1][name][0], err_msg=name)
        assert settings == list(before[1][name][1:]), name


def prefixes(net):
    """The names of the parameters, less the array's own name (weight, W, D, bias, ...)."""
    return {name.rsplit("_", 1)[0] for name in net.collect_params()}


def train_step(net, lr=0.5):
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": lr})
    with autograd.record():
        loss = (net(X) ** 2).mean()
    loss.backward()
    trainer.step(X.shape[0])


def given(function, hybridize):
    """A net for one copying function to take."""
    net = make_net(hybridize)
    if function == "fuse":
        net = doconv_mx.convert(net)
        train_step(net)  # D != 0: the fused kernel differs from the embedded one
    return net


@pytest.mark.parametrize("hybridize", [False, True])
@pytest.mark.parametrize("function", COPYING_FUNCTIONS)
def test_copying_functions_leave_the_net_unchanged(function, hybridize):
    net = given(function, hybridize)
    expected = net(X).asnumpy()
    before = snapshot(net)
    result = getattr(doconv_mx, function)(net)
    assert result is not net
    assert_unchanged(net, before)
    np.testing.assert_array_equal(net(X).asnumpy(), expected)
    np.testing.assert_allclose(result(X).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    kind = DOConv2D if function == "convert" else nn.Conv2D
    assert all(isinstance(b, kind) for b in (result.stem, result.body[0], result.head))
    # The same layer names (prefixes), no array shared with the original.
    assert prefixes(result) == prefixes(net)
    mine = {id(p.data()) for p in net.collect_params().values()}
    assert not mine & {id(p.data()) for p in result.collect_params().values()}
    assert result._active == hybridize and result.stem._active == hybridize
    # The result trains on its own; the original neither moves nor stops training.
    train_step(result)
    assert not np.allclose(result(X).asnumpy(), expected, atol=1e-3)
    assert_unchanged(net, before)
    train_step(net)
    assert not np.allclose(net(X).asnumpy(), expected, atol=1e-3)


def test_copies_of_a_net_trained_on_two_contexts_stay_there():
    contexts = [mx.cpu(0), mx.cpu(1)]
    net = Net()
    net.initialize(mx.init.Xavier(), ctx=contexts)
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    with autograd.record():
        losses = [net(x).sum() for x in gluon.utils.split_and_load(X, contexts)]
    autograd.backward(losses)
    trainer.step(2)
    converted = doconv_mx.convert(net)
    assert converted.stem.W.list_ctx() == contexts
    assert converted.body[1].gamma.list_ctx() == contexts  # the copied BatchNorm too
    with autograd.record():
        losses = [converted(x).sum() for x in gluon.utils.split_and_load(X, contexts)]
    autograd.backward(losses)
    gluon.Trainer(converted.collect_params(), "sgd", {"learning_rate": 0.1}).step(2)


def test_bare_layers_give_the_other_layer():
    conv = nn.Conv2D(4, 3, in_channels=2)
    conv.initialize()
    before = conv.weight.data().asnumpy().copy()
    layer = doconv_mx.convert(conv, D_mul=10)
    assert type(layer) is DOConv2D and layer.spec.D_mul == 10
    assert type(conv) is nn.Conv2D and np.array_equal(conv.weight.data().asnumpy(), before)
    fused = doconv_mx.fuse(layer)
    assert type(fused) is nn.Conv2D and fused is not conv
    np.testing.assert_allclose(fused.weight.data().asnumpy(), before, rtol=0, atol=1e-6)
    assert isinstance(doconv_mx.doconv_layers(layer)[""], DOConv2D)


INCLUDES = [
    "body.*",
    ["body.0", "body.2"],
    lambda name, layer: name.startswith("body.") and isinstance(layer, nn.Conv2D),
    ("body.[02]",),
]


@pytest.mark.parametrize("include", INCLUDES, ids=["pattern", "list", "callable", "tuple"])
def test_include_patterns_lists_and_callables_pick_the_same_layers(include):
    net = make_net()
    converted = doconv_mx.convert(net, include=include)
    assert sorted(doconv_mx.doconv_layers(converted)) == ["body.0", "body.2"]
    assert type(converted.stem) is nn.Conv2D and type(converted.head) is nn.Conv2D


def test_the_callable_include_sees_the_given_nets_layers():
    net = make_net()
    seen = []
    doconv_mx.convert(net, include=lambda name, layer: seen.append((name, layer)) or True)
    assert seen == [("stem", net.stem), ("body.0", net.body[0]), ("body.2", net.body[2]),
                    ("head", net.head)]


@pytest.mark.parametrize("include", ["nothing*", [], lambda name, layer: False])
def test_convert_with_nothing_selected_raises_the_cores_error(include):
    net = make_net()
    kinds = "nn.Conv1D, nn.Conv2D or nn.Conv3D"
    message = str(doconv_core.nothing_to_convert(net, kinds, include))
    assert message.startswith(f"convert found no {kinds}")
    with pytest.raises(ValueError, match=re.escape(message)):
        doconv_mx.convert(net, include=include)
    for layer in (DOConv1D(2, 3), DOConv2D(2, 3), DOConv3D(2, 3)):
        with pytest.raises(ValueError, match=re.escape(
                str(doconv_core.nothing_to_convert(layer, kinds, None)))):
            doconv_mx.convert(layer)


def test_fuse_without_doconv_layers_warns_and_copies():
    net = make_net()
    before = snapshot(net)
    with pytest.warns(UserWarning, match=re.escape(doconv_core.nothing_to_fuse(
            net, "DOConv1D, DOConv2D or DOConv3D"))):
        result = doconv_mx.fuse(net)
    assert result is not net and type(result.stem) is nn.Conv2D
    assert_unchanged(net, before)
    np.testing.assert_array_equal(result(X).asnumpy(), net(X).asnumpy())


def test_fuse_with_doconv_layers_does_not_warn():
    net = doconv_mx.convert(make_net())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        doconv_mx.fuse(net)


def test_parameter_settings_survive_convert_and_fuse():
    net = make_net()
    net.stem.weight.lr_mult, net.stem.weight.wd_mult = 0.5, 0.0
    net.stem.weight.grad_req = "add"
    net.stem.bias.lr_mult, net.stem.bias.wd_mult, net.stem.bias.grad_req = 2.0, 3.0, "null"
    net.head.weight.grad_req = "null"
    converted = doconv_mx.convert(net)
    stem = converted.stem
    for param in (stem.W, stem.D):
        assert (param.lr_mult, param.wd_mult, param.grad_req) == (0.5, 0.0, "add")
    assert (stem.bias.lr_mult, stem.bias.wd_mult, stem.bias.grad_req) == (2.0, 3.0, "null")
    assert converted.head.W.grad_req == converted.head.D.grad_req == "null"
    assert (converted.body[0].W.lr_mult, converted.body[0].W.grad_req) == (1.0, "write")
    stem.W.lr_mult, stem.W.wd_mult = 0.25, 4.0  # W's settings are the fused weight's
    fused = doconv_mx.fuse(converted)
    weight, bias = fused.stem.weight, fused.stem.bias
    assert (weight.lr_mult, weight.wd_mult, weight.grad_req) == (0.25, 4.0, "add")
    assert (bias.lr_mult, bias.wd_mult, bias.grad_req) == (2.0, 3.0, "null")
    assert fused.head.weight.grad_req == "null"


def test_parameter_settings_of_convs_waiting_for_their_first_input():
    for initialize in (False, True):
        net = nn.HybridSequential()
        net.add(nn.Conv2D(4, 3))
        net[0].weight.lr_mult, net[0].weight.grad_req = 0.1, "null"
        net[0].bias.wd_mult = 0.0
        if initialize:
            net.initialize()
        layer = doconv_mx.convert(net)[0]
        assert (layer.W.lr_mult, layer.W.grad_req, layer.D.grad_req) == (0.1, "null", "null")
        assert layer.bias.wd_mult == 0.0


def test_doconv_layers_names_each_layer_once():
    net = doconv_mx.convert(make_net())
    layers = doconv_mx.doconv_layers(net)
    assert list(layers) == ["stem", "body.0", "body.2", "head"]
    assert layers["body.0"] is net.body[0]
    with pytest.raises(ValueError, match="model must be a gluon.Block, got int"):
        doconv_mx.doconv_layers(3)


def test_import_params_returns_the_sorted_layer_names(tmp_path):
    net = doconv_mx.convert(make_net())
    path = tmp_path / "net.npz"
    doconv_mx.export_params(net, path)
    assert doconv_mx.import_params(doconv_mx.convert(make_net()), path) == [
        "body.0", "body.2", "head", "stem"]
    layer = DOConv2D(4, 3, in_channels=2)
    layer.initialize()
    doconv_mx.export_params(layer, path)
    assert sorted(doconv_core.load_params(path)) == [doconv_core.ROOT_NAME]
    assert doconv_mx.import_params(layer, path) == [doconv_core.ROOT_NAME]
