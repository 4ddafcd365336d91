"""The PyTorch ecosystem's standard paths: meta-device builds, default devices, FX tracing,
swapped tensors. Each runs in a subprocess, so that a crash (a segfault) fails its test
instead of ending the run."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PRELUDE = """
import torch
from torch import nn
from doconv_torch import DOConv2d

torch.manual_seed(0)


def reference(**kwargs):
    layer = DOConv2d(4, 8, 3, padding=1, **kwargs)
    with torch.no_grad():
        layer.D.normal_()  # D = 0 would hide a wrong identity behind W's own values
    return layer


x = torch.randn(2, 4, 6, 6)
"""


def run_python(code: str, backend: str) -> None:
    env = dict(os.environ, DOCONV_CKERNEL="1" if backend == "c" else "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, (
        f"exit status {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    assert "OK" in result.stdout, result.stdout


@pytest.fixture(params=["c", "einsum"])
def backend(request):
    return request.param


def test_meta_build_then_to_empty_and_load_state_dict(backend):
    run_python("""
        for kwargs in (dict(), dict(D_mul=12, groups=2), dict(D_mul=20)):
            ref = reference(**kwargs)
            with torch.device("meta"):
                layer = DOConv2d(4, 8, 3, padding=1, **kwargs)
            layer.to_empty(device="cpu")
            result = layer.load_state_dict(ref.state_dict())
            assert not result.missing_keys and not result.unexpected_keys, result
            assert torch.equal(layer(x), ref(x)), kwargs
            with torch.no_grad():
                assert torch.equal(layer(x), ref(x)), kwargs
        print("OK")
    """, backend)


@pytest.mark.parametrize("rank", [1, 3])
def test_meta_build_then_to_empty_and_load_state_dict_in_1d_and_3d(backend, rank):
    run_python(f"""
        import doconv_torch
        layer_class = doconv_torch.DOConv{rank}d
        x = torch.randn((2, 4) + (7, 6, 5)[:{rank}])
        for kwargs in (dict(), dict(D_mul=30, groups=2), dict(kernel_size=1)):
            kwargs = dict(dict(kernel_size=3), **kwargs)
            ref = layer_class(4, 8, padding=1, **kwargs)
            with torch.no_grad():
                if ref.D is not None:
                    ref.D.normal_()
            with torch.device("meta"):
                layer = layer_class(4, 8, padding=1, **kwargs)
            assert layer.W.is_meta and layer.weight.is_meta
            assert layer.weight.shape == ref.weight.shape
            layer.to_empty(device="cpu")
            result = layer.load_state_dict(ref.state_dict())
            assert not result.missing_keys and not result.unexpected_keys, result
            assert torch.equal(layer(x), ref(x)), kwargs
            with torch.no_grad():
                assert torch.equal(layer(x), ref(x)), kwargs
            layer(x).sum().backward()
        print("OK")
    """, backend)


def test_meta_build_then_to_empty_and_reset_parameters(backend):
    run_python("""
        torch.manual_seed(3)
        ref = DOConv2d(4, 8, 3, padding=1, D_mul=12)
        with torch.device("meta"):
            layer = DOConv2d(4, 8, 3, padding=1, D_mul=12)
        layer.to_empty(device="cpu")
        torch.manual_seed(3)
        layer.reset_parameters()
        for name, param in ref.named_parameters():
            assert torch.equal(param, layer.get_parameter(name)), name
        assert torch.equal(layer(x), ref(x))
        layer(x).sum().backward()
        print("OK")
    """, backend)


def test_cpu_layer_called_under_a_meta_device_context(backend):
    run_python("""
        layer = reference(D_mul=12)
        expected = layer(x)
        with torch.device("meta"):
            y = layer(x)  # training forward: the composition runs
            assert y.device.type == "cpu" and torch.equal(y, expected)
            y.sum().backward()
            with torch.no_grad():
                assert torch.equal(layer(x), expected)
        print("OK")
    """, backend)


def test_cpu_layer_called_after_set_default_device(backend):
    run_python("""
        layer = reference(D_mul=12)
        expected = layer(x)
        torch.set_default_device("meta")
        try:
            y = layer(x)
            assert y.device.type == "cpu" and torch.equal(y, expected)
            y.sum().backward()
            assert layer.D.grad.device.type == "cpu"
            with torch.no_grad():
                assert torch.equal(layer(x), expected)
        finally:
            torch.set_default_device("cpu")
        print("OK")
    """, backend)


def test_fx_symbolic_trace(backend):
    run_python("""
        model = nn.Sequential(reference(D_mul=12), nn.ReLU(), DOConv2d(8, 3, 1))
        traced = torch.fx.symbolic_trace(model)
        assert isinstance(traced, torch.fx.GraphModule)
        targets = [str(node.target) for node in traced.graph.nodes]
        assert "doconv.compose" in targets, targets  # one operator, not its parts
        assert torch.equal(traced(x), model(x))
        with torch.no_grad():
            assert torch.equal(traced(x), model(x))
        traced(x).sum().backward()  # the traced graph trains the shared parameters
        assert model[0].D.grad is not None
        print("OK")
    """, backend)


def test_load_state_dict_with_swapped_tensors(backend):
    run_python("""
        torch.__future__.set_swap_module_params_on_conversion(True)
        layer = reference(D_mul=12)
        with torch.no_grad():
            layer(x)  # fills the kernel cache
        other = reference(D_mul=12)
        layer.load_state_dict(other.state_dict())
        with torch.no_grad():
            assert torch.equal(layer(x), other(x))  # the cache saw the swap
        assert torch.equal(layer(x), other(x))
        layer.double()  # a conversion swaps too
        with torch.no_grad():
            assert torch.equal(layer(x.double()), other.double()(x.double()))
        print("OK")
    """, backend)


def test_operator_registrations_agree(backend):
    """torch.library.opcheck: fake strides, autograd and dispatch agree with the kernels."""
    run_python("""
        from doconv_torch import _ops
        for dtype in (torch.float32, torch.float64):
            W = torch.randn(6, 2, 12, dtype=dtype, requires_grad=True)
            D = torch.randn(4, 9, 12, dtype=dtype, requires_grad=True)
            torch.library.opcheck(torch.ops.doconv.compose.default, (W, D, 2, 3, 3))
            grad = torch.randn(6, 2, 3, 3, dtype=dtype)
            torch.library.opcheck(torch.ops.doconv.compose_backward.default,
                                  (grad, W.detach(), D.detach(), 2))
            # The kernel volumes of the other ranks, as DOConv1d (K, 1) and DOConv3d
            # (K_d, K_h*K_w) pass them.
            for M, N in ((5, 1), (3, 9)):
                W = torch.randn(6, 2, M * N + 1, dtype=dtype, requires_grad=True)
                D = torch.randn(4, M * N, M * N + 1, dtype=dtype, requires_grad=True)
                torch.library.opcheck(torch.ops.doconv.compose.default, (W, D, 2, M, N))
        print("OK")
    """, backend)
