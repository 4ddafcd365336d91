"""The eval/no_grad kernel cache: reused when the kernel is outside autograd, never stale."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from doconv_torch import DOConv2d


def fresh_kernel(layer: DOConv2d) -> torch.Tensor:
    with torch.no_grad():
        return layer._compose().clone()


@pytest.fixture
def layer():
    layer = DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=10)
    with torch.no_grad():
        layer.D.normal_()
    return layer.eval()


@pytest.fixture
def count(monkeypatch):
    """How often the kernel is composed."""
    calls = []
    original = DOConv2d._compose

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(DOConv2d, "_compose", counting)
    return calls


def check_fresh(layer):
    """Under no_grad the cached kernel (and output) equal a freshly composed one."""
    with torch.no_grad():
        assert torch.equal(layer.weight, fresh_kernel(layer))


def test_reused_under_no_grad_and_inference_mode(layer, count):
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        first = layer.weight
        y1 = layer(x)
        y2 = layer(x)
        assert layer.weight is first
    assert len(count) == 1 and torch.equal(y1, y2)
    with torch.inference_mode():
        y3 = layer(x)
        assert layer.weight is first  # kept a normal tensor, so usable in both modes
    assert len(count) == 1 and torch.equal(y1, y3)


def test_reused_when_parameters_are_frozen(layer, count):
    layer.requires_grad_(False)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert len(count) == 1 and x.grad is not None


def test_not_used_when_the_kernel_needs_gradients(layer, count):
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        layer(x)
    for mode in (layer.train, layer.eval):  # eval mode with grad enabled still trains D, W
        mode()
        layer.zero_grad()
        layer(x).sum().backward()
        assert layer.W.grad is not None and layer.D.grad.abs().sum() > 0
    assert len(count) == 3
    assert layer._cache is None


def test_optimizer_step_invalidates(layer):
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        before = layer(x)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(x).pow(2).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = layer(x)
    assert not torch.equal(before, after)
    check_fresh(layer)


@pytest.mark.parametrize("foreach", [False, True])
def test_adam_step_invalidates(layer, foreach):
    with torch.no_grad():
        layer.weight
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, foreach=foreach)
    layer(torch.randn(1, 4, 5, 5)).sum().backward()
    optimizer.step()
    check_fresh(layer)


def test_load_state_dict_invalidates(layer):
    other = DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=10)
    with torch.no_grad():
        old = layer.weight.clone()
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert not torch.equal(layer.weight, old)
        assert torch.equal(layer.weight, other.weight)


@pytest.mark.parametrize("change", [
    lambda l: l.W.mul_(2),
    lambda l: l.D.add_(1),
    lambda l: l.D.zero_(),
    lambda l: l.W[0, 0, 0].fill_(5.0),
    lambda l: l.W.copy_(torch.randn_like(l.W)),
    lambda l: nn.init.normal_(l.D),
    lambda l: l.W.detach().neg_(),
], ids=["mul_W", "add_D", "zero_D", "index_W", "copy_W", "init_D", "detached_W"])
def test_in_place_changes_invalidate(layer, change):
    with torch.no_grad():
        old = layer.weight.clone()
        change(layer)
    with torch.no_grad():
        assert not torch.equal(layer.weight, old)
    check_fresh(layer)


def test_replacing_parameters_and_data_invalidates(layer):
    with torch.no_grad():
        layer.weight
    layer.W = nn.Parameter(torch.randn_like(layer.W))
    check_fresh(layer)
    layer.D.data = torch.randn_like(layer.D)
    check_fresh(layer)


def test_changes_through_data_need_clear_cache(layer):
    """``.data`` bypasses version counters (autograd ignores it too): the one documented gap."""
    with torch.no_grad():
        layer.weight
    layer.W.data.mul_(3)
    layer.clear_cache()
    check_fresh(layer)


def test_to_dtype_and_device_invalidate(layer):
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        layer(x)
        layer.double()
        assert layer.weight.dtype == torch.float64
        y = layer(x.double())
        assert y.dtype == torch.float64
        layer.float()
        assert layer.weight.dtype == torch.float32
        check_fresh(layer)
        layer.to("meta")
        assert layer.weight.device.type == "meta"


def test_mutating_the_returned_kernel_does_not_poison_the_cache(layer):
    with torch.no_grad():
        kernel = layer.weight
        kernel.zero_()
        assert layer.weight.abs().sum() > 0
    check_fresh(layer)


def test_inference_mode_kernel_is_not_reused_for_autograd(layer):
    layer.requires_grad_(False)
    x = torch.randn(1, 4, 5, 5)
    with torch.inference_mode():
        layer(x)
    x.requires_grad_()
    layer(x).sum().backward()  # would fail if an inference tensor were saved for backward
    assert x.grad is not None


def test_cache_is_never_saved_or_copied(layer):
    with torch.no_grad():
        layer.weight
    assert layer._cache is not None
    assert list(layer.state_dict()) == ["W", "D", "bias", "_extra_state"]
    assert copy.deepcopy(layer)._cache is None
    assert pickle.loads(pickle.dumps(layer))._cache is None
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    assert set(torch.load(buffer, weights_only=True)) == {"W", "D", "bias", "_extra_state"}


def test_layer_built_in_inference_mode_works_without_cache():
    with torch.inference_mode():
        layer = DOConv2d(2, 3, 3).eval()  # inference tensors: no version counters
        x = torch.randn(1, 2, 5, 5)
        y = layer(x)
        layer.W.mul_(2)
        torch.testing.assert_close(layer(x), 2 * (y - layer.bias.view(1, 3, 1, 1))
                                   + layer.bias.view(1, 3, 1, 1), rtol=1e-5, atol=1e-6)
