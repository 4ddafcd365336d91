"""``doconv fuse`` on Gluon parameter files (``save_parameters``), end to end: train a small
net holding a grouped DOConv2D with D_mul > its kernel volume, a non-square kernel, a
DOConv1D and a DOConv3D; save its parameters; fuse in a subprocess (Gluon files record no
kernel shapes: the command refuses until --kernel-size/--rank say them); load the output
strictly into the same net built with nn.Conv1D/2D/3D; compare outputs."""

from __future__ import annotations

import re

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from mxnet.gluon import nn

from doconv_mx import DOConv1D, DOConv2D, DOConv3D
from tests.cli_checks import run_doconv


run = run_doconv


def plain(native):
    return lambda *args, D_mul=None, **kwargs: native(*args, **kwargs)


class Net(gluon.HybridBlock):
    def __init__(self, doconv: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        conv1, conv2, conv3 = ((DOConv1D, DOConv2D, DOConv3D) if doconv else
                               (plain(nn.Conv1D), plain(nn.Conv2D), plain(nn.Conv3D)))
        with self.name_scope():
            self.features = nn.HybridSequential()
            self.features.add(conv2(8, 3, padding=1, groups=2, D_mul=12, in_channels=4),
                              nn.BatchNorm(in_channels=8), nn.Activation("relu"),
                              conv2(6, (1, 3), padding=(0, 1), use_bias=False, in_channels=8))
            self.signal = conv1(4, 5, padding=2, D_mul=7, in_channels=3)
            self.volume = conv3(4, (3, 1, 2), groups=2, in_channels=2)
            self.head = nn.Dense(3, in_units=14)

    def hybrid_forward(self, F, image, signal, volume):
        pooled = [F.mean(self.features(image), axis=(2, 3)), F.mean(self.signal(signal), axis=2),
                  F.mean(self.volume(volume), axis=(2, 3, 4))]
        return self.head(F.concat(*pooled, dim=1))


def inputs(rng, batch=4):
    return [mx.nd.array(rng.standard_normal(shape)) for shape in
            ((batch, 4, 7, 6), (batch, 3, 9), (batch, 2, 5, 4, 4))]


def test_fused_parameters_load_strictly_into_the_plain_net(tmp_path):
    rng = np.random.default_rng(0)
    net = Net()
    net.initialize(mx.init.Xavier())
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    for _ in range(3):
        x = inputs(rng)
        with autograd.record():
            loss = (net(*x) ** 2).mean()
        loss.backward()
        trainer.step(4)
    assert np.abs(net.features[0].D.data().asnumpy()).max() > 0
    path = tmp_path / "model.params"
    net.save_parameters(str(path))

    result = run("inspect", path)
    assert result.returncode == 0, result.stderr
    assert "kernel shape not recorded for 4 layer(s)" in result.stdout

    out = tmp_path / "plain.params"
    result = run("fuse", path, out)
    assert result.returncode == 1 and not out.exists()
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert re.search(r"layer 'features\.0': .*--kernel-size features\.0=3x3", result.stderr)
    result = run("fuse", path, out, "--rank", "2", "--kernel-size", "features.3=1x3",
                 "--kernel-size", "signal=5", "--kernel-size", "volume=3x1x2")
    assert result.returncode == 0, result.stderr

    fused = Net(doconv=False)
    fused.load_parameters(str(out))  # strict: allow_missing=False, ignore_extra=False
    x = inputs(rng, 5)
    with autograd.predict_mode():
        np.testing.assert_allclose(fused(*x).asnumpy(), net(*x).asnumpy(), rtol=1e-5,
                                   atol=1e-6)
    stored = mx.nd.load(str(out))
    assert stored["features.0.weight"].shape == (8, 2, 3, 3)
    assert stored["features.3.weight"].shape == (6, 8, 1, 3)
    assert stored["volume.weight"].shape == (4, 1, 3, 1, 2)


def test_gluon_errors_are_one_line(tmp_path):
    truncated = tmp_path / "truncated.params"
    mx.nd.save(str(tmp_path / "good.params"), {"0.W": mx.nd.ones((2, 2, 9)),
                                               "0.D": mx.nd.zeros((4, 9, 9))})
    truncated.write_bytes((tmp_path / "good.params").read_bytes()[:60])
    result = run("fuse", truncated, tmp_path / "out.params")
    assert result.returncode == 1, result
    assert result.stderr.startswith("doconv: error: ") and result.stderr.count("\n") == 1
    assert "mx.nd.load" in result.stderr and not (tmp_path / "out.params").exists()
    result = run("fuse", tmp_path / "good.params", tmp_path / "out.pt", "--rank", "2")
    assert result.returncode == 2 and "it fuses to .params" in result.stderr


def test_an_exported_model_fuses_with_its_symbol(tmp_path):
    rng = np.random.default_rng(1)
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(DOConv2D(8, 3, padding=1, groups=2, D_mul=12, in_channels=4),
                nn.BatchNorm(in_channels=8),
                DOConv2D(6, (1, 3), padding=(0, 1), use_bias=False, in_channels=8))
    net.initialize(mx.init.Xavier())
    for layer in (net[0], net[2]):  # as if trained: D away from 0
        layer.D.set_data(mx.nd.array(0.1 * rng.standard_normal(layer.D.shape)))
    net.hybridize()
    x = mx.nd.array(rng.standard_normal((2, 4, 7, 6)))
    expected = net(x).asnumpy()
    net.export(str(tmp_path / "net"))
    params, symbol = tmp_path / "net-0000.params", tmp_path / "net-symbol.json"

    result = run("fuse", params, tmp_path / "plain-0000.params")
    assert result.returncode == 1 and "pass its symbol with --symbol" in result.stderr
    result = run("inspect", params, "--symbol", symbol)
    assert result.returncode == 0, result.stderr
    assert re.search(r"doconv0\s+2\s+3x3\s+2\s+12", result.stdout), result.stdout
    assert re.search(r"doconv1\s+2\s+1x3\s+1\s+3", result.stdout), result.stdout
    result = run("fuse", params, tmp_path / "plain.params", "--symbol", symbol)
    assert result.returncode == 2 and "PREFIX-0000.params" in result.stderr
    result = run("fuse", params, tmp_path / "plain-0000.params", "--symbol", symbol)
    assert result.returncode == 0, result.stderr

    plain = gluon.SymbolBlock.imports(str(tmp_path / "plain-symbol.json"), ["data"],
                                      str(tmp_path / "plain-0000.params"))
    assert not any(name.endswith(("_W", "_D")) for name in plain.collect_params())
    np.testing.assert_allclose(plain(x).asnumpy(), expected, rtol=1e-5, atol=1e-6)
    graph = (tmp_path / "plain-symbol.json").read_text()
    assert "batch_dot" not in graph and '"Convolution"' in graph


# -- issue 28 ---------------------------------------------------------------------------------
def test_a_corrupt_parameter_file_is_one_line_saying_what_is_wrong(tmp_path):
    """MXNet's message starts with "Traceback (most recent call last):", which was all the
    one line said."""
    from tests.cli_checks import assert_failed_cleanly, run_in_process
    good = tmp_path / "good.params"
    mx.nd.save(str(good), {"0.W": mx.nd.ones((2, 2, 9)), "0.D": mx.nd.zeros((2, 9, 9))})
    raw = good.read_bytes()
    good.unlink()
    for name, data in (("truncated", raw[:len(raw) // 2]),
                       ("corrupt", raw[:16] + b"\xff" * 40 + raw[56:])):
        path = tmp_path / f"{name}.params"
        path.write_bytes(data)
        for args in (("inspect", path), ("fuse", path, tmp_path / "out.params", "--rank", "2")):
            result = run_in_process(*args)
            assert_failed_cleanly(result, tmp_path, [path], r"cannot be read by mx\.nd\.load "
                                  r"\(truncated or corrupt; save it again.*\): MXNetError: \S")
            assert "Traceback" not in result[2] and "most recent call" not in result[2]
        path.unlink()


def test_inspect_of_an_exported_model_asks_for_its_symbol_as_fuse_does(tmp_path):
    """It reported "0 DO-Conv layer(s)" and listed the *_W/*_D arrays as other entries."""
    from tests.cli_checks import assert_failed_cleanly, run_in_process
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(DOConv2D(4, 3, in_channels=2))
    net.initialize()
    net.hybridize()
    net(mx.nd.ones((1, 2, 5, 5)))
    net.export(str(tmp_path / "net"))
    keep = [tmp_path / "net-0000.params", tmp_path / "net-symbol.json"]
    for args in (("inspect", keep[0]), ("fuse", keep[0], tmp_path / "plain-0000.params")):
        assert_failed_cleanly(run_in_process(*args), tmp_path, keep,
                              r"exported Gluon model's parameters .*pass its symbol with "
                              r"--symbol PREFIX-symbol\.json")


def test_a_full_disk_is_one_line_naming_out(tmp_path):
    from tests.cli_checks import assert_one_line_error, leftovers
    path = tmp_path / "model.params"
    mx.nd.save(str(path), {"0.W": mx.nd.ones((64, 32, 9)), "0.D": mx.nd.zeros((32, 9, 9))})
    out = tmp_path / "plain.params"
    result = run("fuse", path, out, "--rank", "2", file_size_limit=4096)
    assert_one_line_error(result.returncode, result.stdout, result.stderr,
                          r"cannot write '.*plain\.params': .*(nothing was written)")
    assert leftovers(tmp_path, [path]) == []


def test_a_float16_parameter_file_fuses_composed_in_float32(tmp_path):
    import doconv_core as dc
    rng = np.random.default_rng(2)
    W = rng.standard_normal((4, 2, 9)).astype(np.float16)
    D = (0.1 * rng.standard_normal((2, 9, 9))).astype(np.float16)
    path = tmp_path / "half.params"
    mx.nd.save(str(path), {"0.W": mx.nd.array(W, dtype="float16"),
                           "0.D": mx.nd.array(D, dtype="float16")})
    result = run("fuse", path, tmp_path / "plain.params", "--rank", "2")
    assert result.returncode == 0, result.stderr
    weight = mx.nd.load(str(tmp_path / "plain.params"))["0.weight"].asnumpy()
    expected = dc.compose_kernel(D.astype(np.float32), W.astype(np.float32), groups=1,
                                 kernel_size=(3, 3)).astype(np.float16)
    assert weight.dtype == np.float16
    np.testing.assert_array_equal(weight, expected)


def test_a_malformed_symbol_is_one_line(tmp_path):
    """Found by the fuzz tests: nodes that are not objects, attributes that are not strings
    and inputs naming no node were AttributeError and TypeError tracebacks."""
    import json
    from tests.cli_checks import assert_failed_cleanly, run_in_process
    from tests.test_mx.test_cli_fuzz_mx import exported
    params, symbol = exported(tmp_path)
    good = json.loads(symbol.read_text())
    conv = next(i for i, node in enumerate(good["nodes"]) if node["op"] == "Convolution")
    for change in (lambda g: g["nodes"].__setitem__(0, 1),
                   lambda g: g["nodes"][conv]["attrs"].__setitem__("num_group", None),
                   lambda g: g["nodes"][conv]["attrs"].__setitem__("kernel", 3),
                   lambda g: g["nodes"][conv].__setitem__("inputs", [[999, 0, 0]])):
        graph = json.loads(json.dumps(good))
        change(graph)
        symbol.write_text(json.dumps(graph))
        assert_failed_cleanly(run_in_process("fuse", params, tmp_path / "plain-0000.params",
                                             "--symbol", symbol), tmp_path, [params, symbol],
                              r"--symbol .* is a malformed symbol graph")
