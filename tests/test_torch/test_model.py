"""Whole models: convert -> train -> fuse, portable export/import, legacy checkpoints."""

import copy
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import doconv_core as dc
from doconv_core.testing.cases import property_cases
from doconv_core import CheckpointError
from doconv_torch import (DOConv2d, convert, doconv_layers, export_params, fuse, import_params,
                          load_legacy)


class Block(nn.Module):
    """A ResNet/MobileNet-style block: 1x1 expand, depthwise (with a channel multiplier),
    grouped 3x3, 1x1 project, a strided 1x1 shortcut; BatchNorm; bias=False mostly."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.expand = nn.Conv2d(cin, 2 * cin, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * cin)
        self.depthwise = nn.Conv2d(2 * cin, 4 * cin, 3, stride, 1, groups=2 * cin, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * cin)
        self.grouped = nn.Conv2d(4 * cin, 4 * cin, 3, 1, "same", groups=2,
                                 padding_mode="reflect")
        self.project = nn.Conv2d(4 * cin, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.expand(x)))
        y = F.relu(self.bn2(self.depthwise(y)))
        y = F.relu(self.grouped(y))
        return F.relu(self.bn3(self.project(y)) + self.shortcut(x))


def small_resnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        Block(8, 12, 2), Block(12, 12, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))


CONV_NAMES = ["0", "3.expand", "3.depthwise", "3.grouped", "3.project", "3.shortcut.0",
              "4.expand", "4.depthwise", "4.grouped", "4.project", "4.shortcut.0"]


def conv_names(model, kind):
    return [name for name, m in model.named_modules() if type(m) is kind]


def warm_batchnorm(model, x):
    """Give BatchNorm non-trivial running statistics so eval outputs exercise them."""
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def test_convert_train_fuse_on_a_resnet_style_model():
    torch.manual_seed(1)
    x = torch.randn(6, 3, 12, 12)
    target = torch.randint(0, 5, (6,))
    original = warm_batchnorm(small_resnet(), x)
    with torch.no_grad():
        y_original = original(x)

    model = convert(original, D_mul=12)
    assert conv_names(original, nn.Conv2d) == CONV_NAMES  # the original is untouched
    assert conv_names(model, DOConv2d) == CONV_NAMES and not conv_names(model, nn.Conv2d)
    layers = doconv_layers(model)
    assert {n: l.D_mul for n, l in layers.items()} == {
        n: (12 if n.endswith(("depthwise", "grouped")) or n == "0" else 1) for n in CONV_NAMES}
    assert layers["3.grouped"].padding == "same" and layers["3.grouped"].padding_mode == "reflect"
    with torch.no_grad():
        assert torch.equal(model(x), y_original)  # embedding is exact: D = 0, W holds K

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    assert all(l.D.abs().sum() > 0 for l in layers.values() if l.D is not None)

    model.eval()
    fused = fuse(model)
    assert not conv_names(fused, DOConv2d) and conv_names(fused, nn.Conv2d) == CONV_NAMES
    assert conv_names(model, DOConv2d) == CONV_NAMES  # fuse copies
    with torch.no_grad():
        y_model = model(x)
        torch.testing.assert_close(fused(x), y_model, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(y_model, y_original, atol=1e-3)  # training did something

    # The fused state_dict loads (strictly) into the architecture built with nn.Conv2d.
    plain = small_resnet()
    plain.load_state_dict(fused.state_dict())
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), fused(x))
    assert sum(p.numel() for p in fused.parameters()) == sum(
        p.numel() for p in original.parameters())


def test_convert_include_predicate_sees_the_given_model():
    model = small_resnet()
    seen = []
    own = {id(module) for module in model.modules()}

    def include(name, module):
        seen.append(name)
        assert id(module) in own  # the caller's modules, not the copy's
        return name.startswith("3.") and module.kernel_size == (3, 3)

    converted = convert(model, include=include)
    assert converted is not model and conv_names(model, DOConv2d) == []
    assert conv_names(converted, DOConv2d) == ["3.depthwise", "3.grouped"]
    assert seen == [n for n in CONV_NAMES]  # asked only about plain nn.Conv2d modules, once


def test_convert_and_fuse_a_bare_layer():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = convert(conv)
    assert isinstance(layer, DOConv2d)
    back = fuse(layer)
    assert type(back) is nn.Conv2d
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(back(x), conv(x), rtol=0, atol=0)


def test_convert_skips_subclasses_and_keeps_sharing():
    class StdConv(nn.Conv2d):  # a custom forward: converting would change the function
        pass

    shared = nn.Conv2d(2, 2, 3, padding=1)
    lazy = nn.LazyConv2d(4, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared, StdConv(2, 2, 3), lazy,
                          DOConv2d(2, 2, 3))
    converted = convert(model)
    assert isinstance(converted[0], DOConv2d) and converted[0] is converted[2]
    assert type(converted[3]) is StdConv
    assert isinstance(converted[4], nn.LazyConv2d)  # not materialised: nothing to embed
    assert type(converted[5]) is DOConv2d
    # A materialised LazyConv2d *is* an nn.Conv2d and converts.
    lazy_model = nn.Sequential(nn.LazyConv2d(4, 3))
    lazy_model(torch.randn(1, 2, 5, 5))
    assert isinstance(convert(lazy_model)[0], DOConv2d)


def test_convert_preserves_dtype_training_and_frozen_state():
    conv = nn.Conv2d(2, 4, 3, dtype=torch.float64).eval().requires_grad_(False)
    layer = convert(conv)
    assert layer.W.dtype == torch.float64 and not layer.training
    assert not layer.W.requires_grad and not layer.D.requires_grad
    assert not layer.bias.requires_grad


CONVERT_ERRORS = [
    (dict(D_mul=4), "cannot convert '0': D_mul must be >= kernel height*width = 9 for a 3x3 "
                    "kernel, got 4"),
    (dict(D_mul=0), "D_mul must be an integer >= 1, got 0"),
    (dict(include=3), "include must be None, a callable (name, layer) -> bool, or layer-name "
                      "patterns (a string or an iterable of strings), got 3"),
    (dict(include="x*"), "convert found no nn.Conv1d, nn.Conv2d or nn.Conv3d that include='x*' "
                         "selects in Sequential; nothing would change"),
]


@pytest.mark.parametrize("kwargs, message", CONVERT_ERRORS, ids=[m for _, m in CONVERT_ERRORS])
def test_convert_errors(kwargs, message):
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        convert(model, **kwargs)
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d]  # nothing changed
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got list"):
        convert([nn.Conv2d(2, 2, 3)])
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got dict"):
        fuse({})


def test_layer_params_round_trip_and_cross_framework_container(tmp_path):
    layer = DOConv2d(4, 6, (3, 1), 1, (1, 0), groups=2, D_mul=5, dtype=torch.float64)
    with torch.no_grad():
        layer.D.normal_()
    params = layer.to_params()
    assert params.spec == layer.spec and params.D.shape == (4, 3, 5)
    np.testing.assert_array_equal(params.W, layer.W.detach().numpy())
    params.save(tmp_path / "layer.npz")
    again = DOConv2d.from_params(dc.DOConvParams.load(tmp_path / "layer.npz"),
                                 dtype=torch.float64)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(again(x), layer(x))
    assert repr(again) == repr(layer)
    # Parameters written by another framework (canonical layout) load the same way.
    case = [c for c in property_cases() if c.name.startswith("between-k3x3-dmul+3")
            and not (c.spec.padding == "same" and c.spec.stride != (1, 1))][0]
    arrays = case.arrays(np.float64)
    foreign = dc.DOConvParams(case.spec, arrays["W"], arrays["D"], arrays["bias"])
    loaded = DOConv2d.from_params(foreign, dtype=torch.float64)
    np.testing.assert_allclose(
        loaded(torch.from_numpy(arrays["x"])).detach().numpy(),
        dc.doconv2d(arrays["x"], arrays["D"], arrays["W"], arrays["bias"], case.spec),
        rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="params must be DOConvParams, got dict"):
        DOConv2d.from_params({})


def test_from_params_refuses_same_padding_with_stride():
    spec = dc.ConvSpec(2, 2, 3, stride=2, padding="same")  # valid in Keras
    params = dc.DOConvParams(spec, np.zeros(spec.W_shape), np.zeros(spec.D_shape),
                             np.zeros(2))
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        DOConv2d.from_params(params)


def test_set_params_checks_everything_before_changing_anything():
    layer = DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=10, dtype=torch.float64)
    layer.D.requires_grad_(False)
    rng = np.random.default_rng(0)
    spec = layer.spec
    good = dc.DOConvParams(spec, rng.standard_normal(spec.W_shape).astype(np.float32),
                           rng.standard_normal(spec.D_shape), rng.standard_normal(6))
    before = {k: v.clone() for k, v in layer.state_dict().items()}

    def unchanged():
        return all(torch.equal(before[k], v) for k, v in layer.state_dict().items())

    wrong_shape = dc.DOConvParams(spec, good.W, good.D, good.bias)
    wrong_shape.D = good.D[:, :, :9]  # changed after DOConvParams checked it
    integer_W = dc.DOConvParams(spec, good.W.astype(np.int64), good.D, good.bias)
    refused = [
        ({"W": 1}, "params must be DOConvParams, got dict"),
        (dc.DOConvParams(dc.ConvSpec(4, 6, 3, padding=1, groups=2), good.W[:, :, :9],
                         good.D[:, :, :9], good.bias), "params.spec must describe this layer's"),
        (wrong_shape, "D must have shape (4, 9, 10) for this layer, got (4, 9, 9)"),
        (integer_W, "W must hold floating-point numbers (float16, float32 or float64), got "
                    "dtype int64"),
    ]
    for params, message in refused:
        with pytest.raises(ValueError, match=re.escape(message)):
            layer.set_params(params)
        assert unchanged()
    # The same function spelled otherwise loads; values take the layer's dtype, and
    # requires_grad stays.
    same = dc.DOConvParams(dc.ConvSpec(4, 6, 3, padding="same", groups=2, D_mul=10),
                           good.W, good.D, good.bias)
    layer.set_params(same)
    assert layer.W.dtype == torch.float64 and not layer.D.requires_grad
    assert layer.W.requires_grad
    np.testing.assert_array_equal(layer.W.detach().numpy(), good.W)
    np.testing.assert_array_equal(layer.D.detach().numpy(), good.D)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    np.testing.assert_allclose(layer(x).detach().numpy(),
                               dc.doconv2d(x.numpy(), good.D, good.W, good.bias, spec),
                               rtol=1e-6, atol=1e-6)
    with torch.device("meta"):
        on_meta = DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=10)
    with pytest.raises(ValueError, match="set_params cannot fill a layer on the meta device"):
        on_meta.set_params(good)


def test_export_import_params_for_a_whole_model(tmp_path):
    x = torch.randn(2, 3, 10, 10)
    model = convert(small_resnet()).eval()
    with torch.no_grad():
        for layer in doconv_layers(model).values():
            if layer.D is not None:
                layer.D.normal_(0, 0.1)
    path = tmp_path / "model.npz"
    export_params(model, path)
    assert sorted(dc.load_params(path)) == sorted(CONV_NAMES)
    other = copy.deepcopy(model)
    for layer in doconv_layers(other).values():
        layer.reset_parameters()
    assert import_params(other, path) == sorted(CONV_NAMES)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
    # A bare layer is stored under "layer".
    export_params(doconv_layers(model)["0"], tmp_path / "one.npz")
    assert list(dc.load_params(tmp_path / "one.npz")) == ["layer"]


@pytest.mark.parametrize("dtype, code", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_16_bit_models_export_in_their_dtype(tmp_path, dtype, code):
    # The portable format carries bfloat16 (as BF16, through ml_dtypes) and float16: an
    # export is not widened to F32, and it imports back bit for bit.
    model = convert(small_resnet()).to(dtype)
    path = tmp_path / "model.safetensors"
    export_params(model, path)
    header, _ = dc.read_safetensors_header(path)
    assert {entry["dtype"] for entry in header.values()} == {code}
    other = convert(small_resnet()).to(dtype)
    import_params(other, path)
    for name, layer in doconv_layers(other).items():
        for part in ("W", "D", "bias"):
            value = getattr(layer, part)
            if value is not None:
                assert torch.equal(value, getattr(doconv_layers(model)[name], part)), (name, part)


def test_import_params_mismatches_change_nothing(tmp_path):
    model = convert(small_resnet())
    path = tmp_path / "model.npz"
    export_params(model, path)
    smaller = convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False)))
    with pytest.raises(CheckpointError, match=re.escape(
            "does not match the model's DO-Conv layers: missing [], unexpected ['3.depthwise'")):
        import_params(smaller, path)
    different = convert(small_resnet(), D_mul=10)
    before = {k: v.clone() for k, v in different.state_dict().items()}
    with pytest.raises(CheckpointError, match="layer '0' was saved with ConvSpec"):
        import_params(different, path)
    after = different.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="model has no DOConv1d, DOConv2d or DOConv3d layers to "
                                         "export"):
        export_params(nn.Linear(2, 2), tmp_path / "none.npz")


# -- the original reference code's checkpoints -------------------------------------------------
def original_state(spec, seed):
    """What the authors' DOConv2d state_dict holds for ``spec``: W, D, d_diag, bias."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal(spec.W_shape) / np.sqrt(spec.fan_in)
    state = {"W": torch.from_numpy(W.astype(np.float32))}
    if spec.has_D:
        state["D"] = torch.from_numpy(0.3 * rng.standard_normal(spec.D_shape).astype(np.float32))
        state["d_diag"] = torch.from_numpy(dc.identity_d(spec.in_channels, spec.mn, spec.D_mul))
    if spec.bias:
        state["bias"] = torch.from_numpy(rng.standard_normal(spec.out_channels).astype(np.float32))
    return state


def original_forward(spec, state, x):
    """The authors' PyTorch forward, transcribed (its own group mapping)."""
    M, N = spec.kernel_size
    if spec.has_D:
        D = state["D"] + state["d_diag"]
        W = torch.reshape(state["W"], (spec.out_channels // spec.groups, spec.in_channels,
                                       spec.D_mul))
        DoW = torch.reshape(torch.einsum("ims,ois->oim", D, W), spec.kernel_shape)
    else:
        DoW = torch.reshape(state["W"], spec.kernel_shape)
    return F.conv2d(x, DoW, state.get("bias"), spec.stride, spec.padding, spec.dilation,
                    spec.groups)


LEGACY_LAYERS = {  # name: (ConvSpec, exact?)
    "conv1": (dc.ConvSpec(3, 8, 3, padding=1, bias=False), True),
    "dw": (dc.ConvSpec(8, 8, 3, padding=1, groups=8, D_mul=12), True),
    "grouped": (dc.ConvSpec(8, 12, 3, padding=1, groups=2), False),
    "pw": (dc.ConvSpec(12, 4, 1), True),
}


def test_load_legacy_of_a_model():
    specs = {name: spec for name, (spec, _) in LEGACY_LAYERS.items()}
    model = nn.Sequential()
    for name, spec in specs.items():
        model.add_module(name, DOConv2d(spec.in_channels, spec.out_channels, spec.kernel_size,
                                        padding=spec.padding, groups=spec.groups,
                                        bias=spec.bias, D_mul=spec.D_mul))
    model.add_module("bn", nn.BatchNorm2d(4))
    legacy = {}
    for index, (name, spec) in enumerate(specs.items()):
        legacy.update({f"{name}.{k}": v for k, v in original_state(spec, index).items()})
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.normal_()
    legacy.update({f"bn.{k}": v for k, v in bn.state_dict().items()})

    report = load_legacy(model, legacy)
    assert report.exact == ["conv1", "dw", "pw"]
    assert report.function_preserving == ["grouped"]
    assert report.layers["grouped"].method == "embedded composed kernel"
    assert report.missing_keys == [] and report.unexpected_keys == []
    assert torch.equal(model.bn.running_mean, bn.running_mean)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        h = x
        for name, spec in specs.items():
            state = {k.split(".", 1)[1]: v for k, v in legacy.items()
                     if k.startswith(name + ".")}
            expected = original_forward(spec, state, h)
            h = getattr(model, name)(h)
            torch.testing.assert_close(h, expected, rtol=1e-4, atol=1e-5)
            h = expected
        # The exact layers hold the original parameters themselves.
        assert torch.equal(model.conv1.D, legacy["conv1.D"])
        assert torch.equal(model.dw.W, legacy["dw.W"])


def test_load_legacy_of_one_layer_and_errors():
    spec = dc.ConvSpec(4, 4, 3, groups=2, bias=True)
    layer = DOConv2d(4, 4, 3, groups=2)
    state = original_state(spec, 5)
    state["D_diag"] = state.pop("d_diag")  # either spelling
    report = load_legacy(layer, state)
    assert list(report.layers) == ["layer"] and report.function_preserving == ["layer"]
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), original_forward(spec, {**state, "d_diag":
                                   state["D_diag"]}, x), rtol=1e-5, atol=1e-5)
    bad = dict(state, D_diag=state["D_diag"] * 2)
    with pytest.raises(CheckpointError, match="layer 'layer': D_diag is not the fixed identity"):
        load_legacy(layer, bad)
    with pytest.raises(CheckpointError, match="'layer'") as error:  # the core's wording
        load_legacy(layer, {"D": state["D"]})
    assert re.search(r"\bW\b", str(error.value))
    with pytest.raises(CheckpointError, match=re.escape("has no 'W' for layer 'layer'")):
        load_legacy(layer, {"other": state["D"]})
    wrong = dict(state, W=state["W"][:, :, :4])
    with pytest.raises(CheckpointError, match=re.escape(
            "W must have shape (4, 2, 9) in the original PyTorch layout")):
        load_legacy(layer, wrong)


def legacy_model():
    return nn.Sequential(DOConv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                         DOConv2d(4, 2, 3, padding=1, bias=False))


def test_load_legacy_not_strict_reports_what_it_skipped():
    source = legacy_model()
    with torch.no_grad():
        source[0].D.normal_()
        source[1].running_mean.normal_()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("2.")}
    state["extra"] = torch.zeros(1)
    target = legacy_model()
    W2 = target[2].W.clone()
    report = load_legacy(target, state, strict=False)
    assert list(report.layers) == ["0"] and report.exact == ["0"]
    assert report.missing_keys == ["2.W", "2.D"] and report.unexpected_keys == ["extra"]
    assert torch.equal(target[0].D, source[0].D)
    assert torch.equal(target[1].running_mean, source[1].running_mean)
    assert torch.equal(target[2].W, W2)


def test_load_legacy_ignores_a_stray_weight_under_a_loaded_layer():
    """A ``weight`` beside a layer's W is unexpected: it must not be embedded over W, D."""
    source = legacy_model()
    state = dict(source.state_dict(), **{"0.weight": torch.ones(4, 3, 3, 3)})
    target = legacy_model()
    with pytest.raises(CheckpointError, match=re.escape("unexpected keys ['0.weight']")):
        load_legacy(target, state)
    report = load_legacy(target, state, strict=False)
    assert report.unexpected_keys == ["0.weight"] and report.missing_keys == []
    assert torch.equal(target[0].W, source[0].W) and torch.equal(target[0].D, source[0].D)


def test_load_legacy_keeps_requires_grad_and_refuses_meta_and_bad_arguments():
    source = legacy_model()
    target = legacy_model()
    target[0].D.requires_grad_(False)
    load_legacy(target, source.state_dict())
    assert not target[0].D.requires_grad and target[0].W.requires_grad
    with torch.device("meta"):
        on_meta = legacy_model()
    with pytest.raises(CheckpointError, match=re.escape(
            "cannot load the legacy checkpoint: layers ['0', '2'] are on the meta device")):
        load_legacy(on_meta, source.state_dict())
    with pytest.raises(ValueError, match="the legacy weights must be a mapping"):
        load_legacy(target, [1])
    with pytest.raises(ValueError, match="strict must be True or False, got 1"):
        load_legacy(target, source.state_dict(), strict=1)
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got dict"):
        load_legacy({}, source.state_dict())


def test_doconv_model_loads_a_plain_conv_state_dict_by_embedding():
    """A model built with DOConv2d takes a pretrained nn.Conv2d checkpoint unchanged."""
    x = torch.randn(2, 3, 10, 10)
    plain = warm_batchnorm(small_resnet(), x)
    model = convert(small_resnet(), D_mul=10).eval()
    model.load_state_dict(plain.state_dict())  # strict: keys weight -> W, D
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert all(l.D is None or torch.count_nonzero(l.D) == 0
               for l in doconv_layers(model).values())
    # Round trip: the fused state of a trained DO-Conv model loads back into it.
    with torch.no_grad():
        for layer in doconv_layers(model).values():
            if layer.D is not None:
                layer.D.normal_(0, 0.1)
        expected = model(x)
    model.load_state_dict(fuse(model).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    bad = dict(plain.state_dict())
    bad["0.weight"] = bad["0.weight"][:, :2]
    with pytest.raises(RuntimeError, match=re.escape(
            "size mismatch for 0.weight: copying an nn.Conv2d weight of shape (8, 2, 3, 3) "
            "into a DOConv2d whose kernel has shape (8, 3, 3, 3)")):
        model.load_state_dict(bad)
