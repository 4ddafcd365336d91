"""Fuzzing the core's file readers: the safetensors reader (``doconv_core.tensorfile``), the
portable container (safetensors and ``.npz``, ``load_params``) and legacy checkpoint import
(``prepare_legacy`` and the ``import_legacy_*`` functions).

Each test draws a structurally valid input (tests/fuzz_files.py), often mutates it (header
length, JSON shape and depth, offsets, dtypes, shapes, metadata, truncation, trailing and
flipped bytes) and checks the one property every reader promises: an unchanged input reads
back exactly, and any input either reads or raises ``CheckpointError``, never another
exception. The comparison with the reference reader, ``safetensors.numpy``, runs where that
package is installed (tests/test_torch/test_fuzz_safetensors_reference.py).

Budgets: under the default hypothesis profile "ci" (tests/conftest.py) every test runs a
fixed number of examples, derandomized, so each run checks the same files (under 15 s for
this file on a busy 2-core machine). For a long local run, with fresh random examples:

    HYPOTHESIS_PROFILE=long DOCONV_FUZZ_SCALE=100 python -m pytest tests/core/test_fuzz_files.py

(each budget times DOCONV_FUZZ_SCALE, 100 by default).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import doconv_core as dc
from doconv_core.checkpoint import prepare_legacy
from doconv_core.legacy import import_legacy_gluon, import_legacy_tf, import_legacy_torch
from doconv_core.params import CheckpointError
from doconv_core.tensorfile import (
    DTYPES,
    check_numpy_shape,
    read_safetensors,
    read_safetensors_header,
)
from fuzz_files import (
    array_values,
    legacy_shapes,
    mutated_safetensors,
    portable_files,
    valid_legacy_arrays,
)
from strategies import fuzz_settings, layer_specs

HAS_ML_DTYPES = importlib.util.find_spec("ml_dtypes") is not None


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def readable_code(code: str) -> bool:
    """Whether read_safetensors can make a NumPy array of safetensors dtype ``code`` here."""
    _, plain, extension = DTYPES[code]
    return plain is not None or (extension is not None and HAS_ML_DTYPES)


def numpy_holds(entry) -> bool:
    try:
        check_numpy_shape(entry["shape"], max(DTYPES[entry["dtype"]][0] // 8, 1), "", "")
    except CheckpointError:
        return False
    return True


def read_all(path):
    """Every reader's answer for ``path``: header, mmap and plain reads ({} on error)."""
    outcomes = {}
    for name, read in (("header", read_safetensors_header),
                       ("mmap", lambda p: read_safetensors(p, mmap=True)),
                       ("plain", lambda p: read_safetensors(p, mmap=False))):
        try:
            outcomes[name] = read(path)
        except CheckpointError as error:
            assert str(error).startswith(repr(str(path))), str(error)
            outcomes[name] = None
    return outcomes


@fuzz_settings(200)
@given(case=mutated_safetensors())
def test_safetensors_reader_reads_or_raises_checkpoint_error(folder, case):
    raw, expected, _ = case
    path = folder / "fuzz.safetensors"
    path.write_bytes(raw)
    outcomes = read_all(path)
    header, mmap, plain = outcomes["header"], outcomes["mmap"], outcomes["plain"]
    # The readers agree: an array read means a valid header, and both read modes agree.
    assert (mmap is None) == (plain is None)
    if mmap is not None:
        assert header is not None
        entries, metadata = header
        assert mmap[1] == plain[1] == metadata
        assert list(mmap[0]) == list(plain[0]) == list(entries)
        for name, entry in entries.items():
            for arrays in (mmap[0], plain[0]):
                assert arrays[name].shape == entry["shape"]
            assert mmap[0][name].tobytes() == plain[0][name].tobytes()
    if header is not None:
        # A header that validates is one whose arrays NumPy can hold, or the read says why.
        entries, _ = header
        readable = all(readable_code(e["dtype"]) for e in entries.values())
        if readable and mmap is None:  # then only a shape NumPy cannot hold is refused
            assert not all(numpy_holds(e) for e in entries.values()), entries
    if expected is not None:  # unchanged: exactly what was written
        content, metadata = expected
        assert header is not None
        assert header[1] == metadata
        assert {name: (e["dtype"], list(e["shape"])) for name, e in header[0].items()} == {
            name: (t.code, t.shape) for name, t in content.items()}
        if all(readable_code(t.code) for t in content.values()):
            assert {name: a.tobytes() for name, a in plain[0].items()} == {
                name: t.data for name, t in content.items()}


def same_layers(loaded, layers):
    assert list(loaded) == list(layers)
    for name, params in layers.items():
        assert loaded[name].spec == params.spec
        for part in ("W", "D", "bias"):
            a, b = getattr(params, part), getattr(loaded[name], part)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@fuzz_settings(150)
@given(case=portable_files())
def test_portable_files_load_or_raise_checkpoint_error(folder, case):
    suffix, raw, layers, _ = case
    path = folder / f"fuzz.{suffix}"
    path.write_bytes(raw)
    try:
        loaded = dc.load_params(path)
    except CheckpointError as error:
        assert str(error).startswith(repr(str(path))), str(error)
        assert layers is None, f"an unchanged file was refused: {error}"
        return
    if layers is not None:
        same_layers(loaded, layers)
    for params in loaded.values():  # what loads is a layer: valid shapes, a kernel
        assert isinstance(params, dc.DOConvParams)
        assert params.kernel().shape == params.spec.kernel_shape


LAYOUTS = {"torch-legacy": import_legacy_torch, "tf-legacy": import_legacy_tf,
           "gluon-legacy": import_legacy_gluon}


@st.composite
def legacy_cases(draw):
    """(layout, spec, arrays): valid arrays of the original layout, perhaps with some
    replaced by wrong values, dropped, or joined by names the layout does not have."""
    layout = draw(st.sampled_from(sorted(LAYOUTS)))
    spec = draw(layer_specs())
    if layout == "gluon-legacy" and draw(st.integers(0, 3)):  # mostly specs Gluon had
        spec = dc.ConvSpec(spec.in_channels, spec.out_channels, spec.kernel_size,
                           groups=spec.groups, bias=spec.bias)
    arrays = valid_legacy_arrays(spec, layout, draw(st.integers(0, 2**16)))
    shapes = legacy_shapes(spec, layout)
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["value", "drop", "extra"]))
        name = draw(st.sampled_from(sorted(shapes)))
        if kind == "value":
            arrays[name] = draw(array_values(shapes[name]))
        elif kind == "drop":
            arrays.pop(name, None)
        else:
            arrays[draw(st.text(max_size=3))] = draw(array_values(None))
    return layout, spec, arrays


@fuzz_settings(120)
@given(case=legacy_cases(), strict=st.booleans(), loads_other_keys=st.booleans(),
       prefix=st.sampled_from(["", "features.0"]))
def test_legacy_imports_succeed_exactly_or_raise_checkpoint_error(case, strict,
                                                                  loads_other_keys, prefix):
    layout, spec, arrays = case
    weights = {(f"{prefix}.{key}" if prefix else key): value for key, value in arrays.items()}
    try:
        results, remaining, missing = prepare_legacy(
            weights, {prefix: spec}, layout=layout, strict=strict,
            loads_other_keys=loads_other_keys)
    except CheckpointError:
        return
    for result in results.values():
        params = result.params
        assert params.spec == spec and params.kernel().shape == spec.kernel_shape
        assert result.exact or result.method == "embedded composed kernel"


@fuzz_settings(100)
@given(case=legacy_cases())
def test_legacy_import_functions_compose_the_original_kernel_or_refuse(case):
    layout, spec, arrays = case
    importer = LAYOUTS[layout]
    try:
        result = importer(spec, **arrays)
    except CheckpointError:
        return
    except TypeError as error:  # a name the importer does not take: the caller's mistake
        assert "unexpected keyword argument" in str(error) or "missing 1 required" in str(
            error), error
        return
    original = original_kernel(layout, spec, arrays)
    kernel = result.params.kernel()
    # The kernel is stored in the parameters' dtype: float16/bfloat16 checkpoints compare to
    # a few units in their last place (composed in float32, rounded once), others to 1e-5.
    tolerance = max(1e-5, 4 * float(half_eps(kernel.dtype)))
    np.testing.assert_allclose(kernel.astype(np.float64), original, rtol=tolerance,
                               atol=tolerance * max(1.0, float(np.abs(original).max(initial=0))))


def half_eps(dtype: np.dtype) -> float:
    """The machine epsilon of a 16-bit float dtype (bfloat16 through ml_dtypes), else 0."""
    if dtype.itemsize != 2:
        return 0.0
    if dtype.name == "bfloat16":
        import ml_dtypes
        return float(ml_dtypes.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def original_kernel(layout, spec, arrays):
    """The composed kernel as the original code computed it, in float64."""
    from doconv_core.legacy import tf_channel_map, torch_channel_map

    def f64(name):
        value = arrays.get(name)
        return None if value is None else np.asarray(value, dtype=np.float64)

    if layout == "torch-legacy":
        D, W, channel_map = f64("D"), f64("W"), torch_channel_map(spec)
    elif layout == "tf-legacy":
        W = f64("W").transpose(2, 1, 0)
        D = None if f64("D") is None else f64("D").transpose(2, 0, 1)
        channel_map = tf_channel_map(spec)
    else:
        W = f64("weight").reshape(spec.W_shape)
        D = None if f64("D") is None else f64("D").transpose(2, 0, 1)
        channel_map = tf_channel_map(spec)
    if D is None:
        return W.reshape(spec.kernel_shape)
    return dc.compose_kernel(D, W, groups=spec.groups, kernel_size=spec.kernel_size,
                             channel_map=channel_map)
