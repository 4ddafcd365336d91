"""doconv_torch offers the adapters' common API (doconv_core.testing.api) with its semantics:
convert and fuse return copies, every spelling of ``include`` selects the same layers, nothing
to convert is an error and nothing to fuse a warning, and requires_grad survives both."""

import re

import pytest
import torch
from torch import nn

import doconv_core
import doconv_torch
from doconv_core.testing.api import COPYING_FUNCTIONS, api_problems
from doconv_torch import DOConv2d, convert, doconv_layers, fuse


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False),
                                  nn.ReLU(), nn.Conv2d(4, 2, 1))
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.body(self.bn(self.stem(x))).mean((2, 3)))


CONVS = ["stem", "body.0", "body.2"]


def trained_doconv_net():
    model = convert(Net()).eval()
    with torch.no_grad():
        for layer in doconv_layers(model).values():
            if layer.D is not None:
                layer.D.normal_(0, 0.1)
    return model


def test_the_common_api():
    assert api_problems(doconv_torch) == []


def test_the_api_check_sees_a_difference(monkeypatch):
    def fuse(model, inplace=False):  # the signature before the common API
        return model

    fuse.__module__ = "doconv_torch.model"
    monkeypatch.setattr(doconv_torch, "fuse", fuse)
    monkeypatch.setattr(doconv_torch, "__all__",
                        [n for n in doconv_torch.__all__ if n != "load_legacy"])
    assert api_problems(doconv_torch) == [
        "doconv_torch.__all__ lacks 'load_legacy'",
        "doconv_torch.fuse(model, inplace=False) differs from (model)"]


def snapshot(model):
    return {"types": [(name, type(module)) for name, module in model.named_modules()],
            "state": {key: value.clone() for key, value in model.state_dict().items()},
            "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
            "training": [module.training for module in model.modules()]}


def assert_same(model, before):
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert sorted(after["state"]) == sorted(before["state"])
    assert all(torch.equal(before["state"][key], value) for key, value in after["state"].items())
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]


@pytest.mark.parametrize("function", COPYING_FUNCTIONS)
def test_copying_functions_leave_the_model_alone(function):
    model = {"convert": Net().eval, "fuse": trained_doconv_net}[function]()
    model.stem.requires_grad_(False)
    before = snapshot(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)

    result = getattr(doconv_torch, function)(model)

    assert result is not model
    assert_same(model, before)
    kind = {"convert": DOConv2d, "fuse": nn.Conv2d}[function]
    assert [name for name, m in result.named_modules() if type(m) is kind] == CONVS
    # Nothing is shared: changing the result cannot reach the given model.
    assert not {id(m) for m in result.modules()} & {id(m) for m in model.modules()}
    assert not {p.data_ptr() for p in result.parameters()} & {
        p.data_ptr() for p in model.parameters()}
    with torch.no_grad():
        torch.testing.assert_close(result(x), expected, rtol=1e-5, atol=1e-6)
        for parameter in result.parameters():
            parameter.add_(1)
    assert_same(model, before)


@pytest.mark.parametrize("function", COPYING_FUNCTIONS)
def test_copying_functions_copy_a_bare_layer(function):
    layer = {"convert": nn.Conv2d(2, 3, 3), "fuse": DOConv2d(2, 3, 3)}[function]
    before = snapshot(layer)
    result = getattr(doconv_torch, function)(layer)
    assert result is not layer and type(result) is not type(layer)
    assert_same(layer, before)


@pytest.mark.parametrize("spellings, picked", [
    (["body.*", ["body.*"], ("body.?",), lambda name, module: name.startswith("body.")],
     ["body.0", "body.2"]),
    ([["stem", "body.2"], ["body.2", "stem", "nothing"],
      lambda name, module: module.kernel_size == (3, 3) and module.bias is not None
      or name == "body.2"],
     ["stem", "body.2"]),
    (["*", None, ["*"], lambda name, module: True], CONVS),
    (["body.0", ["body.[0]"], lambda name, module: module.groups == 2], ["body.0"]),
])
def test_include_spellings_select_the_same_layers(spellings, picked):
    for include in spellings:
        converted = convert(Net(), include=include)
        assert sorted(doconv_layers(converted)) == sorted(picked), include


def test_include_patterns_match_whole_names():
    with pytest.raises(ValueError, match="include='body' selects"):
        convert(Net(), include="body")  # the Sequential, not its convs
    assert sorted(doconv_layers(convert(Net(), include="body*"))) == ["body.0", "body.2"]
    assert list(doconv_layers(convert(nn.Conv2d(2, 2, 3), include="*"))) == [""]


@pytest.mark.parametrize("model, include", [
    (nn.Linear(2, 2), None),
    (nn.Sequential(DOConv2d(2, 2, 3), nn.ReLU()), None),  # already converted
    (Net(), "head"),
    (Net(), ["nothing", "bn"]),
    (Net(), lambda name, module: False),
])
def test_convert_with_nothing_selected_raises(model, include):
    before = snapshot(model)
    message = str(doconv_core.nothing_to_convert(model, "nn.Conv1d, nn.Conv2d or nn.Conv3d",
                                                 include))
    assert message.startswith("convert found no nn.Conv1d, nn.Conv2d or nn.Conv3d")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        convert(model, include=include)
    assert_same(model, before)


@pytest.mark.parametrize("model", [nn.Linear(2, 2), Net(), nn.Sequential()])
def test_fuse_without_doconv_warns_and_copies(model):
    before = snapshot(model)
    with pytest.warns(UserWarning, match=f"^fuse found no DOConv1d, DOConv2d or DOConv3d in "
                                         f"{type(model).__name__}; "
                                         "it returns an unchanged copy$"):
        result = fuse(model)
    assert result is not model
    assert_same(result, before)
    assert_same(model, before)


def test_fuse_with_doconv_does_not_warn(recwarn):
    fuse(convert(Net()))
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_requires_grad_survives_convert_and_fuse():
    model = Net()
    model.stem.weight.requires_grad_(False)       # frozen kernel, trainable bias
    model.body[2].bias.requires_grad_(False)      # trainable kernel, frozen bias
    converted = convert(model)
    stem, grouped, pointwise = (converted.stem, converted.body[0], converted.body[2])
    assert (stem.W.requires_grad, stem.D.requires_grad, stem.bias.requires_grad) == (
        False, False, True)
    assert grouped.W.requires_grad and grouped.D.requires_grad and grouped.bias is None
    assert pointwise.D is None
    assert (pointwise.W.requires_grad, pointwise.bias.requires_grad) == (True, False)
    assert converted.head.weight.requires_grad  # other modules keep theirs

    grouped.W.requires_grad_(False)  # D trainable, W frozen: the fused weight follows W
    fused = fuse(converted)
    assert (fused.stem.weight.requires_grad, fused.stem.bias.requires_grad) == (False, True)
    assert not fused.body[0].weight.requires_grad
    assert (fused.body[2].weight.requires_grad, fused.body[2].bias.requires_grad) == (
        True, False)
    # And the layer's own fuse.
    layer = DOConv2d(2, 2, 3)
    layer.bias.requires_grad_(False)
    conv = layer.fuse()
    assert conv.weight.requires_grad and not conv.bias.requires_grad
    layer.W.requires_grad_(False)
    assert not layer.fuse().weight.requires_grad
