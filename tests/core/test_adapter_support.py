"""The core helpers every adapter's model-level functions go through."""

import dataclasses

import numpy as np
import pytest

import doconv_core
from doconv_core import CheckpointError, ConvSpec, layer_filter, prepare_legacy
from doconv_core.legacy import torch_channel_map
from doconv_core.spec import native_spec


@pytest.mark.parametrize("include, picked", [
    (None, ["conv1", "block.conv2", "head"]),
    ("conv1", ["conv1"]),
    ("block.*", ["block.conv2"]),
    (["conv?", "head"], ["conv1", "head"]),
    (lambda name, layer: layer == 2, ["block.conv2"]),
])
def test_layer_filter(include, picked):
    layers = {"conv1": 1, "block.conv2": 2, "head": 3}
    keep = layer_filter(include)
    assert [name for name, layer in layers.items() if keep(name, layer)] == picked


@pytest.mark.parametrize("include", [3, [1, "a"], {"a": 1.0}.values(), b"conv"])
def test_layer_filter_refuses(include):
    with pytest.raises(ValueError, match=r"include must be None, a callable \(name, layer\) "
                                         r"-> bool, or layer-name patterns"):
        layer_filter(include)


def test_nothing_to_convert_message():
    error = doconv_core.nothing_to_convert(object(), "nn.Conv2d", ["x*"])
    assert str(error) == ("convert found no nn.Conv2d that include=['x*'] selects in object; "
                          "nothing would change")


def test_native_spec_renames_the_argument():
    with pytest.raises(ValueError, match=r"^filters must be an integer >= 1, got 0"):
        native_spec({"out_channels": "filters"}, None, 0, 3)
    assert native_spec({}, 4, 8, 3) == ConvSpec(4, 8, 3)


@pytest.mark.parametrize("spec, pads", [
    (ConvSpec(2, 2, 3, padding="same"), ((1, 1), (1, 1))),
    (ConvSpec(2, 2, (2, 4), padding="same", dilation=(1, 3)), ((0, 1), (4, 5))),
    (ConvSpec(2, 2, 3, padding="valid"), ((0, 0), (0, 0))),
    (ConvSpec(2, 2, 3, padding=(2, 1), stride=2), ((2, 2), (1, 1))),
])
def test_fixed_padding(spec, pads):
    assert spec.fixed_padding() == pads
    for size in (5, 8, 13):  # the same at every input size
        assert spec.resolve_padding((size, size)) == pads


def test_fixed_padding_refuses_strided_same():
    with pytest.raises(ValueError, match=r"padding 'same' with stride \(2, 2\) depends on the "
                                         "input size"):
        ConvSpec(2, 2, 3, padding="same", stride=2).fixed_padding()


def test_output_size_with_unknown_sizes():
    spec = ConvSpec(2, 2, 3, stride=2)
    assert spec.output_size((None, 9)) == (None, 4)
    with pytest.raises(ValueError, match=r"an input of spatial size \(None, 2\) is too small"):
        spec.output_size((None, 2))


def test_compose_kernel_with_the_canonical_channel_map_is_the_default():
    spec = ConvSpec(4, 6, 3, groups=2, D_mul=11)
    rng = np.random.default_rng(0)
    D, W = rng.standard_normal(spec.D_shape), rng.standard_normal(spec.W_shape)
    canonical = doconv_core.legacy.canonical_channel_map(spec)
    np.testing.assert_allclose(  # summed in another order: rounding differs
        doconv_core.compose_kernel(D, W, groups=2, kernel_size=(3, 3), channel_map=canonical),
        doconv_core.compose_kernel(D, W, groups=2, kernel_size=(3, 3)), rtol=1e-13)
    other = doconv_core.compose_kernel(D, W, groups=2, kernel_size=(3, 3),
                                       channel_map=torch_channel_map(spec))
    slot = D + doconv_core.identity_d(4, 9, 11)
    expected = np.einsum("ms,s->m", slot[torch_channel_map(spec)[5, 1]], W[5, 1])
    np.testing.assert_allclose(other[5, 1].ravel(), expected)
    with pytest.raises(ValueError, match=r"channel_map must have shape"):
        doconv_core.compose_kernel(D, W, groups=2, kernel_size=(3, 3), channel_map=canonical.T)


def _legacy_weights(spec, prefix):
    return {f"{prefix}W": np.zeros(spec.W_shape, np.float32),
            f"{prefix}D": np.zeros(spec.D_shape, np.float32)}


def test_prepare_legacy_splits_a_flat_checkpoint():
    spec = ConvSpec(2, 4, 3, bias=False)
    weights = {**_legacy_weights(spec, "a."), **_legacy_weights(spec, "b."), "bn.weight": 1}
    results, rest, missing = prepare_legacy(weights, {"a": spec, "b": spec},
                                            layout="torch-legacy", strict=True,
                                            loads_other_keys=True)
    assert sorted(results) == ["a", "b"] and rest == {"bn.weight": 1} and missing == []
    assert all(result.exact for result in results.values())


def test_prepare_legacy_root_layer_and_alias():
    spec = ConvSpec(2, 4, 3, bias=False)
    weights = {**_legacy_weights(spec, ""),
               "d_diag": doconv_core.identity_d(2, 9, 9)}
    results, rest, _ = prepare_legacy(weights, {"": spec}, layout="torch-legacy",
                                      strict=True, loads_other_keys=False)
    assert list(results) == [doconv_core.ROOT_NAME] and rest == {}


def test_prepare_legacy_strict_and_not():
    spec = ConvSpec(2, 4, 3, bias=False)
    weights = {**_legacy_weights(spec, "a."), "extra": np.zeros(1)}
    with pytest.raises(CheckpointError, match=r"has no 'b.W' for layer 'b'"):
        prepare_legacy(weights, {"a": spec, "b": spec}, layout="torch-legacy", strict=True,
                       loads_other_keys=True)
    with pytest.raises(CheckpointError, match=r"holds keys that are not arrays of this model's "
                                              r"DO-Conv layers: \['extra'\]"):
        prepare_legacy(weights, {"a": spec}, layout="tf-legacy", strict=True,
                       loads_other_keys=False)
    results, rest, missing = prepare_legacy(weights, {"a": spec, "b": spec},
                                            layout="torch-legacy", strict=False,
                                            loads_other_keys=False)
    assert list(results) == ["a"] and missing == ["b.W"] and list(rest) == ["extra"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights=[1]), "the legacy weights must be a mapping"),
    (dict(layout="keras"), "layout must be one of"),
    (dict(strict=1), "strict must be True or False, got 1"),
])
def test_prepare_legacy_refuses(kwargs, message):
    arguments = dict(weights={}, layers={}, layout="torch-legacy", strict=True,
                     loads_other_keys=True)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        prepare_legacy(**arguments)


class FakeLayer:
    """What the core's import and export helpers need of an adapter's layer."""

    def __init__(self, spec, ready=True):
        self.spec, self.ready, self.loaded = spec, ready, None
        rng = np.random.default_rng(1)
        self.params = doconv_core.DOConvParams(spec, rng.standard_normal(spec.W_shape),
                                               rng.standard_normal(spec.D_shape), None)

    def to_params(self):
        return self.params

    def set_params(self, params):
        self.loaded = params


def test_export_and_import_layers(tmp_path):
    spec = ConvSpec(2, 4, 3, bias=False)
    source = {"a": FakeLayer(spec), "b.c": FakeLayer(spec)}
    doconv_core.export_layers(tmp_path / "m.npz", object(), source, "Fake")
    target = {"b.c": FakeLayer(spec), "a": FakeLayer(spec)}
    assert doconv_core.import_layers(tmp_path / "m.npz", target) == ["a", "b.c"]
    np.testing.assert_array_equal(target["a"].loaded.W, source["a"].params.W)
    with pytest.raises(ValueError, match=r"model has no Fake layers to export \(list\)"):
        doconv_core.export_layers(tmp_path / "n.npz", [], {}, "Fake")


def test_import_layers_changes_nothing_on_a_mismatch(tmp_path):
    spec = ConvSpec(2, 4, 3, bias=False)
    doconv_core.export_layers(tmp_path / "m.npz", None, {"a": FakeLayer(spec)}, "Fake")
    target = {"a": FakeLayer(spec), "b": FakeLayer(spec)}
    with pytest.raises(CheckpointError, match=r"missing \['b'\]"):
        doconv_core.import_layers(tmp_path / "m.npz", target)
    assert all(layer.loaded is None for layer in target.values())


def test_check_layers_ready_names_every_layer_not_ready():
    spec = ConvSpec(2, 4, 3, bias=False)
    layers = {"b": FakeLayer(spec, False), "a": FakeLayer(spec, False), "c": FakeLayer(spec)}
    with pytest.raises(CheckpointError, match=r"^cannot load 'f.npz': layers \['a', 'b'\] are "
                                              r"waiting; do X$"):
        doconv_core.check_layers_ready(layers, "'f.npz'", lambda layer: layer.ready,
                                       "are waiting; do X")
    doconv_core.check_layers_ready({"c": layers["c"]}, "f", lambda layer: layer.ready, "")


def test_assignable_params():
    spec = ConvSpec(2, 4, 3, bias=False)
    params = FakeLayer(spec).params
    assert doconv_core.assignable_params(params, spec.with_in_channels(2)).spec == spec
    deferred = dataclasses.replace(spec, in_channels=None)
    assert doconv_core.assignable_params(params, deferred).spec.in_channels == 2
    with pytest.raises(ValueError, match=r"^params must be DOConvParams, got dict$"):
        doconv_core.assignable_params({}, spec)
    with pytest.raises(ValueError, match=r"params.spec must describe this layer's function"):
        doconv_core.assignable_params(params, ConvSpec(2, 4, 5, bias=False))
    as_int = doconv_core.DOConvParams(spec, params.W.astype(np.int64), params.D, None)
    with pytest.raises(CheckpointError, match=r"W must hold floating-point numbers"):
        doconv_core.assignable_params(as_int, spec)
