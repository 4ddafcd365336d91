"""All-or-nothing imports: prepare_import validates a whole checkpoint, assigns nothing."""

import json
import re

import numpy as np
import pytest

import doconv_core as dc
from doconv_core.params import _META_KEY
from checkpoint_files import rewrite_npz

SPEC = dc.ConvSpec(2, 4, 3, padding=1)
HEAD = dc.ConvSpec(4, 2, 1)


def params(spec, dtype=np.float32):
    rng = np.random.default_rng(0)
    return dc.DOConvParams(
        spec, rng.standard_normal(spec.W_shape).astype(dtype),
        rng.standard_normal(spec.D_shape).astype(dtype) if spec.has_D else None,
        rng.standard_normal(spec.out_channels).astype(dtype) if spec.bias else None)


def saved(tmp_path, change=None):
    """A two-layer file, its raw arrays changed by ``change`` (then saved as they are)."""
    path = tmp_path / "model.npz"
    dc.save_params(path, {"a": params(SPEC), "b": params(HEAD)})
    if change is not None:
        rewrite_npz(path, change)
    return path


def set_meta(arrays, **updates):
    meta = json.loads(str(arrays[_META_KEY]))
    meta.update(updates)
    arrays[_META_KEY] = np.array(json.dumps(meta))


@pytest.mark.parametrize("layers, got", [([], "list"), (None, "NoneType"), ("a", "str")])
def test_load_params_refuses_layers_that_are_not_a_mapping(tmp_path, layers, got):
    path = saved(tmp_path, lambda a: set_meta(a, layers=layers))
    with pytest.raises(dc.CheckpointError, match=re.escape(
            f"{str(path)!r} has invalid metadata: 'layers' must map layer names to settings, "
            f"got {got}")):
        dc.load_params(path)


@pytest.mark.parametrize("value, dtype", [
    (np.ones(HEAD.W_shape, dtype=np.int64), "int64"),
    (np.full(HEAD.W_shape, "x"), "<U1"),
    (np.zeros(HEAD.W_shape, dtype=bool), "bool"),
    (np.zeros(HEAD.W_shape, dtype=np.complex64), "complex64"),
])
def test_load_params_refuses_arrays_that_are_not_floating(tmp_path, value, dtype):
    path = saved(tmp_path, lambda a: a.update({"b/W": value}))
    with pytest.raises(dc.CheckpointError, match=re.escape(
            f"{str(path)!r}: layer 'b': W must hold floating-point numbers (float16, float32 "
            f"or float64), got dtype {dtype}")):
        dc.load_params(path)


def test_load_params_refuses_bad_layer_entries(tmp_path):
    path = saved(tmp_path, lambda a: set_meta(a, layers={"a": [1, 2]}))
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "layer 'a' has invalid settings: expected a mapping, got list")):
        dc.load_params(path)
    path = saved(tmp_path, lambda a: set_meta(a, layers={"": SPEC.to_dict()}))
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "has invalid metadata: layer names must be non-empty strings without '/', got ''")):
        dc.load_params(path)


def test_prepare_import_portable(tmp_path):
    path = saved(tmp_path)
    prepared = dc.prepare_import(path, {"a": SPEC, "b": HEAD.with_in_channels(None)})
    assert sorted(prepared) == ["a", "b"] and all(r.exact for r in prepared.values())
    np.testing.assert_array_equal(prepared["a"].params.W, params(SPEC).W)
    # 'same' with stride 1 is the file's padding (1, 1): the same function.
    dc.prepare_import(path, {"a": dc.ConvSpec(2, 4, 3, padding="same"), "b": HEAD})
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "does not match the model's DO-Conv layers: missing [], unexpected ['b']")):
        dc.prepare_import(path, {"a": SPEC})
    with pytest.raises(dc.CheckpointError, match="layer 'a' was saved with"):
        dc.prepare_import(path, {"a": dc.ConvSpec(2, 4, 3), "b": HEAD})
    with pytest.raises(ValueError, match="layout must be one of"):
        dc.prepare_import(path, {}, layout="pickle")


def legacy_torch(spec, dtype=np.float32):
    p = params(spec, dtype)
    return {"W": p.W, "D": p.D, "bias": p.bias}


def test_prepare_import_legacy_checks_every_layer_before_returning():
    targets = {"a": SPEC, "b": HEAD}
    good = {"a": legacy_torch(SPEC), "b": legacy_torch(HEAD)}
    prepared = dc.prepare_import("the state", targets, good, layout="torch-legacy")
    assert sorted(prepared) == ["a", "b"]
    bad = {"a": legacy_torch(SPEC), "b": dict(legacy_torch(HEAD), W=np.ones(HEAD.W_shape, int))}
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "the state: layer 'b': W must hold floating-point numbers (float16, float32 or "
            "float64), got dtype int64")):
        dc.prepare_import("the state", targets, bad, layout="torch-legacy")
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "the state does not match the model's DO-Conv layers: missing ['b'], "
            "unexpected []")):
        dc.prepare_import("the state", targets, {"a": good["a"]}, layout="torch-legacy")
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "the state: layer 'a' holds arrays the torch-legacy layout does not have: "
            "['weight']")):
        dc.prepare_import("the state", targets, dict(good, a=dict(good["a"], weight=1.0)),
                          layout="torch-legacy")
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "the state: layer 'a' is missing its W array")):
        dc.prepare_import("the state", targets, dict(good, a={"D": good["a"]["D"]}),
                          layout="torch-legacy")
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "the state: layer 'a': W must hold floating-point numbers")):
        dc.prepare_import("the state", targets, dict(good, a=dict(good["a"], W="text")),
                          layout="torch-legacy")


def test_legacy_importers_refuse_non_floating_arrays():
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "D must hold floating-point numbers (float16, float32 or float64), got dtype int64")):
        dc.import_legacy_tf(SPEC, W=np.zeros((9, 2, 4)), D=np.zeros((9, 9, 2), dtype=np.int64),
                            bias=np.zeros(4))


def test_check_state_keys():
    expected = {"a.W": (4, 2, 9), "bn.weight": (4,), "lazy": None}
    given = {"a.W": (4, 2, 9), "bn.weight": (4,), "lazy": (7,)}
    assert dc.check_state_keys("s", expected, given, strict=True) == ([], [])
    assert dc.check_state_keys("s", expected, {**given, "x": (1,)}, strict=False) == ([], ["x"])
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "s does not match the model (strict): missing keys [], unexpected keys ['x']")):
        dc.check_state_keys("s", expected, {**given, "x": (1,)}, strict=True)
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "s: 'bn.weight' must have shape (4,) for this model, got (5,)")):
        dc.check_state_keys("s", expected, {**given, "bn.weight": (5,)}, strict=False)


@pytest.mark.parametrize("spec, expected", [
    (dc.ConvSpec(2, 4, 3, padding=1), "same"),
    (dc.ConvSpec(2, 4, 3, padding=(1, 1), dilation=1), "same"),
    (dc.ConvSpec(2, 4, (3, 5), padding=(2, 4), dilation=2), "same"),
    (dc.ConvSpec(2, 4, 3, padding=0, padding_mode="reflect"), "valid"),
    (dc.ConvSpec(2, 4, 3, 2, padding="same"), "same"),
    (dc.ConvSpec(2, 4, 1, padding="same"), "same"),  # kept, though 'valid' is equal
    (dc.ConvSpec(2, 4, 1, padding=0), "valid"),
    (dc.ConvSpec(2, 4, 3, 2, padding=1), None),  # 'same' with stride 2 pads (0, 1) or (1, 1)
    (dc.ConvSpec(2, 4, 3, padding=2), None),
    (dc.ConvSpec(2, 4, 3, padding=1, padding_mode="reflect"), None),
])
def test_string_padding(spec, expected):
    assert spec.string_padding() == expected


@pytest.mark.parametrize("name", ["model.safetensors", "model.npz"])
def test_export_and_import_layers_in_both_containers(tmp_path, name):
    # export_layers (every adapter's export_params) follows save_params: safetensors unless
    # the path ends in .npz.
    class Layer:
        def __init__(self, spec, seed):
            self.spec, self.params = spec, params(spec)
            self.params.W = self.params.W + seed

        def to_params(self):
            return self.params

        def set_params(self, value):
            self.params = value

    source = {"a": Layer(SPEC, 1), "b.c": Layer(HEAD, 2)}
    path = tmp_path / name
    dc.export_layers(path, object(), source, "Fake")
    assert dc.is_safetensors(path) is name.endswith(".safetensors")
    target = {"a": Layer(SPEC, 0), "b.c": Layer(HEAD, 0)}
    assert dc.import_layers(path, target) == ["a", "b.c"]
    for key in source:
        np.testing.assert_array_equal(target[key].params.W, source[key].params.W)


def test_prepare_import_refuses_a_bad_safetensors_file_whole(tmp_path):
    path = tmp_path / "model.safetensors"
    dc.save_params(path, {"a": params(SPEC), "b": params(HEAD)})
    arrays, metadata = dc.read_safetensors(path, mmap=False)
    arrays["b.W"] = arrays["b.W"].astype(np.int64)
    dc.write_safetensors(path, arrays, metadata)
    with pytest.raises(dc.CheckpointError, match=re.escape(
            f"{str(path)!r}: layer 'b': W must hold floating-point numbers (float16, float32 "
            "or float64), got dtype int64")):
        dc.prepare_import(path, {"a": SPEC, "b": HEAD})
