"""DOConv1D and DOConv3D (and DOConv2D where the rank is what is tested) against the NumPy
reference (doconv_core.doconv, doconv_vjp) on the core's 1-D and 3-D cases, and everything
DOConv2D offers, for every rank.

Tolerances: float64 outputs and gradients 1e-9 relative to their scale (MXNet's CPU
Convolution runs float64 for every rank); float32 1e-4.
"""

import inspect
import re

import mxnet as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mx_helpers import count, gluon_padding, make_layer, unsupported_reason
from mxnet import autograd, gluon
from mxnet.gluon import nn
from strategies import input_shape_for, layer_specs

import doconv_core
import doconv_mx
from doconv_core.testing.cases import rank_cases
from doconv_mx import DOConv1D, DOConv2D, DOConv3D, DOConvND
from doconv_mx.layer import LAYER_CLASSES, LAYOUTS

CASES = rank_cases()
SUPPORTED = [c for c in CASES if gluon_padding(c.spec) is not None]
# Gluon's Convolution pads each axis alike on both sides, with zeros, by a fixed amount:
# other padding modes, 'causal' and 'same' that is not such a padding are unsupported.
UNSUPPORTED = [c for c in CASES if gluon_padding(c.spec) is None]
NATIVE = {1: nn.Conv1D, 2: nn.Conv2D, 3: nn.Conv3D}
RANKS = pytest.mark.parametrize("rank", (1, 2, 3), ids=lambda rank: f"{rank}d")
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 6, 4)}  # input sizes for the hand-written tests


def close(actual, expected, tolerance, what=""):
    """max |actual - expected| <= tolerance * max(1, max |expected|)."""
    scale = max(1.0, float(np.abs(expected).max()) if np.size(expected) else 0.0)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale, err_msg=what)


def test_case_split_is_explicit():
    assert {c.spec.rank for c in SUPPORTED} == {1, 3}
    assert len(SUPPORTED) >= 25 and len(SUPPORTED) + len(UNSUPPORTED) == len(CASES)
    for case in UNSUPPORTED:
        spec = case.spec
        reason = unsupported_reason(spec)
        pads = spec.fixed_padding() if not (spec.padding == "same" and max(spec.stride) > 1) \
            else None
        if reason.startswith("padding_mode"):  # something is padded, with another mode
            assert spec.padding_mode != "zeros" and any(before for before, _ in pads)
        else:  # 'same' or 'causal' that is not one fixed symmetric padding here
            assert re.match(r"padding '(same|causal)' has no Gluon equivalent here", reason)
            assert pads is None or any(before != after for before, after in pads)
        arrays = case.arrays(np.float32)
        params = doconv_core.DOConvParams(spec, arrays["W"], arrays["D"], arrays["bias"])
        with pytest.raises(ValueError, match=re.escape(reason)):
            DOConvND.from_params(params)
    # Every padding kind and both ranks are among the supported cases.
    assert {str(c.spec.padding)[:5] for c in SUPPORTED} >= {"valid", "same", "(1,)"}
    assert any(c.spec.padding == "causal" for c in SUPPORTED)  # kernel size 1: pads nothing


def _grads(layer, x, R):
    """(y, {x, D, W, bias gradients}) of sum(layer(x) * R)."""
    x = x.copy()
    x.attach_grad()
    with autograd.record():
        y = layer(x)
        loss = (y * mx.nd.array(R, dtype=x.dtype)).sum()
    loss.backward()
    grads = {"x": x.grad.asnumpy()}
    for name in ("D", "W", "bias"):
        param = getattr(layer, name)
        if param is not None:
            grads[name] = param.grad().asnumpy()
    return y.asnumpy(), grads


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("case", SUPPORTED, ids=lambda c: c.name)
def test_float64_outputs_gradients_and_fusion_match_reference(case, hybridize):
    spec = case.spec
    arrays = case.arrays(np.float64)
    layer, x = make_layer(spec, arrays, hybridize=hybridize)
    assert type(layer) is LAYER_CLASSES[spec.rank]
    args = (arrays["x"], arrays["D"], arrays["W"], arrays["bias"], spec)
    expected = doconv_core.doconv(*args)
    close(layer(x).asnumpy(), expected, 1e-9, "inference")
    close(layer(x).asnumpy(), expected, 1e-9, "inference, cached kernel")
    R = np.random.default_rng(1).standard_normal(expected.shape)
    y, grads = _grads(layer, x, R)
    close(y, expected, 1e-9, "training")
    reference = doconv_core.doconv_vjp(*args, R)
    assert sorted(grads) == sorted(k for k, v in reference.items() if v is not None)
    for name, grad in grads.items():
        close(grad, reference[name], 1e-9, f"grad {name}")
    conv = layer.fuse()
    assert type(conv) is NATIVE[spec.rank]
    kernel = doconv_core.compose_kernel(arrays["D"], arrays["W"], groups=spec.groups,
                                        kernel_size=spec.kernel_size)
    np.testing.assert_allclose(conv.weight.data().asnumpy(), kernel, rtol=0, atol=1e-12)
    if hybridize:
        conv.hybridize()
    close(conv(x).asnumpy(), expected, 1e-9, "fused")


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("case", SUPPORTED[::3], ids=lambda c: c.name)
def test_float32_deferred_matches_reference(case, hybridize):
    spec = case.spec
    arrays = case.arrays(np.float32)
    layer, x = make_layer(spec, arrays, deferred=True, hybridize=hybridize, dtype="float32")
    assert layer.spec.same_function(spec) and layer.spec.in_channels == spec.in_channels
    as64 = {k: None if v is None else v.astype(np.float64) for k, v in arrays.items()}
    args = (as64["x"], as64["D"], as64["W"], as64["bias"], spec)
    expected = doconv_core.doconv(*args)
    R = np.random.default_rng(2).standard_normal(expected.shape)
    y, grads = _grads(layer, x, R)
    close(y, expected, 1e-4, "output")
    reference = doconv_core.doconv_vjp(*args, R)
    for name, grad in grads.items():
        close(grad, reference[name], 1e-4, f"grad {name}")


@pytest.mark.parametrize("rank", (1, 3), ids=lambda rank: f"{rank}d")
@settings(max_examples=15, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**16), hybridize=st.booleans())
def test_random_specs_match_reference(rank, data, seed, hybridize):
    spec = data.draw(layer_specs(padding_modes=("zeros",), rank=rank).filter(
        lambda s: gluon_padding(s) is not None), label="spec")
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.standard_normal(input_shape_for(spec)),
              "D": rng.standard_normal(spec.D_shape) if spec.has_D else None,
              "W": rng.standard_normal(spec.W_shape),
              "bias": rng.standard_normal(spec.out_channels) if spec.bias else None}
    layer, x = make_layer(spec, arrays, hybridize=hybridize, deferred=bool(seed % 2))
    expected = doconv_core.doconv(arrays["x"], arrays["D"], arrays["W"], arrays["bias"], spec)
    close(layer(x).asnumpy(), expected, 1e-9)


@RANKS
def test_signature_parity_with_gluon_conv(rank):
    layer_class, native = LAYER_CLASSES[rank], NATIVE[rank]
    assert layer_class.rank == rank and issubclass(layer_class, DOConvND)
    assert layer_class.__name__ == f"DOConv{rank}D"
    ours = inspect.signature(layer_class.__init__).parameters
    theirs = inspect.signature(native.__init__).parameters
    names = [n for n, p in theirs.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == names
    for name in names[1:]:
        assert ours[name].default == theirs[name].default, name
    assert ours["D_mul"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ours["D_mul"].default is None
    # Same positional call as Gluon's conv, prefix through **kwargs.
    args = (6, 3, 2, 1, 1, 2, LAYOUTS[rank], "relu", False, None, "zeros", 4)
    conv, layer = native(*args), layer_class(*args, prefix="mine_")
    assert layer.prefix == "mine_" and layer.layout == LAYOUTS[rank]
    assert layer.spec == doconv_core.ConvSpec(4, 6, 3, 2, 1, 1, 2, bias=False, rank=rank)
    for block in (conv, layer):
        block.initialize()
    x = mx.nd.random.normal(shape=(2, 4) + SPATIAL[rank])
    layer.set_params(doconv_core.DOConvParams(
        layer.spec, *doconv_core.embed_kernel(conv.weight.data().asnumpy(), groups=2)[::-1]))
    np.testing.assert_allclose(layer(x).asnumpy(), conv(x).asnumpy(), rtol=1e-6, atol=1e-6)
    assert layer.bias is None and sorted(layer._reg_params) == ["D", "W"]


def test_the_base_class_is_not_a_layer():
    with pytest.raises(TypeError, match="DOConvND is the base of DOConv1D, DOConv2D and "
                                        "DOConv3D; build one of those"):
        DOConvND(4, 3, 1, 0, 1, 1, "NCHW", None, True, None, "zeros", 0)


@RANKS
def test_initialisation_follows_gluon_conv(rank):
    """D = 0; W chunks drawn like the native conv's weight (same initializer, conv fan-in)."""
    layer = LAYER_CLASSES[rank](16, 3, in_channels=8, D_mul=3 ** rank + 2)
    conv = NATIVE[rank](16, 3, in_channels=8)
    for block in (layer, conv):
        block.initialize(mx.init.Xavier(magnitude=3))
    W = layer.W.data().asnumpy()
    assert W.shape == (16, 8, 3 ** rank + 2) and np.all(layer.D.data().asnumpy() == 0)
    volume = 3 ** rank
    bound = np.sqrt(3 / ((8 * volume + 16 * volume) / 2))  # Xavier uniform bound, conv kernel
    assert np.abs(conv.weight.data().asnumpy()).max() <= bound
    assert 0.9 * bound < np.abs(W).max() <= bound
    assert np.std(W) == pytest.approx(np.std(conv.weight.data().asnumpy()), rel=0.1)


@pytest.mark.parametrize("rank", (1, 3), ids=lambda rank: f"{rank}d")
def test_deferred_in_channels_inside_hybridized_parent(tmp_path, rank):
    layer_class = LAYER_CLASSES[rank]
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(layer_class(6, 3, groups=2, D_mul=3 ** rank + 2),
                layer_class(4, 1, activation="relu"),
                layer_class(5, (3,) + (1,) * (rank - 1), padding=(1,) + (0,) * (rank - 1)))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    x = mx.nd.random.normal(shape=(2, 4) + tuple(s + 3 for s in SPATIAL[rank]))
    y = net(x)
    assert [blk.spec.in_channels for blk in net] == [4, 6, 4]  # read from W's inferred shape
    assert net[0].W.shape == (6, 2, 3 ** rank + 2) and net[0].D.shape == (4, 3 ** rank,
                                                                           3 ** rank + 2)
    assert net[1].D is None and net[1].W.shape == (4, 6, 1)
    h = x.asnumpy()
    for blk in net:
        p = blk.to_params()
        h = doconv_core.doconv(h, p.D, p.W, p.bias, p.spec)
        if blk is net[1]:
            h = np.maximum(h, 0)
    close(y.asnumpy(), h, 1e-5)
    net.export(str(tmp_path / "deferred"))
    block = gluon.SymbolBlock.imports(str(tmp_path / "deferred-symbol.json"), ["data"],
                                      str(tmp_path / "deferred-0000.params"))
    np.testing.assert_array_equal(block(x).asnumpy(), y.asnumpy())
    assert len(block.collect_params().keys()) == 8  # W, D, bias; W, bias; W, D, bias


@RANKS
def test_inference_cache_is_reused_and_never_stale(monkeypatch, rank):
    layer = LAYER_CLASSES[rank](4, 3, padding=1, in_channels=2, D_mul=3 ** rank + 1)
    layer.initialize(mx.init.Xavier())
    x = mx.nd.random.normal(shape=(1, 2) + SPATIAL[rank])
    calls = []
    original = DOConvND._compose
    monkeypatch.setattr(DOConvND, "_compose",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    first = layer(x).asnumpy()
    layer(x)
    assert len(calls) == 1
    layer.D.data()[:] = 0.1  # a write: recomposed once, then reused again
    changed = layer(x).asnumpy()
    layer(x)
    assert len(calls) == 2 and not np.allclose(changed, first)
    p = layer.to_params()
    close(changed, doconv_core.doconv(x.asnumpy(), p.D, p.W, p.bias, p.spec), 1e-5)


@pytest.mark.parametrize("rank", (1, 3), ids=lambda rank: f"{rank}d")
def test_params_round_trip_and_rank_checks(tmp_path, rank):
    case = next(c for c in SUPPORTED if c.spec.rank == rank and c.spec.has_D)
    arrays = case.arrays(np.float32)
    layer, x = make_layer(case.spec, arrays, dtype="float32")
    params = layer.to_params()
    assert params.spec.rank == rank
    np.testing.assert_array_equal(params.W, arrays["W"])
    for build in (LAYER_CLASSES[rank].from_params, DOConvND.from_params):
        clone = build(params, activation="relu")
        assert type(clone) is LAYER_CLASSES[rank] and clone._activation == "relu"
        np.testing.assert_array_equal(clone(x).asnumpy(), np.maximum(layer(x).asnumpy(), 0))
    other = LAYER_CLASSES[2 if rank != 2 else 1]
    with pytest.raises(ValueError, match=f"params hold a {rank}-D layer .*; {other.__name__} "
                                         f"is {other.rank}-D: use DOConv{rank}D"):
        other.from_params(params)
    net = nn.HybridSequential()
    net.add(layer)
    path = tmp_path / "net.npz"
    doconv_mx.export_params(net, path)
    assert doconv_core.load_params(path)["0"].spec.rank == rank
    s = case.spec
    fresh = nn.HybridSequential()
    fresh.add(LAYER_CLASSES[rank](s.out_channels, s.kernel_size, s.stride, gluon_padding(s),
                                  s.dilation, s.groups, use_bias=s.bias, D_mul=s.D_mul))
    fresh.initialize()
    assert doconv_mx.import_params(fresh, path) == ["0"]  # completes the deferred in_channels
    np.testing.assert_array_equal(fresh(x).asnumpy(), layer(x).asnumpy())
    # The same layer in another rank is another function: refused, nothing changed.
    wrong = nn.HybridSequential()
    wrong.add(other(s.out_channels, s.kernel_size[0], groups=s.groups))
    wrong.initialize()
    with pytest.raises(doconv_core.CheckpointError, match="layer '0' was saved with"):
        doconv_mx.import_params(wrong, path)
    assert wrong[0].spec.in_channels is None


@RANKS
def test_fuse_keeps_parameter_settings_and_activation(rank):
    layer = LAYER_CLASSES[rank](4, 3, padding=1, in_channels=2, activation="tanh")
    layer.initialize(mx.init.Xavier())
    layer.D.set_data(mx.nd.random.normal(shape=layer.D.shape))
    layer.W.lr_mult, layer.W.wd_mult, layer.W.grad_req = 0.5, 0.0, "add"
    layer.bias.lr_mult, layer.bias.grad_req = 2.0, "null"
    conv = layer.fuse()
    assert type(conv) is NATIVE[rank] and conv.prefix == layer.prefix
    assert conv._kwargs["layout"] == LAYOUTS[rank]
    weight, bias = conv.weight, conv.bias
    assert (weight.lr_mult, weight.wd_mult, weight.grad_req) == (0.5, 0.0, "add")
    assert (bias.lr_mult, bias.grad_req) == (2.0, "null")
    x = mx.nd.random.normal(shape=(2, 2) + SPATIAL[rank])
    np.testing.assert_allclose(conv(x).asnumpy(), layer(x).asnumpy(), rtol=1e-5, atol=1e-6)


@RANKS
def test_inputs_of_another_rank_name_the_expected_ndim(rank):
    layer_class, ndim, layout = LAYER_CLASSES[rank], rank + 2, LAYOUTS[rank]
    for known in (True, False):
        layer = layer_class(4, 3, in_channels=2 if known else 0)
        layer.initialize()
        for hybridize in (False, True):
            layer.hybridize(hybridize)
            for wrong in (ndim - 1, ndim + 1):
                shape = (1, 2) + (6,) * (wrong - 2)
                with pytest.raises(ValueError, match=re.escape(
                        f"input must be {ndim}-D ({layout}), got shape {shape}")):
                    layer(mx.nd.ones(shape))
        assert layer.spec.in_channels == (2 if known else None)  # nothing fixed
    with pytest.raises(ValueError, match=re.escape(
            "input must have 2 channels (the layer's in_channels), got 3")):
        layer_class(4, 3, in_channels=2)(mx.nd.ones((1, 3) + (6,) * rank))


@pytest.mark.parametrize("rank", (1, 3), ids=lambda rank: f"{rank}d")
def test_an_input_of_another_rank_through_a_hybridized_parent_changes_nothing(rank):
    parent = nn.HybridSequential()
    parent.add(LAYER_CLASSES[rank](4, 3, padding=1, groups=2))
    parent.initialize()
    parent.hybridize()
    layer = parent[0]
    with pytest.raises(ValueError, match="shape cannot be inferred|Input data should be"):
        parent(mx.nd.ones((2, 4) + (8,) * (rank + 1)))
    assert layer.spec.in_channels is None and layer.W.shape[1] == 0
    out = parent(mx.nd.ones((2, 4) + (8,) * rank))
    assert out.shape == (2, 4) + (8,) * rank and layer.spec.in_channels == 4


ERRORS = [
    (1, dict(kernel_size=(3, 3)),
     "kernel_size must be an integer >= 1 or a sequence of one of them, got 2 values"),
    (3, dict(kernel_size=(3, 3)),
     "kernel_size must be an integer >= 1 or a triple of them, got 2 values"),
    (1, dict(kernel_size=3, strides=(1, 1)),
     "strides must be an integer >= 1 or a sequence of one of them, got 2 values"),
    (3, dict(kernel_size=3, padding=(1, 1)),
     "padding must be an integer >= 0 or a triple of them, got 2 values"),
    (1, dict(kernel_size=3, padding="causal"),
     "padding must be an integer >= 0 or a sequence of one of them, got 'causal'"),
    (3, dict(kernel_size=3, padding="same"),
     "padding must be an integer >= 0 or a triple of them, got 'same'"),
    (1, dict(kernel_size=3, layout="NWC"),
     r"layout must be 'NCW' \(MXNet 1.9's CPU Convolution supports no other 1-D layout\), "
     r"got 'NWC'"),
    (3, dict(kernel_size=3, layout="NDHWC"),
     r"layout must be 'NCDHW' \(MXNet 1.9's CPU Convolution supports no other 3-D layout\), "
     r"got 'NDHWC'"),
    (1, dict(kernel_size=5, D_mul=4), "D_mul must be >= kernel length = 5, got 4"),
    (3, dict(kernel_size=(3, 1, 2), D_mul=5),
     "D_mul must be >= kernel volume = 6 for a 3x1x2 kernel, got 5"),
    (3, dict(kernel_size=1, D_mul=2), "D_mul must be 1 or None for a 1x1x1 kernel"),
    (1, dict(kernel_size=3, groups=3), r"channels must be divisible by groups \(3\), got 4"),
]


@pytest.mark.parametrize("rank,kwargs,message", ERRORS, ids=[m[:40] for *_, m in ERRORS])
def test_bad_arguments_raise_clear_errors(rank, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LAYER_CLASSES[rank](4, **kwargs)


def test_load_legacy_is_two_dimensional_only():
    for layer in (DOConv1D(4, 3, in_channels=2), DOConv3D(4, 3, in_channels=2)):
        layer.initialize()
        with pytest.raises(doconv_core.CheckpointError, match=re.escape(
                "the legacy checkpoint has arrays ['weight'] for layer 'layer', a "
                f"{layer.rank}-D layer: the original DO-Conv layers were 2-D only, so "
                "load_legacy loads 2-D layers only")):
            doconv_mx.load_legacy(layer, {"weight": np.zeros((4, 2) + (3,) * layer.rank)})
    net = nn.HybridSequential()
    net.add(DOConv2D(4, 3, padding=1, in_channels=3), DOConv1D(4, 3, in_channels=4),
            DOConv3D(2, 3, in_channels=4))
    net.initialize()
    before = [p.data().asnumpy().copy() for p in net.collect_params().values()]
    rng = np.random.default_rng(0)
    legacy = {"0.weight": rng.standard_normal((4, 3, 3, 3)),
              "0.D": rng.standard_normal((9, 9, 3)), "0.bias": rng.standard_normal(4)}
    with pytest.raises(doconv_core.CheckpointError, match=re.escape(
            "cannot fill the model's 1-D/3-D layers ['1', '2']: the original DO-Conv layers "
            "were 2-D only, so load_legacy loads 2-D layers only (pass strict=False")):
        doconv_mx.load_legacy(net, legacy)
    with pytest.raises(doconv_core.CheckpointError, match=re.escape(
            "has arrays ['2.bias'] for layer '2', a 3-D layer")):
        doconv_mx.load_legacy(net, dict(legacy, **{"2.bias": np.zeros(2)}), strict=False)
    for param, value in zip(net.collect_params().values(), before):
        np.testing.assert_array_equal(param.data().asnumpy(), value)  # nothing changed
    report = doconv_mx.load_legacy(net, legacy, strict=False)
    assert report.exact == ["0"] and report.missing_keys == ["1.weight", "2.weight"]
    assert net[0].to_params().W.shape == (4, 3, 9)
    np.testing.assert_allclose(net[0].W.data().asnumpy().reshape(4, 3, 3, 3), legacy["0.weight"],
                               rtol=1e-6)


def test_a_mixed_rank_net_counts_each_rank():
    net = nn.HybridSequential()
    net.add(DOConv1D(2, 3), DOConv2D(2, 3), DOConv3D(2, 3))
    assert count(net, DOConvND) == 3
    assert [type(layer) for layer in doconv_mx.doconv_layers(net).values()] == [
        DOConv1D, DOConv2D, DOConv3D]


@pytest.mark.parametrize("rank", (1, 3), ids=lambda rank: f"{rank}d")
def test_convert_keeps_convs_waiting_for_their_first_input(rank):
    native = NATIVE[rank]
    net = nn.HybridSequential()
    net.add(native(4, 3, padding=1), native(3, 1, bias_initializer=mx.init.Normal(1.0)))
    net.initialize(mx.init.Xavier())
    net[1].weight.set_data(mx.nd.ones((3, 4) + (1,) * rank))  # shape and values known
    bias = net[1].bias.data().asnumpy()
    converted = doconv_mx.convert(net)
    assert [type(layer) for layer in converted] == [LAYER_CLASSES[rank]] * 2
    assert converted[0].spec.in_channels is None and net[0].weight._data is None
    x = mx.nd.random.normal(shape=(2, 5) + SPATIAL[rank])
    y = converted(x)
    assert y.shape == (2, 3) + SPATIAL[rank] and converted[0].spec.in_channels == 5
    assert converted[0].W.shape == (4, 5, 3 ** rank) and not converted[0].D.data().asnumpy().any()
    np.testing.assert_array_equal(converted[1].fuse().weight.data().asnumpy(),
                                  np.ones((3, 4) + (1,) * rank))
    np.testing.assert_array_equal(converted[1].bias.data().asnumpy(), bias)
    np.testing.assert_allclose(doconv_mx.fuse(converted)(x).asnumpy(), y.asnumpy(), rtol=1e-5,
                               atol=1e-5)
