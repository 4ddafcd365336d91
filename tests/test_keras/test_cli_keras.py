"""``doconv fuse`` on Keras ``.keras`` archives, end to end: train a small functional model
holding a grouped DOConv2D with D_mul > its kernel volume, a non-square kernel, a DOConv1D
and a DOConv3D; save it; fuse in a subprocess; load the output with
``keras.models.load_model`` in a fresh process that never imports doconv; compare outputs.
Archives holding code (a Lambda layer) stay refused by Keras' safe mode."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest

from doconv_tf import DOConv1D, DOConv2D, DOConv3D
from tests.cli_checks import run_doconv


run = run_doconv


def build() -> keras.Model:
    image = keras.Input((7, 6, 4))
    signal = keras.Input((9, 3))
    volume = keras.Input((5, 4, 4, 2))
    x = DOConv2D(8, 3, padding="same", groups=2, D_mul=12, name="grouped")(image)
    x = keras.layers.BatchNormalization()(x)
    x = DOConv2D(6, (1, 3), padding="same", use_bias=False, name="wide")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    s = keras.layers.GlobalAveragePooling1D()(DOConv1D(4, 5, D_mul=7, name="signal")(signal))
    v = keras.layers.GlobalAveragePooling3D()(
        DOConv3D(4, (3, 1, 2), groups=2, name="volume")(volume))
    out = keras.layers.Dense(3)(keras.layers.Concatenate()([x, s, v]))
    return keras.Model([image, signal, volume], out)


def inputs(rng, batch=4):
    return [rng.standard_normal((batch, 7, 6, 4)).astype("float32"),
            rng.standard_normal((batch, 9, 3)).astype("float32"),
            rng.standard_normal((batch, 5, 4, 4, 2)).astype("float32")]


@pytest.mark.slow
def test_fused_archive_loads_without_doconv_and_matches(tmp_path):
    rng = np.random.default_rng(0)
    model = build()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(inputs(rng, 16), rng.standard_normal((16, 3)).astype("float32"), epochs=2,
              batch_size=8, verbose=0)
    assert np.abs(keras.ops.convert_to_numpy(model.get_layer("grouped").D)).max() > 0
    path = tmp_path / "model.keras"
    model.save(path)
    x = inputs(rng, 5)
    np.savez(tmp_path / "io.npz", *x, y=keras.ops.convert_to_numpy(model(x)))

    result = run("inspect", path)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.startswith(("grouped", "wide", "signal", "volume"))}
    assert rows["grouped"][1:8] == ["2", "3x3", "2", "12", "8x2x12", "4x9x12", "8"]
    assert rows["wide"][1:8] == ["2", "1x3", "1", "3", "6x8x3", "8x3x3", "-"]
    assert rows["signal"][1:5] == ["1", "5", "1", "7"]
    assert rows["volume"][1:4] == ["3", "3x1x2", "2"]

    out = tmp_path / "plain.keras"
    result = run("fuse", path, out)
    assert result.returncode == 0, result.stderr
    assert "fused 4 DO-Conv layer(s)" in result.stdout
    # A fresh process without doconv: the fused archive holds only Keras' own layers.
    check = (
        "import sys, numpy as np, keras\n"
        f"model = keras.models.load_model({str(out)!r})\n"
        f"data = np.load({str(tmp_path / 'io.npz')!r})\n"
        "y = keras.ops.convert_to_numpy(model([data['arr_0'], data['arr_1'], data['arr_2']]))\n"
        "np.testing.assert_allclose(y, data['y'], rtol=1e-4, atol=1e-5)\n"
        "assert not any(m.startswith('doconv') for m in sys.modules), 'doconv was imported'\n"
        "print(sorted({type(l).__name__ for l in model.layers if 'Conv' in type(l).__name__}))\n")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "DOConv" not in result.stdout and "Conv2D" in result.stdout

    result = run("fuse", path, out)
    assert result.returncode == 1 and "exists; pass --force" in result.stderr


@pytest.mark.slow
def test_archives_with_code_stay_refused(tmp_path):
    inp = keras.Input((6, 6, 2))
    x = DOConv2D(3, 3)(inp)
    model = keras.Model(inp, keras.layers.Lambda(lambda t: t * 2)(x))
    path = tmp_path / "lambda.keras"
    model.save(path)
    out = tmp_path / "plain.keras"
    result = run("fuse", path, out)
    assert result.returncode == 1, result
    assert result.stderr.startswith("doconv: error: ") and result.stderr.count("\n") == 1
    assert "safe" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(path.read_bytes()[:300])
    result = run("fuse", truncated, out)
    assert result.returncode == 1 and "truncated or corrupt zip" in result.stderr
    result = run("fuse", path, tmp_path / "plain.pt")
    assert result.returncode == 2 and "it fuses to .keras" in result.stderr


# -- issue 28 ---------------------------------------------------------------------------------
def small_model(dtype: str = "float32") -> keras.Model:
    image = keras.Input((6, 6, 2))
    out = DOConv2D(16, 3, D_mul=10, dtype=dtype, name="conv")(image)
    return keras.Model(image, keras.layers.GlobalAveragePooling2D()(out))


def test_a_full_disk_is_one_line_naming_out(tmp_path):
    from tests.cli_checks import assert_one_line_error, leftovers
    path = tmp_path / "model.keras"
    small_model().save(path)
    result = run("fuse", path, tmp_path / "plain.keras", file_size_limit=4096)
    assert_one_line_error(result.returncode, result.stdout, result.stderr,
                          r"cannot write '.*plain\.keras': .*(nothing was written)")
    assert leftovers(tmp_path, [path]) == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_archives_fuse_in_their_dtype(tmp_path, dtype):
    from tests.cli_checks import run_in_process
    import doconv_core as dc
    model = small_model(dtype)
    path = tmp_path / "model.keras"
    model.save(path)
    out = tmp_path / "plain.keras"
    status, _, stderr = run_in_process("fuse", path, out)
    assert status == 0, stderr
    fused = keras.saving.load_model(out)
    kernel = fused.get_layer("conv").kernel
    assert kernel.dtype == dtype
    params = model.get_layer("conv").to_params()
    expected = dc.oihw_to_hwio(dc.compose_kernel(params.D.astype(np.float32),
                                                 params.W.astype(np.float32), groups=1,
                                                 kernel_size=(3, 3)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kernel).astype(np.float32),
                               expected, rtol=2e-2, atol=2e-2)
