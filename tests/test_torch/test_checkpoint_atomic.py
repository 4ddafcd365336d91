"""Checkpoint imports are all-or-nothing: a bad file or state changes no parameter."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from doconv_core import CheckpointError
from doconv_torch import DOConv2d, export_params, import_params, load_legacy
from checkpoint_files import rewrite_npz as rewrite


def model():
    return nn.Sequential(DOConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                         DOConv2d(4, 2, 3, padding=1, bias=False))


def snapshot(module):
    return {key: value.clone() for key, value in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_import_params_with_an_integer_second_W_changes_nothing(tmp_path):
    source = model()
    good = tmp_path / "good.npz"
    export_params(source, good)
    bad = tmp_path / "bad.npz"
    export_params(source, bad)
    rewrite(bad, lambda a: a.update({"2/W": a["2/W"].astype(np.int64)}))
    target = model()
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{str(bad)!r}: layer '2': W must hold floating-point numbers (float16, float32 or "
            "float64), got dtype int64")):
        import_params(target, bad)
    assert_unchanged(target, before)
    assert import_params(target, good) == ["0", "2"]  # still usable
    assert torch.equal(target[2].W, source[2].W)


def test_import_params_refuses_meta_layers(tmp_path):
    path = tmp_path / "model.npz"
    export_params(model(), path)
    with torch.device("meta"):
        target = model()
    with pytest.raises(CheckpointError, match=re.escape(
            "layers ['0', '2'] are on the meta device; materialise them "
            "(model.to_empty(device=...)) first")):
        import_params(target, path)


def original_state(module, seed=0):
    """The authors' layout for ``module``'s DO-Conv layers plus its other entries."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, value in module.state_dict().items():
        if key.endswith(("W", "D", "bias")) and not key.startswith("1."):
            value = torch.from_numpy(rng.standard_normal(tuple(value.shape)).astype(np.float32))
        state[key] = value.clone()
    return state


def test_strict_legacy_load_with_an_extra_key_changes_nothing():
    target = model()
    state = original_state(target)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=re.escape(
            "the legacy checkpoint does not match the model (strict): missing keys [], "
            "unexpected keys ['extra']")):
        load_legacy(target, dict(state, extra=torch.zeros(1)))
    assert_unchanged(target, before)
    report = load_legacy(target, state)  # still usable
    assert report.unexpected_keys == [] and torch.equal(target[0].W, state["0.W"])


def test_legacy_load_with_a_bad_shape_or_dtype_changes_nothing():
    target = model()
    state = original_state(target)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=re.escape(
            "the legacy checkpoint: '1.running_mean' must have shape (4,) for this model, "
            "got (5,)")):
        load_legacy(target, dict(state, **{"1.running_mean": torch.zeros(5)}), strict=False)
    assert_unchanged(target, before)
    with pytest.raises(CheckpointError, match=re.escape(
            "the legacy checkpoint: layer '2': W must hold floating-point numbers (float16, "
            "float32 or float64), got dtype int64")):
        load_legacy(target, dict(state, **{"2.W": state["2.W"].long()}))
    assert_unchanged(target, before)
    with pytest.raises(CheckpointError, match=re.escape(
            "the legacy checkpoint: ['1.weight'] must be torch.Tensor values")):
        load_legacy(target, dict(state, **{"1.weight": [1.0] * 4}))
    assert_unchanged(target, before)
