"""The compiled CPU composition (doconv_torch._ckernel): same values and gradients as
einsum, double backward, the cases it must leave to einsum, and a safe compile cache.

Agreement with einsum is to rounding, not bitwise: the kernel sums in another order and is
built with -ffp-contract=fast (float64 within 1e-12, float32 within 1e-5 relative).
"""

import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

import doconv_core
from doconv_torch import DOConv2d, _ckernel, _ops

REPO = Path(__file__).resolve().parents[2]

# (C_out, C_in, groups, M, N, D_mul): g=1, depthwise, grouped, 2x2/2x3/5x5, D_mul of 1, 12,
# 13, 18, 20, 25 (identity blocks cut, repeated, absent), several tiles of 16 channels with a
# partial one (C_in/g = 40, 34), the 16- and 32-wide paths.
SHAPES = [
    (6, 4, 1, 3, 3, 9), (6, 4, 1, 3, 3, 12), (8, 8, 8, 3, 3, 9), (8, 12, 4, 3, 3, 9),
    (6, 9, 3, 2, 2, 9), (4, 4, 2, 1, 2, 1), (4, 6, 2, 3, 3, 20), (8, 4, 4, 3, 3, 18),
    (5, 5, 5, 2, 3, 13), (4, 40, 1, 3, 3, 9), (6, 40, 2, 5, 5, 25), (4, 34, 2, 3, 3, 12),
]
IDS = ["O{}_I{}_g{}_{}x{}_Dmul{}".format(*s) for s in SHAPES]
# gradcheck's numerical Jacobian grows with the inputs: a small shape for the 32-wide path.
GRADCHECK_SHAPES = [s if s != (6, 40, 2, 5, 5, 25) else (4, 8, 2, 5, 5, 25) for s in SHAPES]


@pytest.fixture(autouse=True)
def _c_kernel_required(monkeypatch):
    monkeypatch.setenv("DOCONV_CKERNEL", "1")
    _ckernel._reset()
    yield
    _ckernel._reset()


def inputs(shape, dtype, seed=0):
    out_channels, in_channels, groups, M, N, D_mul = shape
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(out_channels, in_channels // groups, D_mul, dtype=dtype,
                    generator=generator, requires_grad=True)
    D = torch.randn(in_channels, M * N, D_mul, dtype=dtype, generator=generator,
                    requires_grad=True)
    D_diag = torch.from_numpy(doconv_core.identity_d(in_channels, M * N, D_mul)).to(dtype)
    return W, D, D_diag


def einsum_compose(W, D, D_diag, groups, M, N):
    out_channels, in_per_group, D_mul = W.shape
    Dg = (D + D_diag).reshape(groups, in_per_group, M * N, D_mul)
    Wg = W.reshape(groups, out_channels // groups, in_per_group, D_mul)
    return torch.einsum("gois,gims->goim", Wg, Dg).reshape(out_channels, in_per_group, M, N)


def c_compose(W, D, D_diag, groups, M, N):
    """doconv::compose, checked to run the C kernel (D_diag: only the reference reads it)."""
    assert _ckernel.c_kernel_applies(W, D, M, N)
    before = _ckernel._Calls.forward
    K = _ops.compose(W, D, groups, M, N)
    assert _ckernel._Calls.forward == before + 1
    return K


def compare_with_einsum(shape, dtype, atol, rtol):
    W, D, D_diag = inputs(shape, dtype)
    groups, M, N = shape[2:5]
    K = c_compose(W, D, D_diag, groups, M, N)
    assert K.is_contiguous() and K.shape == (shape[0], shape[1] // groups, M, N)
    expected = einsum_compose(W, D, D_diag, groups, M, N)
    grad_K = torch.randn(K.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(K, (W, D), grad_K)
    want = torch.autograd.grad(expected, (W, D), grad_K)
    for name, a, b in (("K", K, expected), ("dW", got[0], want[0]), ("dD", got[1], want[1])):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")


def test_backend_is_the_c_kernel_in_a_private_cache():
    backend = _ckernel.backend()
    assert backend.name == "c", backend
    library = Path(backend.detail.split(" (")[0])
    assert library.parent == _ckernel.cache_dir()
    assert _ckernel._private(str(library), directory=False)
    assert _ckernel._private(str(library.parent), directory=True)


@pytest.mark.parametrize("shape", GRADCHECK_SHAPES, ids=IDS)
def test_gradcheck_float64(shape):
    W, D, D_diag = inputs(shape, torch.float64)
    groups, M, N = shape[2:5]
    assert torch.autograd.gradcheck(lambda w, d: c_compose(w, d, D_diag, groups, M, N), (W, D))


@pytest.mark.parametrize("shape", [(6, 4, 1, 3, 3, 12), (8, 12, 4, 3, 3, 9),
                                   (4, 6, 2, 3, 3, 20)])
def test_double_backward_float64(shape):
    W, D, D_diag = inputs(shape, torch.float64)
    groups, M, N = shape[2:5]
    assert torch.autograd.gradgradcheck(
        lambda w, d: c_compose(w, d, D_diag, groups, M, N), (W, D))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_matches_einsum(shape, dtype):
    tol = (dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64
           else dict(atol=1e-5, rtol=1e-5))
    compare_with_einsum(shape, dtype, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(128, 128, 1, 3, 3, 9), (128, 128, 1, 3, 3, 12),
                                   (256, 256, 4, 3, 3, 9)], ids=["C128", "C128_Dmul12", "g4"])
def test_matches_einsum_on_several_threads(shape, dtype):
    """Large enough for _threads() to ask OpenMP for every torch thread."""
    assert _ckernel._threads(shape[0] * shape[1] // shape[2] * shape[5]) == \
        torch.get_num_threads()
    tol = (dict(atol=1e-11, rtol=1e-12) if dtype == torch.float64
           else dict(atol=1e-4, rtol=1e-5))
    compare_with_einsum(shape, dtype, **tol)


def test_non_contiguous_W_and_one_thread():
    W = torch.randn(4, 6, 9, dtype=torch.float64).permute(1, 0, 2).requires_grad_()
    assert not W.is_contiguous()
    D = torch.randn(4, 9, 9, dtype=torch.float64, requires_grad=True)
    D_diag = torch.from_numpy(doconv_core.identity_d(4, 9, 9, float))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.autograd.gradcheck(lambda w, d: c_compose(w, d, D_diag, 1, 3, 3), (W, D))
    finally:
        torch.set_num_threads(threads)


def test_one_openmp_runtime_in_the_process():
    """The kernel's libgomp.so.1 must resolve to the runtime torch loaded (one thread pool)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this platform")
    if "-fopenmp" not in _ckernel.backend().detail:
        pytest.skip("the kernel was built without OpenMP")
    runtimes = {line.split()[-1] for line in maps.read_text().splitlines()
                if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


# -- what the layer sends to the kernel, and what it leaves to einsum --------------------
def layer_and_input(dtype=torch.float32, **kwargs):
    layer = DOConv2d(6, 8, 3, padding=1, groups=2, dtype=dtype, **kwargs)
    with torch.no_grad():
        layer.D.normal_()
    return layer, torch.randn(2, 6, 5, 5, dtype=dtype)


def runs_c_kernel(layer):
    """Whether a training forward of ``layer`` composes with the C kernel."""
    before = _ckernel._Calls.forward
    layer.weight
    return _ckernel._Calls.forward > before


def test_layer_trains_through_the_kernel_like_einsum(monkeypatch):
    layer, x = layer_and_input(D_mul=12)
    assert runs_c_kernel(layer)
    backward_calls = _ckernel._Calls.backward
    layer(x).square().sum().backward()
    assert _ckernel._Calls.backward == backward_calls + 1
    grads = [p.grad.clone() for p in (layer.W, layer.D, layer.bias)]
    layer.zero_grad()
    monkeypatch.setenv("DOCONV_CKERNEL", "0")
    _ckernel._reset()
    assert not runs_c_kernel(layer)
    layer(x).square().sum().backward()
    for got, p in zip(grads, (layer.W, layer.D, layer.bias)):
        torch.testing.assert_close(got, p.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["D_mul 33", "5x7 kernel", "bfloat16", "1x1 kernel",
                                  "float64", "float32"])
def test_which_layers_use_the_kernel(case):
    kwargs, dtype, uses_kernel = {}, torch.float32, False
    if case == "D_mul 33":
        kwargs["D_mul"] = 33  # wider than the kernel's 32-element rows
    elif case == "bfloat16":
        dtype = torch.bfloat16
    elif case == "float64":
        dtype, uses_kernel = torch.float64, True
    elif case == "float32":
        uses_kernel = True
    if case == "5x7 kernel":
        layer = DOConv2d(6, 8, (5, 7), groups=2)  # M*N = 35 > 32
    elif case == "1x1 kernel":
        layer = DOConv2d(6, 8, 1)
    else:
        layer, _ = layer_and_input(dtype, **kwargs)
    assert runs_c_kernel(layer) == uses_kernel
    if layer.D is not None:
        D_diag = torch.from_numpy(doconv_core.identity_d(
            layer.in_channels, layer.D.shape[1], layer.D_mul)).float()
        expected = einsum_compose(layer.W.float(), layer.D.float(), D_diag, layer.groups,
                                  *layer.kernel_size)
        torch.testing.assert_close(layer.weight.float(), expected, atol=1e-2 if dtype ==
                                   torch.bfloat16 else 1e-5, rtol=1e-2)


def test_traced_and_transformed_calls_use_einsum():
    layer, x = layer_and_input()
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x), atol=1e-5, rtol=1e-5)
    assert "aten::einsum" in str(traced.graph) or "aten::bmm" in str(traced.graph)
    params = dict(layer.named_parameters())
    grads = torch.func.grad(
        lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(params)
    layer(x).square().sum().backward()
    for name, param in layer.named_parameters():  # einsum's gradients against the kernel's
        torch.testing.assert_close(grads[name], param.grad, atol=1e-4, rtol=1e-4)


# -- building and loading the library safely ---------------------------------------------
@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache directory of our own, decided afresh."""
    monkeypatch.setenv("DOCONV_CACHE_DIR", str(tmp_path / "cache"))
    _ckernel._reset()
    return tmp_path / "cache"


def test_default_cache_dir_is_outside_the_repository(monkeypatch):
    monkeypatch.delenv("DOCONV_CACHE_DIR", raising=False)
    directory = _ckernel.cache_dir().resolve()
    assert REPO not in directory.parents and directory != REPO


def test_compiles_into_a_new_private_directory(fresh):
    assert _ckernel.backend().name == "c"
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    libraries = list(fresh.iterdir())
    assert len(libraries) == 1 and libraries[0].suffix == ".so", libraries  # no leftovers
    assert stat.S_IMODE(libraries[0].stat().st_mode) == 0o700


def test_missing_compiler(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="DOCONV_CKERNEL=1 .*could not run"):
        _ckernel.backend()
    monkeypatch.setenv("DOCONV_CKERNEL", "auto")
    _ckernel._reset()
    with pytest.warns(RuntimeWarning, match="C composition kernel is unavailable.*"
                                            "DOCONV_CKERNEL=0"):
        assert _ckernel.backend().name == "einsum"
    layer, _ = layer_and_input(torch.float64)
    assert not runs_c_kernel(layer)
    monkeypatch.setenv("DOCONV_CKERNEL", "0")
    _ckernel._reset()
    assert _ckernel.backend() == ("einsum", "DOCONV_CKERNEL=0")  # and no warning


def test_bad_mode_is_named():
    os.environ["DOCONV_CKERNEL"] = "yes"  # restored by the autouse fixture's monkeypatch
    with pytest.raises(ValueError, match="DOCONV_CKERNEL must be 'auto', '0' or '1', "
                                         "got 'yes'"):
        _ckernel.backend()


def test_a_directory_others_can_write_is_not_used(fresh):
    fresh.mkdir(mode=0o700)
    fresh.chmod(0o777)
    with pytest.raises(RuntimeError, match="is not private to this user"):
        _ckernel.backend()
    assert list(fresh.iterdir()) == []


def test_a_symlinked_cache_directory_is_not_used(fresh, tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    fresh.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RuntimeError, match="is not private to this user"):
        _ckernel.backend()


def test_a_planted_library_others_can_write_is_not_loaded(fresh):
    assert _ckernel.backend().name == "c"
    (library,) = fresh.iterdir()
    library.chmod(0o777)  # as if someone else could have replaced it
    _ckernel._reset()
    with pytest.raises(RuntimeError, match="is not a private regular file"):
        _ckernel.backend()


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("cc") is None,
                    reason="needs a Linux cc")
def test_a_library_with_another_abi_is_refused(fresh, monkeypatch):
    source = _ckernel.SOURCE.read_text().replace("return 8; }", "return 99; }")
    fresh.mkdir(mode=0o700)
    with pytest.raises(RuntimeError, match="has ABI 99, expected 8"):
        _ckernel._compile_and_load(source, fresh)
