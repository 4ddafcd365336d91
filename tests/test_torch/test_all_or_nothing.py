"""All or nothing, as a property: for a random model of DO-Conv layers (mixed ranks and
kernel sizes, a BatchNorm among them) and a random failure point (a bad array in the file or
the legacy weights, a layer that cannot take values), a failed import_params, load_legacy or
set_params leaves every parameter and buffer bit-identical. Example counts come from the
loaded hypothesis profile (tests/conftest.py)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from doconv_torch import DOConv1d, DOConv2d, DOConv3d, export_params, import_params, load_legacy

from strategies import RANK_KERNEL_SIZES

CLASSES = {1: DOConv1d, 2: DOConv2d, 3: DOConv3d}
# What makes a layer unable to take values, and (for files) what makes an array bad.
LAYER_FAILURES = ("inference", "no_right_inverse", "param_shape")
ARRAY_FAILURES = ("array_int", "array_shape", "array_missing")


class NoInverse(nn.Module):
    def forward(self, x):
        return x * 2


@st.composite
def layer_settings(draw, ranks):
    rank = draw(st.sampled_from(ranks))
    kernel_size = draw(st.sampled_from(RANK_KERNEL_SIZES[rank]))
    volume = int(np.prod(kernel_size))
    D_mul = draw(st.sampled_from([None, volume + 1])) if volume > 1 else None
    return (rank, draw(st.integers(1, 3)), draw(st.integers(1, 3)), kernel_size,
            draw(st.booleans()), D_mul)


@st.composite
def cases(draw, loader):
    ranks = (2,) if loader == "load_legacy" else (1, 2, 3)  # the original layers were 2-D
    settings = draw(st.lists(layer_settings(ranks), min_size=1, max_size=4))
    at = draw(st.integers(0, len(settings) - 1))
    kinds = LAYER_FAILURES + (() if loader == "set_params" else ARRAY_FAILURES)
    return settings, at, draw(st.sampled_from(kinds)), draw(st.integers(0, 2**16))


def build(settings, seed, inference_at=None):
    torch.manual_seed(seed)
    model = nn.Sequential()
    for index, (rank, c_in, c_out, kernel_size, bias, D_mul) in enumerate(settings):
        with torch.inference_mode(index == inference_at), torch.no_grad():
            layer = CLASSES[rank](c_in, c_out, kernel_size, bias=bias, D_mul=D_mul)
            if layer.D is not None:
                layer.D.normal_()
        model.add_module(str(index), layer)
    model.add_module("bn", nn.BatchNorm1d(3))
    with torch.no_grad():
        model.bn.running_mean.normal_()
    return model


def snapshot(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def spoil_array(arrays, key, kind):
    if kind == "array_int":
        arrays[key] = arrays[key].astype(np.int64)
    elif kind == "array_shape":
        arrays[key] = np.zeros(arrays[key].size + 1, arrays[key].dtype)
    else:
        del arrays[key]


def spoil_layer(layer, kind):
    if kind == "no_right_inverse":
        parametrize.register_parametrization(layer, "W", NoInverse())
    elif kind == "param_shape":
        layer.W = nn.Parameter(torch.zeros(1))


def check(loader, settings, at, kind, seed, tmp_path):
    target = build(settings, seed, inference_at=at if kind == "inference" else None)
    saved = build(settings, seed + 1)
    spoil_layer(target[at], kind)
    before = snapshot(target)
    if loader == "import_params":
        path = tmp_path / "m.npz"
        export_params(saved, path)
        if kind in ARRAY_FAILURES:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
            spoil_array(arrays, f"{at}/W", kind)
            np.savez(path, **arrays)
        call = lambda: import_params(target, path)  # noqa: E731
    elif loader == "load_legacy":
        arrays = {key: value.numpy().copy() for key, value in saved.state_dict().items()}
        if kind in ARRAY_FAILURES:
            spoil_array(arrays, f"{at}.W", kind)
        weights = {key: torch.from_numpy(value) for key, value in arrays.items()}
        call = lambda: load_legacy(target, weights)  # noqa: E731
    else:
        call = lambda: target[at].set_params(saved[at].to_params())  # noqa: E731
    with pytest.raises(ValueError):
        call()
    after = snapshot(target)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), \
            key


@pytest.mark.parametrize("loader", ["import_params", "load_legacy", "set_params"])
def test_a_failed_import_changes_nothing(loader, tmp_path_factory):
    @given(cases(loader))
    def run(case):
        check(loader, *case, tmp_path_factory.mktemp("case"))

    run()
