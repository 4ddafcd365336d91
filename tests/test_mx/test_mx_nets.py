"""Whole nets: convert/fuse (GluonCV model zoo included), export, data-parallel training."""

import mxnet as mx
import numpy as np
import pytest
from gluoncv.model_zoo import get_model
from mxnet import autograd, gluon
from mxnet.gluon import nn

import doconv_core
import doconv_mx
from doconv_mx import DOConv2D
from mx_helpers import count as _count


class Custom(nn.HybridBlock):
    """Children registered as attributes, one inside a HybridSequential."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.stem = nn.Conv2D(6, 3, padding=1, in_channels=3, activation="relu")
            self.body = nn.HybridSequential()
            self.body.add(nn.Conv2D(6, 3, padding=1, groups=6),
                          nn.BatchNorm(),
                          nn.Conv2D(4, 1, use_bias=False))
            self.head = nn.Conv2D(2, (1, 3), strides=(1, 2))

    def hybrid_forward(self, F, x):
        return self.head(self.body(self.stem(x)))


@pytest.mark.parametrize("hybridize", [False, True])
def test_convert_fuse_custom_net(tmp_path, hybridize):
    net = Custom()
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize()
    x = mx.nd.random.normal(shape=(2, 3, 8, 8))
    expected = net(x).asnumpy()
    original = net
    net = doconv_mx.convert(original, D_mul=12)
    assert net is not original and _count(original, DOConv2D) == 0
    assert isinstance(net.stem, DOConv2D) and net._children["stem"] is net.stem
    assert isinstance(net.body[0], DOConv2D) and isinstance(net.body[2], DOConv2D)
    assert net.body[0].spec.D_mul == 12 and net.body[2].spec.D_mul == 1  # 1x1: no D
    assert net.stem.prefix.endswith("conv0_") and net.stem._active == hybridize
    np.testing.assert_allclose(net(x).asnumpy(), expected, rtol=0, atol=1e-6)
    # train a step so D != 0, then fusing must keep the function
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01})
    with autograd.record():
        loss = (net(x) ** 2).mean()
    loss.backward()
    trainer.step(2)
    assert np.abs(net.stem.D.data().asnumpy()).max() > 0
    np.testing.assert_array_equal(original(x).asnumpy(), expected)  # the original: untouched
    trained = net(x).asnumpy()
    fused = doconv_mx.fuse(net)
    assert _count(fused, DOConv2D) == 0 and type(fused.stem) is nn.Conv2D
    assert _count(net, DOConv2D) == 4 and isinstance(net.stem, DOConv2D)
    np.testing.assert_allclose(fused(x).asnumpy(), trained, rtol=1e-5, atol=1e-5)
    fused.hybridize()
    np.testing.assert_allclose(fused(x).asnumpy(), trained, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(net(x).asnumpy(), trained)
    net = fused
    net.export(str(tmp_path / "fused"))
    block = gluon.SymbolBlock.imports(str(tmp_path / "fused-symbol.json"), ["data"],
                                      str(tmp_path / "fused-0000.params"))
    np.testing.assert_allclose(block(x).asnumpy(), trained, rtol=1e-5, atol=1e-5)


def test_convert_include_and_errors():
    net = Custom()
    net.initialize()
    one = doconv_mx.convert(net, include=["body.0"])
    assert isinstance(one.body[0], DOConv2D) and type(one.stem) is nn.Conv2D
    head = doconv_mx.convert(one, include=lambda name, conv: name == "head")
    assert isinstance(head.head, DOConv2D) and isinstance(head.body[0], DOConv2D)
    assert type(head.stem) is nn.Conv2D and type(one.head) is nn.Conv2D
    with pytest.raises(ValueError, match="include must be None, a callable"):
        doconv_mx.convert(net, include=3)
    with pytest.raises(ValueError, match="layer 'stem': D_mul must be >= kernel height"):
        doconv_mx.convert(net, D_mul=4)
    assert _count(net, DOConv2D) == 0
    fresh = Custom()  # uninitialized: fresh DOConv2D layers, initialized later
    fresh = doconv_mx.convert(fresh)
    fresh.initialize()
    assert fresh(mx.nd.ones((1, 3, 8, 8))).shape == (1, 2, 8, 3)
    unready = nn.HybridSequential()
    unready.add(DOConv2D(4, 3))
    with pytest.raises(ValueError, match="fuse needs an initialized layer"):
        doconv_mx.fuse(unready)


@pytest.mark.parametrize("hybridize", [False, True])
def test_convert_after_initialize_before_first_forward(hybridize):
    """initialize() leaves convs with deferred in_channels (a model-zoo stem) undrawn until the
    first forward; convert keeps them waiting the same way, so that forward works."""
    net = get_model("resnet18_v1", pretrained=False)
    contexts = [mx.cpu(0), mx.cpu(1)]
    net.initialize(mx.init.Xavier(), ctx=contexts)
    if hybridize:
        net.hybridize()
    stem, embedded = net.features[0], net.features[5][0].body[0]
    assert stem.weight._data is None and embedded.weight._data is not None
    kernel = embedded.weight.data().asnumpy()
    original, net = net, doconv_mx.convert(net)
    assert _count(net, nn.Conv2D) == 0 and type(original.features[0]) is nn.Conv2D
    assert original.features[0].weight._data is None  # still waiting for its first input
    with pytest.raises(ValueError, match="layer 'features.0': fuse needs an initialized layer"):
        doconv_mx.fuse(net)  # nothing drawn yet: refused, naming the layer
    x = mx.nd.random.normal(shape=(4, 3, 32, 32))
    assert net(x).shape == (4, 1000)
    stem = net.features[0]
    assert isinstance(stem, DOConv2D) and stem.spec.in_channels == 3
    assert stem.W.list_ctx() == contexts and stem.W.shape == (64, 3, 49)
    W = stem.W.data().asnumpy()
    bound = np.sqrt(3 / ((3 * 49 + 64 * 49) / 2))  # Xavier's, as for the stem's own weight
    assert 0.9 * bound < np.abs(W).max() <= bound and np.all(stem.D.data().asnumpy() == 0)
    params = net.features[5][0].body[0].to_params()  # initialized convs: embedded exactly
    np.testing.assert_array_equal(params.W[..., :9].reshape(kernel.shape), kernel)
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()  # (a plain sum has no gradient through BN)
    parts = zip(gluon.utils.split_and_load(x, contexts),
                gluon.utils.split_and_load(mx.nd.array([3, 7, 1, 0]), contexts))
    with autograd.record():
        losses = [loss_fn(net(a), b) for a, b in parts]
    autograd.backward(losses)
    trainer.step(4)
    assert np.abs(stem.D.data().asnumpy()).max() > 0  # the new stem trains


def test_convert_deferred_convs_keep_dtype_bias_grad_req_and_set_data():
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, padding=1, bias_initializer=mx.init.Normal(1.0)),
            nn.Conv2D(3, 3, padding=1), nn.Conv2D(2, 1))
    net.initialize(mx.init.Xavier())
    net.cast("float64")
    bias = net[0].bias.data().asnumpy()
    net[0].weight.grad_req = "null"
    # A weight set before the first forward fixes the shape and the values: embedded exactly.
    kernel = np.random.default_rng(0).standard_normal((3, 4, 3, 3))
    net[1].weight.set_data(mx.nd.array(kernel, dtype="float64"))
    original, net = net, doconv_mx.convert(net)
    assert _count(net, DOConv2D) == 3
    assert original[1].weight._data is None  # the original's values still wait
    x = mx.nd.random.normal(shape=(2, 5, 6, 6), dtype="float64")
    y = net(x)
    assert y.dtype == np.float64 and y.shape == (2, 2, 6, 6)
    assert [layer.spec.in_channels for layer in net] == [5, 4, 3]
    np.testing.assert_array_equal(net[0].bias.data().asnumpy(), bias)
    assert net[0].W.grad_req == net[0].D.grad_req == "null"
    assert net[1].W.grad_req == "write"
    np.testing.assert_array_equal(net[1].fuse().weight.data().asnumpy(), kernel)


def _outputs(net, x):
    """(logits, features) in train mode: BatchNorm then normalises with batch statistics, so
    outputs stay O(1) (eval-mode outputs of a random-init mobilenet are ~1e-16) and do not
    depend on the running statistics that each train-mode pass updates."""
    with autograd.train_mode():
        return net(x).asnumpy(), net.features(x).asnumpy()


@pytest.mark.parametrize("name,size", [("resnet18_v1", 64), ("mobilenet1.0", 64)])
def test_model_zoo_convert_and_fuse(tmp_path, name, size):
    net = get_model(name, pretrained=False)
    net.initialize(mx.init.Xavier())
    convs = _count(net, nn.Conv2D)
    x = mx.nd.random.normal(shape=(2, 3, size, size))
    logits, features = _outputs(net, x)
    assert np.abs(logits).max() > 0.1
    net = doconv_mx.convert(net)
    assert _count(net, DOConv2D) == convs and _count(net, nn.Conv2D) == 0
    if name == "mobilenet1.0":
        assert any(b.spec.groups == b.spec.in_channels > 1
                   for b in doconv_mx.doconv_layers(net).values())
    for hybridize in (False, True):
        net.hybridize(hybridize)
        converted = _outputs(net, x)
        np.testing.assert_allclose(converted[0], logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(converted[1], features, rtol=1e-5,
                                   atol=1e-5 * np.abs(features).max())
    net = doconv_mx.fuse(net)
    assert _count(net, DOConv2D) == 0 and _count(net, nn.Conv2D) == convs
    net.hybridize()
    fused = _outputs(net, x)
    np.testing.assert_allclose(fused[0], logits, rtol=1e-5, atol=1e-5)
    y = net(x).asnumpy()
    net.export(str(tmp_path / name))
    block = gluon.SymbolBlock.imports(str(tmp_path / f"{name}-symbol.json"), ["data"],
                                      str(tmp_path / f"{name}-0000.params"))
    np.testing.assert_allclose(block(x).asnumpy(), y, rtol=1e-6, atol=1e-6 * np.abs(y).max())


def _small_net():
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(DOConv2D(6, 3, padding=1, groups=2, in_channels=4, D_mul=11, activation="tanh"),
                DOConv2D(3, (3, 1), strides=2, in_channels=6), nn.Flatten(), nn.Dense(5, in_units=18))
    return net


def _train(contexts, x, y, steps=3):
    mx.random.seed(7)
    net = _small_net()
    net.initialize(mx.init.Xavier(), ctx=contexts)
    net.cast("float64")
    # Identical, non-zero starting values on every context (D nonzero to exercise c(o, i)).
    rng = np.random.default_rng(0)
    for _, p in sorted(net.collect_params().items()):
        p.set_data(mx.nd.array(0.3 * rng.standard_normal(p.shape), dtype="float64"))
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1},
                            kvstore="device")
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(steps):
        xs = gluon.utils.split_and_load(x, contexts)
        ys = gluon.utils.split_and_load(y, contexts)
        with autograd.record():
            losses = [loss_fn(net(a), b) for a, b in zip(xs, ys)]
        for loss in losses:
            loss.backward()
        trainer.step(x.shape[0])  # gradients summed over contexts, divided by the batch
    return {k.split("_", 1)[1]: v.data(contexts[0]).asnumpy()
            for k, v in net.collect_params().items()}


def test_data_parallel_matches_single_context():
    rng = np.random.default_rng(1)
    x = mx.nd.array(rng.standard_normal((8, 4, 6, 6)), dtype="float64")
    y = mx.nd.array(rng.integers(0, 5, 8), dtype="float64")
    single = _train([mx.cpu(0)], x, y)
    double = _train([mx.cpu(0), mx.cpu(1)], x, y)
    assert single.keys() == double.keys() and any(k.endswith("_D") for k in single)
    for key in single:
        np.testing.assert_allclose(double[key], single[key], rtol=1e-10, atol=1e-12)
    start = _train([mx.cpu(0)], x, y, steps=0)
    assert not np.allclose(single["doconv0_D"], start["doconv0_D"])  # training moved D


class MixedRanks(nn.HybridBlock):
    """A 3-D conv, then a 2-D conv over (channels x depth) maps, then 1-D convs over the
    flattened positions: every rank in one net (one conv with a deferred in_channels)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv3 = nn.Conv3D(4, (3, 3, 3), padding=(1, 1, 1), in_channels=2,
                                   activation="relu")
            self.conv2 = nn.Conv2D(6, 3, strides=2, groups=2, in_channels=16)
            self.bn = nn.BatchNorm(in_channels=6)
            self.conv1 = nn.HybridSequential()
            self.conv1.add(nn.Conv1D(6, 3, padding=1, groups=6),  # depthwise, deferred C_in
                           nn.Conv1D(3, 1, use_bias=False, in_channels=6))

    def hybrid_forward(self, F, x):
        y = self.conv3(x)  # (N, 4, 4, 8, 8)
        y = self.bn(self.conv2(F.reshape(y, shape=(0, -3, -2))))  # (N, 6, 3, 3)
        return self.conv1(F.reshape(y, shape=(0, 0, -1)))  # (N, 3, 9)


@pytest.mark.parametrize("hybridize", [False, True])
def test_convert_fuse_a_net_mixing_ranks(tmp_path, hybridize):
    net = MixedRanks()
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize()
    x = mx.nd.random.normal(shape=(2, 2, 4, 8, 8))
    expected = net(x).asnumpy()
    converted = doconv_mx.convert(net)
    kinds = {1: doconv_mx.DOConv1D, 2: DOConv2D, 3: doconv_mx.DOConv3D}
    layers = doconv_mx.doconv_layers(converted)
    assert {name: type(layer) for name, layer in layers.items()} == {
        "conv3": kinds[3], "conv2": kinds[2], "conv1.0": kinds[1], "conv1.1": kinds[1]}
    assert _count(net, doconv_mx.DOConvND) == 0 and type(net.conv1[0]) is nn.Conv1D
    assert layers["conv3"]._active == hybridize
    np.testing.assert_allclose(converted(x).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    trainer = gluon.Trainer(converted.collect_params(), "sgd", {"learning_rate": 0.05})
    with autograd.record():
        loss = (converted(x) ** 2).mean()
    loss.backward()
    trainer.step(2)
    assert all(np.abs(layer.D.data().asnumpy()).max() > 0
               for layer in layers.values() if layer.D is not None)
    trained = converted(x).asnumpy()
    fused = doconv_mx.fuse(converted)
    assert _count(fused, doconv_mx.DOConvND) == 0
    assert [type(b) for b in (fused.conv3, fused.conv2, fused.conv1[0], fused.conv1[1])] == [
        nn.Conv3D, nn.Conv2D, nn.Conv1D, nn.Conv1D]
    np.testing.assert_allclose(fused(x).asnumpy(), trained, rtol=1e-5, atol=1e-5)
    # Every rank's parameters go through the portable file, and the fused net exports.
    path = tmp_path / "mixed.npz"
    doconv_mx.export_params(converted, path)
    assert {name: p.spec.rank for name, p in doconv_core.load_params(path).items()} == {
        "conv3": 3, "conv2": 2, "conv1.0": 1, "conv1.1": 1}
    fresh = doconv_mx.convert(MixedRanks())
    fresh.initialize()
    assert doconv_mx.import_params(fresh, path) == ["conv1.0", "conv1.1", "conv2", "conv3"]
    with autograd.predict_mode():
        np.testing.assert_allclose(fresh.conv1(mx.nd.ones((1, 6, 9))).asnumpy(),
                                   converted.conv1(mx.nd.ones((1, 6, 9))).asnumpy(),
                                   rtol=1e-6, atol=1e-6)
    fused.hybridize()
    y = fused(x).asnumpy()
    fused.export(str(tmp_path / "fused"))
    block = gluon.SymbolBlock.imports(str(tmp_path / "fused-symbol.json"), ["data"],
                                      str(tmp_path / "fused-0000.params"))
    np.testing.assert_allclose(block(x).asnumpy(), y, rtol=1e-6, atol=1e-6)


def test_convert_picks_ranks_by_include_and_checks_every_rank():
    net = MixedRanks()
    net.initialize()
    only_1d = doconv_mx.convert(net, include=lambda name, conv: isinstance(conv, nn.Conv1D))
    assert sorted(doconv_mx.doconv_layers(only_1d)) == ["conv1.0", "conv1.1"]
    assert type(only_1d.conv3) is nn.Conv3D and type(only_1d.conv2) is nn.Conv2D
    assert doconv_mx.convert(net, D_mul=30).conv3.spec.D_mul == 30
    with pytest.raises(ValueError, match="layer 'conv3': D_mul must be >= kernel volume = 27 "
                                         "for a 3x3x3 kernel, got 10"):
        doconv_mx.convert(net, D_mul=10)
    channels_last = nn.HybridSequential()
    channels_last.add(nn.Conv1D(4, 3), nn.Conv3D(4, 3, layout="NDHWC"))
    with pytest.raises(ValueError, match=r"layer '1': layout must be 'NCDHW' \(MXNet 1.9's "
                                         r"CPU Convolution supports no other 3-D layout\)"):
        doconv_mx.convert(channels_last)
    bare = nn.Conv1D(4, 3, in_channels=2)
    bare.initialize()
    layer = doconv_mx.convert(bare)
    assert type(layer) is doconv_mx.DOConv1D and type(doconv_mx.fuse(layer)) is nn.Conv1D


@pytest.mark.parametrize("kvstore", ["device", "local", None])
def test_convert_and_fuse_a_net_with_a_trainer_attached(kvstore):
    # A net trained by a Trainer (momentum state, a kvstore on 2 contexts): convert and fuse
    # copy it without the Trainer, which keeps holding, and training, the old Parameters.
    contexts = [mx.cpu(0), mx.cpu(1)] if kvstore == "device" else [mx.cpu()]
    net = Custom()
    net.initialize(mx.init.Xavier(), ctx=contexts)
    net.hybridize()
    x = mx.nd.random.normal(shape=(2, 3, 8, 8))

    def step(block, trainer):
        with autograd.record():
            losses = [block(x.as_in_context(ctx)).sum() for ctx in contexts]
        autograd.backward(losses)
        trainer.step(2)

    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.01,
                                                          "momentum": 0.9}, kvstore=kvstore)
    step(net, trainer)
    converted = doconv_mx.convert(net)
    assert all(p._trainer is None for p in converted.collect_params().values())
    np.testing.assert_allclose(converted(x).asnumpy(), net(x).asnumpy(), rtol=1e-5, atol=1e-5)
    own = converted(x).asnumpy()
    step(net, trainer)  # the old Trainer trains the old net only
    np.testing.assert_array_equal(converted(x).asnumpy(), own)
    own_trainer = gluon.Trainer(converted.collect_params(), "sgd", {"learning_rate": 0.01},
                                kvstore=kvstore)
    step(converted, own_trainer)  # the copy trains with a Trainer of its own
    assert not np.array_equal(converted(x).asnumpy(), own)
    fused = doconv_mx.fuse(converted)
    assert all(p._trainer is None for p in fused.collect_params().values())
    np.testing.assert_allclose(fused(x).asnumpy(), converted(x).asnumpy(), rtol=1e-5,
                               atol=1e-5)
    step(converted, own_trainer)  # and so does the net fused
    step(fused, gluon.Trainer(fused.collect_params(), "sgd", {"learning_rate": 0.01},
                              kvstore=kvstore))
