from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from samples import datasets as D
from samples.datasets import DatasetError, read_idx, write_idx

RNG = np.random.default_rng(1234)


def make_set(directory: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> dict[str, np.ndarray]:
    # A tiny, valid MNIST-shaped IDX set.
    arrays = {
        "train_images": RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": RNG.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for role, arr in arrays.items():
        write_idx(directory / (D.IDX_FILES[role] + (".gz" if gz else "")), arr)
    return arrays


@pytest.fixture
def no_local_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Isolate from whatever datasets the developer's machine has, and from the network.
    monkeypatch.setattr(D, "default_search_dirs", lambda name: [])
    monkeypatch.setattr(D, "default_download_dir", lambda name: tmp_path / "dl" / name)
    monkeypatch.setattr(D, "MIRRORS", {k: ((tmp_path / "nowhere").as_uri() + "/",) for k in D.MIRRORS})


# ------------------------------------------------------------------------ IDX format


def test_read_idx_hand_built_bytes(tmp_path: Path) -> None:
    # Check against the format spec, independent of write_idx.
    payload = bytes(range(6))
    p = tmp_path / "x.idx"
    p.write_bytes(b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + payload)
    a = read_idx(p)
    assert a.dtype == np.uint8 and a.shape == (2, 3)
    assert a.tolist() == [[0, 1, 2], [3, 4, 5]]
    p.write_bytes(b"\x00\x00\x0b\x01" + struct.pack(">I", 2) + struct.pack(">hh", -2, 300))
    assert read_idx(p).tolist() == [-2, 300]


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(2 * 28 * 28, dtype=np.uint16).reshape(2, 28, 28).astype(np.uint8),
        np.array([-5, 0, 7], dtype=np.int8),
        np.array([[1, -70000], [3, 2**31 - 1]], dtype=np.int32),
        np.array([0.5, -1.25, 3e30], dtype=np.float32),
        np.array([[np.pi], [-1e300]], dtype=np.float64),
        np.array([-32768, 32767], dtype=np.int16),
    ],
)
def test_write_read_round_trip(tmp_path: Path, arr: np.ndarray, suffix: str) -> None:
    p = write_idx(tmp_path / f"a{suffix}", arr)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(p)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    back[0] = back[0]  # writable, not a view on a read-only buffer


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    arr = np.arange(10, dtype=np.uint8)
    gz = write_idx(tmp_path / "a.gz", arr)
    renamed = gz.rename(tmp_path / "no-suffix")
    np.testing.assert_array_equal(read_idx(renamed), arr)


def test_write_idx_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="array: expected dtype"):
        write_idx(tmp_path / "a", np.zeros(3, dtype=np.uint32))


def test_write_idx_gzip_is_reproducible(tmp_path: Path) -> None:
    arr = np.arange(100, dtype=np.uint8)
    a = write_idx(tmp_path / "a.gz", arr).read_bytes()
    b = write_idx(tmp_path / "b.gz", arr).read_bytes()
    assert a == b


def _valid_bytes() -> bytes:
    return b"\x00\x00\x08\x02" + struct.pack(">II", 3, 4) + bytes(12)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "truncated IDX file: expected 4 bytes of magic number, got 0"),
        (b"\x08\x03\x00\x00" + bytes(20), "bad IDX magic number 0x08030000"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX dtype code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "expected 12 bytes of dimension sizes, got 4"),
        (_valid_bytes()[:-1], r"truncated IDX data: header \(3, 4\) needs 12 bytes, file has 11"),
        (_valid_bytes() + b"\x00", "unexpected data after the 12 bytes"),
        (b"\x00\x00\x0e\x03" + struct.pack(">III", 2**20, 2**20, 2**20), "too large"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_corrupt_idx_raises_clear_error(tmp_path: Path, content: bytes, message: str, compress: bool) -> None:
    p = tmp_path / ("bad.gz" if compress else "bad")
    p.write_bytes(gzip.compress(content) if compress else content)
    with pytest.raises(DatasetError, match=message) as info:
        read_idx(p)
    assert str(p) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_gzip_raises_clear_error(tmp_path: Path) -> None:
    arr = RNG.integers(0, 256, (50, 40), dtype=np.uint8)
    good = gzip.compress(b"\x00\x00\x08\x02" + struct.pack(">II", 50, 40) + arr.tobytes())
    cases = {
        "garbage.gz": b"\x1f\x8b" + b"not really gzip data at all",
        "cut.gz": good[: len(good) // 2],
        "crc.gz": good[:-8] + bytes(8),  # right data, wrong CRC/size trailer
    }
    for fname, blob in cases.items():
        p = tmp_path / fname
        p.write_bytes(blob)
        with pytest.raises(DatasetError, match="corrupt or truncated gzip data") as info:
            read_idx(p)
        assert str(p) in str(info.value), fname


def test_missing_file_is_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nope: cannot read .FileNotFoundError: No such file"):
        read_idx(tmp_path / "nope")


# ------------------------------------------------------------------- dataset checks


@pytest.mark.parametrize("gz", [True, False])
def test_load_dir_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = make_set(tmp_path, gz=gz)
    ds = D.load_dir(tmp_path, "mnist")
    np.testing.assert_array_equal(ds.x_train, arrays["train_images"])
    np.testing.assert_array_equal(ds.x_test, arrays["test_images"])
    assert ds.y_train.dtype == np.int64 and ds.y_train.tolist() == [0, 1, 2, 3, 4, 5]
    assert ds.y_test.tolist() == [3, 2, 1, 0]
    assert ds.source == str(tmp_path) and not ds.is_subset


def test_load_dir_accepts_kaggle_names(tmp_path: Path) -> None:
    arrays = make_set(tmp_path, gz=False)
    for f in tmp_path.iterdir():
        f.rename(tmp_path / f.name.replace("-idx", ".idx"))
    np.testing.assert_array_equal(D.load_dir(tmp_path).x_train, arrays["train_images"])


def test_count_mismatch(tmp_path: Path) -> None:
    make_set(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DatasetError, match="has 6 images but .*train-labels-idx1-ubyte.gz has 5 labels"):
        D.load_dir(tmp_path)


@pytest.mark.parametrize(
    "fname, arr, message",
    [
        ("train-images-idx3-ubyte.gz", np.zeros((6, 28, 28), np.int32), "expected uint8 images .* got int32"),
        ("t10k-images-idx3-ubyte.gz", np.zeros((4, 27, 28), np.uint8), r"got uint8 \(4, 27, 28\)"),
        ("t10k-labels-idx1-ubyte.gz", np.zeros((4, 1), np.uint8), "expected uint8 labels"),
        ("train-labels-idx1-ubyte.gz", np.full(6, 10, np.uint8), "expected labels 0..9, found 10"),
    ],
)
def test_wrong_content(tmp_path: Path, fname: str, arr: np.ndarray, message: str) -> None:
    make_set(tmp_path)
    write_idx(tmp_path / fname, arr)
    with pytest.raises(DatasetError, match=message) as info:
        D.load_dir(tmp_path)
    assert fname in str(info.value)


def test_keras_npz(tmp_path: Path) -> None:
    x = RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=np.array([1, 2, 3], np.uint8),
             x_test=x[:1], y_test=np.array([9], np.uint8))
    ds = D.load_dir(tmp_path, "mnist")
    np.testing.assert_array_equal(ds.x_train, x)
    assert ds.y_train.tolist() == [1, 2, 3] and ds.y_test.tolist() == [9]
    (tmp_path / "mnist.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(DatasetError, match="mnist.npz: cannot read"):
        D.load_dir(tmp_path, "mnist")


# -------------------------------------------------------------------- search order


def test_bad_name() -> None:
    with pytest.raises(ValueError, match=r"name: expected one of 'mnist', 'fashion-mnist', got 'cifar10'"):
        D.load_dataset("cifar10")


def test_data_dir_empty_is_an_error_not_a_fallback(tmp_path: Path, no_local_data: None) -> None:
    with pytest.raises(DatasetError, match="data_dir: expected the mnist IDX files") as info:
        D.load_dataset("mnist", tmp_path)
    msg = str(info.value)
    assert "train-images-idx3-ubyte[.gz]" in msg and "t10k-labels-idx1-ubyte[.gz]" in msg
    with pytest.raises(DatasetError, match="absent does not exist"):
        D.load_dataset("mnist", tmp_path / "absent")


def test_data_dir_partial_names_missing_files(tmp_path: Path, no_local_data: None) -> None:
    make_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]\."):
        D.load_dataset("mnist", tmp_path)


def test_data_dir_direct_and_torchvision_layout(tmp_path: Path, no_local_data: None) -> None:
    a = make_set(tmp_path / "flat")
    ds = D.load_dataset("mnist", tmp_path / "flat", verbose=False)
    assert np.array_equal(ds.x_train, a["train_images"])
    b = make_set(tmp_path / "tv" / "FashionMNIST" / "raw", gz=False)
    ds = D.load_dataset("fashion-mnist", tmp_path / "tv", verbose=False)
    assert np.array_equal(ds.x_test, b["test_images"]) and ds.name == "fashion-mnist"


def test_search_dirs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_local_data: None) -> None:
    first, second, third = tmp_path / "1", tmp_path / "2", tmp_path / "3"
    first.mkdir()
    make_set(second / "x", n_train=2)  # wrong level: files are one dir deeper, must be skipped
    make_set(third, n_train=3)
    monkeypatch.setattr(D, "default_search_dirs", lambda name: [first, second, third])
    ds = D.load_dataset("mnist", download=False, verbose=False)
    assert ds.source == str(third) and len(ds.x_train) == 3
    make_set(second, n_train=5)
    assert len(D.load_dataset("mnist", download=False, verbose=False).x_train) == 5


def test_default_search_dirs_include_debian_path() -> None:
    dirs = D.default_search_dirs("fashion-mnist")
    assert dirs[0] == Path.home() / ".doconv" / "data" / "fashion-mnist"
    assert dirs[-1] == Path("/usr/share/datasets/fashion-mnist")
    assert Path.home() / ".keras" / "datasets" in D.default_search_dirs("mnist")


def test_fallback_to_committed_subset(capsys: pytest.CaptureFixture[str], no_local_data: None) -> None:
    ds = D.load_dataset("mnist", verbose=False)  # download tried (dead file:// mirror), then fallback
    assert "NOTICE" in capsys.readouterr().err
    assert ds.is_subset and ds.source == str(D.SUBSET_DIR)
    assert ds.x_train.shape == (4000, 28, 28) and ds.x_test.shape == (1000, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert np.bincount(ds.y_train).tolist() == [400] * 10
    assert np.bincount(ds.y_test).tolist() == [100] * 10
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    # Real digits: roughly 19% of MNIST pixels are non-zero.
    assert 0.1 < np.count_nonzero(ds.x_train) / ds.x_train.size < 0.3
    # Train and test do not share images.
    train_keys = {x.tobytes() for x in ds.x_train}
    assert not any(x.tobytes() in train_keys for x in ds.x_test)


def test_fashion_mnist_has_no_fallback(no_local_data: None) -> None:
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist.*--data-dir"):
        D.load_dataset("fashion-mnist", download=False, verbose=False)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_debian_fashion_mnist() -> None:
    ds = D.load_dir("/usr/share/datasets/fashion-mnist", "fashion-mnist")
    assert ds.x_train.shape == (60000, 28, 28) and ds.x_test.shape == (10000, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10


# ------------------------------------------------------------------------ download


def _md5(b: bytes) -> str:
    return hashlib.md5(b, usedforsecurity=False).hexdigest()


def test_download_file_checksum_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blob = RNG.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    src = tmp_path / "src.bin"
    src.write_bytes(blob)
    out = D.download_file(src.as_uri(), tmp_path / "out" / "f.gz", md5=_md5(blob))
    assert out.read_bytes() == blob
    assert "100%" in capsys.readouterr().err  # progress bar reached the end
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.gz"]


def test_download_file_checksum_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"tampered")
    dest_dir = tmp_path / "out"
    dest_dir.mkdir()
    (dest_dir / "keep.gz").write_bytes(b"old")
    with pytest.raises(DatasetError, match="MD5 mismatch: expected 0{32}, got " + _md5(b"tampered")):
        D.download_file(src.as_uri(), dest_dir / "new.gz", md5="0" * 32, verbose=False)
    with pytest.raises(DatasetError, match="MD5 mismatch"):
        D.download_file(src.as_uri(), dest_dir / "keep.gz", md5="0" * 32, verbose=False)
    # No half-written or temp file; an existing file is left untouched.
    assert sorted(p.name for p in dest_dir.iterdir()) == ["keep.gz"]
    assert (dest_dir / "keep.gz").read_bytes() == b"old"


def test_download_file_interrupted_leaves_nothing(tmp_path: Path) -> None:
    class Broken:
        headers = {"Content-Length": "100"}
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def read(self, n: int) -> bytes:
            if getattr(self, "sent", False):
                raise TimeoutError("read timed out")
            self.sent = True
            return b"x" * 10

    with pytest.raises(TimeoutError):
        D.download_file("http://example.invalid/f", tmp_path / "f", md5="0" * 32,
                        opener=lambda url, timeout: Broken(), verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_download_dataset_mirror_fallthrough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             no_local_data: None) -> None:
    mirror = tmp_path / "mirror"
    arrays = make_set(mirror)
    sums = {p.name: _md5(p.read_bytes()) for p in mirror.iterdir()}
    dead = (tmp_path / "dead").as_uri() + "/"
    got = D.download_dataset("mnist", tmp_path / "dl", mirrors=[dead, mirror.as_uri()],
                             checksums=sums, verbose=False)
    assert got == tmp_path / "dl"
    np.testing.assert_array_equal(D.load_dir(got).x_train, arrays["train_images"])
    # End to end through load_dataset with the mirror and checksums patched in.
    monkeypatch.setattr(D, "MIRRORS", {"mnist": (dead, mirror.as_uri())})
    monkeypatch.setattr(D, "MD5", {"mnist": sums})
    ds = D.load_dataset("mnist", verbose=False)
    assert ds.source == str(tmp_path / "dl" / "mnist") and not ds.is_subset
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])


def test_download_dataset_fails_fast(tmp_path: Path) -> None:
    calls = []

    def opener(url: str, timeout: float):
        calls.append((url, timeout))
        raise TimeoutError("timed out")

    got = D.download_dataset("mnist", tmp_path / "dl", opener=opener, verbose=False)
    assert got is None and not (tmp_path / "dl").exists()
    # One try per mirror in total, not per file, with the short timeout.
    assert [u for u, _ in calls] == [m + "train-images-idx3-ubyte.gz" for m in D.MIRRORS["mnist"]]
    assert all(t == D.DOWNLOAD_TIMEOUT_S <= 10 for _, t in calls)


# ------------------------------------------------------------------------- helpers


def test_to_float32_layouts() -> None:
    x = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    f = D.to_float32(x)
    assert f.dtype == np.float32
    np.testing.assert_array_equal(f, np.array([[[0, 1], [0.2, 0.4]]], dtype=np.float32))
    assert D.to_float32(x, "NCHW").shape == (1, 1, 2, 2)
    assert D.to_float32(x, "NHWC").shape == (1, 2, 2, 1)
    with pytest.raises(ValueError, match="layout: expected one of .* got 'CHW'"):
        D.to_float32(x, "CHW")


def test_iterate_minibatches() -> None:
    x, y = np.arange(10) * 10, np.arange(10)
    batches = list(D.iterate_minibatches(x, y, 4))
    assert [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(list(D.iterate_minibatches(x, y, 4, drop_last=True))) == 2
    shuffled = list(D.iterate_minibatches(x, y, 3, shuffle=True, seed=0))
    ys = np.concatenate([b[1] for b in shuffled])
    assert sorted(ys.tolist()) == list(range(10)) and ys.tolist() != list(range(10))
    assert all(np.array_equal(bx, by * 10) for bx, by in shuffled)  # pairs stay aligned
    with pytest.raises(ValueError, match="batch_size: expected a positive integer, got 0"):
        next(D.iterate_minibatches(x, y, 0))
    with pytest.raises(ValueError, match="x, y: expected the same length"):
        next(D.iterate_minibatches(x, y[:3], 2))
