"""DOConv2D against the NumPy reference (doconv_core) on the core's property cases.

Tolerances: float64 outputs 1e-10 absolute; float32 1e-4 relative to the output scale.
"""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mx_helpers import gluon_padding, make_layer, unsupported_reason
from mxnet import autograd, gluon
from mxnet.gluon import nn
from strategies import input_shape_for, layer_specs

import doconv_core
import doconv_mx
from doconv_core.testing.cases import property_cases
from doconv_mx import DOConv2D

ROOT = Path(__file__).resolve().parents[2]
CASES = property_cases()
SUPPORTED = [c for c in CASES if gluon_padding(c.spec) is not None]
# Gluon's Convolution pads with zeros only and has no 'same' string: cases padding with
# another mode, and 'same' cases that are not a fixed symmetric padding, are unsupported.
UNSUPPORTED = [c for c in CASES if gluon_padding(c.spec) is None]


def test_case_split_is_explicit():
    assert len(SUPPORTED) >= 30 and len(SUPPORTED) + len(UNSUPPORTED) == len(CASES)
    for case in UNSUPPORTED:
        spec = case.spec
        reason = unsupported_reason(spec)
        if reason.startswith("padding_mode"):  # something is padded, with another mode
            assert spec.padding_mode != "zeros" and spec.padding not in ("valid", (0, 0))
        else:  # 'same' is not one fixed symmetric padding here
            assert reason.startswith("padding 'same' has no Gluon equivalent here")
            assert spec.padding == "same"
            assert any(s != 1 or (k - 1) * d % 2 for k, s, d in
                       zip(spec.kernel_size, spec.stride, spec.dilation))
        arrays = case.arrays(np.float32)
        params = doconv_core.DOConvParams(spec, arrays["W"], arrays["D"], arrays["bias"])
        with pytest.raises(ValueError, match=re.escape(reason)):
            DOConv2D.from_params(params)
    # Nothing padded: the padding mode does not matter ('same' of a 1x1 kernel pads nothing).
    assert any(c.spec.padding == "same" and c.spec.padding_mode != "zeros"
               and c.spec.kernel_size == (1, 1) for c in SUPPORTED)


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("case", SUPPORTED, ids=lambda c: c.name)
def test_outputs_and_fused_kernel_match_reference(case, hybridize):
    arrays = case.arrays(np.float64)
    layer, x = make_layer(case.spec, arrays, hybridize=hybridize)
    expected = doconv_core.doconv2d(arrays["x"], arrays["D"], arrays["W"], arrays["bias"],
                                    case.spec)
    np.testing.assert_allclose(layer(x).asnumpy(), expected, rtol=0, atol=1e-10)
    features = doconv_core.doconv2d_features(arrays["x"], arrays["D"], arrays["W"],
                                             arrays["bias"], case.spec)
    np.testing.assert_allclose(layer(x).asnumpy(), features, rtol=0, atol=1e-10)
    conv = layer.fuse()
    assert type(conv) is nn.Conv2D
    kernel = doconv_core.compose_kernel(arrays["D"], arrays["W"], groups=case.spec.groups,
                                        kernel_size=case.spec.kernel_size)
    np.testing.assert_allclose(conv.weight.data().asnumpy(), kernel, rtol=0, atol=1e-12)
    if hybridize:
        conv.hybridize()
    np.testing.assert_allclose(conv(x).asnumpy(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", SUPPORTED[::6], ids=lambda c: c.name)
def test_float32_deferred_matches_reference(case):
    arrays = case.arrays(np.float32)
    layer, x = make_layer(case.spec, arrays, deferred=True, dtype="float32")
    assert layer.spec == doconv_core.ConvSpec(**{**case.spec.to_dict(),
                                                 "padding": gluon_padding(case.spec),
                                                 "padding_mode": "zeros"})
    expected = doconv_core.doconv2d(*(arrays[k].astype(np.float64) if arrays[k] is not None
                                      else None for k in ("x", "D", "W", "bias")), case.spec)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(layer(x).asnumpy(), expected, rtol=0, atol=1e-4 * scale)


GRAD_CASES = [c for c in SUPPORTED if c.spec.has_D][::5]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.name)
def test_gradients_match_compose_kernel_vjp(case):
    """dL/dW, dL/dD from MXNet equal the core's VJP of dL/dK (dL/dK from MXNet's conv)."""
    spec = case.spec
    arrays = case.arrays(np.float64)
    layer, x = make_layer(spec, arrays)
    rng = np.random.default_rng(1)
    out = layer(x)
    R = mx.nd.array(rng.standard_normal(out.shape), dtype="float64")
    x.attach_grad()
    with autograd.record():
        loss = (layer(x) * R).sum()
    loss.backward()
    conv = layer.fuse()
    x2 = x.copy()
    x2.attach_grad()
    with autograd.record():
        loss2 = (conv(x2) * R).sum()
    loss2.backward()
    grad_K = conv.weight.grad().asnumpy()
    grad_D, grad_W = doconv_core.compose_kernel_vjp(grad_K, arrays["D"], arrays["W"],
                                                    groups=spec.groups,
                                                    kernel_size=spec.kernel_size)
    np.testing.assert_allclose(layer.W.grad().asnumpy(), grad_W, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(layer.D.grad().asnumpy(), grad_D, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(x.grad.asnumpy(), x2.grad.asnumpy(), rtol=1e-9, atol=1e-9)
    if spec.bias:
        np.testing.assert_allclose(layer.bias.grad().asnumpy(), conv.bias.grad().asnumpy(),
                                   rtol=1e-9, atol=1e-9)


def test_gradients_match_finite_differences():
    """Central differences of the NumPy reference, float64, every entry of D and W (1e-6)."""
    spec = doconv_core.ConvSpec(4, 4, (3, 2), stride=(1, 2), padding=(1, 0), groups=2,
                                D_mul=8)
    rng = np.random.default_rng(3)
    arrays = {"x": rng.standard_normal((2, 4, 5, 6)), "D": 0.5 * rng.standard_normal(spec.D_shape),
              "W": rng.standard_normal(spec.W_shape), "bias": rng.standard_normal(4)}
    layer, x = make_layer(spec, arrays)
    R = rng.standard_normal(layer(x).shape)

    def loss(D, W):
        return float((doconv_core.doconv2d(arrays["x"], D, W, arrays["bias"], spec) * R).sum())

    with autograd.record():
        out = (layer(x) * mx.nd.array(R, dtype="float64")).sum()
    out.backward()
    eps = 1e-6
    for name, grad in (("D", layer.D.grad().asnumpy()), ("W", layer.W.grad().asnumpy())):
        numeric = np.zeros_like(arrays[name])
        for index in np.ndindex(arrays[name].shape):
            plus = {k: arrays[k].copy() for k in ("D", "W")}
            minus = {k: arrays[k].copy() for k in ("D", "W")}
            plus[name][index] += eps
            minus[name][index] -= eps
            numeric[index] = (loss(**plus) - loss(**minus)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-6)


def test_signature_parity_with_nn_conv2d():
    ours = inspect.signature(DOConv2D.__init__).parameters
    theirs = inspect.signature(nn.Conv2D.__init__).parameters
    names = [n for n, p in theirs.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [n for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == names
    for name in names[1:]:
        assert ours[name].default == theirs[name].default, name
    assert ours["D_mul"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ours["D_mul"].default is None
    # Same positional call as nn.Conv2D, prefix/params through **kwargs.
    args = (6, (3, 3), (2, 1), (1, 1), (1, 1), 2, "NCHW", "relu", False, None, "zeros", 4)
    conv, layer = nn.Conv2D(*args), DOConv2D(*args, prefix="mine_")
    assert layer.prefix == "mine_"
    assert layer.spec == doconv_core.ConvSpec(4, 6, (3, 3), (2, 1), (1, 1), (1, 1), 2,
                                              bias=False)
    for layer_ in (conv, layer):
        layer_.initialize()
    x = mx.nd.random.normal(shape=(2, 4, 7, 7))
    layer.set_params(doconv_core.DOConvParams(
        layer.spec, *doconv_core.embed_kernel(conv.weight.data().asnumpy(), groups=2)[::-1]))
    np.testing.assert_allclose(layer(x).asnumpy(), conv(x).asnumpy(), rtol=1e-6, atol=1e-6)
    assert layer.bias is None and sorted(layer._reg_params) == ["D", "W"]


def test_initialisation_follows_nn_conv2d():
    """D = 0; W chunks drawn like nn.Conv2D's weight (same initializer, conv fan-in)."""
    layer = DOConv2D(64, 3, in_channels=32, D_mul=20)
    conv = nn.Conv2D(64, 3, in_channels=32)
    for block in (layer, conv):
        block.initialize(mx.init.Xavier(magnitude=3))
    W = layer.W.data().asnumpy()
    assert W.shape == (64, 32, 20) and np.all(layer.D.data().asnumpy() == 0)
    bound = np.sqrt(3 / ((32 * 9 + 64 * 9) / 2))  # Xavier uniform bound for the conv kernel
    assert np.abs(conv.weight.data().asnumpy()).max() <= bound
    assert np.abs(W).max() <= bound and np.abs(W).max() > 0.9 * bound
    assert np.std(W) == pytest.approx(np.std(conv.weight.data().asnumpy()), rel=0.05)
    explicit = DOConv2D(4, 3, in_channels=2, weight_initializer=mx.init.Constant(0.5))
    explicit.initialize(mx.init.Xavier())
    assert np.all(explicit.W.data().asnumpy() == 0.5)
    default = DOConv2D(4, 3, in_channels=2)
    default.initialize()  # Gluon's global default Uniform(0.07), as for nn.Conv2D
    assert 0 < np.abs(default.W.data().asnumpy()).max() <= 0.07


def test_deferred_in_channels_inside_hybridized_parent(tmp_path):
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(DOConv2D(6, 3, groups=2, D_mul=11), DOConv2D(4, (1, 1), activation="relu"),
                DOConv2D(5, (3, 1), padding=(1, 0)))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    x = mx.nd.random.normal(shape=(2, 4, 9, 9))
    y = net(x)
    stored = [blk._spec for blk in net]
    assert [blk.spec.in_channels for blk in net] == [4, 6, 4]  # read from W's inferred shape
    assert all(blk._spec is spec for blk, spec in zip(net, stored))  # reading changed nothing
    assert net[0].W.shape == (6, 2, 11) and net[0].D.shape == (4, 9, 11)
    assert net[1].D is None and net[1].W.shape == (4, 6, 1)
    h = x
    for blk in net:
        p = blk.to_params()
        h = doconv_core.doconv2d(h.asnumpy() if hasattr(h, "asnumpy") else h,
                                 p.D, p.W, p.bias, p.spec)
        if blk is net[1]:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(y.asnumpy(), h, rtol=1e-4, atol=1e-5)
    # The graph built before C_in was known (with its shape ties) exports and reloads.
    net.export(str(tmp_path / "deferred"))
    block = gluon.SymbolBlock.imports(str(tmp_path / "deferred-symbol.json"), ["data"],
                                      str(tmp_path / "deferred-0000.params"))
    np.testing.assert_array_equal(block(x).asnumpy(), y.asnumpy())
    assert len(block.collect_params().keys()) == 8  # W, D, bias; W, bias; W, D, bias: no identity


def test_export_imports_identical_and_saves_no_identity(tmp_path):
    layer = DOConv2D(6, 3, padding=1, groups=3, in_channels=3, D_mul=12, activation="tanh")
    layer.initialize(mx.init.Xavier())
    layer.D.set_data(mx.nd.random.normal(shape=layer.D.shape))
    layer.hybridize()
    x = mx.nd.random.normal(shape=(2, 3, 8, 8))
    expected = layer(x).asnumpy()
    prefix = str(tmp_path / "doconv")
    layer.export(prefix)
    saved = mx.nd.load(prefix + "-0000.params")
    assert sorted(k.split("_")[-1] for k in saved) == ["D", "W", "bias"]
    block = gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"], prefix + "-0000.params")
    np.testing.assert_array_equal(block(x).asnumpy(), expected)
    # save/load_parameters round trip as well
    layer.save_parameters(str(tmp_path / "p.params"))
    other = DOConv2D(6, 3, padding=1, groups=3, in_channels=3, D_mul=12, activation="tanh")
    other.load_parameters(str(tmp_path / "p.params"))
    np.testing.assert_array_equal(other(x).asnumpy(), expected)


@pytest.fixture(params=["write counters", "value comparison"])
def staleness_check(request, monkeypatch):
    """Both ways the inference cache notices changes: MXNet's write counters (read through
    doconv_mx._versions), and exact comparison with copies where those cannot be read."""
    if request.param == "value comparison":
        monkeypatch.setattr(doconv_mx._versions, "available", lambda: False)
    else:
        assert doconv_mx._versions.available(), doconv_mx._versions.reason
    return request.param


def test_inference_cache_is_reused_and_never_stale(monkeypatch, tmp_path, staleness_check):
    layer = DOConv2D(4, 3, in_channels=2, D_mul=10)
    layer.initialize(mx.init.Xavier())
    x = mx.nd.random.normal(shape=(1, 2, 6, 6))
    calls = []
    original = DOConv2D._compose
    monkeypatch.setattr(DOConv2D, "_compose",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    previous = layer(x).asnumpy()
    layer(x)
    assert len(calls) == 1  # second inference reused the kernel

    other = DOConv2D(4, 3, in_channels=2, D_mul=10)
    other.initialize(mx.init.Normal(0.5))
    other.D.set_data(mx.nd.random.normal(shape=other.D.shape))
    other.save_parameters(str(tmp_path / "other.params"))
    trainer = gluon.Trainer(layer.collect_params(), "sgd", {"learning_rate": 0.5})
    rng = np.random.default_rng(0)

    def slice_add():
        layer.W.data()[0, 0, 0] += 1.0

    def numpy_assign():
        layer.W.data()[:] = 0.3 * rng.standard_normal(layer.W.shape)

    def op_out():
        D = layer.D.data()
        mx.nd.elemwise_add(D, D, out=D)

    def pending():  # still queued when the layer is called: the check must wait for it
        a = mx.nd.random.normal(shape=(384, 384))
        D = layer.D.data()
        mx.nd.broadcast_add(D, mx.nd.dot(a, a).mean().reshape((1, 1, 1)), out=D)

    def train_step():
        with autograd.record():
            loss = layer(x).sum()
        loss.backward()
        trainer.step(1)

    # In-place changes by every route, then the ones that replace the arrays (new values,
    # same values on another context, same values in another dtype).
    routes = [
        ("set_data", lambda: layer.D.set_data(mx.nd.ones(layer.D.shape) * 0.1)),
        ("slice assignment", slice_add), ("numpy assignment", numpy_assign),
        ("op with out=", op_out), ("pending write", pending), ("Trainer step", train_step),
        ("load_parameters", lambda: layer.load_parameters(str(tmp_path / "other.params"))),
        ("initialize(force_reinit)",
         lambda: layer.initialize(mx.init.Normal(0.3), force_reinit=True)),
        ("reset_ctx", lambda: layer.collect_params().reset_ctx(mx.cpu(1))),
        ("cast", lambda: layer.cast("float64")),
    ]
    for route, change in routes:
        change()
        if route == "reset_ctx":
            x = x.as_in_context(mx.cpu(1))
        if route == "cast":
            assert not layer._cache
            x = x.astype("float64")
        composed = len(calls)
        y = layer(x)
        assert y.context == x.context and y.dtype == x.dtype, route
        out = y.asnumpy()
        p = layer.to_params()
        expected = doconv_core.doconv2d(x.asnumpy(), p.D, p.W, p.bias, p.spec)
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 * scale, err_msg=route)
        if route not in ("reset_ctx", "cast"):  # those two keep the values
            assert not np.allclose(out, previous), route  # the route changed the function
        assert len(calls) == composed + 1, route
        layer(x)
        assert len(calls) == composed + 1, route  # and the new kernel is reused
        assert [key[0] for key in layer._cache] == [x.context], route
        previous = out


def test_inference_cache_hit_reads_write_counters_only(monkeypatch):
    """A cache hit neither recomposes, nor compares values, nor copies W or D: the cache
    holds the parameters' own arrays and MXNet's count of writes to each."""
    assert doconv_mx._versions.available(), doconv_mx._versions.reason
    layer = DOConv2D(8, 3, padding=1, in_channels=8, D_mul=12)
    layer.initialize(mx.init.Xavier())
    x = mx.nd.random.normal(shape=(2, 8, 5, 5))
    expected = layer(x).asnumpy()
    W, D = layer.W.data(), layer.D.data()
    ((_, (W_held, D_held, _, _)),) = layer._cache.items()
    assert W_held is W and D_held is D  # no copies kept
    calls = []
    original = DOConv2D._compose
    monkeypatch.setattr(DOConv2D, "_compose",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))

    def refuse(*args, **kwargs):
        raise AssertionError("the cache check read values")

    monkeypatch.setattr(mx.nd.contrib, "allclose", refuse)
    monkeypatch.setattr(mx.nd.NDArray, "copy", refuse)
    for _ in range(3):
        np.testing.assert_array_equal(layer(x).asnumpy(), expected)
    assert calls == []
    D[0, 0, 0] = 0.5  # one write: one recomposition, then hits again
    changed = layer(x).asnumpy()
    layer(x)
    assert calls == [1] and not np.array_equal(changed, expected)


def test_write_counters_count_every_write_and_no_read():
    versions = doconv_mx._versions
    assert versions.available(), versions.reason
    a, b = mx.nd.zeros((3, 4)), mx.nd.ones((3, 4))
    count, other = versions.version(a), versions.version(b)
    assert count[0] != other[0]  # one engine variable per array

    def view_assign():
        a[1][:] = 2.0

    writes = [lambda: a.__iadd__(1), view_assign, lambda: a.reshape((12,)).__iadd__(1),
              lambda: a.detach().__iadd__(1), lambda: a.__setitem__(slice(None), np.ones((3, 4))),
              lambda: mx.nd.elemwise_add(b, b, out=a)]
    for write in writes:
        write()
        now = versions.version(a)
        assert now[0] == count[0] and now[1] > count[1]
        count = now
    (a * b).asnumpy()
    a.asnumpy()
    assert versions.version(a) == count and versions.version(b) == other  # reads: no change


@pytest.mark.parametrize("name,delta", [("_HANDLE_BYTES", 8), ("_HANDLE_BYTES", -8),
                                        ("_VECTOR_BYTES", -8), ("_SHARED_PTR_BYTES", -16)])
def test_write_counter_probe_refuses_other_layouts(monkeypatch, name, delta):
    """A build laid out differently is recognised as such (no crash, no wrong counter)."""
    versions = doconv_mx._versions
    monkeypatch.setattr(versions, name, getattr(versions, name) + delta)
    offset, reason = versions._probe()
    assert offset is None and reason


def test_write_counters_under_naive_engine(tmp_path):
    """MXNET_ENGINE_TYPE=NaiveEngine (synchronous, its own variable type) counts writes too."""
    script = tmp_path / "naive.py"
    script.write_text(
        "import mxnet as mx, numpy as np\n"
        "import doconv_mx\n"
        "assert doconv_mx._versions.available(), doconv_mx._versions.reason\n"
        "layer = doconv_mx.DOConv2D(4, 3, in_channels=2)\n"
        "layer.initialize(mx.init.Xavier())\n"
        "x = mx.nd.ones((1, 2, 5, 5))\n"
        "first = layer(x).asnumpy()\n"
        "layer.D.data()[:] = 0.5\n"
        "assert not np.allclose(layer(x).asnumpy(), first)\n")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "MXNET_ENGINE_TYPE": "NaiveEngine", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_core_container_round_trip(tmp_path):
    case = SUPPORTED[3]
    arrays = case.arrays(np.float32)
    layer, x = make_layer(case.spec, arrays, dtype="float32")
    params = layer.to_params()
    np.testing.assert_array_equal(params.W, arrays["W"])
    clone = DOConv2D.from_params(params)
    np.testing.assert_array_equal(clone(x).asnumpy(), layer(x).asnumpy())
    net = nn.HybridSequential()
    net.add(layer)
    path = tmp_path / "net.npz"
    doconv_mx.export_params(net, path)
    assert sorted(doconv_core.load_params(path)) == ["0"]
    fresh = nn.HybridSequential()
    fresh.add(DOConv2D(case.spec.out_channels, case.spec.kernel_size, case.spec.stride,
                       gluon_padding(case.spec), case.spec.dilation, case.spec.groups,
                       use_bias=case.spec.bias, D_mul=case.spec.D_mul))
    fresh.initialize()
    doconv_mx.import_params(fresh, path)  # also completes the deferred in_channels
    np.testing.assert_array_equal(fresh(x).asnumpy(), layer(x).asnumpy())
    wrong = nn.HybridSequential()
    wrong.add(DOConv2D(case.spec.out_channels + case.spec.groups, case.spec.kernel_size))
    wrong.initialize()
    with pytest.raises(doconv_core.CheckpointError, match="layer '0' was saved with"):
        doconv_mx.import_params(wrong, path)
    # 'same' specs from other frameworks load where Gluon has an exact equivalent
    same = doconv_core.ConvSpec(2, 4, (3, 3), padding="same", D_mul=9)
    p = doconv_core.DOConvParams(same, np.ones(same.W_shape, np.float32),
                                 np.zeros(same.D_shape, np.float32), np.zeros(4, np.float32))
    assert DOConv2D.from_params(p).spec.padding == (1, 1)


@pytest.mark.parametrize("groups,in_channels,out_channels", [(1, 3, 4), (2, 4, 6), (3, 3, 6)])
def test_legacy_gluon_import(groups, in_channels, out_channels):
    rng = np.random.default_rng(groups)
    M = N = 3
    weight = rng.standard_normal((out_channels, in_channels // groups, M, N))
    D_legacy = 0.3 * rng.standard_normal((9, 9, in_channels))
    bias = rng.standard_normal(out_channels)
    layer = DOConv2D(out_channels, 3, padding=1, groups=groups)  # deferred in_channels
    layer.initialize()
    layer.cast("float64")
    report = doconv_mx.load_legacy(layer, {"weight": mx.nd.array(weight, dtype="float64"),
                                           "D": D_legacy, "bias": bias})
    assert report.exact == [doconv_core.ROOT_NAME] and report.function_preserving == []
    assert report.missing_keys == report.unexpected_keys == []
    assert layer.spec.in_channels == in_channels  # completed from the weight
    # The original's function, written out: slot (o, i) reads D channel i*g + o // O_g.
    O_g, I_g = out_channels // groups, in_channels // groups
    D_total = D_legacy.transpose(2, 0, 1) + doconv_core.identity_d(in_channels, 9, 9, np.float64)
    W = weight.reshape(out_channels, I_g, 9)
    kernel = np.zeros((out_channels, I_g, 9))
    for o in range(out_channels):
        for i in range(I_g):
            kernel[o, i] = D_total[i * groups + o // O_g] @ W[o, i]
    x = rng.standard_normal((2, in_channels, 6, 5))
    expected = doconv_core.conv2d(x, kernel.reshape(out_channels, I_g, M, N), bias, padding=1,
                                  groups=groups)
    np.testing.assert_allclose(layer(mx.nd.array(x, dtype="float64")).asnumpy(), expected,
                               rtol=1e-10, atol=1e-10)
    bad = DOConv2D(out_channels, 3, groups=groups, in_channels=in_channels, D_mul=10)
    bad.initialize()
    with pytest.raises(doconv_core.CheckpointError, match="supports only D_mul = M\\*N = 9"):
        doconv_mx.load_legacy(bad, {"weight": weight, "D": D_legacy, "bias": bias})


ERRORS = [
    (dict(channels=0, kernel_size=3), "channels must be an integer >= 1, got 0"),
    (dict(channels=3, kernel_size=3, groups=2), r"channels must be divisible by groups \(2\), got 3"),
    (dict(channels=4, kernel_size=(3, 3, 3)), "kernel_size must be an integer >= 1 or a pair of them, got 3 values"),
    (dict(channels=4, kernel_size=3, strides=0), "strides must be an integer >= 1 or a pair of them, got 0"),
    (dict(channels=4, kernel_size=3, padding=-1), "padding must be an integer >= 0 or a pair of them, got -1"),
    (dict(channels=4, kernel_size=3, padding="same"), "padding must be an integer >= 0 or a pair of them, got 'same'"),
    (dict(channels=4, kernel_size=3, dilation=(1, 0)), r"dilation must be an integer >= 1 or a pair of them, got \(1, 0\)"),
    (dict(channels=4, kernel_size=3, groups=0), "groups must be an integer >= 1, got 0"),
    (dict(channels=4, kernel_size=3, use_bias="yes"), "use_bias must be True or False, got 'yes' \\(str\\)"),
    (dict(channels=4, kernel_size=3, D_mul=4), "D_mul must be >= kernel height\\*width = 9 for a 3x3 kernel, got 4"),
    (dict(channels=4, kernel_size=1, D_mul=2), "D_mul must be 1 or None for a 1x1 kernel"),
    (dict(channels=4, kernel_size=3, D_mul=2.5), "D_mul must be an integer >= 1, got 2.5"),
    (dict(channels=4, kernel_size=3, in_channels=-1), "in_channels must be an integer >= 0, got -1"),
    (dict(channels=4, kernel_size=3, in_channels=3, groups=2), r"in_channels must be divisible by groups \(2\), got 3"),
    (dict(channels=4, kernel_size=3, layout="NHWC"), "layout must be 'NCHW' .*got 'NHWC'"),
    (dict(channels=4, kernel_size=3, activation="gelu"), "activation must be None or one of .*got 'gelu'"),
]


@pytest.mark.parametrize("kwargs,message", ERRORS, ids=[m[:30] for _, m in ERRORS])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DOConv2D(**kwargs)


def test_bad_inputs_and_states_raise_clear_errors():
    with pytest.raises(TypeError):
        DOConv2D(4, 3, (1, 1), (0, 0), (1, 1), 1, "NCHW", None, True, None, "zeros", 0, 9)
    layer = DOConv2D(4, 3, in_channels=2)
    with pytest.raises(ValueError, match="fuse needs an initialized layer"):
        layer.fuse()
    layer.initialize()
    for hybrid in (False, True):
        if hybrid:
            layer.hybridize()
        with pytest.raises(ValueError, match=r"input must have 2 channels \(the layer's in_channels\), got 3"):
            layer(mx.nd.ones((1, 3, 5, 5)))
    deferred = DOConv2D(4, 3, groups=2)
    deferred.initialize()
    with pytest.raises(ValueError, match=r"in_channels must be divisible by groups \(2\), got 3"):
        deferred(mx.nd.ones((1, 3, 5, 5)))
    assert deferred.spec.in_channels is None  # nothing changed
    with pytest.raises(ValueError, match="params must be DOConvParams"):
        layer.set_params({"W": 1})
    other = doconv_core.DOConvParams(doconv_core.ConvSpec(2, 4, 5), np.zeros((4, 2, 25)),
                                     np.zeros((2, 25, 25)), np.zeros(4))
    with pytest.raises(ValueError, match="params.spec must describe this layer's function"):
        layer.set_params(other)


@settings(max_examples=25)
@given(spec=layer_specs(padding_modes=("zeros",)).filter(lambda s: gluon_padding(s) is not None),
       seed=st.integers(0, 2**16), hybridize=st.booleans())
def test_random_specs_match_reference(spec, seed, hybridize):
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.standard_normal(input_shape_for(spec)),
              "D": rng.standard_normal(spec.D_shape) if spec.has_D else None,
              "W": rng.standard_normal(spec.W_shape),
              "bias": rng.standard_normal(spec.out_channels) if spec.bias else None}
    layer, x = make_layer(spec, arrays, hybridize=hybridize, deferred=bool(seed % 2))
    expected = doconv_core.doconv2d(arrays["x"], arrays["D"], arrays["W"], arrays["bias"], spec)
    np.testing.assert_allclose(layer(x).asnumpy(), expected, rtol=1e-10, atol=1e-10)
