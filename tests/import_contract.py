"""The all-or-nothing import contract, one property for every adapter (NumPy and hypothesis
only): for a random model (a few DO-Conv layers of random ranks and kernel sizes) and a
random failure point (a bad array in the portable file or the legacy weights, a layer that
cannot take values), a failed ``import_params`` or ``load_legacy`` raises a CheckpointError
and leaves every parameter bit-identical.

An adapter's test module describes how to build its layers (``Adapter``) and takes the two
tests ``contract_tests`` makes for it:
``test_a_failed_import_params_changes_nothing, test_a_failed_load_legacy_changes_nothing =
contract_tests(ADAPTER)``.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from doconv_core import CheckpointError, ConvSpec, DOConvParams
from checkpoint_files import rewrite_npz
from strategies import RANK_KERNEL_SIZES, fuzz_settings

# What can be wrong with one array: an integer dtype, a wrong shape, or its absence.
ARRAY_FAULTS = ("int64", "shape", "missing")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """What the contract needs of an adapter.

    ``module``: the adapter package (export_params, import_params, load_legacy,
    doconv_layers). ``build(specs, unready, seed)``: a model holding one DO-Conv layer per
    spec (complete specs, 'valid' padding), in order, with seeded random values; the layers
    at the indices in ``unready`` (index -> one of ``unready_kinds``) cannot take values.
    ``values(model)``: copies of every parameter that holds values. ``legacy_layout``: the
    core's layout name of the original layer this adapter's ``load_legacy`` reads.
    """

    module: Any
    build: Callable[[list[ConvSpec], dict[int, str], int], Any]
    values: Callable[[Any], list[np.ndarray]]
    unready_kinds: tuple[str, ...]
    legacy_layout: str


def legacy_shapes(layout: str, spec: ConvSpec) -> dict[str, tuple[int, ...]]:
    """The shapes of the arrays the original layer of ``layout`` saved for ``spec``."""
    if layout == "torch-legacy":  # the canonical layout
        shapes = {"W": spec.W_shape}
        D = spec.D_shape
    elif layout == "tf-legacy":
        shapes = {"W": (spec.D_mul, spec.in_per_group, spec.out_channels)}
        D = (spec.mn, spec.D_mul, spec.in_channels)
    elif layout == "gluon-legacy":
        shapes = {"weight": spec.kernel_shape}
        D = (spec.mn, spec.mn, spec.in_channels)
    else:
        raise ValueError(f"no legacy shapes for {layout!r}")
    if spec.has_D:
        shapes["D"] = D
    if spec.bias:
        shapes["bias"] = (spec.out_channels,)
    return shapes


@st.composite
def layer_spec(draw, rank: int, *, kernel_volume_D_mul: bool = False) -> ConvSpec:
    """A small complete spec of ``rank`` with 'valid' padding (every adapter has it)."""
    groups = draw(st.sampled_from([1, 2]))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    kernel_size = draw(st.sampled_from(RANK_KERNEL_SIZES[rank]))
    mn = math.prod(kernel_size)
    extra = 0 if kernel_volume_D_mul or mn == 1 else draw(st.sampled_from([0, 0, 3]))
    return ConvSpec(in_channels, out_channels, kernel_size, padding=0, groups=groups,
                    bias=draw(st.booleans()), D_mul=mn + extra if mn > 1 else None,
                    rank=rank)


def failures(adapter: Adapter) -> list[tuple[str, str]]:
    """Every failure point the contract tries, one test each: ("array", fault) for a bad
    array, ("unready", kind) for a layer that cannot take values."""
    return ([("array", fault) for fault in ARRAY_FAULTS]
            + [("unready", how) for how in adapter.unready_kinds])


@st.composite
def import_failures(draw, failure: tuple[str, str]) -> dict:
    """A model of 2 or 3 layers of any rank and the ``failure`` at one of them."""
    specs = draw(st.lists(st.sampled_from([1, 2, 3]).flatmap(layer_spec), min_size=2,
                          max_size=3))
    return _case(draw, specs, failure, "W")


@st.composite
def legacy_failures(draw, failure: tuple[str, str], layout: str) -> dict:
    """As import_failures for ``load_legacy``: 2-D layers only, as the original had (with
    D_mul = M*N for the Gluon layout), and strict loading."""
    gluon = layout == "gluon-legacy"
    specs = draw(st.lists(layer_spec(2, kernel_volume_D_mul=gluon), min_size=2, max_size=3))
    return _case(draw, specs, failure, "weight" if gluon else "W")


def _case(draw, specs: list[ConvSpec], failure: tuple[str, str], first: str) -> dict:
    kind, detail = failure
    # Counted from the last layer, so the simplest examples fail after earlier layers that
    # could have been assigned (the case all-or-nothing is about).
    index = len(specs) - 1 - draw(st.integers(0, len(specs) - 1))
    case = {"specs": specs, "kind": kind, "index": index, "seed": draw(st.integers(0, 2**16))}
    if kind == "array":
        case.update(fault=detail, part=draw(st.sampled_from([first, "D", "bias"])))
    else:
        case["how"] = detail
    return case


def _spoil(arrays: dict, key: str, fault: str) -> None:
    """Apply one of ARRAY_FAULTS to ``arrays[key]``."""
    if fault == "missing":
        del arrays[key]
    elif fault == "int64":
        arrays[key] = arrays[key].astype(np.int64)
    else:  # one element more
        arrays[key] = np.concatenate([arrays[key].reshape(-1), arrays[key].reshape(-1)[:1]])


def _the_part(arrays: dict, names: list[str], case: dict, separator: str) -> str:
    """The key of the failure's array, falling back to the layer's first array where the
    layer has no such part (no D for a one-element kernel, no bias)."""
    prefix = f"{names[case['index']]}{separator}"
    key = prefix + case["part"]
    return key if key in arrays else min(k for k in arrays if k.startswith(prefix))


def _assert_identical(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _target(adapter: Adapter, case: dict) -> tuple[Any, list[str]]:
    unready = {case["index"]: case["how"]} if case["kind"] == "unready" else {}
    model = adapter.build(case["specs"], unready, case["seed"] + 1)
    return model, list(adapter.module.doconv_layers(model))


def _assert_refused(adapter: Adapter, model: Any, load: Callable[[], Any], case: dict
                    ) -> None:
    before = adapter.values(model)
    try:
        load()
    except CheckpointError:
        pass
    else:
        raise AssertionError(f"the import took {case}")
    _assert_identical(before, adapter.values(model))


def check_import(adapter: Adapter, case: dict) -> None:
    """The property for ``import_params`` (the file: a version-2 ``.npz``, rewritten raw)."""
    source = adapter.build(case["specs"], {}, case["seed"])
    model, names = _target(adapter, case)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.npz"
        adapter.module.export_params(source, path)
        if case["kind"] == "array":
            rewrite_npz(path, lambda arrays: _spoil(arrays, _the_part(arrays, names, case, "/"),
                                                    case["fault"]))
        _assert_refused(adapter, model, lambda: adapter.module.import_params(model, path), case)


def check_legacy(adapter: Adapter, case: dict) -> None:
    """The property for ``load_legacy`` (strict), every layer's original arrays given."""
    model, names = _target(adapter, case)
    rng = np.random.default_rng(case["seed"])
    weights = {f"{name}.{part}": rng.standard_normal(shape)
               for name, spec in zip(names, case["specs"])
               for part, shape in legacy_shapes(adapter.legacy_layout, spec).items()}
    if case["kind"] == "array":
        if case["fault"] == "missing":  # the first array: a layer may lack its D and bias
            case = {**case, "part": next(iter(legacy_shapes(adapter.legacy_layout,
                                                            case["specs"][0])))}
        _spoil(weights, _the_part(weights, names, case, "."), case["fault"])
    _assert_refused(adapter, model, lambda: adapter.module.load_legacy(model, weights), case)


def random_params(spec: ConvSpec, rng: np.random.Generator) -> DOConvParams:
    """Float32 parameters for ``spec`` (every adapter takes float32)."""
    def draw(shape):
        return rng.standard_normal(shape).astype(np.float32)
    return DOConvParams(spec, draw(spec.W_shape), draw(spec.D_shape) if spec.has_D else None,
                        draw(spec.out_channels) if spec.bias else None)


def contract_tests(adapter: Adapter, examples: int = 3) -> tuple[Callable, Callable]:
    """The two property tests for ``adapter``, one per failure point, each with ``examples``
    examples (fuzz_settings: the loaded profile's budget)."""
    each_failure = pytest.mark.parametrize("failure", failures(adapter), ids="-".join)

    @each_failure
    @fuzz_settings(examples)
    @given(data=st.data())
    def test_a_failed_import_params_changes_nothing(failure, data):
        check_import(adapter, data.draw(import_failures(failure)))

    @each_failure
    @fuzz_settings(examples)
    @given(data=st.data())
    def test_a_failed_load_legacy_changes_nothing(failure, data):
        check_legacy(adapter, data.draw(legacy_failures(failure, adapter.legacy_layout)))

    return test_a_failed_import_params_changes_nothing, test_a_failed_load_legacy_changes_nothing
