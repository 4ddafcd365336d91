"""The compiled CPU composition (doconv_torch._ckernel): same values and gradients as
einsum, double backward, the cases it must leave to einsum, and a safe compile cache.

Agreement with einsum is to rounding, not bitwise: the kernel sums in another order and is
built with -ffp-contract=fast (float64 within 1e-12, float32 within 1e-5 relative).
"""

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time
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
    # the volume-3 and volume-27 specialisations (1-D and 3-D kernels of size 3), with output
    # rows per group not a multiple of the rows composed together
    (6, 5, 1, 1, 3, 3), (10, 20, 2, 1, 3, 3), (7, 20, 1, 3, 9, 27), (6, 4, 2, 3, 9, 27),
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
                                   (256, 256, 4, 3, 3, 9), (250, 250, 1, 3, 3, 9),
                                   (256, 256, 1, 3, 3, 12)],
                         ids=["C128", "C128_Dmul12", "g4", "C250_streamed", "C256_Dmul12_streamed"])
def test_matches_einsum_on_several_threads(shape, dtype):
    """Large enough for _threads() to ask OpenMP for every torch thread; the last two write
    K and dW (over 2 MiB) with non-temporal stores, C250 from rows not aligned to a line."""
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


RANK_LAYERS = {  # DOConv1d and DOConv3d: the kernel composes their volume as (M, N)
    "1d_k3_g2_Dmul5": (1, dict(in_channels=6, out_channels=8, kernel_size=3, padding=1,
                               groups=2, D_mul=5)),
    "1d_k7_dw": (1, dict(in_channels=4, out_channels=4, kernel_size=7, groups=4)),
    "3d_3x3x3_g2": (3, dict(in_channels=6, out_channels=8, kernel_size=3, padding=1,
                            groups=2)),
    "3d_3x1x2_Dmul8": (3, dict(in_channels=4, out_channels=6, kernel_size=(3, 1, 2),
                               D_mul=8)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", RANK_LAYERS)
def test_1d_and_3d_layers_train_through_the_kernel_like_einsum(monkeypatch, name, dtype):
    from doconv_torch import DOConv1d, DOConv3d

    rank, kwargs = RANK_LAYERS[name]
    layer = {1: DOConv1d, 3: DOConv3d}[rank](**kwargs, dtype=dtype)
    with torch.no_grad():
        layer.D.normal_()
    x = torch.randn((2, kwargs["in_channels"]) + (9, 6, 5)[:rank], dtype=dtype)
    results = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("DOCONV_CKERNEL", mode)
        _ckernel._reset()
        layer.zero_grad()
        calls = (_ckernel._Calls.forward, _ckernel._Calls.backward)
        y = layer(x)
        y.square().sum().backward()
        ran = (_ckernel._Calls.forward - calls[0], _ckernel._Calls.backward - calls[1])
        assert ran == ((1, 1) if mode == "1" else (0, 0)), (mode, ran)
        results[mode] = [y.detach()] + [p.grad.clone() for p in layer.parameters()]
    tol = (dict(atol=1e-11, rtol=1e-12) if dtype == torch.float64
           else dict(atol=1e-4, rtol=1e-5))
    for c, e in zip(results["1"], results["0"]):
        torch.testing.assert_close(c, e, **tol)


def test_3d_kernels_above_32_elements_compose_with_einsum():
    from doconv_torch import DOConv3d

    layer = DOConv3d(4, 4, (3, 3, 4), groups=2)  # volume 36 > 32
    assert not runs_c_kernel(layer)
    assert runs_c_kernel(DOConv3d(4, 4, (2, 4, 4), groups=2))  # volume 32


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


def built_files(directory):
    """The cache directory's entries but its lock file (libraries, or leftovers)."""
    return sorted(p for p in directory.iterdir() if p.name != _ckernel.LOCK_NAME)


def test_compiles_into_a_new_private_directory(fresh):
    assert _ckernel.backend().name == "c"
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    libraries = built_files(fresh)
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
    (library,) = built_files(fresh)
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


# -- the build's loose ends: $CC with arguments, one build at a time, no leftovers, and a
# cache directory that no one else can swap from above ----------------------------------
needs_posix_cc = pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("cc") is None or shutil.which("sh") is None,
    reason="needs Linux, cc and sh")


def compiler_script(path, body):
    """An executable sh script: a stand-in for a compiler or a compiler wrapper."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def logging_cc(path, log, delay=0, wrap=True):
    """A compiler wrapper that logs each compile to ``log``: as ccache, it runs the command
    it is given (``wrap``), or else the real compiler (the test environment's $CC, or cc)."""
    real = '"$@"' if wrap else os.environ.get("CC", "cc") + ' "$@"'
    return compiler_script(path, f'echo "$*" >> {shlex.quote(str(log))}\n'
                                 f'sleep {delay}\nexec {real}\n')


def worker_env(cache, **env):
    return {**os.environ, "DOCONV_CKERNEL": "1", "DOCONV_CACHE_DIR": str(cache), **env}


@needs_posix_cc
def test_a_cc_with_arguments_is_split_like_a_shell_would(fresh, monkeypatch, tmp_path):
    log = tmp_path / "cc.log"
    wrapper = shlex.quote(str(logging_cc(tmp_path / "my tools" / "log-cc", log)))  # a space
    monkeypatch.setenv("CC", f"{wrapper} {os.environ.get('CC', 'cc')}")  # CC="ccache gcc"
    backend = _ckernel.backend()
    assert backend.name == "c" and f"({wrapper} " in backend.detail, backend
    assert log.read_text().count("\n") == 1


@pytest.mark.parametrize("cc, reason", [
    ("no-such-ccache cc", r"C compiler \$CC='no-such-ccache cc' could not run: .*no-such-ccache"),
    ("'cc", r"""\$CC="'cc" is not a valid command line \(No closing quotation\)"""),
    (" ", r"\$CC=' ' names no compiler"),
    ("false", r"did not compile with \$CC='false' and any flag set: -O3 .*: exit status 1"),
], ids=["not-found", "bad-quoting", "blank", "fails"])
def test_an_unusable_cc_is_named_in_the_error_warning_and_backend(fresh, monkeypatch, cc,
                                                                   reason):
    if cc == "false" and shutil.which("false") is None:
        pytest.skip("no false(1)")
    monkeypatch.setenv("CC", cc)
    with pytest.raises(RuntimeError, match="DOCONV_CKERNEL=1 but .*" + reason):
        _ckernel.backend()
    monkeypatch.setenv("DOCONV_CKERNEL", "auto")
    _ckernel._reset()
    with pytest.warns(RuntimeWarning, match=reason):
        backend = _ckernel.backend()
    assert backend.name == "einsum" and re.search(reason, backend.detail), backend
    assert built_files(fresh) == []  # every failed build removed its temporary directory


RANK = textwrap.dedent("""
    import os, sys, time
    from doconv_torch import _ckernel
    open(sys.argv[1], "w").close()  # ready: torch imported
    while not os.path.exists(sys.argv[2]):  # go: all at once
        time.sleep(0.01)
    print(_ckernel.backend().detail)
""")


@needs_posix_cc
@pytest.mark.skipif(_ckernel.fcntl is None, reason="no fcntl")
def test_concurrent_processes_build_once_and_all_load_it(fresh, tmp_path):
    log, go = tmp_path / "cc.log", tmp_path / "go"
    env = worker_env(fresh, CC=str(logging_cc(tmp_path / "log-cc", log, 1, wrap=False)))
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(tmp_path / f"ready{i}"), str(go)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(3)):
            assert all(rank.poll() is None for rank in ranks), "a rank died before the build"
            assert time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.05)
        go.touch()
        outputs = [rank.communicate(timeout=300) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert [rank.returncode for rank in ranks] == [0, 0, 0], outputs
    details = {stdout.strip() for stdout, _ in outputs}
    assert len(details) == 1 and ".so (" in details.pop(), outputs  # the same library
    assert log.read_text().count("\n") == 1, log.read_text()  # one compile, not three
    assert len(built_files(fresh)) == 1, built_files(fresh)


@needs_posix_cc
@pytest.mark.parametrize("signal_name", ["KILL", "INT"])
def test_a_build_killed_midway_leaves_nothing_behind(fresh, tmp_path, signal_name):
    """SIGINT: the build's own cleanup runs. SIGKILL: nothing runs, so the next build removes
    what the dead process left."""
    killer = compiler_script(tmp_path / "killer-cc", f'kill -{signal_name} "$PPID"\nsleep 5\n')
    # default_int_handler: SIGINT raises KeyboardInterrupt even where the parent ignores it.
    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from doconv_torch import _ckernel; _ckernel.backend()")
    build = subprocess.run([sys.executable, "-c", code], env=worker_env(fresh, CC=str(killer)),
                           cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    if signal_name == "KILL":
        assert build.returncode == -9, build.stderr
        (left,) = built_files(fresh)  # what a killed build leaves: its temporary directory
        assert left.name.startswith("tmp") and left.is_dir()
        assert _ckernel.backend().name == "c"  # the next build, in this process
        (library,) = built_files(fresh)
        assert library.suffix == ".so"
    else:
        assert "KeyboardInterrupt" in build.stderr, build.stderr
        assert built_files(fresh) == []


def test_stale_build_directories_are_removed_and_live_ones_kept(fresh):
    fresh.mkdir(mode=0o700)
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True, timeout=60,
                                  check=True).stdout)
    now = time.time()
    paths = {}
    for name, pid, tag, age in (("dead", dead_pid, None, 0), ("live", os.getpid(), None, 0),
                                ("old", os.getpid(), None, 7200),
                                ("other-host", dead_pid, "0" * 8, 0),
                                ("legacy-old", None, None, 7200),
                                ("legacy-new", None, None, 0)):
        if pid is None:
            path = fresh / f"tmp{name[-3:]}_2345"  # tempfile's names, of earlier versions
        elif tag is None:
            path = fresh / f"{_ckernel._temp_prefix(pid)}{name}"
        else:
            path = fresh / f"tmp-{tag}-{pid}-{name}"
        path.mkdir()
        (path / "compose.c").write_text("")
        os.utime(path, (now - age, now - age))
        paths[name] = path
    (fresh / "notes.txt").write_text("not ours to remove")
    _ckernel._remove_stale(fresh, check_pids=True)
    kept = {name for name, path in paths.items() if path.exists()}
    # Another host's PID says nothing here; only age removes its directories.
    assert kept == {"live", "other-host", "legacy-new"}
    assert (fresh / "notes.txt").exists()


@pytest.fixture
def under(monkeypatch, tmp_path):
    """Use a cache directory under tmp_path/<parent>, decided afresh."""
    def use(parent, *below):
        cache = Path(tmp_path, parent, *below, "doconv")
        monkeypatch.setenv("DOCONV_CACHE_DIR", str(cache))
        _ckernel._reset()
        return cache
    return use


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702], ids=oct)
@pytest.mark.parametrize("route", ["parent", "grandparent", "symlink"])
def test_a_cache_under_a_directory_others_can_write_is_refused(tmp_path, under, mode, route):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    if route == "parent":
        cache = under("shared")
    elif route == "grandparent":
        (shared / "mine").mkdir(mode=0o700)
        cache = under("shared", "mine", "not-yet")
    else:
        (tmp_path / "link").symlink_to(shared)
        cache = under("link")
    reason = (f"cache directory {cache} is not safe: {shared} has mode {mode:04o}, "
              "expected no group/other write unless sticky")
    with pytest.raises(RuntimeError, match="DOCONV_CKERNEL=1 but .*" + re.escape(reason)):
        _ckernel.backend()
    assert not cache.exists() and not (shared / "mine" / "not-yet").exists()  # nor created


@needs_posix_cc
def test_a_cache_under_a_sticky_directory_is_used(tmp_path, under):
    shared = tmp_path / "sticky"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    (tmp_path / "link").symlink_to(shared)
    cache = under("link", "made")
    assert _ckernel.backend().name == "c"
    assert stat.S_IMODE((shared / "made").stat().st_mode) == 0o700  # missing parents: private
    assert len(built_files(cache)) == 1


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0,
                    reason="root makes files of another owner")
@pytest.mark.parametrize("what", ["directory", "symlink"])
def test_a_cache_under_a_directory_of_another_user_is_refused(tmp_path, under, what):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    if what == "directory":
        os.chown(theirs, 12345, 12345)
        cache = under("theirs")
        reason = f"{theirs} is owned by uid 12345, expected uid 0 or root"
    else:
        os.symlink(theirs, tmp_path / "their-link")
        os.lchown(tmp_path / "their-link", 12345, 12345)
        cache = under("their-link")
        reason = f"symlink {tmp_path / 'their-link'} is owned by uid 12345, expected uid 0 or root"
    with pytest.raises(RuntimeError, match=re.escape(f"{cache} is not safe: {reason}")):
        _ckernel.backend()
    assert not (theirs / "doconv").exists()
