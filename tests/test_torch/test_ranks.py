"""DOConv1d and DOConv3d (and DOConv2d beside them): the NumPy reference over the core's 1-D
and 3-D cases, nn.Conv1d/nn.Conv3d parity, errors, conversions, whole models of mixed ranks,
checkpoints, the kernel cache, TorchScript and torch.export.

Tolerances against the float64 reference: max |error| / max |reference| <= 1e-9 in float64,
1e-4 in float32 (as the cross-framework check).
"""

import re

import numpy as np
import pytest
import torch
from torch import nn

import doconv_core as dc
from doconv_core.testing.cases import rank_cases
from doconv_torch import (DOConv1d, DOConv2d, DOConv3d, convert, doconv_layers, export_params,
                          fuse, import_params, load_legacy)

LAYERS = {1: DOConv1d, 2: DOConv2d, 3: DOConv3d}
NATIVE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CASES = rank_cases()
RELATIVE = {torch.float32: 1e-4, torch.float64: 1e-9}


def torch_supports(spec: dc.ConvSpec) -> bool:
    """PyTorch refuses padding='same' with a stride and has no causal padding."""
    if spec.padding == "same" and any(s != 1 for s in spec.stride):
        return False
    return spec.normalized().padding != "causal"


def assert_relative(actual, expected, tolerance, what=""):
    actual = actual.detach().double().numpy() if isinstance(actual, torch.Tensor) else actual
    assert actual.shape == expected.shape, what
    error = np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g}"


def build(spec: dc.ConvSpec, **kwargs):
    return LAYERS[spec.rank](spec.in_channels, spec.out_channels, spec.kernel_size,
                             spec.stride, spec.padding, spec.dilation, spec.groups, spec.bias,
                             spec.padding_mode, D_mul=spec.D_mul, **kwargs)


def with_D(layer, std=0.3):
    with torch.no_grad():
        if layer.D is not None:
            layer.D.normal_(0, std)
    return layer


# -- the NumPy reference over rank_cases() -----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_outputs_gradients_and_fusion_match_the_reference(case, dtype):
    spec = case.spec
    if not torch_supports(spec):
        with pytest.raises(ValueError, match=r"^padding='(same|causal)' is not supported"):
            build(spec)
        return
    arrays = case.arrays(np.float64, seed=1)
    x64, D, W, bias = arrays["x"], arrays["D"], arrays["W"], arrays["bias"]
    layer = LAYERS[spec.rank].from_params(dc.DOConvParams(spec, W, D, bias), dtype=dtype)
    assert type(layer) is LAYERS[spec.rank] and layer.spec.same_function(spec)
    x = torch.from_numpy(x64).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype
    tolerance = RELATIVE[dtype]
    assert_relative(y, dc.doconv(x64, D, W, bias, spec), tolerance, "output")

    grad_y = np.random.default_rng(2).standard_normal(tuple(y.shape))
    y.backward(torch.from_numpy(grad_y).to(dtype))
    expected = dc.doconv_vjp(x64, D, W, bias, spec, grad_y)
    for name, got in (("x", x.grad), ("W", layer.W.grad),
                      ("D", None if layer.D is None else layer.D.grad),
                      ("bias", None if layer.bias is None else layer.bias.grad)):
        if expected[name] is None:
            assert got is None, name
        else:
            assert_relative(got, expected[name], tolerance, f"grad {name}")

    fused = layer.fuse()
    assert type(fused) is NATIVE[spec.rank]
    assert_relative(fused.weight, dc.compose_kernel(D, W, groups=spec.groups,
                                                    kernel_size=spec.kernel_size),
                    tolerance, "fused kernel")
    with torch.no_grad():
        # The fused conv runs the layer's own kernel through the same op: bit-identical.
        assert torch.equal(fused(x), layer(x))


@pytest.mark.parametrize("case", [c for c in CASES if torch_supports(c.spec)][::5],
                         ids=lambda c: c.name)
def test_feature_composition_agrees(case):
    """The independent feature-composition oracle (checks the channel mapping c(o, i))."""
    arrays = case.arrays(np.float64, seed=2)
    layer = LAYERS[case.spec.rank].from_params(
        dc.DOConvParams(case.spec, arrays["W"], arrays["D"], arrays["bias"]),
        dtype=torch.float64)
    with torch.no_grad():
        y = layer(torch.from_numpy(arrays["x"]))
    expected = dc.doconv_features(arrays["x"], arrays["D"], arrays["W"], arrays["bias"],
                                  case.spec)
    assert_relative(y, expected, 1e-9, "output")


# -- the native convs' signature and behaviour -------------------------------------------------
PARITY = [
    (1, (3, 8, 3), dict()),
    (1, (4, 8, 5), dict(stride=2, padding=2, dilation=2, groups=2, bias=False)),
    (1, (4, 8, 4), dict(padding="same", padding_mode="reflect")),   # even kernel: asymmetric
    (1, (4, 4, 3), dict(padding=1, groups=4, padding_mode="circular")),
    (1, (4, 6, 1), dict(stride=2)),
    (3, (3, 8, 3), dict(padding=1)),
    (3, (4, 8, (3, 1, 2)), dict(stride=(1, 2, 1), padding=(1, 0, 1), groups=2)),
    (3, (4, 8, (2, 3, 3)), dict(padding="same", padding_mode="replicate")),
    (3, (4, 4, 3), dict(padding="valid", groups=4, dilation=(1, 2, 1), bias=False)),
    (3, (4, 6, 1), dict(padding_mode="zeros")),
    (3, (4, 8, 3), dict(padding=(0, 1, 2), padding_mode="circular", dtype=torch.float64)),
]
ATTRIBUTES = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "padding_mode", "transposed", "output_padding", "training"]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("rank, args, kwargs", PARITY,
                         ids=[f"{r}d-{a}-{k}" for r, a, k in PARITY])
def test_parity_with_the_native_conv(rank, args, kwargs):
    torch.manual_seed(7)
    native = NATIVE[rank](*args, **kwargs)
    torch.manual_seed(7)
    layer = LAYERS[rank](*args, **kwargs)
    for name in ATTRIBUTES:
        assert getattr(layer, name) == getattr(native, name), name
    assert list(layer._reversed_padding_repeated_twice) == list(
        native._reversed_padding_repeated_twice)
    # D_mul = the kernel volume and D = 0 draw exactly the native conv's initialisation.
    assert torch.equal(layer.weight, native.weight)
    assert (layer.bias is None) == (native.bias is None)
    if native.bias is not None:
        assert torch.equal(layer.bias, native.bias)
    assert repr(layer) == "DO" + repr(native)[:-1] + f", D_mul={layer.D_mul})"

    dtype = native.weight.dtype
    x = torch.randn((2, args[0]) + (9, 8, 7)[:rank], dtype=dtype)
    converted = LAYERS[rank].from_conv(native)
    torch.testing.assert_close(converted(x), native(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(converted(x[0]), native(x[0]), rtol=1e-5, atol=1e-6)  # unbatched
    fused = with_D(converted).fuse()
    assert type(fused) is NATIVE[rank] and repr(fused) == repr(native)
    for name in ATTRIBUTES:
        assert getattr(fused, name) == getattr(native, name), name
    assert torch.equal(fused(x), converted(x))


def test_parameters_state_and_composition_per_rank():
    layer = with_D(DOConv3d(4, 6, (3, 1, 2), groups=2, D_mul=8), std=1.0)
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {
        "W": (6, 2, 8), "D": (4, 6, 8), "bias": (6,)}
    assert list(layer.state_dict()) == ["W", "D", "bias", "_extra_state"]
    assert list(layer.buffers()) == []
    kernel = layer.weight
    assert kernel.shape == (6, 2, 3, 1, 2) and kernel.is_contiguous() and kernel.requires_grad
    np.testing.assert_allclose(
        kernel.detach().numpy(), dc.compose_kernel(layer.D.detach().numpy(),
                                                   layer.W.detach().numpy(), groups=2,
                                                   kernel_size=(3, 1, 2)), rtol=1e-5, atol=1e-6)
    one = DOConv1d(3, 5, 1, bias=False)
    assert one.D is None and one.D_mul == 1 and torch.equal(one.weight, one.W.reshape(5, 3, 1))
    assert DOConv1d(2, 2, 5).D_mul == 5 and DOConv3d(2, 2, 3).D_mul == 27


BAD_ARGUMENTS = [
    (DOConv1d, dict(padding="causal"), "padding='causal' is not supported in PyTorch (nn.Conv1d "
                                       "has no causal padding); pad the input on the left instead"),
    (DOConv1d, dict(padding="same", stride=2), "padding='same' is not supported for strided "
                                               "convolutions in PyTorch, got stride=(2,)"),
    (DOConv3d, dict(padding="same", stride=(1, 2, 1)), "padding='same' is not supported for "
                                                       "strided convolutions in PyTorch, got "
                                                       "stride=(1, 2, 1)"),
    (DOConv3d, dict(padding="causal"), "padding must be 'valid', 'same', an integer >= 0 or a "
                                       "triple of them, got 'causal'"),
    (DOConv1d, dict(kernel_size=(3, 3)), "kernel_size must be an integer >= 1 or a sequence of "
                                         "one of them, got 2 values: (3, 3)"),
    (DOConv3d, dict(kernel_size=(3, 3)), "kernel_size must be an integer >= 1 or a triple of "
                                         "them, got 2 values: (3, 3)"),
    (DOConv3d, dict(D_mul=26), "D_mul must be >= kernel volume = 27 for a 3x3x3 kernel, got 26"),
    (DOConv1d, dict(kernel_size=1, D_mul=2),
     "D_mul must be 1 or None for a length-1 kernel (it has no depthwise part), got 2"),
]


@pytest.mark.parametrize("cls, override, message", BAD_ARGUMENTS,
                         ids=[m for _, _, m in BAD_ARGUMENTS])
def test_bad_arguments_raise_clear_value_errors(cls, override, message):
    kwargs = dict(in_channels=4, out_channels=8, kernel_size=3)
    kwargs.update(override)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        cls(**kwargs)


@pytest.mark.parametrize("cls, good, bad, message", [
    (DOConv1d, (2, 4, 9), (2, 4, 9, 9), "input must be 3-D (N, C, L) or 2-D (C, L), got shape "
                                        "(2, 4, 9, 9)"),
    (DOConv3d, (2, 4, 5, 5, 5), (4, 5, 5), "input must be 5-D (N, C, D, H, W) or 4-D "
                                           "(C, D, H, W), got shape (4, 5, 5)"),
])
def test_wrong_input_raises_clear_value_error(cls, good, bad, message):
    layer = cls(4, 2, 3, padding=1)
    assert layer(torch.zeros(good)).shape[:2] == (2, 2)
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(torch.zeros(bad))
    wrong_channels = (good[0], 3) + good[2:]
    with pytest.raises(ValueError, match=re.escape(
            "input must have 4 channels (the layer's in_channels), got 3")):
        layer(torch.zeros(wrong_channels))


def test_conversions_check_the_rank():
    params = DOConv1d(2, 3, 3).to_params()
    assert params.spec.rank == 1
    with pytest.raises(ValueError, match=re.escape(
            "params.spec describes a 1-D layer (rank=1); DOConv3d is 3-D, use DOConv1d")):
        DOConv3d.from_params(params)
    with pytest.raises(ValueError, match="params.spec must describe this layer's function"):
        DOConv2d(2, 3, 3).set_params(dc.DOConvParams(
            dc.ConvSpec(2, 3, 3, rank=3), np.zeros((3, 2, 27)), np.zeros((2, 27, 27)),
            np.zeros(3)))
    with pytest.raises(ValueError, match="conv must be an nn.Conv3d, got Conv2d"):
        DOConv3d.from_conv(nn.Conv2d(2, 3, 3))
    with pytest.raises(ValueError, match="conv must be an nn.Conv1d, got Conv3d"):
        DOConv1d.from_conv(nn.Conv3d(2, 3, 3))
    # Causal padding that pads nothing (a kernel of one element) is 'valid'.
    causal = dc.ConvSpec(2, 3, 1, padding="causal", rank=1)
    layer = DOConv1d.from_params(dc.DOConvParams(causal, np.ones((3, 2, 1)), None, np.zeros(3)))
    assert layer.padding == "valid" and layer.spec.same_function(causal)
    with pytest.raises(ValueError, match="padding='causal' is not supported in PyTorch"):
        DOConv1d.from_params(dc.DOConvParams(dc.ConvSpec(2, 3, 3, padding="causal", rank=1),
                                             np.ones((3, 2, 3)), np.zeros((2, 3, 3)),
                                             np.zeros(3)))


@pytest.mark.parametrize("rank", [1, 3])
def test_params_round_trip_and_plain_conv_state_embedding(rank, tmp_path):
    layer = with_D(LAYERS[rank](4, 6, 3, padding=1, groups=2, D_mul=3 ** rank + 2,
                                dtype=torch.float64))
    x = torch.randn((2, 4) + (6, 5, 4)[:rank], dtype=torch.float64)
    params = layer.to_params()
    assert params.spec == layer.spec and params.spec.rank == rank
    params.save(tmp_path / "layer.npz")
    again = LAYERS[rank].from_params(dc.DOConvParams.load(tmp_path / "layer.npz"),
                                     dtype=torch.float64)
    assert torch.equal(again(x), layer(x)) and repr(again) == repr(layer)
    # A plain conv's state_dict (``weight``) loads by embedding: the same function.
    native = NATIVE[rank](4, 6, 3, padding=1, groups=2, dtype=torch.float64)
    again.load_state_dict(native.state_dict())
    torch.testing.assert_close(again(x), native(x), rtol=1e-12, atol=1e-12)
    bad = {"weight": native.weight[:, :1], "bias": native.bias}
    with pytest.raises(RuntimeError, match=re.escape(
            f"copying an nn.Conv{rank}d weight of shape {tuple(bad['weight'].shape)} into a "
            f"DOConv{rank}d whose kernel has shape {tuple(native.weight.shape)}")):
        again.load_state_dict(bad)
    with pytest.raises(AttributeError, match=f"DOConv{rank}d.weight is the kernel composed"):
        again.weight = native.weight.detach()


@pytest.mark.parametrize("rank", [1, 3])
def test_the_kernel_cache_per_rank(rank, monkeypatch):
    layer = with_D(LAYERS[rank](4, 4, 3, padding=1)).eval()
    calls = []
    original = type(layer)._compose

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(type(layer), "_compose", counting)
    x = torch.randn((1, 4) + (5, 5, 5)[:rank])
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first) and len(calls) == 1
        layer.W.mul_(2)  # an in-place change: recomposed
        layer(x)
        assert len(calls) == 2
        layer.D = nn.Parameter(layer.D + 1)  # assignment (__setattr__) drops the cache
        layer(x)
        assert len(calls) == 3
    layer(x).sum().backward()  # training: never cached
    assert layer.D.grad is not None and layer._cache is None


# -- whole models mixing ranks ------------------------------------------------------------------
class Mixed(nn.Module):
    """A 1-D, a 2-D and a 3-D branch (each with a grouped and a 1x1 conv) feeding one head."""

    def __init__(self):
        super().__init__()
        self.signal = nn.Sequential(nn.Conv1d(2, 4, 5, padding=2), nn.BatchNorm1d(4), nn.ReLU(),
                                    nn.Conv1d(4, 4, 3, stride=2, groups=2, bias=False),
                                    nn.Conv1d(4, 3, 1))
        self.image = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"),
                                   nn.ReLU(), nn.Conv2d(4, 3, 1))
        self.volume = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                                    nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1), groups=4),
                                    nn.Conv3d(4, 3, 1, bias=False))
        self.head = nn.Linear(3, 2)

    def forward(self, signal, image, volume):
        features = (self.signal(signal).mean(-1) + self.image(image).mean((-2, -1))
                    + self.volume(volume).mean((-3, -2, -1)))
        return self.head(features)


MIXED_CONVS = {1: ["signal.0", "signal.3", "signal.4"], 2: ["image.0", "image.2"],
               3: ["volume.0", "volume.3", "volume.4"]}


def mixed_inputs():
    return torch.randn(3, 2, 11), torch.randn(3, 3, 6, 5), torch.randn(3, 1, 4, 5, 6)


def names_of(model, kind):
    return [name for name, module in model.named_modules() if type(module) is kind]


def test_convert_train_and_fuse_a_model_mixing_ranks():
    torch.manual_seed(0)
    original = Mixed()
    inputs = mixed_inputs()
    original.train()
    original(*inputs)  # BatchNorm statistics
    original.eval()
    with torch.no_grad():
        expected = original(*inputs)

    model = convert(original, D_mul=30)
    for rank, names in MIXED_CONVS.items():
        assert names_of(model, LAYERS[rank]) == names
        assert names_of(original, NATIVE[rank]) == names  # the original is untouched
        assert not names_of(model, NATIVE[rank])
    assert {name: layer.D_mul for name, layer in doconv_layers(model).items()} == {
        "signal.0": 30, "signal.3": 30, "signal.4": 1, "image.0": 30, "image.2": 1,
        "volume.0": 30, "volume.3": 30, "volume.4": 1}
    with torch.no_grad():
        assert torch.equal(model(*inputs), expected)  # embedding is exact

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(*inputs).square().sum().backward()
        optimizer.step()
    model.eval()
    fused = fuse(model)
    for rank, names in MIXED_CONVS.items():
        assert names_of(fused, NATIVE[rank]) == names and not names_of(fused, LAYERS[rank])
    with torch.no_grad():
        trained = model(*inputs)
        torch.testing.assert_close(fused(*inputs), trained, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(trained, expected, atol=1e-4)
    plain = Mixed().eval()
    plain.load_state_dict(fused.state_dict())  # strict: the native architecture
    with torch.no_grad():
        assert torch.equal(plain(*inputs), fused(*inputs))

    # Only the picked layers of any rank, and exact types only.
    picked = convert(original, include=["signal.0", "volume.*"])
    assert sorted(doconv_layers(picked)) == ["signal.0", "volume.0", "volume.3", "volume.4"]

    class MyConv3d(nn.Conv3d):
        pass

    custom = nn.Sequential(MyConv3d(2, 2, 3), nn.Conv1d(2, 2, 3))
    assert [type(m) for m in convert(custom)] == [MyConv3d, DOConv1d]


def test_export_import_and_legacy_load_across_ranks(tmp_path):
    torch.manual_seed(1)
    model = convert(Mixed()).eval()
    for layer in doconv_layers(model).values():
        with_D(layer)
    inputs = mixed_inputs()
    path = tmp_path / "mixed.npz"
    export_params(model, path)
    stored = dc.load_params(path)
    assert {name: params.spec.rank for name, params in stored.items()} == {
        name: rank for rank, names in MIXED_CONVS.items() for name in names}
    other = convert(Mixed()).eval()
    other.load_state_dict(model.state_dict())  # BatchNorm's statistics; then new DO-Conv ones
    for layer in doconv_layers(other).values():
        layer.reset_parameters()
    assert sorted(import_params(other, path)) == sorted(doconv_layers(model))
    with torch.no_grad():
        assert torch.equal(other(*inputs), model(*inputs))

    # The original authors' layout (W, D, d_diag) is 2-D only, as in every adapter: arrays
    # for a 1-D or 3-D layer are refused, and with strict so is a model holding one.
    legacy = {name: value.clone() for name, value in model.state_dict().items()}
    for name, layer in doconv_layers(model).items():
        if layer.D is not None:
            legacy[f"{name}.d_diag"] = torch.from_numpy(dc.identity_d(
                layer.in_channels, layer.D.shape[1], layer.D_mul))
    fresh = convert(Mixed()).eval()
    before = {key: value.clone() for key, value in fresh.state_dict().items()}
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "the legacy checkpoint has arrays ['signal.0.D', 'signal.0.W', 'signal.0.bias', "
            "'signal.0.d_diag'] for layer 'signal.0', a 1-D layer: the original DO-Conv layers "
            "were 2-D only, so load_legacy loads 2-D layers only")):
        load_legacy(fresh, legacy, strict=False)
    other_ranks = tuple(f"{name}." for rank in (1, 3) for name in MIXED_CONVS[rank])
    planar = {key: value for key, value in legacy.items() if not key.startswith(other_ranks)}
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "the legacy checkpoint cannot fill the model's 1-D/3-D layers ['signal.0', "
            "'signal.3', 'signal.4', 'volume.0', 'volume.3', 'volume.4']: the original DO-Conv "
            "layers were 2-D only, so load_legacy loads 2-D layers only (pass strict=False")):
        load_legacy(fresh, planar)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing changed
    report = load_legacy(fresh, planar, strict=False)
    assert report.exact == ["image.0", "image.2"] and report.unexpected_keys == []
    assert sorted(report.missing_keys) == sorted(
        key for key in fresh.state_dict() if key.startswith(other_ranks)
        and key.rsplit(".", 1)[1] in ("W", "D", "bias"))
    for name, layer in doconv_layers(fresh).items():
        if layer.spec.rank != 2:
            assert torch.equal(layer.W, before[f"{name}.W"]), name  # left as it was
            continue
        np.testing.assert_allclose(layer.weight.detach().numpy(),
                                   doconv_layers(model)[name].weight.detach().numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)


# -- TorchScript, torch.export, torch.compile ---------------------------------------------------
def two_ranks():
    torch.manual_seed(3)
    return nn.ModuleDict({
        "signal": nn.Sequential(with_D(DOConv1d(2, 4, 3, padding=1, D_mul=5)), nn.ReLU(),
                                with_D(DOConv1d(4, 4, 3, padding="same", groups=2,
                                                padding_mode="circular"))),
        "volume": nn.Sequential(with_D(DOConv3d(2, 4, 3, padding=1)), nn.ReLU(),
                                with_D(DOConv3d(4, 4, (1, 3, 3), stride=(1, 2, 2), groups=4)),
                                DOConv3d(4, 2, 1))})


class TwoRanks(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = two_ranks()

    def forward(self, signal, volume):
        return (self.layers["signal"](signal).mean((1, 2))
                + self.layers["volume"](volume).mean((1, 2, 3, 4)))


def two_inputs(batch=2):
    return torch.randn(batch, 2, 12), torch.randn(batch, 2, 4, 7, 7)


def forward_backward(module, inputs, model):
    model.zero_grad()
    y = module(*inputs)
    y.square().sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:.*torch.jit.*is deprecated:DeprecationWarning")
def test_torchscript_script_and_trace_per_rank():
    model = TwoRanks()
    inputs = two_inputs()
    y, grads = forward_backward(model, inputs, model)
    scripted = torch.jit.script(model)
    y_script, grads_script = forward_backward(scripted, inputs, model)
    torch.testing.assert_close(y_script, y, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_script[name], grads[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match=r"input must have 2 channels \(the layer's in_channels\)"):
        torch.jit.script(DOConv3d(2, 4, 3))(torch.zeros(1, 3, 4, 4, 4))
    traced = torch.jit.trace(model.eval(), inputs)
    other = two_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(traced(*other), model(*other), rtol=1e-5, atol=1e-6)


def test_torch_export_per_rank():
    model = TwoRanks().eval()
    inputs = two_inputs()
    exported = torch.export.export(model, inputs)
    targets = [str(node.target) for node in exported.graph.nodes]
    assert targets.count("doconv.compose.default") == 4, targets  # the 1x1x1 has no D
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(*inputs), model(*inputs), rtol=1e-5,
                                   atol=1e-6)


def test_fx_symbolic_trace_per_rank():
    model = TwoRanks()
    traced = torch.fx.symbolic_trace(model)
    assert [str(n.target) for n in traced.graph.nodes].count("doconv.compose") == 4
    inputs = two_inputs()
    torch.testing.assert_close(traced(*inputs), model(*inputs), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.*is deprecated:DeprecationWarning")
def test_torch_compile_per_rank():
    torch._dynamo.reset()
    model = TwoRanks()
    inputs = two_inputs()
    y, grads = forward_backward(model, inputs, model)
    compiled = torch.compile(model, backend="inductor")
    y_compiled, grads_compiled = forward_backward(compiled, inputs, model)
    torch.testing.assert_close(y_compiled, y, rtol=1e-4, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_compiled[name], grads[name], rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad():
        model.layers["volume"][0].W.mul_(2)  # the compiled module sees parameter changes
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


def test_one_operator_for_every_rank_with_the_kernel_shape():
    """doconv::compose sees the kernel volume as (M, N); the layers view it as kernel_size."""
    for layer, shape in ((DOConv1d(4, 6, 5, groups=2), (6, 2, 5)),
                         (DOConv3d(4, 6, (3, 1, 2), groups=2), (6, 2, 3, 1, 2)),
                         (DOConv3d(4, 6, 5, groups=2), (6, 2, 5, 5, 5))):  # volume 125 > 32
        with_D(layer)
        kernel = layer.weight
        assert kernel.shape == shape and kernel.is_contiguous()
        np.testing.assert_allclose(
            kernel.detach().numpy(),
            dc.compose_kernel(layer.D.detach().numpy(), layer.W.detach().numpy(), groups=2,
                              kernel_size=layer.kernel_size), rtol=1e-5, atol=1e-5)


def test_a_layer_pickled_before_the_n_d_layers_still_runs():
    """torch.save(model) of an earlier DOConv2d holds no layout attributes of the N-d base."""
    layer = with_D(DOConv2d(4, 4, 3, padding="same", padding_mode="reflect"))
    state = layer.__getstate__()
    for name in ("_compose_M", "_compose_N", "_kernel_shape", "_conv_padding"):
        del state[name]
    old = DOConv2d.__new__(DOConv2d)
    old.__setstate__(state)
    x = torch.randn(2, 4, 6, 5)
    assert torch.equal(old(x), layer(x))
