"""All or nothing, as a property (the shared contract in tests/import_contract.py): for a
random model of DO-Conv layers (mixed ranks and kernel sizes) and a random failure point (a
bad array in the file or the legacy weights, a layer that cannot take values: built under
torch.inference_mode(), a parametrization without right_inverse, a parameter of another
shape), a failed import_params, load_legacy or set_params leaves every parameter
bit-identical."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import doconv_torch
from doconv_torch import DOConv1d, DOConv2d, DOConv3d

from import_contract import Adapter, contract_tests, layer_spec, random_params
from strategies import fuzz_settings

CLASSES = {1: DOConv1d, 2: DOConv2d, 3: DOConv3d}
UNREADY = ("inference", "no_right_inverse", "param_shape")


class NoInverse(nn.Module):
    def forward(self, x):
        return 2 * x


def make_unready(layer, how):
    if how == "no_right_inverse":
        parametrize.register_parametrization(layer, "W", NoInverse())
    elif how == "param_shape":
        layer.W = nn.Parameter(torch.zeros(1))


def build(specs, unready, seed):
    """One layer per spec holding seeded values; those in ``unready`` cannot take values."""
    rng = np.random.default_rng(seed)
    model = nn.Sequential()
    for index, spec in enumerate(specs):
        how = unready.get(index)
        params = random_params(spec, rng)
        with torch.inference_mode(how == "inference"):
            layer = CLASSES[spec.rank](spec.in_channels, spec.out_channels, spec.kernel_size,
                                       padding=spec.padding, groups=spec.groups,
                                       bias=spec.bias, D_mul=spec.D_mul)
            with torch.no_grad():  # not set_params: it refuses inference tensors
                for name in ("W", "D", "bias"):
                    if getattr(params, name) is not None:
                        getattr(layer, name).copy_(torch.from_numpy(getattr(params, name)))
        make_unready(layer, how)
        model.add_module(str(index), layer)
    return model


def values(model):
    return [value.detach().cpu().numpy().copy() for value in model.state_dict().values()
            if value.is_floating_point()]


ADAPTER = Adapter(doconv_torch, build, values, unready_kinds=UNREADY,
                  legacy_layout="torch-legacy")
test_a_failed_import_params_changes_nothing, test_a_failed_load_legacy_changes_nothing = \
    contract_tests(ADAPTER)


@pytest.mark.parametrize("how", UNREADY)
@fuzz_settings(3)
@given(data=st.data())
def test_a_failed_set_params_changes_nothing(how, data):
    spec = data.draw(st.sampled_from([1, 2, 3]).flatmap(layer_spec))
    seed = data.draw(st.integers(0, 2**16))
    model = build([spec], {0: how}, seed)
    before = values(model)
    with pytest.raises(ValueError, match="set_params cannot fill this layer"):
        model[0].set_params(random_params(spec, np.random.default_rng(seed + 1)))
    after = values(model)
    assert all(a.dtype == b.dtype and a.tobytes() == b.tobytes() for a, b in zip(before, after))
    assert len(before) == len(after)
