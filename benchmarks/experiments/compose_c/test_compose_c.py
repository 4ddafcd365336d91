"""Tests for the C-kernel DO-Conv composition prototype (doconv_compose.py).

Not part of the project's test suite: the tox envs collect only tests/..., so run these
by hand from the repository root:

    .tox/torch/bin/python -m pytest benchmarks/experiments/compose_c -q

Needs a C compiler (`cc`, or $CC); without one the C-kernel tests are skipped and only the
einsum fallback is tested.  The compiled kernel is cached in ~/.cache/doconv-experiments
(or $DOCONV_CACHE_DIR), outside the repository.  Runs in a few seconds.

Agreement with einsum is to rounding (the two sum in different orders, and the kernel is
built with -ffp-contract=fast): float64 within 1e-12, float32 within 1e-5 relative.
"""
import os
import shutil
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import doconv_compose as dc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
HAVE_CC = shutil.which(os.environ.get("CC", "cc")) is not None

# (C_out, C_in, groups, M, N, S): g=1, grouped, depthwise, S = 1, 9, 12, 13, 18, 20, 25,
# several tiles with a partial one (C_in/g = 40, 34), PAD-16 and PAD-32 paths, 2x2/2x3/5x5.
SHAPES = [
    (6, 4, 1, 3, 3, 9),
    (6, 4, 1, 3, 3, 12),
    (8, 8, 8, 3, 3, 9),       # depthwise
    (8, 12, 4, 3, 3, 9),      # grouped
    (6, 9, 3, 2, 2, 9),
    (4, 4, 2, 1, 1, 1),
    (4, 6, 2, 3, 3, 20),
    (8, 4, 4, 3, 3, 18),
    (5, 5, 5, 2, 3, 13),
    (4, 40, 1, 3, 3, 9),      # 3 tiles of 16, last one partial
    (6, 40, 2, 5, 5, 25),     # PAD-32 path
    (4, 34, 2, 3, 3, 12),
]
IDS = ["O%d_I%d_g%d_%dx%d_S%d" % s for s in SHAPES]
# gradcheck's numerical Jacobian grows with the number of inputs: the big PAD-32 shape took
# ~10 s, so gradcheck uses a small PAD-32 shape (the big one is still compared with einsum)
GC_SHAPES = [s if s != (6, 40, 2, 5, 5, 25) else (4, 8, 2, 5, 5, 25) for s in SHAPES]
GC_IDS = ["O%d_I%d_g%d_%dx%d_S%d" % s for s in GC_SHAPES]


@pytest.fixture(scope="module")
def lib():
    if not HAVE_CC:
        pytest.skip("no C compiler (cc / $CC): C kernel not available")
    if os.environ.get("DOCONV_NO_CKERNEL") == "1":
        pytest.skip("DOCONV_NO_CKERNEL=1 is set")
    lib = dc.get_lib()
    assert lib is not None, "cc exists but the C kernel did not compile or load"
    return lib


def _inputs(O, I, g, M, N, S, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(O, I // g, S, dtype=dtype, generator=gen, requires_grad=True)
    D = torch.randn(I, M * N, S, dtype=dtype, generator=gen, requires_grad=True)
    return W, D, dc.make_d_diag(I, M * N, S, dtype)


def _compare(W, D, Dd, g, M, N, atol, rtol, seed=1):
    """K, dW and dD of compose() (C kernel) against compose_einsum (autograd)."""
    K1 = dc.compose(W, D, Dd, g, M, N)
    assert K1.grad_fn is not None and "ComposeC" in type(K1.grad_fn).__name__
    K2 = dc.compose_einsum(W, D, Dd, g, M, N)
    gK = torch.randn(K1.shape, dtype=K1.dtype, generator=torch.Generator().manual_seed(seed))
    a = torch.autograd.grad(K1, (W, D), gK)
    b = torch.autograd.grad(K2, (W, D), gK)
    for name, x, y in (("K", K1, K2), ("dW", a[0], b[0]), ("dD", a[1], b[1])):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: "%s: %s" % (name, m))


@pytest.mark.parametrize("shape", GC_SHAPES, ids=GC_IDS)
def test_gradcheck_f64(lib, shape):
    O, I, g, M, N, S = shape
    W, D, _ = _inputs(*shape, torch.float64)
    assert torch.autograd.gradcheck(lambda w, d: dc._ComposeC.apply(w, d, g, M, N), (W, D))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_matches_einsum(lib, shape, dtype):
    O, I, g, M, N, S = shape
    W, D, Dd = _inputs(*shape, dtype)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    _compare(W, D, Dd, g, M, N, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(128, 128, 1, 3, 3, 9), (128, 128, 1, 3, 3, 12), (256, 256, 32, 3, 3, 9)],
                         ids=["C128_S9", "C128_S12", "g32_C256"])
def test_matches_einsum_multithreaded(lib, shape, dtype):
    """Sizes large enough that _nthreads() asks OpenMP for more than one thread."""
    O, I, g, M, N, S = shape
    W, D, Dd = _inputs(*shape, dtype)
    tol = dict(atol=1e-11, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-5)
    _compare(W, D, Dd, g, M, N, **tol)


def test_noncontiguous_w_and_one_thread(lib):
    W = torch.randn(6, 4, 9, dtype=torch.float64).permute(1, 0, 2).contiguous().permute(1, 0, 2)
    assert not W.is_contiguous()
    W.requires_grad_()
    D = torch.randn(4, 9, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, d: dc._ComposeC.apply(w, d, 1, 3, 3), (W, D))
    nth = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        W2 = W[:, :2].detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda w, d: dc._ComposeC.apply(w, d, 2, 3, 3), (W2, D))
    finally:
        torch.set_num_threads(nth)


def test_large_s_uses_einsum(lib):
    W, D, Dd = _inputs(2, 2, 2, 3, 3, 33, torch.float64)  # S = 33 > 32
    K = dc.compose(W, D, Dd, 2, 3, 3)
    assert "ComposeC" not in type(K.grad_fn).__name__
    assert torch.autograd.gradcheck(lambda w, d: dc.compose(w, d, Dd, 2, 3, 3), (W, D))


def test_kernel_file_matches_embedded_source():
    with open(os.path.join(HERE, "doconv_kernel.c")) as f:
        assert f.read() == dc._C_SRC, "doconv_kernel.c is stale: regenerate it from _C_SRC"


def test_default_cache_dir_outside_repo(monkeypatch):
    monkeypatch.delenv("DOCONV_CACHE_DIR", raising=False)
    d = os.path.realpath(dc._cache_dir())
    assert not (d + os.sep).startswith(os.path.realpath(REPO) + os.sep), d
    assert dc._private_ok(d, want_dir=True)


@pytest.fixture
def fresh_lib_state(monkeypatch):
    """Let get_lib() run again (its result is cached in module globals)."""
    monkeypatch.setattr(dc, "_lib", None)
    monkeypatch.setattr(dc, "_lib_tried", False)


def _assert_einsum_fallback():
    g, M, N = 2, 3, 3
    W, D, Dd = _inputs(6, 8, g, M, N, 9, torch.float64)
    K = dc.compose(W, D, Dd, g, M, N)
    assert "ComposeC" not in type(K.grad_fn).__name__
    torch.testing.assert_close(K, dc.compose_einsum(W, D, Dd, g, M, N), atol=0, rtol=0)
    assert torch.autograd.gradcheck(lambda w, d: dc.compose(w, d, Dd, g, M, N), (W, D))


def test_fallback_when_compiler_missing(fresh_lib_state, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DOCONV_CACHE_DIR", str(tmp_path / "cache"))  # empty: nothing cached
    monkeypatch.delenv("DOCONV_NO_CKERNEL", raising=False)
    assert dc.get_lib() is None
    _assert_einsum_fallback()


def test_fallback_forced_by_env(fresh_lib_state, monkeypatch):
    monkeypatch.setenv("DOCONV_NO_CKERNEL", "1")
    assert dc.get_lib() is None
    _assert_einsum_fallback()


def test_unsafe_cache_dir_is_not_used(fresh_lib_state, monkeypatch, tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)  # writable by anyone: a cached .so there must not be loaded
    monkeypatch.setenv("DOCONV_CACHE_DIR", str(d))
    monkeypatch.delenv("DOCONV_NO_CKERNEL", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dc.get_lib() is None
    assert list(d.iterdir()) == []
    _assert_einsum_fallback()
