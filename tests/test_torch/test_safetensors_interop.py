"""doconv_core.tensorfile against the reference implementation (the ``safetensors`` package):
files either writes, the other reads, with the same tensors and metadata."""

import json

import numpy as np
import pytest
import torch

import doconv_core as dc
import doconv_torch
from doconv_core.params import CheckpointError

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file as numpy_load_file  # noqa: E402
from safetensors.numpy import save_file as numpy_save_file  # noqa: E402
from safetensors.torch import load_file as torch_load_file  # noqa: E402
from safetensors.torch import save_file as torch_save_file  # noqa: E402

SHAPES = [(), (3,), (2, 3), (2, 1, 3), (2, 3, 1, 2), (0, 3)]


def arrays_of(dtype):
    rng = np.random.default_rng(0)
    return {f"t{index}.{len(shape)}d": rng.standard_normal(shape).astype(dtype)
            for index, shape in enumerate(SHAPES)}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_reference_reads_what_doconv_writes(tmp_path, dtype):
    arrays = arrays_of(dtype)
    arrays.update(ints=np.arange(5, dtype=np.int64), flags=np.array([True, False]))
    metadata = {"format": "doconv.params", "note": "é", "layers": json.dumps({"a": 1})}
    path = tmp_path / "ours.safetensors"
    dc.write_safetensors(path, arrays, metadata)
    for loaded in (numpy_load_file(str(path)), torch_load_file(str(path))):
        assert sorted(loaded) == sorted(arrays)
        for name, array in arrays.items():
            value = loaded[name]
            value = value.numpy() if isinstance(value, torch.Tensor) else value
            assert value.dtype == array.dtype and value.shape == array.shape
            np.testing.assert_array_equal(value, array)
    with safe_open(str(path), framework="np") as handle:
        assert handle.metadata() == metadata
        assert sorted(handle.keys()) == sorted(arrays)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_doconv_reads_what_the_reference_writes(tmp_path, dtype):
    arrays = arrays_of(dtype)
    path = tmp_path / "reference.safetensors"
    numpy_save_file(arrays, str(path), metadata={"k": "v", "format": "np"})
    for mmap in (True, False):
        loaded, metadata = dc.read_safetensors(path, mmap=mmap)
        assert metadata == {"k": "v", "format": "np"}
        for name, array in arrays.items():
            assert loaded[name].dtype == array.dtype
            np.testing.assert_array_equal(loaded[name], array)


def test_files_match_the_reference_byte_for_byte(tmp_path):
    # Same layout as the reference writer (tensor order, padding, JSON spelling); metadata
    # with one key, since the reference orders several keys by a hash map.
    arrays = {"b": np.ones((2, 3), np.float32), "a": np.arange(3.0), "c": np.zeros(1, np.float16),
              "d": np.arange(4, dtype=np.int32)}
    for metadata in (None, {"format": "pt"}):
        dc.write_safetensors(tmp_path / "ours.safetensors", arrays, metadata)
        numpy_save_file(arrays, str(tmp_path / "theirs.safetensors"), metadata=metadata)
        assert ((tmp_path / "ours.safetensors").read_bytes()
                == (tmp_path / "theirs.safetensors").read_bytes())


def test_bfloat16_from_torch(tmp_path):
    path = tmp_path / "bf16.safetensors"
    torch_save_file({"x": torch.arange(4, dtype=torch.bfloat16)}, str(path))
    assert dc.read_safetensors_header(path)[0]["x"]["dtype"] == "BF16"
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        with pytest.raises(CheckpointError, match="ml_dtypes"):
            dc.read_safetensors(path)
    else:
        np.testing.assert_array_equal(dc.read_safetensors(path)[0]["x"].astype(np.float32),
                                      [0, 1, 2, 3])


def test_exported_model_loads_with_the_reference_alone(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(doconv_torch.DOConv2d(3, 4, 3, padding=1),
                                torch.nn.ReLU(),
                                doconv_torch.DOConv2d(4, 2, 3, groups=2, bias=False))
    path = tmp_path / "model.safetensors"
    doconv_torch.export_params(model, path)
    tensors = torch_load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "doconv.params" and metadata["format_version"] == "3"
    layers = json.loads(metadata["layers"])
    assert list(layers) == ["0", "2"] and layers["2"]["groups"] == 2
    assert sorted(tensors) == ["0.D", "0.W", "0.bias", "2.D", "2.W"]
    np.testing.assert_array_equal(tensors["0.W"].numpy(), model[0].to_params().W)
    # And a file the reference writes from those tensors imports back into a fresh model.
    again = tmp_path / "again.safetensors"
    torch_save_file({name: value.clone() for name, value in tensors.items()}, str(again),
                    metadata=metadata)
    fresh = torch.nn.Sequential(doconv_torch.DOConv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                doconv_torch.DOConv2d(4, 2, 3, groups=2, bias=False))
    assert doconv_torch.import_params(fresh, again) == ["0", "2"]
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_reference_refuses_what_doconv_refuses(tmp_path):
    path = tmp_path / "x.safetensors"
    dc.write_safetensors(path, {"x": np.ones(4, np.float32)})
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(safetensors.SafetensorError):
        numpy_load_file(str(path))
    with pytest.raises(CheckpointError, match="truncated"):
        dc.read_safetensors(path)
