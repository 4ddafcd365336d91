"""Property tests of the ``doconv`` command's Keras reader: a ``.keras`` archive truncated,
extended or with bytes flipped (its zip structures included); every run either fuses to the
same model as the intact archive does, or is one ``doconv: error:`` line, exit 1, with
nothing written."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import keras
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from doconv_tf import DOConv1D, DOConv2D
from fuzz_files import npz_byte_mutations
from strategies import fuzz_settings
from tests.cli_checks import assert_failed_cleanly, run_in_process


@functools.lru_cache(maxsize=1)
def archive() -> tuple[bytes, tuple]:
    """(a small model's .keras bytes, the weights its fused archive holds)."""
    image = keras.Input((6, 6, 2))
    signal = keras.Input((7, 2))
    x = keras.layers.GlobalAveragePooling2D()(DOConv2D(4, 3, groups=2, name="conv")(image))
    s = keras.layers.GlobalAveragePooling1D()(DOConv1D(2, 3, D_mul=4, name="line")(signal))
    model = keras.Model([image, signal], keras.layers.Concatenate()([x, s]))
    with tempfile.TemporaryDirectory() as directory:
        path, out = Path(directory) / "model.keras", Path(directory) / "plain.keras"
        model.save(path)
        assert run_in_process("fuse", path, out)[0] == 0
        return path.read_bytes(), weights(out)


def weights(path: Path) -> tuple:
    model = keras.saving.load_model(path, compile=False)
    return tuple((w.path, keras.ops.convert_to_numpy(w)) for w in model.weights)


@fuzz_settings(6)
@given(st.data())
def test_fuse_of_a_mutated_keras_archive(data):
    raw, reference = archive()
    with tempfile.TemporaryDirectory() as directory:
        source, out = Path(directory) / "model.keras", Path(directory) / "plain.keras"
        source.write_bytes(data.draw(npz_byte_mutations(raw))[0])  # a zip archive too
        result = run_in_process("fuse", source, out)
        if result[0] != 0:
            assert_failed_cleanly(result, Path(directory), [source])
            return
        found = weights(out)
        assert [name for name, _ in found] == [name for name, _ in reference]
        for (name, value), (_, expected) in zip(found, reference):
            np.testing.assert_array_equal(value, expected, err_msg=name)
