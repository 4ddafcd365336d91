"""Framework-neutral MNIST / Fashion-MNIST loading for the DO-Conv samples (NumPy only)."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import os
import struct
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "DatasetError",
    "add_dataset_arguments",
    "default_download_dir",
    "default_search_dirs",
    "download_dataset",
    "download_file",
    "iterate_minibatches",
    "load_dataset",
    "load_dir",
    "read_idx",
    "to_float32",
    "write_idx",
]

DATASET_NAMES = ("mnist", "fashion-mnist")

# Role -> standard IDX base name (the files may also end in ".gz").
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Published MD5s of the original .gz files (the same ones torchvision checks).
MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# Debian's `dataset-fashion-mnist` installs the four .gz files here. Its .gz files are
# recompressed (different MD5 from the published ones), so local files are validated by
# parsing, not by checksum. Debian has no MNIST package.
DEBIAN_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}

SUBSET_DIR = Path(__file__).resolve().parent / "data" / "mnist-subset"

DOWNLOAD_TIMEOUT_S = 5.0  # fail fast on machines without network
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_MAX_IDX_BYTES = 1 << 31  # refuse absurd sizes from a corrupt header before allocating

# IDX type code -> big-endian NumPy dtype.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}


class DatasetError(ValueError):
    """A dataset file is missing, corrupt or of the wrong shape."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # uint8 (N, 28, 28)
    y_train: np.ndarray  # int64 (N,), values 0..9
    x_test: np.ndarray
    y_test: np.ndarray
    source: str  # where it came from, for logs
    is_subset: bool = False  # True for the committed 5k fallback


# ---------------------------------------------------------------------------- IDX I/O


def _open_maybe_gzip(path: Path) -> io.BufferedIOBase:
    # Decide by content, not suffix: some tools leave raw files named .gz or vice versa.
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_exact(f: io.BufferedIOBase, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DatasetError(
            f"{path}: truncated IDX file: expected {n} bytes of {what}, got {len(data)}"
        )
    return data


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    path = Path(path)
    try:
        with _open_maybe_gzip(path) as f:
            magic = _read_exact(f, 4, path, "magic number")
            if magic[0] != 0 or magic[1] != 0:
                raise DatasetError(
                    f"{path}: bad IDX magic number 0x{magic.hex()}: expected first two bytes 0x0000"
                )
            code, ndim = magic[2], magic[3]
            if code not in _IDX_DTYPES:
                known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
                raise DatasetError(
                    f"{path}: unknown IDX dtype code 0x{code:02X}: expected one of {known}"
                )
            if ndim == 0:
                raise DatasetError(f"{path}: IDX header has 0 dimensions: expected at least 1")
            dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path, "dimension sizes"))
            dtype = _IDX_DTYPES[code]
            nbytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            if nbytes > _MAX_IDX_BYTES:
                raise DatasetError(
                    f"{path}: IDX header claims {dims} ({nbytes} bytes): too large, file is corrupt"
                )
            payload = f.read(nbytes + 1)  # +1 detects trailing garbage; reaching EOF checks gzip CRC
    except DatasetError:
        raise
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: corrupt or truncated gzip data ({type(e).__name__}: {e})") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e.strerror or e})") from e
    if len(payload) < nbytes:
        raise DatasetError(
            f"{path}: truncated IDX data: header {dims} needs {nbytes} bytes, file has {len(payload)}"
        )
    if len(payload) > nbytes:
        raise DatasetError(f"{path}: unexpected data after the {nbytes} bytes declared by header {dims}")
    arr = np.frombuffer(bytearray(payload), dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    # gzip when the name ends in .gz; mtime=0 keeps the output byte-for-byte reproducible.
    path = Path(path)
    arr = np.asarray(array)
    native = arr.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        supported = sorted(str(d) for d in _IDX_CODES)
        raise ValueError(f"array: expected dtype one of {supported}, got {arr.dtype}")
    if not 1 <= arr.ndim <= 255 or any(s >= 2**32 for s in arr.shape):
        raise ValueError(f"array: expected 1..255 dims each < 2**32, got shape {arr.shape}")
    header = bytes([0, 0, _IDX_CODES[native], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = arr.astype(native.newbyteorder(">"), copy=False).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(header + body)
    else:
        path.write_bytes(header + body)
    return path


# ---------------------------------------------------------------------- validation


def _check_name(name: str) -> str:
    if name not in DATASET_NAMES:
        raise ValueError(f"name: expected one of {', '.join(map(repr, DATASET_NAMES))}, got {name!r}")
    return name


def _check_split(images: np.ndarray, labels: np.ndarray, img_src: str, lbl_src: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(
            f"{img_src}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(
            f"{lbl_src}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DatasetError(f"{img_src} has {len(images)} images but {lbl_src} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{lbl_src}: expected labels 0..9, found {int(labels.max())}")
    return labels.astype(np.int64)  # int64: what torch's cross-entropy wants


def _find_idx_file(directory: Path, base: str) -> Path | None:
    # Accept raw or .gz, and Kaggle's "train-images.idx3-ubyte" spelling.
    for stem in (base, base.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            p = directory / (stem + suffix)
            if p.is_file():
                return p
    return None


def _missing_in_dir(directory: Path, name: str) -> list[str]:
    if name == "mnist" and (directory / "mnist.npz").is_file():
        return []
    return [base + "[.gz]" for base in IDX_FILES.values() if _find_idx_file(directory, base) is None]


def load_dir(directory: str | os.PathLike[str], name: str = "mnist") -> Dataset:
    # Load the four IDX files (or Keras' mnist.npz) from one directory.
    _check_name(name)
    d = Path(directory)
    found = {role: _find_idx_file(d, base) for role, base in IDX_FILES.items()}
    paths = {role: p for role, p in found.items() if p is not None}
    if len(paths) < len(IDX_FILES):
        if name == "mnist" and (d / "mnist.npz").is_file():
            return _load_npz(d / "mnist.npz", name)
        missing = ", ".join(_missing_in_dir(d, name))
        raise DatasetError(f"{d}: no complete {name} IDX set: missing {missing}")
    a = {role: read_idx(p) for role, p in paths.items()}
    src = {role: str(p) for role, p in paths.items()}
    y_train = _check_split(a["train_images"], a["train_labels"], src["train_images"], src["train_labels"])
    y_test = _check_split(a["test_images"], a["test_labels"], src["test_images"], src["test_labels"])
    return Dataset(name, a["train_images"], y_train, a["test_images"], y_test, source=str(d))


def _load_npz(path: Path, name: str) -> Dataset:
    # Keras' mnist.npz holds plain arrays; allow_pickle=False keeps object arrays out.
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DatasetError(f"{path}: expected an .npz archive, got a single array")
        with z:
            arrays = {k: np.asarray(z[k]) for k in keys}
    except KeyError as e:
        raise DatasetError(f"{path}: expected arrays {keys}, missing {e}") from e
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    s = str(path)
    return Dataset(
        name=name,
        x_train=arrays["x_train"],
        y_train=_check_split(arrays["x_train"], arrays["y_train"], s + ":x_train", s + ":y_train"),
        x_test=arrays["x_test"],
        y_test=_check_split(arrays["x_test"], arrays["y_test"], s + ":x_test", s + ":y_test"),
        source=s,
    )


# ------------------------------------------------------------------------- download


def _progress(label: str, done: int, total: int | None) -> None:
    mb = done / 1e6
    if total:
        frac = min(done / total, 1.0)
        bar = "#" * int(frac * 30)
        line = f"\r  {label} [{bar:<30}] {frac:4.0%} {mb:.1f}/{total / 1e6:.1f} MB"
    else:
        line = f"\r  {label} {mb:.1f} MB"
    sys.stderr.write(line)
    sys.stderr.flush()


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    md5: str,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    opener: Callable[..., Any] = urllib.request.urlopen,
    verbose: bool = True,
) -> Path:
    # Stream to a temp file beside dest, check MD5, then rename: dest is never half-written.
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        done = 0
        with os.fdopen(fd, "wb") as out, opener(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
            total = int(length) if length and str(length).isdigit() else None
            while chunk := resp.read(1 << 16):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if verbose:
                    _progress(dest.name, done, total)
        if verbose:
            sys.stderr.write("\n")
        if digest.hexdigest() != md5.lower():
            raise DatasetError(f"{url}: MD5 mismatch: expected {md5}, got {digest.hexdigest()}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_dataset(
    name: str,
    dest_dir: str | os.PathLike[str],
    *,
    mirrors: Sequence[str] | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    opener: Callable[..., Any] = urllib.request.urlopen,
    verbose: bool = True,
) -> Path | None:
    # Returns dest_dir when all files are there and verified, None when no mirror worked.
    _check_name(name)
    dest = Path(dest_dir)
    mirrors = list(MIRRORS[name] if mirrors is None else mirrors)
    checksums = MD5[name] if checksums is None else checksums
    for fname, md5 in checksums.items():
        target = dest / fname
        if target.is_file() and _md5_of(target) == md5:
            continue
        errors = []
        for base in list(mirrors):
            url = base.rstrip("/") + "/" + fname
            if verbose:
                print(f"Downloading {url}", file=sys.stderr)
            try:
                download_file(url, target, md5=md5, timeout=timeout, opener=opener, verbose=verbose)
                break
            except (OSError, DatasetError, ValueError) as e:  # URLError/timeouts are OSErrors
                errors.append(f"{url}: {e}")
                mirrors.remove(base)  # a dead mirror stays dead for the other files: fail fast
        else:
            if verbose:
                print(f"Download of {name} failed:\n  " + "\n  ".join(errors), file=sys.stderr)
            try:
                dest.rmdir()  # don't leave an empty directory behind after a failed first try
            except OSError:
                pass
            return None
    return dest


# --------------------------------------------------------------------------- search


def default_download_dir(name: str) -> Path:
    return Path.home() / ".doconv" / "data" / _check_name(name)


def default_search_dirs(name: str) -> list[Path]:
    # Usual places other tools leave these files, checked in this order.
    _check_name(name)
    home = Path.home()
    tv = _TORCHVISION_DIR[name]
    dirs = [
        default_download_dir(name),
        # Keras keeps mnist.npz in datasets/ but Fashion-MNIST as IDX .gz in datasets/fashion-mnist/.
        home / ".keras" / "datasets" / ("fashion-mnist" if name == "fashion-mnist" else "."),
        home / ".mxnet" / "datasets" / name,  # Gluon
        Path.cwd() / "data" / tv / "raw",  # torchvision with root="data"
        home / "data" / tv / "raw",
    ]
    if name in DEBIAN_DIRS:
        dirs.append(DEBIAN_DIRS[name])
    return dirs


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    verbose: bool = True,
) -> Dataset:
    _check_name(name)

    def info(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr)

    def done(ds: Dataset) -> Dataset:
        info(f"{name}: {len(ds.x_train)} train / {len(ds.x_test)} test images from {ds.source}")
        return ds

    if data_dir is not None:
        # An explicit directory is a promise: never fall back silently.
        root = Path(data_dir).expanduser()
        candidates = [root, root / _TORCHVISION_DIR[name] / "raw", root / name]
        for d in candidates:
            if d.is_dir() and not _missing_in_dir(d, name):
                return done(load_dir(d, name))
        wanted = ", ".join(b + "[.gz]" for b in IDX_FILES.values())
        problem = (
            f"missing {', '.join(_missing_in_dir(root, name))}" if root.is_dir() else f"{root} does not exist"
        )
        raise DatasetError(
            f"data_dir: expected the {name} IDX files ({wanted}) in one of "
            f"{', '.join(map(str, candidates))}; {problem}. "
            "Omit --data-dir to search the usual places and download."
        )

    for d in default_search_dirs(name):
        if d.is_dir() and not _missing_in_dir(d, name):
            return done(load_dir(d, name))

    if download:
        got = download_dataset(name, default_download_dir(name), verbose=verbose)
        if got is not None:
            return done(load_dir(got, name))

    if name == "mnist":
        ds = load_dir(SUBSET_DIR, name)
        print(
            f"NOTICE: full MNIST not found or downloadable; using the committed {len(ds.x_train)}/"
            f"{len(ds.x_test)} subset in {SUBSET_DIR} (see samples/data/README.md). "
            "Accuracies are not comparable to full-MNIST results.",
            file=sys.stderr,
        )
        return done(dataclasses.replace(ds, is_subset=True))

    raise DatasetError(
        f"{name}: not found in {', '.join(map(str, default_search_dirs(name)))}"
        f"{' and the download failed' if download else ' (download disabled)'}. "
        "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) "
        "or pass --data-dir pointing at the four IDX files."
    )


# -------------------------------------------------------------------------- helpers


def to_float32(images: np.ndarray, layout: str = "NHW") -> np.ndarray:
    # uint8 (N, 28, 28) -> float32 in [0, 1]; NCHW for PyTorch/Gluon, NHWC for Keras.
    layouts = ("NHW", "NCHW", "NHWC")
    if layout not in layouts:
        raise ValueError(f"layout: expected one of {layouts}, got {layout!r}")
    x = np.asarray(images, dtype=np.float32) / np.float32(255.0)
    if layout == "NCHW":
        return x[:, None, :, :]
    if layout == "NHWC":
        return x[..., None]
    return x


def iterate_minibatches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x, y: expected the same length, got {len(x)} and {len(y)}")
    order = np.random.default_rng(seed).permutation(len(x)) if shuffle else np.arange(len(x))
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def add_dataset_arguments(parser: argparse.ArgumentParser, default: str = "mnist") -> None:
    # The CLI flags shared by the sample scripts.
    parser.add_argument("--dataset", choices=DATASET_NAMES, default=default)
    parser.add_argument("--data-dir", default=None, help="directory holding the four IDX files (no fallback)")
    parser.add_argument(
        "--no-download", dest="download", action="store_false", help="never touch the network"
    )


if __name__ == "__main__":  # python -m samples.datasets --dataset mnist: fetch/check the data
    p = argparse.ArgumentParser(description="Locate, download and check a sample dataset.")
    add_dataset_arguments(p)
    a = p.parse_args()
    try:
        load_dataset(a.dataset, a.data_dir, download=a.download)
    except DatasetError as e:
        sys.exit(f"error: {e}")
