"""The ``doconv`` command with NumPy alone: the portable container's inspect and fuse, a
safetensors state dict written without torch, the help the README shows, and every error
path (one line on stderr, the exit status, no traceback, no output file left)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import doconv_core as dc
from doconv_core import cli
from tests.cli_checks import run_doconv

REPO = Path(__file__).resolve().parents[2]


run = run_doconv


def random_params(spec: dc.ConvSpec, rng: np.random.Generator) -> dc.DOConvParams:
    W = rng.standard_normal(spec.W_shape).astype(np.float32)
    D = None if not spec.has_D else 0.1 * rng.standard_normal(spec.D_shape).astype(np.float32)
    bias = rng.standard_normal(spec.out_channels).astype(np.float32) if spec.bias else None
    return dc.DOConvParams(spec, W, D, bias)


SPECS = {
    # grouped, D_mul > kernel volume
    "features.0": dc.ConvSpec(4, 6, 3, padding=1, groups=2, D_mul=12),
    # non-square
    "features.2": dc.ConvSpec(6, 4, (1, 3), padding=(0, 1), bias=False),
    "head": dc.ConvSpec(4, 2, 1),
    "signal": dc.ConvSpec(3, 5, 4, D_mul=6, rank=1),
    "volume": dc.ConvSpec(2, 4, (3, 1, 2), groups=2, rank=3),
}


@pytest.fixture
def container(tmp_path):
    rng = np.random.default_rng(0)
    layers = {name: random_params(spec, rng) for name, spec in SPECS.items()}
    path = tmp_path / "model.safetensors"
    dc.save_params(path, layers)
    return path, layers


def assert_one_line_error(result: subprocess.CompletedProcess, status: int, pattern: str) -> None:
    assert result.returncode == status, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("doconv: error: "), lines[0]
    assert "Traceback" not in result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_inspect_lists_every_layer_and_the_counts(container):
    path, layers = container
    result = run("inspect", path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "doconv parameter container, 5 DO-Conv layer(s)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:7]}
    assert rows["features.0"][1:8] == ["2", "3x3", "2", "12", "6x2x12", "4x9x12", "6"]
    assert rows["features.2"][1:8] == ["2", "1x3", "1", "3", "4x6x3", "6x3x3", "-"]
    assert rows["head"][1:8] == ["2", "1x1", "1", "1", "2x4x1", "-", "2"]
    assert rows["signal"][1:5] == ["1", "4", "1", "6"]
    assert rows["volume"][1:4] == ["3", "3x1x2", "2"]
    ratio = np.linalg.norm(layers["features.0"].D) / np.linalg.norm(layers["features.0"].W)
    assert float(rows["features.0"][8]) == pytest.approx(ratio, rel=1e-3)
    training = sum(p.W.size + (0 if p.D is None else p.D.size)
                   + (0 if p.bias is None else p.bias.size) for p in layers.values())
    fused = sum(p.kernel().size + (0 if p.bias is None else p.bias.size)
                for p in layers.values())
    assert f"parameters: {training:,} for training, {fused:,} after fusion" in out


def test_fuse_writes_plain_kernels_equal_to_the_layers(container, tmp_path):
    path, layers = container
    out = tmp_path / "fused.safetensors"
    result = run("fuse", path, out)
    assert result.returncode == 0, result.stderr
    assert "fused 5 DO-Conv layer(s)" in result.stdout
    arrays, metadata = dc.read_safetensors(out)
    assert metadata["format"] == "doconv.fused" and metadata["format_version"] == "1"
    specs = json.loads(metadata["layers"])
    expected_keys = set()
    rng = np.random.default_rng(1)
    for name, params in layers.items():
        spec = params.spec
        assert dc.ConvSpec.from_dict(specs[name]) == spec
        expected_keys |= {f"{name}.weight"} | ({f"{name}.bias"} if spec.bias else set())
        kernel = arrays[f"{name}.weight"]
        assert kernel.shape == spec.kernel_shape and kernel.dtype == np.float32
        x = rng.standard_normal((2, spec.in_channels) + (6,) * spec.rank)
        settings = dict(stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                        groups=spec.groups)
        plain = dc.conv(x, kernel.astype(np.float64), arrays.get(f"{name}.bias"), **settings)
        # The feature composition: an independent computation of the DO-Conv layer.
        reference = dc.doconv_features(x, params.D, params.W, params.bias, spec)
        np.testing.assert_allclose(plain, reference, rtol=1e-5, atol=1e-5)
    assert set(arrays) == expected_keys


def test_fuse_reads_the_npz_container_too(container, tmp_path):
    _, layers = container
    npz = tmp_path / "model.npz"
    dc.save_params(npz, layers)
    out = tmp_path / "fused.safetensors"
    assert run("fuse", npz, out).returncode == 0
    arrays, _ = dc.read_safetensors(out)
    np.testing.assert_allclose(arrays["features.0.weight"], layers["features.0"].kernel(),
                               rtol=1e-6)


def torch_style_state(rng: np.random.Generator, extra_state: bool = True) -> dict:
    """A PyTorch state dict as doconv_torch saves it, written with NumPy alone."""
    state = {}
    for name in ("features.0", "features.2", "volume"):
        params = random_params(SPECS[name], rng)
        spec = params.spec
        state[f"{name}.W"] = params.W
        if params.D is not None:
            state[f"{name}.D"] = params.D
        if params.bias is not None:
            state[f"{name}.bias"] = params.bias
        if extra_state:
            state[f"{name}._extra_state"] = np.array(
                [1, spec.rank, spec.groups, *spec.kernel_size], dtype=np.int64)
        state[f"{name}.after"] = np.arange(3, dtype=np.float32)  # any other key
    state["bn.running_mean"] = np.zeros(4, np.float32)
    return state


def test_fuse_a_safetensors_state_dict_without_torch(tmp_path):
    rng = np.random.default_rng(2)
    state = torch_style_state(rng)
    path = tmp_path / "model.safetensors"
    dc.write_safetensors(path, state, {"epoch": "3"})
    out = tmp_path / "plain.safetensors"
    result = run("fuse", path, out)
    assert result.returncode == 0, result.stderr
    arrays, metadata = dc.read_safetensors(out)
    assert metadata == {"epoch": "3"}
    expected = {key for key in state if not key.endswith((".W", ".D", "_extra_state"))}
    expected |= {"features.0.weight", "features.2.weight", "volume.weight"}
    assert set(arrays) == expected
    for key in state:
        if key in arrays:
            np.testing.assert_array_equal(arrays[key], state[key])
    kernel = dc.compose_kernel(state["features.2.D"], state["features.2.W"], groups=1,
                               kernel_size=(1, 3))
    np.testing.assert_allclose(arrays["features.2.weight"], kernel, rtol=1e-6)
    assert arrays["volume.weight"].shape == (4, 1, 3, 1, 2)


def test_a_state_dict_without_kernel_shapes_is_refused_until_an_option_settles_it(tmp_path):
    state = torch_style_state(np.random.default_rng(3), extra_state=False)
    path = tmp_path / "old.safetensors"
    dc.write_safetensors(path, state)
    out = tmp_path / "plain.safetensors"
    assert_one_line_error(run("fuse", path, out), 1,
                          r"layer 'features\.0': .* does not record its kernel's shape.*"
                          r"--kernel-size features\.0=3x3")
    assert not out.exists()
    # --rank 2 settles the square 3x3 but not features.2's three elements (1x3 or 3x1).
    assert_one_line_error(run("fuse", path, out, "--rank", "2"), 1,
                          r"layer 'features\.2'.*--kernel-size features\.2=1x3")
    assert_one_line_error(
        run("fuse", path, out, "--rank", "2", "--kernel-size", "features.2=1x3"), 1,
        r"layer 'volume'")
    result = run("fuse", path, out, "--rank", "2", "--kernel-size", "features.2=1x3",
                 "--kernel-size", "volume=3x1x2")
    assert result.returncode == 0, result.stderr
    arrays, _ = dc.read_safetensors(out)
    assert arrays["features.2.weight"].shape == (4, 6, 1, 3)
    assert arrays["volume.weight"].shape == (4, 1, 3, 1, 2)
    # Without LAYER=, a shape settles every layer of its volume.
    other = tmp_path / "by_volume.safetensors"
    result = run("fuse", path, other, "--kernel-size", "3x3", "--kernel-size", "1x3",
                 "--kernel-size", "3x1x2")
    assert result.returncode == 0, result.stderr
    assert dc.read_safetensors(other)[0]["features.2.weight"].shape == (4, 6, 1, 3)
    assert_one_line_error(run("fuse", path, tmp_path / "o.safetensors", "--kernel-size", "1x3",
                              "--kernel-size", "3x1"), 2, r"both claim every layer of 3")
    assert_one_line_error(run("fuse", path, tmp_path / "o.safetensors",
                              "--kernel-size", "nothere=3x3"), 1, r"names \['nothere'\]")
    assert_one_line_error(run("fuse", path, tmp_path / "o.safetensors",
                              "--kernel-size", "features.0=2x2"), 1,
                          r"features\.0.*2x2 has 4 elements")


def test_help_fits_the_readme():
    readme = (REPO / "README.md").read_text()
    for command in ((), ("fuse",), ("inspect",)):
        result = run(*command, "--help")
        assert result.returncode == 0
        block = f"$ doconv {' '.join(command + ('--help',))}\n{result.stdout}"
        assert block in readme, f"README's Deploy section lacks:\n{block}"


def test_pyproject_declares_the_console_script():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'\[project\.scripts\]\s*\n(#.*\n)*doconv = "doconv_core\.cli:main"', text)


def test_the_core_imports_no_framework():
    code = ("import sys, doconv_core.cli, doconv_core.__main__; "
            "print(sorted(m for m in ('torch', 'keras', 'tensorflow', 'mxnet', 'jax') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.stdout.strip() == "[]", result


# -- every error: one line, the exit status, no traceback, no output left ---------------------
def error_cases(tmp_path: Path, container: Path) -> list:
    good = container.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[: len(good) // 2])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good[:8] + b"{" + b"\xff" * 40 + good[49:])
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"just some text, not a checkpoint\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    zipped = tmp_path / "notes.zip"
    import zipfile
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("notes.txt", "hello")
    no_layers = tmp_path / "plain.safetensors"
    dc.write_safetensors(no_layers, {"fc.weight": np.zeros((2, 2), np.float32)})
    return [
        (("fuse", tmp_path / "missing.safetensors"), 1, r"missing\.safetensors' does not exist"),
        (("fuse", truncated), 1, r"truncated"),
        (("fuse", corrupt), 1, r"corrupt\.safetensors' has a (header that is not UTF-8|corrupt)"),
        (("fuse", foreign), 1, r"unknown format"),
        (("fuse", empty), 1, r"is empty"),
        (("fuse", zipped), 1, r"zip archive of none of the formats"),
        (("fuse", no_layers), 1, r"holds no DO-Conv layers"),
        (("fuse", tmp_path), 1, r"is a directory"),
        (("inspect", truncated), 1, r"truncated"),
        (("inspect", foreign), 1, r"unknown format"),
    ]


def test_every_bad_input_is_one_line_and_leaves_no_output(container, tmp_path):
    path, _ = container
    for args, status, pattern in error_cases(tmp_path, path):
        out = tmp_path / "out.safetensors"
        full = args + (out,) if args[0] == "fuse" else args
        assert_one_line_error(run(*full), status, pattern)
        assert not out.exists(), args
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left"


def test_an_existing_output_needs_force(container, tmp_path):
    path, _ = container
    out = tmp_path / "fused.safetensors"
    out.write_bytes(b"keep me")
    assert_one_line_error(run("fuse", path, out), 1, r"exists; pass --force")
    assert out.read_bytes() == b"keep me"
    assert run("fuse", path, out, "--force").returncode == 0
    assert dc.is_safetensors(out)


@pytest.mark.parametrize("args, pattern", [
    (("fuse", "{in}", "{tmp}/out.txt"), r"no known suffix"),
    (("fuse", "{in}", "{tmp}/out.keras"), r"fuses to \.safetensors or \.pt/\.pth"),
    (("fuse", "{in}", "{tmp}/out.safetensors", "--key", "model"), r"--key applies to PyTorch"),
    (("fuse", "{in}", "{tmp}/out.safetensors", "--rank", "2"), r"records them"),
    (("fuse", "{in}", "{tmp}/out.safetensors", "--symbol", "net-symbol.json"),
     r"--symbol applies to exported Gluon models"),
    (("inspect", "{in}", "--key", "model"), r"--key applies to PyTorch"),
    (("fuse", "{in}", "{tmp}/out.safetensors", "--kernel-size", "3y3"), r"not a kernel shape"),
    (("fuse", "{in}", "{tmp}/out.safetensors", "--rank", "4"), r"invalid choice"),
    (("fuse", "{in}"), r"required: OUT"),
    (("frobnicate",), r"invalid choice"),
    ((), r"a command is required"),
])
def test_usage_errors_exit_2(container, tmp_path, args, pattern):
    path, _ = container
    args = [a.format(**{"in": path, "tmp": tmp_path}) for a in args]
    assert_one_line_error(run(*args), 2, pattern)
    assert not list(tmp_path.glob("out*"))


def test_main_in_process_returns_the_status(container, tmp_path, capsys):
    path, _ = container
    assert cli.main(["inspect", str(path)]) == 0
    assert "5 DO-Conv layer(s)" in capsys.readouterr().out
    assert cli.main(["inspect", str(tmp_path / "none.pt")]) == 1
    assert capsys.readouterr().err.startswith("doconv: error: ")


@pytest.mark.parametrize("framework, suffix, pattern", [
    ("torch", ".pt", r"PyTorch file; reading it needs torch"),
    ("keras", ".keras", r"Keras archive; reading it needs keras"),
    ("mxnet", ".params", r"Gluon parameter file; reading it needs mxnet"),
])
def test_a_missing_framework_is_one_line(tmp_path, framework, suffix, pattern):
    import importlib.util
    if importlib.util.find_spec(framework) is not None:
        pytest.skip(f"{framework} is installed here")
    import zipfile
    path = tmp_path / f"model{suffix}"
    if framework == "torch":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model/data.pkl", b"\x80\x02}q\x00.")
    elif framework == "keras":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", "{}")
            archive.writestr("model.weights.h5", b"")
    else:
        path.write_bytes((0x112).to_bytes(8, "little") + bytes(8))
    out = tmp_path / f"out{suffix}"
    assert_one_line_error(run("fuse", path, out), 1, pattern)
    assert not out.exists()


# -- issue 28: what the layers refuse, the command refuses; every failure one line ----------
def layer_state(W_shape, D_shape, extra=None, bias=True) -> dict:
    """A one-layer state dict ``conv.*`` with arrays of these shapes."""
    rng = np.random.default_rng(5)
    state = {"conv.W": rng.standard_normal(W_shape).astype(np.float32)}
    if D_shape is not None:
        state["conv.D"] = np.zeros(D_shape, np.float32)
    if bias:
        state["conv.bias"] = np.zeros(W_shape[0], np.float32)
    if extra is not None:
        state["conv._extra_state"] = np.array(extra, dtype=np.int64)
    return state


@pytest.mark.parametrize("W_shape, D_shape, extra, pattern", [
    # D_mul 4 below the 3x3 kernel's 9: DOConv2d refuses it, the command wrote zeros.
    ((3, 2, 4), (2, 9, 4), [1, 2, 1, 3, 3], r"D_mul must be >= kernel height\*width = 9"),
    ((3, 2, 4), (2, 9, 4), None, r"D_mul must be >= kernel volume = 9"),
    # C_in = 0: a ZeroDivisionError traceback before.
    ((3, 0, 9), (0, 9, 9), [1, 2, 1, 3, 3], r"no input channels"),
    ((3, 0, 9), (0, 9, 9), None, r"no input channels"),
    ((0, 2, 9), (2, 9, 9), [1, 2, 1, 3, 3], r"out_channels must be an integer >= 1"),
    ((3, 2, 9), (4, 9, 9), None, r"out_channels must be divisible by groups \(2\)"),
    ((3, 2, 9), (2, 9, 9), [1, 2, 1, 3], r"extra-state record must be \[1, rank, groups"),
    ((3, 2, 9), (2, 9, 9), [1, 2, 0, 3, 3], r"extra-state record must be"),
    ((3, 2, 2), None, [1, 2, 1, 1, 1], r"D_mul must be 1 or None for a 1x1 kernel"),
])
def test_a_layer_the_layers_refuse_is_refused_by_the_command(tmp_path, W_shape, D_shape, extra,
                                                             pattern):
    from tests.cli_checks import assert_failed_cleanly, run_in_process
    path = tmp_path / "model.safetensors"
    dc.write_safetensors(path, layer_state(W_shape, D_shape, extra))
    out = tmp_path / "plain.safetensors"
    assert_failed_cleanly(run_in_process("fuse", path, out, "--rank", "2"), tmp_path, [path],
                          r"layer 'conv'.*" + pattern if "extra-state" not in pattern
                          else pattern)
    assert_failed_cleanly(run_in_process("inspect", path), tmp_path, [path], pattern)


def test_the_command_and_the_layers_share_one_rule():
    """layer_spec (the command's check) accepts exactly the shapes a ConvSpec gives."""
    for kernel, D_mul, groups in (((3, 3), 9, 1), ((3, 3), 12, 2), ((1, 3), 3, 1), ((3,), 5, 1),
                                  ((3, 1, 2), 6, 2), ((1, 1), 1, 2)):
        spec = dc.ConvSpec(4, 6, kernel, groups=groups, D_mul=D_mul, rank=len(kernel))
        found = dc.compose.layer_spec(spec.W_shape, spec.D_shape, (6,), kernel_size=kernel,
                                      groups=groups)
        assert found.same_function(spec) and found.D_mul == spec.D_mul
    with pytest.raises(ValueError, match="D_mul must be >= kernel height"):
        dc.ConvSpec(2, 3, 3, D_mul=4)
    with pytest.raises(ValueError, match="D_mul must be >= kernel height"):
        dc.compose.layer_spec((3, 2, 4), (2, 9, 4), None, kernel_size=(3, 3))


def test_a_portable_npz_member_claiming_a_huge_array_is_one_line(tmp_path):
    """A member whose .npy header claims 10^12 elements: a MemoryError traceback before."""
    import io
    import zipfile
    from tests.cli_checks import assert_failed_cleanly, run_in_process
    spec = dc.ConvSpec(2, 3, 3)
    dc.save_params(tmp_path / "good.npz", {"c": random_params(spec, np.random.default_rng(0))})
    with zipfile.ZipFile(tmp_path / "good.npz") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (10 ** 6, 10 ** 6)})
    members["c/W.npy"] = header.getvalue() + members["c/W.npy"][128:]
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    (tmp_path / "good.npz").unlink()
    out = tmp_path / "plain.safetensors"
    for args in (("inspect", path), ("fuse", path, out)):
        assert_failed_cleanly(run_in_process(*args), tmp_path, [path], r"huge\.npz")


def test_a_full_disk_is_one_line_naming_out_and_leaves_nothing(container, tmp_path):
    """The write itself fails (RLIMIT_FSIZE: what a full disk does to write()); before, the
    message was the OS's alone, naming no file or the temporary one."""
    from tests.cli_checks import leftovers, run_doconv
    path, _ = container
    big = tmp_path / "big.safetensors"
    dc.write_safetensors(big, layer_state((64, 32, 9), (32, 9, 9), [1, 2, 1, 3, 3]))
    for source in (path, big):
        out = tmp_path / "plain.safetensors"
        result = run_doconv("fuse", source, out, file_size_limit=1024)
        assert_one_line_error(result, 1, r"cannot write '.*plain\.safetensors': File too large;"
                                         r" free some space")
        assert ".tmp" not in result.stderr
        assert leftovers(tmp_path, [path, big]) == []


def test_a_failed_rename_names_out_not_the_temporary_file(container, tmp_path, monkeypatch):
    import errno
    import os
    from tests.cli_checks import assert_failed_cleanly, run_in_process
    path, _ = container
    real_replace = os.replace

    def replace(source, target):
        if str(source).endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), source)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "plain.safetensors"
    result = run_in_process("fuse", path, out)
    assert_failed_cleanly(result, tmp_path, [path],
                          r"cannot write '.*plain\.safetensors': No space left on device; free")
    assert ".tmp" not in result[2]


def test_a_float16_state_dict_fuses_composed_in_float32(tmp_path):
    """16-bit floats compose in float32 and are stored in their dtype, in every format (the
    PyTorch env checks .pt and bfloat16 give the same bits)."""
    state = {key: value.astype(np.float16) if value.dtype == np.float32 else value
             for key, value in torch_style_state(np.random.default_rng(6)).items()}
    path = tmp_path / "half.safetensors"
    dc.write_safetensors(path, state)
    out = tmp_path / "plain.safetensors"
    result = run("fuse", path, out)
    assert result.returncode == 0, result.stderr
    arrays, _ = dc.read_safetensors(out)
    kernel = dc.compose_kernel(state["features.0.D"].astype(np.float32),
                               state["features.0.W"].astype(np.float32), groups=2,
                               kernel_size=(3, 3)).astype(np.float16)
    assert arrays["features.0.weight"].dtype == np.float16
    np.testing.assert_array_equal(arrays["features.0.weight"], kernel)


def test_a_zip_of_an_unsupported_version_is_one_line(tmp_path):
    """zipfile's NotImplementedError ("zip file version 6.4"), found by the fuzz tests, was a
    traceback."""
    import zipfile
    from tests.cli_checks import assert_failed_cleanly, run_in_process
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", b"\x80\x02}q\x00.")
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")
    raw[central + 6:central + 8] = (64).to_bytes(2, "little")  # version needed: 6.4
    path.write_bytes(bytes(raw))
    for args in (("inspect", path), ("fuse", path, tmp_path / "plain.pt")):
        assert_failed_cleanly(run_in_process(*args), tmp_path, [path],
                              r"truncated or corrupt zip archive: NotImplementedError")
