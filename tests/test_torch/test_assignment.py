"""Every path that assigns a DO-Conv layer's parameters: parametrized parameters, inference
tensors, load_state_dict under swap_module_params_on_conversion, and convert/fuse of wrapped
(DDP, torch.compile) or hooked models."""

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from doconv_core import CheckpointError
from doconv_torch import (DOConv1d, DOConv2d, DOConv3d, convert, export_params, fuse,
                          import_params, load_legacy)


class Doubled(nn.Module):
    """W = 2 * original; exact both ways."""

    def forward(self, x):
        return 2 * x

    def right_inverse(self, x):
        return x / 2


class Split(nn.Module):
    """W = a + b from two originals (right_inverse returns a pair)."""

    def forward(self, a, b):
        return a + b

    def right_inverse(self, x):
        return x / 2, x / 2


class NoInverse(nn.Module):
    def forward(self, x):
        return x + 1


class WrongShape(nn.Module):
    """Consistent at registration, then its right_inverse flattens."""

    broken = False

    def forward(self, x):
        return x.reshape(4, 3, 9)

    def right_inverse(self, x):
        return x.reshape(-1) if self.broken else x


class Flattened(nn.Module):
    def forward(self, x):
        return x.reshape(-1)

    def right_inverse(self, x):
        return x


def model():
    return nn.Sequential(DOConv2d(3, 4, 3), nn.BatchNorm2d(4), DOConv2d(4, 2, 1))


def source(path):
    """A model with other values, exported to ``path``; returns it."""
    torch.manual_seed(1)
    saved = model()
    with torch.no_grad():
        saved[0].D.normal_()
    export_params(saved, path)
    return saved


def snapshot(module):
    """Every parameter and buffer, parametrization originals included, as clones."""
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_unchanged(before, module):
    after = snapshot(module)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


LOADERS = ["import_params", "set_params", "load_legacy"]


def load(how, target, saved, path):
    if how == "import_params":
        return import_params(target, path)
    if how == "set_params":
        return target[0].set_params(saved[0].to_params())
    return load_legacy(target, saved.state_dict())


# -- defect 1: parametrized parameters ------------------------------------------------
@pytest.mark.parametrize("how", LOADERS)
@pytest.mark.parametrize("name", ["W", "D", "bias"])
def test_a_parametrized_parameter_loads_through_its_right_inverse(tmp_path, how, name):
    path = tmp_path / "m.safetensors"
    saved = source(path)
    target = model()
    parametrize.register_parametrization(target[0], name, Doubled())
    load(how, target, saved, path)
    for part in ("W", "D", "bias"):
        assert torch.equal(getattr(target[0], part), getattr(saved[0], part)), part
    assert torch.equal(target[0].parametrizations[name].original,
                       getattr(saved[0], name) / 2)


def test_a_parametrization_with_two_originals_loads(tmp_path):
    path = tmp_path / "m.safetensors"
    saved = source(path)
    target = model()
    parametrize.register_parametrization(target[0], "W", Split())
    import_params(target, path)
    assert torch.equal(target[0].W, saved[0].W)
    chain = target[0].parametrizations.W
    assert torch.equal(chain.original0, saved[0].W / 2)


@pytest.mark.parametrize("how", LOADERS)
@pytest.mark.parametrize("parametrization, message", [
    (NoInverse, "W is parametrized by NoInverse, which has no right_inverse"),
    (WrongShape, r"right_inverse of W's parametrization must return tensors of shapes "
                 r"\[\(4, 3, 9\)\]"),
])
def test_a_parametrization_that_cannot_take_values_is_refused_before_anything_changes(
        tmp_path, how, parametrization, message):
    path = tmp_path / "m.safetensors"
    saved = source(path)
    target = model()
    # The refused layer is the first: the 1x1 layer after it must not load either.
    made = parametrization()
    parametrize.register_parametrization(target[0], "W", made)
    made.broken = True
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        load(how, target, saved, path)
    assert_unchanged(before, target)


def test_a_parametrized_layer_exports_fuses_and_converts(tmp_path):
    layer = DOConv2d(3, 4, 3)
    parametrize.register_parametrization(layer, "W", Doubled())
    with torch.no_grad():
        layer.D.normal_()
    x = torch.randn(1, 3, 6, 6)
    fused = fuse(nn.Sequential(layer))[0]
    torch.testing.assert_close(fused(x), layer(x), rtol=1e-5, atol=1e-6)
    export_params(layer, tmp_path / "p.safetensors")
    plain = DOConv2d(3, 4, 3)
    import_params(plain, tmp_path / "p.safetensors")
    assert torch.equal(plain.W, layer.W) and torch.equal(plain.D, layer.D)


# -- defect 2: load_state_dict under swap_module_params_on_conversion -------------------
@pytest.fixture
def swap_on_conversion():
    was = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(was)


FORWARDS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
            "grad": contextlib.nullcontext}
KERNELS = [(DOConv1d, 1), (DOConv1d, 3), (DOConv2d, 1), (DOConv2d, 3), (DOConv2d, (1, 3)),
           (DOConv3d, 1), (DOConv3d, (1, 2, 2))]


@pytest.mark.parametrize("conversion", ["none", "double", "to"])
@pytest.mark.parametrize("forward", list(FORWARDS))
@pytest.mark.parametrize("cls, kernel_size", KERNELS)
def test_load_state_dict_swapping_parameters_after_any_forward(swap_on_conversion, cls,
                                                               kernel_size, forward,
                                                               conversion):
    def build():
        return nn.Sequential(cls(2, 3, 3), cls(3, 2, kernel_size))

    target, other = build(), build()
    if conversion == "double":
        target, other = target.double(), other.double()
    x = torch.randn((1, 2) + (5,) * cls._rank, dtype=target[0].W.dtype)
    for _ in range(2):  # the second pass runs with a kernel cached by the first
        with FORWARDS[forward]():
            target(x)
        if conversion == "to":
            target.to(torch.float32)
    state = {key: value + 1 if value.is_floating_point() else value
             for key, value in other.state_dict().items()}
    target.load_state_dict(state)
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key
    other.load_state_dict(state)
    with torch.no_grad():  # and no stale kernel: the outputs are the loaded values'
        torch.testing.assert_close(target(x.to(target[0].W.dtype)),
                                   other(x.to(target[0].W.dtype)))


# -- defect 3: inference tensors ----------------------------------------------------------
def inference_model():
    """The first DO-Conv layer normal, the second built under inference_mode."""
    with torch.inference_mode():
        late = DOConv2d(4, 2, 1)
    return nn.Sequential(DOConv2d(3, 4, 3), nn.BatchNorm2d(4), late)


@pytest.mark.parametrize("how", ["import_params", "load_legacy"])
def test_an_inference_tensor_layer_is_refused_before_anything_changes(tmp_path, how):
    path = tmp_path / "m.safetensors"
    saved = source(path)
    target = inference_model()
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=r"layer .2.: its parameters are inference tensors"):
        load(how, target, saved, path)
    assert_unchanged(before, target)
    with torch.inference_mode():  # where inference tensors take values
        load(how, target, saved, path)
    assert torch.equal(target[2].W, saved[2].W) and torch.equal(target[0].D, saved[0].D)


def test_set_params_refuses_an_inference_tensor_layer():
    with torch.inference_mode():
        layer = DOConv2d(3, 4, 3)
    params = DOConv2d(3, 4, 3).to_params()
    before = snapshot(layer)
    with pytest.raises(ValueError, match="its parameters are inference tensors"):
        layer.set_params(params)
    assert_unchanged(before, layer)


def test_load_legacy_refuses_an_inference_tensor_batchnorm_before_anything_changes(tmp_path):
    saved = source(tmp_path / "m.safetensors")
    target = model()
    with torch.inference_mode():
        target[1] = nn.BatchNorm2d(4)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=r"\['1.bias', '1.num_batches_tracked'"):
        load_legacy(target, saved.state_dict())
    assert_unchanged(before, target)


def test_a_parameter_of_another_shape_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    saved = source(path)
    target = model()
    target[2].bias = nn.Parameter(torch.zeros(1))  # copy_ would broadcast into it
    parametrize.register_parametrization(target[0], "W", Flattened(), unsafe=True)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=r"layer '0': W has shape \(108,\), not the "
                                              r"\(4, 3, 9\).*layer '2': bias has shape \(1,\)"):
        import_params(target, path)
    assert_unchanged(before, target)
    with pytest.raises(ValueError, match=r"bias has shape \(1,\)"):
        target[2].set_params(saved[2].to_params())
    assert_unchanged(before, target)


# -- defect 10: wrapped and hooked models -------------------------------------------------
@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def plain_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_convert_and_fuse_of_a_ddp_model_give_its_module_unwrapped(process_group):
    wrapped = nn.parallel.DistributedDataParallel(plain_model())
    before = snapshot(wrapped)
    converted = convert(wrapped)
    assert isinstance(converted, nn.Sequential) and isinstance(converted[0], DOConv2d)
    assert_unchanged(before, wrapped)
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(converted(x), wrapped(x), rtol=1e-5, atol=1e-6)
    # The copy wraps again and trains: DDP sees the new parameters.
    again = nn.parallel.DistributedDataParallel(converted)
    again(x).sum().backward()
    assert converted[0].D.grad is not None
    fused = fuse(again)
    assert isinstance(fused, nn.Sequential) and type(fused[0]) is nn.Conv2d
    torch.testing.assert_close(fused(x), converted(x), rtol=1e-5, atol=1e-6)


def test_convert_and_fuse_of_a_compiled_model_give_a_compiled_copy():
    original = plain_model()
    compiled = torch.compile(original, backend="eager")
    converted = convert(compiled)
    assert isinstance(converted, type(compiled))
    inner = converted._orig_mod  # what torch.compile wraps
    assert isinstance(inner[0], DOConv2d) and type(original[0]) is nn.Conv2d
    with torch.no_grad():
        inner[0].D.normal_()  # the copy's forward must run the copy's layers
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(converted(x), inner(x), rtol=1e-5, atol=1e-6)
    fused = fuse(converted)
    assert isinstance(fused, type(compiled)) and type(fused._orig_mod[0]) is nn.Conv2d
    torch.testing.assert_close(fused(x), inner(x), rtol=1e-5, atol=1e-6)


def test_convert_and_fuse_keep_forward_and_backward_hooks():
    calls = []
    original = plain_model()
    original[0].register_forward_pre_hook(lambda module, args: calls.append("pre"))
    original[0].register_forward_hook(lambda module, args, out: calls.append("post"))
    original[0].register_full_backward_hook(lambda module, gin, gout: calls.append("back"))
    original[2].register_forward_hook(lambda module, args, kwargs, out: calls.append("kw"),
                                      with_kwargs=True)
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    for made in (convert(original), fuse(convert(original)), convert(original[0])):
        calls.clear()
        made(x).sum().backward()
        expected = ["pre", "post", "back"] if isinstance(made, DOConv2d) else \
            ["pre", "post", "kw", "back"]
        assert calls == expected, (type(made).__name__, calls)
    assert type(original[0]) is nn.Conv2d  # the given model keeps its own


def test_reset_parameters_of_a_parametrized_layer_draws_what_a_plain_one_draws():
    plain, layer = DOConv2d(3, 4, 3), DOConv2d(3, 4, 3)
    parametrize.register_parametrization(layer, "W", Doubled())
    parametrize.register_parametrization(layer, "bias", Doubled())
    torch.manual_seed(5)
    plain.reset_parameters()
    torch.manual_seed(5)
    layer.reset_parameters()
    for name in ("W", "D", "bias"):
        assert torch.equal(getattr(layer, name), getattr(plain, name)), name
    parametrize.register_parametrization(layer, "D", NoInverse())
    before = snapshot(layer)
    with pytest.raises(ValueError, match="reset_parameters cannot fill this layer: D is "
                                         "parametrized by NoInverse"):
        layer.reset_parameters()
    assert_unchanged(before, layer)


def test_a_native_conv_state_dict_embeds_through_a_parametrization():
    conv = nn.Conv2d(3, 4, 3)
    target = nn.Sequential(DOConv2d(3, 4, 3))
    parametrize.register_parametrization(target[0], "W", Doubled())
    parametrize.register_parametrization(target[0], "bias", Doubled())
    target.load_state_dict(nn.Sequential(conv).state_dict())
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(target(x), conv(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(target[0].bias, conv.bias)
    refusing = nn.Sequential(DOConv2d(3, 4, 3))
    parametrize.register_parametrization(refusing[0], "W", NoInverse())
    before = snapshot(refusing)
    with pytest.raises(RuntimeError, match=r"cannot embed 0.weight: W is parametrized by "
                                           r"NoInverse, which has no right_inverse"):
        refusing.load_state_dict(nn.Sequential(conv).state_dict())
    assert_unchanged(before, refusing)
