"""The portable parameter container: safetensors (version 3), and .npz (versions 1, 2)."""

import importlib.util
import json
import os
import re

import numpy as np
import pytest

import doconv_core as dc
from doconv_core.params import _META_KEY
from checkpoint_files import safetensors_parts, write_safetensors_parts


def make_params(spec, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return dc.DOConvParams(
        spec,
        W=rng.standard_normal(spec.W_shape).astype(dtype),
        D=rng.standard_normal(spec.D_shape).astype(dtype) if spec.has_D else None,
        bias=rng.standard_normal(spec.out_channels).astype(dtype) if spec.bias else None)


LAYERS = {
    "stem.conv": make_params(dc.ConvSpec(3, 8, 3, 2, "same", D_mul=12), 1),
    "block.0.dw": make_params(dc.ConvSpec(8, 16, 3, padding=1, groups=8, bias=False,
                                          padding_mode="reflect"), 2, np.float64),
    "head": make_params(dc.ConvSpec(16, 4, 1, groups=2), 3),
}


@pytest.mark.parametrize("name, safetensors", [
    ("model.safetensors", True), ("model.npz", False), ("model.NPZ", False), ("model", True),
    ("model.bin", True)])
def test_round_trip_preserves_everything(tmp_path, name, safetensors):
    path = tmp_path / name
    dc.save_params(path, LAYERS)
    assert dc.is_safetensors(path) is safetensors
    assert os.listdir(tmp_path) == [name]  # no temporary file left, no suffix added
    loaded = dc.load_params(path)
    assert list(loaded) == list(LAYERS)
    for name, original in LAYERS.items():
        copy = loaded[name]
        assert copy.spec == original.spec
        for part in ("W", "D", "bias"):
            a, b = getattr(original, part), getattr(copy, part)
            if a is None:
                assert b is None
            else:
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(copy.kernel(), original.kernel())


def test_single_layer_save_and_load(tmp_path):
    params = LAYERS["stem.conv"]
    params.save(tmp_path / "one.safetensors")
    assert dc.DOConvParams.load(tmp_path / "one.safetensors").spec == params.spec
    assert sorted(dc.read_safetensors(tmp_path / "one.safetensors")[0]) == [
        "layer.D", "layer.W", "layer.bias"]
    dc.save_params(tmp_path / "many.safetensors", LAYERS)
    with pytest.raises(dc.CheckpointError, match="holds 3 layers"):
        dc.DOConvParams.load(tmp_path / "many.safetensors")


def test_params_validate_shapes():
    spec = dc.ConvSpec(4, 4, 3)
    with pytest.raises(ValueError, match=r"D must have shape \(4, 9, 9\) for this layer, got no array"):
        dc.DOConvParams(spec, W=np.zeros(spec.W_shape))
    with pytest.raises(ValueError, match="spec.in_channels must be known"):
        dc.DOConvParams(dc.ConvSpec(None, 4, 1), W=np.zeros((4, 4, 1)))


def rewrite(path, change):
    """Load the raw arrays of a saved file, apply change(arrays), save them again."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    change(arrays)
    np.savez(path, **arrays)


def set_meta(arrays, **updates):
    meta = json.loads(str(arrays[_META_KEY]))
    meta.update(updates)
    arrays[_META_KEY] = np.array(json.dumps(meta))


@pytest.mark.parametrize("change, message", [
    (lambda a: set_meta(a, version=99), r"has format version 99; this doconv reads versions 1, 2"),
    (lambda a: set_meta(a, format="other"), r"is not a doconv.params file"),
    (lambda a: a.pop("head/W"), r"layer 'head' is missing its W array"),
    (lambda a: a.pop("stem.conv/D"), r"layer 'stem.conv' is missing its D array"),
    (lambda a: a.update({"head/W": np.zeros((4, 8, 2))}),
     r"layer 'head': W must have shape \(4, 8, 1\) for this layer, got \(4, 8, 2\)"),
    (lambda a: a.update({"extra/W": np.zeros(3)}), r"holds arrays no layer describes: \['extra/W'\]"),
    (lambda a: a.pop(_META_KEY), r"has no doconv metadata"),
    (lambda a: a.update({_META_KEY: np.array("{not json")}), r"has corrupt metadata"),
    (lambda a: set_meta(a, layers={"head": {"in_channels": 16}}),
     r"layer 'head' has invalid settings"),
])
def test_load_rejects_bad_files(tmp_path, change, message):
    path = tmp_path / "model.npz"
    dc.save_params(path, LAYERS)
    rewrite(path, change)
    with pytest.raises(dc.CheckpointError, match=message):
        dc.load_params(path)


def test_load_never_unpickles(tmp_path):
    path = tmp_path / "evil.npz"
    dc.save_params(path, LAYERS)
    rewrite(path, lambda a: a.update({"head/W": np.array([object()], dtype=object)}))
    with pytest.raises(dc.CheckpointError, match="cannot be read safely"):
        dc.load_params(path)


def test_load_rejects_files_of_neither_container(tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(dc.CheckpointError, match=r"is not an .npz file \(a zip archive\); "
                                                 r"it starts with b'hello'"):
        dc.load_params(tmp_path / "text.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(dc.CheckpointError, match="single .npy array"):
        dc.load_params(tmp_path / "array.npy")
    with pytest.raises(dc.CheckpointError, match="is not a readable .npz file: "):
        dc.load_params(tmp_path / "missing.npz")
    with pytest.raises(dc.CheckpointError, match="is not a readable doconv parameter file: "):
        dc.load_params(tmp_path / "missing.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(dc.CheckpointError, match=r"is not a doconv parameter file \(safetensors "
                                                 r"or .npz\); it starts with b'hello'"):
        dc.load_params(tmp_path / "text.safetensors")
    # Told apart by content: a safetensors file named .npz loads, and the other way round.
    dc.save_params(tmp_path / "real.safetensors", LAYERS)
    os.rename(tmp_path / "real.safetensors", tmp_path / "named.npz")
    assert list(dc.load_params(tmp_path / "named.npz")) == list(LAYERS)
    dc.save_params(tmp_path / "real.npz", LAYERS)
    os.rename(tmp_path / "real.npz", tmp_path / "named.safetensors")
    assert list(dc.load_params(tmp_path / "named.safetensors")) == list(LAYERS)


def test_save_rejects_bad_names(tmp_path):
    with pytest.raises(ValueError, match="layer names must be non-empty strings without '/'"):
        dc.save_params(tmp_path / "x.npz", {"a/b": LAYERS["head"]})
    with pytest.raises(ValueError, match=r"layers\['a'\] must be DOConvParams, got dict"):
        dc.save_params(tmp_path / "x.npz", {"a": {}})


def test_match_layers():
    specs = {name: params.spec for name, params in LAYERS.items()}
    dc.match_layers(LAYERS, specs, "f.npz")  # no error
    with pytest.raises(dc.CheckpointError, match=re.escape(
            "f.npz does not match the model's DO-Conv layers: missing ['new'], "
            "unexpected ['head']")):
        dc.match_layers(LAYERS, {**{k: v for k, v in specs.items() if k != "head"},
                                 "new": specs["head"]}, "f.npz")
    with pytest.raises(dc.CheckpointError, match="f.npz: layer 'head' was saved with"):
        dc.match_layers(LAYERS, dict(specs, head=dc.ConvSpec(16, 4, 1)), "f.npz")


def rank_layers():
    """1-D, 2-D and 3-D layers, built per test so that a broken rank fails these tests, not
    the collection of the whole module."""
    return {
        "audio.causal": make_params(dc.ConvSpec(2, 4, 3, 1, "causal", 2, bias=False,
                                                padding_mode="reflect", D_mul=5, rank=1), 4),
        "audio.head": make_params(dc.ConvSpec(4, 6, 1, 2, groups=2, rank=1), 5, np.float64),
        "image": make_params(dc.ConvSpec(3, 6, (3, 1), 2, "same", groups=3, D_mul=4), 6),
        "volume.block": make_params(
            dc.ConvSpec(4, 4, (3, 1, 2), (1, 2, 1), (1, 0, 1), (2, 1, 1), 2,
                        padding_mode="circular", D_mul=8, rank=3), 7, np.float64),
        "volume.head": make_params(dc.ConvSpec(4, 2, 1, rank=3), 8),
    }


def test_multi_rank_file_round_trips(tmp_path):
    layers = rank_layers()
    path = tmp_path / "ranks.safetensors"
    dc.save_params(path, layers)
    _, meta = dc.read_safetensors_header(path)
    assert meta["format"] == "doconv.params"
    assert meta["format_version"] == str(dc.FORMAT_VERSION) == "3"
    assert {name: config["rank"] for name, config in json.loads(meta["layers"]).items()} == {
        "audio.causal": 1, "audio.head": 1, "image": 2, "volume.block": 3, "volume.head": 3}
    loaded = dc.load_params(path)
    assert list(loaded) == list(layers)
    for name, original in layers.items():
        copy = loaded[name]
        assert copy.spec == original.spec and copy.spec.rank == original.spec.rank
        for part in ("W", "D", "bias"):
            a, b = getattr(original, part), getattr(copy, part)
            if a is None:
                assert b is None
            else:
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)
        assert copy.kernel().shape == original.spec.kernel_shape
        np.testing.assert_array_equal(copy.kernel(), original.kernel())
    specs = {name: params.spec for name, params in layers.items()}
    dc.match_layers(loaded, specs, "ranks.safetensors")  # no error
    with pytest.raises(dc.CheckpointError, match="ranks.safetensors: layer 'volume.head' was "
                                                 "saved with"):
        dc.match_layers(loaded, dict(specs, **{"volume.head": dc.ConvSpec(4, 2, 1, rank=1)}),
                        "ranks.safetensors")
    # A path ending in .npz still gets the newest .npz version, 2, which earlier releases read.
    dc.save_params(tmp_path / "ranks.npz", layers)
    with np.load(tmp_path / "ranks.npz", allow_pickle=False) as archive:
        meta = json.loads(str(archive[_META_KEY]))
    assert meta["version"] == 2 and set(meta["layers"]) == set(layers)
    assert list(dc.load_params(tmp_path / "ranks.npz")) == list(layers)


def test_single_layer_of_each_rank_round_trips(tmp_path):
    for name, params in rank_layers().items():
        params.save(tmp_path / f"{name}.safetensors")
        assert dc.DOConvParams.load(tmp_path / f"{name}.safetensors").spec == params.spec


def write_version_1_file(path, layers):
    """A file as doconv wrote it before ranks existed: version 1, specs without "rank"."""
    meta = {"format": "doconv.params", "version": 1, "layers": {}}
    arrays = {}
    for name, params in layers.items():
        config = params.spec.to_dict()
        del config["rank"]
        meta["layers"][name] = config
        for part in ("W", "D", "bias"):
            if getattr(params, part) is not None:
                arrays[f"{name}/{part}"] = getattr(params, part)
    arrays[_META_KEY] = np.array(json.dumps(meta))
    np.savez(path, **arrays)


def test_version_1_file_loads_as_two_dimensional(tmp_path):
    path = tmp_path / "old.npz"
    write_version_1_file(path, LAYERS)
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive[_META_KEY]))
    assert meta["version"] == 1 and all("rank" not in c for c in meta["layers"].values())
    loaded = dc.load_params(path)
    assert list(loaded) == list(LAYERS)
    for name, original in LAYERS.items():
        assert loaded[name].spec.rank == 2 and loaded[name].spec == original.spec
        np.testing.assert_array_equal(loaded[name].W, original.W)
        np.testing.assert_array_equal(loaded[name].kernel(), original.kernel())
    # Saving it again writes the current version, with the rank.
    dc.save_params(tmp_path / "new.safetensors", loaded)
    _, meta = dc.read_safetensors_header(tmp_path / "new.safetensors")
    assert meta["format_version"] == "3"
    assert all(c["rank"] == 2 for c in json.loads(meta["layers"]).values())
    dc.save_params(tmp_path / "new.npz", loaded)
    with np.load(tmp_path / "new.npz", allow_pickle=False) as archive:
        meta = json.loads(str(archive[_META_KEY]))
    assert meta["version"] == 2 and all(c["rank"] == 2 for c in meta["layers"].values())


def test_layer_with_a_wrong_rank_is_refused(tmp_path):
    # A 3-D layer whose metadata says rank 1 no longer matches its arrays or its own tuples.
    path = tmp_path / "ranks.npz"
    dc.save_params(path, rank_layers())

    def relabel(arrays):
        meta = json.loads(str(arrays[_META_KEY]))
        meta["layers"]["volume.block"]["rank"] = 1
        arrays[_META_KEY] = np.array(json.dumps(meta))

    rewrite(path, relabel)
    with pytest.raises(dc.CheckpointError, match=r"layer 'volume.block' has invalid settings: "
                                                 r"kernel_size must be an integer >= 1 or a "
                                                 r"sequence of one of them, got 3 values"):
        dc.load_params(path)


def doconv_safetensors(path, change=None):
    """LAYERS saved as safetensors, its tensors ({name: array}) and metadata ({str: str},
    "layers" decoded) changed by ``change(arrays, metadata)`` and written back unchecked."""
    dc.save_params(path, LAYERS)
    if change is not None:
        arrays, metadata = dc.read_safetensors(path, mmap=False)
        metadata["layers"] = json.loads(metadata["layers"])
        change(arrays, metadata)
        if isinstance(metadata.get("layers"), dict):
            metadata["layers"] = json.dumps(metadata["layers"])
        dc.write_safetensors(path, arrays, metadata)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda a, m: m.update(format_version="99"),
     r"has format version '99'; this doconv reads versions 1, 2, 3$"),
    (lambda a, m: m.pop("format_version"), r"has format version None"),
    (lambda a, m: m.update(format="pt"),
     r"is a safetensors file but not a doconv.params file: its metadata has format 'pt'$"),
    (lambda a, m: m.clear(), r"is a safetensors file but not a doconv.params file: its "
                             r"metadata has no 'format' \(keys \[\]\)$"),
    (lambda a, m: m.pop("layers"), r"has no doconv metadata: its metadata has no 'layers'$"),
    (lambda a, m: m.update(layers="{not json"),
     r"has corrupt metadata 'layers' \(invalid JSON\): "),
    (lambda a, m: m.update(layers="[1, 2]"), r"has invalid metadata: 'layers' must map layer "
                                             r"names to settings, got list$"),
    (lambda a, m: a.pop("head.W"), r": layer 'head' is missing its W array$"),
    (lambda a, m: a.pop("stem.conv.D"), r": layer 'stem.conv' is missing its D array$"),
    (lambda a, m: a.update({"head.W": np.zeros((4, 8, 2), np.float32)}),
     r": layer 'head': W must have shape \(4, 8, 1\) for this layer, got \(4, 8, 2\)$"),
    (lambda a, m: a.update({"head.W": a["head.W"].astype(np.int64)}),
     r": layer 'head': W must hold floating-point numbers \(float16, float32 or float64\), got "
     r"dtype int64$"),
    (lambda a, m: a.update({"head.bias": a["head.bias"].astype(np.complex64)}),
     r": layer 'head': bias must hold floating-point numbers .* got dtype complex64$"),
    (lambda a, m: a.update({"extra.W": np.zeros(3, np.float32)}),
     r" holds arrays no layer describes: \['extra.W'\]$"),
    (lambda a, m: a.update({"head/W": a.pop("head.W")}), r"layer 'head' is missing its W array"),
    (lambda a, m: m["layers"].update(head={"in_channels": 16}),
     r": layer 'head' has invalid settings: "),
    (lambda a, m: m["layers"].update({"a/b": m["layers"]["head"]}),
     r"has invalid metadata: layer names must be non-empty strings without '/', got 'a/b'$"),
])
def test_load_rejects_bad_safetensors_files(tmp_path, change, message):
    path = doconv_safetensors(tmp_path / "model.safetensors", change)
    with pytest.raises(dc.CheckpointError, match=message) as error:
        dc.load_params(path)
    assert str(error.value).startswith(repr(str(path)))


def with_two_byte_bias(tmp_path, code):
    """A saved model whose head.bias is re-labelled as the 2-byte dtype ``code``."""
    path = doconv_safetensors(tmp_path / "model.safetensors")
    entries, metadata, data = safetensors_parts(path)
    begin, end = entries["head.bias"]["data_offsets"]
    entries["head.bias"] = {"dtype": code, "shape": [4], "data_offsets": [begin, begin + 8]}
    shift = end - begin - 8  # F32 to a 2-byte dtype: the later tensors move down
    for name, entry in entries.items():
        if name != "head.bias" and entry["data_offsets"][0] >= end:
            entry["data_offsets"] = [entry["data_offsets"][0] - shift,
                                     entry["data_offsets"][1] - shift]
    write_safetensors_parts(path, entries, metadata, data[:begin + 8] + data[end:])
    return path


def test_load_refuses_float8_before_reading(tmp_path):
    path = with_two_byte_bias(tmp_path, "F8_E4M3")
    entries, metadata, data = safetensors_parts(path)
    entries["head.bias"]["shape"] = [8]
    write_safetensors_parts(path, entries, metadata, data)
    with pytest.raises(dc.CheckpointError, match=re.escape(
            f"{str(path)!r}: tensor 'head.bias' must hold floating-point numbers (float16, "
            "float32 or float64), got dtype F8_E4M3")):
        dc.load_params(path)


def test_bfloat16_loads_with_ml_dtypes_and_names_it_without(tmp_path):
    path = with_two_byte_bias(tmp_path, "BF16")
    if importlib.util.find_spec("ml_dtypes") is None:
        with pytest.raises(dc.CheckpointError, match=re.escape(
                f"{str(path)!r}: tensor 'head.bias' has dtype BF16, which NumPy reads only "
                "with the ml_dtypes package; install ml_dtypes")):
            dc.load_params(path)
    else:
        bias = dc.load_params(path)["head"].bias
        assert bias.dtype.name == "bfloat16" and bias.shape == (4,)


def test_load_of_corrupt_and_foreign_safetensors_files(tmp_path):
    path = doconv_safetensors(tmp_path / "model.safetensors")
    raw = path.read_bytes()
    path.write_bytes(raw[:-5])
    with pytest.raises(dc.CheckpointError, match="is truncated or corrupt"):
        dc.load_params(path)
    path.write_bytes(raw[:100])
    with pytest.raises(dc.CheckpointError, match="goes beyond the file's 100 bytes"):
        dc.load_params(path)
    foreign = tmp_path / "foreign.safetensors"
    dc.write_safetensors(foreign, {"weight": np.ones((2, 2), np.float32)}, {"format": "pt"})
    with pytest.raises(dc.CheckpointError, match="not a doconv.params file: its metadata has "
                                                 "format 'pt'"):
        dc.load_params(foreign)


def test_layer_names_with_dots_and_part_names(tmp_path):
    # Tensor names are "{layer}.{part}"; layers are found by the metadata's names, so names
    # that look like parts of other layers are no problem.
    spec = dc.ConvSpec(2, 2, 3, bias=True)
    layers = {name: make_params(spec, seed) for seed, name in
              enumerate(["a", "a.W", "a.D", "a.bias", "features.0", "W"])}
    path = tmp_path / "dots.safetensors"
    dc.save_params(path, layers)
    assert "a.W.W" in dc.read_safetensors_header(path)[0]
    loaded = dc.load_params(path)
    assert list(loaded) == list(layers)
    for name, params in layers.items():
        np.testing.assert_array_equal(loaded[name].W, params.W)
        np.testing.assert_array_equal(loaded[name].D, params.D)


def test_loaded_arrays_are_writable_copies(tmp_path):
    path = doconv_safetensors(tmp_path / "model.safetensors")
    loaded = dc.load_params(path)
    assert loaded["head"].W.flags.writeable
    os.remove(path)  # nothing keeps the file open or mapped
    np.testing.assert_array_equal(loaded["head"].W, LAYERS["head"].W)


def test_save_is_atomic(tmp_path, monkeypatch):
    for name in ("p.safetensors", "p.npz"):
        path = tmp_path / name
        dc.save_params(path, LAYERS)
        before = path.read_bytes()

        def fail(*args):
            raise OSError("no space left")

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", fail)
            with pytest.raises(OSError, match="no space left"):
                dc.save_params(path, {"head": LAYERS["head"]})
        assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["p.npz", "p.safetensors"]


def test_save_rejects_layers_that_are_not_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="layers must be DOConvParams or a mapping of layer "
                                         "names to them, got list"):
        dc.save_params(tmp_path / "x.safetensors", [LAYERS["head"]])
    assert os.listdir(tmp_path) == []


# -- 16-bit floats: carried by the container, composed in float32 -------------------------
def half_layers(dtype):
    return {name: make_params(params.spec, index, np.float32) for index, (name, params)
            in enumerate(LAYERS.items())} | {
        "half": dc.DOConvParams(LAYERS["stem.conv"].spec,
                                *(None if a is None else a.astype(dtype) for a in (
                                    LAYERS["stem.conv"].W, LAYERS["stem.conv"].D,
                                    LAYERS["stem.conv"].bias)))}


def same_arrays(a, b):
    for part in ("W", "D", "bias"):
        x, y = getattr(a, part), getattr(b, part)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype
            assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("suffix", ["safetensors", "npz"])
def test_float16_round_trips_in_both_containers(tmp_path, suffix):
    layers = half_layers(np.float16)
    dc.save_params(tmp_path / f"m.{suffix}", layers)
    loaded = dc.load_params(tmp_path / f"m.{suffix}")
    for name in layers:
        same_arrays(layers[name], loaded[name])


def test_bfloat16_round_trips_in_safetensors_and_widens_exactly_in_npz(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")  # core env: the no-ml_dtypes case is above
    layers = half_layers(ml_dtypes.bfloat16)
    dc.save_params(tmp_path / "m.safetensors", layers)
    entries, _ = dc.read_safetensors_header(tmp_path / "m.safetensors")
    assert entries["half.W"]["dtype"] == "BF16"
    loaded = dc.load_params(tmp_path / "m.safetensors")
    for name in layers:
        same_arrays(layers[name], loaded[name])
    dc.save_params(tmp_path / "m.npz", layers)  # .npz has no bfloat16: float32, exactly
    widened = dc.load_params(tmp_path / "m.npz")
    for name in layers:
        for part in ("W", "D", "bias"):
            stored, original = getattr(widened[name], part), getattr(layers[name], part)
            if original is not None:
                assert stored.dtype == np.float32
                np.testing.assert_array_equal(stored, original.astype(np.float32))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_16_bit_kernels_compose_in_float32_and_keep_their_dtype(half):
    dtype = np.dtype(np.float16) if half == "float16" else np.dtype(
        pytest.importorskip("ml_dtypes").bfloat16)
    stem = LAYERS["stem.conv"]
    params = dc.DOConvParams(stem.spec, stem.W.astype(dtype), stem.D.astype(dtype), stem.bias)
    expected = dc.compose_kernel(params.D.astype(np.float32), params.W.astype(np.float32),
                                 groups=stem.spec.groups, kernel_size=stem.spec.kernel_size)
    kernel = params.kernel()
    assert kernel.dtype == dtype
    assert kernel.tobytes() == expected.astype(dtype).tobytes()


def test_checkpoint_array_takes_bfloat16_and_assignable_params_widens_it():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.array([1.5, -2.0], ml_dtypes.bfloat16)
    assert dc.checkpoint_array("W", values) is values
    with pytest.raises(dc.CheckpointError, match=r"W must hold floating-point numbers .* got "
                                                 r"dtype float8_e4m3fn"):
        dc.checkpoint_array("W", values.astype(ml_dtypes.float8_e4m3fn))
    head = LAYERS["head"]
    params = dc.DOConvParams(head.spec, head.W.astype(ml_dtypes.bfloat16), None, head.bias)
    assigned = dc.assignable_params(params, head.spec)
    assert assigned.W.dtype == np.float32
    np.testing.assert_array_equal(assigned.W, head.W.astype(ml_dtypes.bfloat16).astype(np.float32))
