"""Train a classifier with or without DO-Conv on Keras 3, on one device or data-parallel.

    KERAS_BACKEND=tensorflow python samples/train_tf.py --model resnet20 --data fashion-mnist \\
        --epochs 3 --doconv --output runs/r20-doconv-tf
    KERAS_BACKEND=jax python samples/train_tf.py --model ResNet50 --data /data/imagenet \\
        --devices 2 --batch-size 64 --doconv --output runs/r50-doconv-jax
    ... --resume                     # continue DIR/backup up to --epochs

The Keras side of samples/train_pt.py: the same flags (samples/recipe.py), the same folder
checks, learning-rate schedule, per-sample augmentation seeds and metrics.json, the same
fused == unfused check at the end. ``--model`` is the built-in resnet20
(samples/models_tf.py), a ``keras.applications`` name (built with weights=None and a linear
classifier) or ``package.module:callable`` called with num_classes= and input_shape= and
returning a Functional or Sequential model whose last layer gives logits; ``--doconv``
converts it with ``doconv_tf.convert``. ``--devices N`` trains data-parallel on N devices
(TensorFlow: MirroredStrategy; JAX: keras.distribution.DataParallel; GPUs where present,
else N CPU devices); ``--batch-size`` is per device.

The outputs in ``--output``: backup/ (Keras' BackupAndRestore state after every epoch,
swapped in atomically, plus this recipe's recipe.json), metrics.json and fused.keras (the
fused plain model; it loads with keras.models.load_model alone, in safe mode).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, os.getcwd())  # --model package.module:callable from where it is run

import numpy as np  # noqa: E402

from samples import recipe  # noqa: E402
from samples.common import _positive  # noqa: E402
from samples.datasets import DATASET_NAMES, DatasetError, load_dataset  # noqa: E402
from samples.recipe import RecipeError  # noqa: E402

# Keras is imported by main() once the devices are set up: JAX reads XLA_FLAGS and
# TensorFlow fixes its logical devices when first initialised.
keras: Any = None

PROG = "train_tf.py"
BUILTIN_NAMES = ("resnet20",)  # samples/models_tf.py, which imports Keras
BACKUP = "backup"  # BackupAndRestore's folder inside --output: a link to backup-epochNNNN/
STATE = "recipe.json"  # this recipe's part of the backup
STATE_FORMAT = "doconv-keras-recipe-backup"
STATE_VERSION = 1
BACKENDS = ("tensorflow", "jax", "torch")
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)
IDX_MEAN_STD = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
EXIT_USER_ERROR = 2
EXIT_FAILED = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageReadError(RecipeError):
    """An image that cannot be decoded; found while training, it ends the run in one line."""


_received_signal: int | None = None


def _note_signal(signum: int, frame: Any) -> None:
    global _received_signal
    _received_signal = signum


def _brief(error: BaseException) -> str:
    text = " ".join(str(error).split())
    # TensorFlow's op errors: the message without the op's function and device names
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", text)
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


# ----------------------------------------------------------------------- command line


HELP = {
    "model": f"a built-in ({', '.join(BUILTIN_NAMES)}: samples/models_tf.py), a "
             "keras.applications name (ResNet50, MobileNetV2, ...: weights=None, a linear "
             "classifier) or package.module:callable, called with num_classes= and "
             "input_shape= and returning a Functional or Sequential model whose output is "
             "logits",
    "batch_size": "per device (default: %(default)s)",
    "workers": "loader threads reading and augmenting the next batches ahead; 0: read in "
               "the training loop (default: %(default)s)",
    "amp": "mixed precision: Keras' mixed_bfloat16 policy on CPUs, mixed_float16 on GPUs",
    "sync_bn": "jax only, where BatchNormalization always sees the whole global batch (an "
               "error on tensorflow and torch)",
    "output": f"{BACKUP}/ (Keras' BackupAndRestore state and {STATE}, every epoch), "
              f"{recipe.METRICS}, fused.keras",
    "resume": f"continue from DIR/{BACKUP}/ up to --epochs (same flags, backend and "
              "--devices)",
    "onnx": "not available (an error): deploy fused.keras",
}


def parser() -> argparse.ArgumentParser:
    result = recipe.recipe_parser(PROG, __doc__.split("\n\n")[0], HELP)
    result.add_argument("--devices", type=_positive, default=1, metavar="N",
                        help="data-parallel on N devices: GPUs where present, else N CPU "
                             "devices (tensorflow, jax; torch: 1) (default: %(default)s)")
    return result


def keras_backend_name() -> str:
    """The backend Keras will load, read as Keras reads it, without importing Keras."""
    name = os.environ.get("KERAS_BACKEND")
    if not name:
        home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
        try:
            name = json.loads((home / "keras.json").read_text()).get("backend")
        except (OSError, ValueError, AttributeError):
            name = None
    return name or "tensorflow"


def check_framework_flags(args: argparse.Namespace, backend: str) -> None:
    """The shared flags whose meaning differs on Keras: refused in one line where the
    backend cannot honour them."""
    if backend not in BACKENDS:
        raise RecipeError(f"KERAS_BACKEND={backend!r}: this recipe runs on "
                          f"{', '.join(BACKENDS)}")
    if backend == "torch" and args.devices > 1:
        raise RecipeError(f"--devices {args.devices}: Keras' torch backend trains on one device "
                          "(keras.distribution supports JAX only; use KERAS_BACKEND=jax or "
                          "tensorflow, or samples/train_pt.py under torchrun)")
    if args.sync_bn and backend != "jax":
        raise RecipeError(f"--sync-bn: not available on the {backend} backend (on jax, "
                          "BatchNormalization always sees the whole global batch)")
    if args.onnx:
        raise RecipeError("--onnx: the Keras recipe deploys fused.keras (export it with "
                          "model.export(..., format='onnx') where tf2onnx is installed)")
    if args.data not in DATASET_NAMES and args.train_crop_size != args.val_crop_size:
        raise RecipeError(f"--train-crop-size {args.train_crop_size} and --val-crop-size "
                          f"{args.val_crop_size} differ: a Keras model is built for one input "
                          "size")


# -------------------------------------------------------------------------- devices


@dataclasses.dataclass
class Devices:
    backend: str
    count: int
    kind: str  # "cpu" or "gpu"
    names: tuple[str, ...]  # the devices that train, as the backend names them
    strategy: Any = None  # TensorFlow's tf.distribute strategy, else None

    def scope(self) -> contextlib.AbstractContextManager:
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _native_stderr_silenced():
    """TensorFlow's C++ start-up notes (absl, oneDNN) go to file descriptor 2 whatever
    TF_CPP_MIN_LOG_LEVEL says; silenced while it starts, so that a user's mistake found
    afterwards is still one line. Python's own errors still show (raised after this)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def setup_devices(count: int, backend: str) -> Devices:
    """Make ``count`` devices and import Keras over them (RecipeError if there are fewer)."""
    global keras
    if backend == "jax":
        flag = "--xla_force_host_platform_device_count"
        if flag not in os.environ.get("XLA_FLAGS", ""):  # harmless where GPUs train
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}={count}".strip()
        import jax
        import keras as keras_module
        accelerators = [d for d in jax.devices() if d.platform != "cpu"]
        found = accelerators or jax.devices("cpu")
        kind = "gpu" if accelerators else "cpu"
        if len(found) < count:
            raise RecipeError(f"--devices {count}: jax has {len(found)} {kind} device(s)")
        if count > 1:
            keras_module.distribution.set_distribution(
                keras_module.distribution.DataParallel(devices=found[:count]))
        keras = keras_module
        return Devices(backend, count, kind, tuple(str(d) for d in found[:count]))
    if backend == "tensorflow":
        with _native_stderr_silenced():
            import tensorflow as tf
            gpus = tf.config.list_physical_devices("GPU")
            if gpus and len(gpus) < count:
                raise RecipeError(f"--devices {count}: TensorFlow sees {len(gpus)} GPU(s)")
            if not gpus and count > 1:
                cpu = tf.config.list_physical_devices("CPU")[0]
                tf.config.set_logical_device_configuration(
                    cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
            import keras as keras_module
            keras = keras_module
            kind = "gpu" if gpus else "cpu"
            strategy = (tf.distribute.MirroredStrategy([f"/{kind}:{i}" for i in range(count)])
                        if count > 1 else None)
            # As the PyTorch recipe's deterministic algorithms: a resumed run repeats the
            # uninterrupted one on GPUs too (on CPUs the kernels already are).
            tf.config.experimental.enable_op_determinism()
            tf.constant(0)  # the runtime starts (and logs) here, not in the first step
            names = (tuple(strategy.extended.worker_devices) if strategy is not None
                     else (tf.config.list_logical_devices(kind.upper())[0].name,))
        return Devices(backend, count, kind, names, strategy)
    import keras as keras_module
    import torch
    keras = keras_module
    kind = "gpu" if torch.cuda.is_available() else "cpu"
    return Devices(backend, 1, kind, ("cuda:0" if kind == "gpu" else "cpu",))


# ------------------------------------------------------------------------------- data


def _evenly(count: int, limit: int | None) -> np.ndarray:
    """Indices of ``limit`` items spread over ``count`` (a class-sorted folder keeps every
    class), or all: as train_pt.py picks them."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


def check_image_header(path: Path) -> None:
    """RecipeError unless ``path`` starts as a PNG (signature and a valid IHDR chunk) or a
    JPEG does. Cheap enough for ImageNet; a file that still fails to decode ends the run
    in one line when it is reached."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(33)
    except OSError as error:
        raise RecipeError(f"--data: cannot read image {path} ({_brief(error)})") from None
    if head.startswith(PNG_SIGNATURE):
        if head[12:16] == b"IHDR" and len(head) == 33 and \
                zlib.crc32(head[12:29]) == int.from_bytes(head[29:33], "big"):
            return
        raise RecipeError(f"--data: cannot read image {path} (a broken PNG header)")
    if head.startswith(b"\xff\xd8\xff"):
        return
    raise RecipeError(f"--data: cannot read image {path} (neither PNG nor JPEG)")


class ArraySource:
    """MNIST-style 28x28 uint8 images: normalised as train_pt.py does, replicated to 3
    channels; no augmentation (train_pt.py has none for them either)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def item(self, index: int, epoch: int | None) -> np.ndarray:
        pixels = (self.images[index].astype(np.float32) / 255 - self.mean) / self.std
        return np.repeat(pixels[..., None], 3, axis=-1)


class FolderSource:
    """Images of an ImageNet-layout folder decoded with tf.io (grayscale replicated).
    Training (``epoch`` given): random-resized crop and horizontal flip drawn from
    recipe.sample_seed(seed, epoch, index), the PyTorch recipe's draws; validation: resize
    the shorter side and center-crop."""

    def __init__(self, items: Sequence[tuple[Path, int]], *, crop: int, resize: int,
                 seed: int) -> None:
        self.items, self.crop, self.resize, self.seed = items, crop, resize, seed
        self.labels = np.array([label for _, label in items], np.int64)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def tf(self) -> Any:
        import tensorflow  # imported by setup_devices (found by load_data) before any item
        return tensorflow

    def _resize(self, image: np.ndarray, height: int, width: int) -> np.ndarray:
        return self.tf.image.resize(image, (height, width), method="bilinear",
                                    antialias=True).numpy()

    def item(self, index: int, epoch: int | None) -> np.ndarray:
        path = self.items[index][0]
        try:
            image = self.tf.io.decode_image(path.read_bytes(), channels=3,
                                            expand_animations=False).numpy()
        except Exception as error:  # noqa: BLE001 - tf's errors and OSError alike
            raise ImageReadError(f"cannot read image {path} ({_brief(error)})") from None
        height, width = image.shape[:2]
        if epoch is not None:
            rng = np.random.default_rng(recipe.sample_seed(self.seed, epoch, index))
            left, top, right, bottom = recipe.random_resized_crop_box(width, height, rng)
            pixels = self._resize(image[top:bottom, left:right], self.crop, self.crop)
            if rng.random() < 0.5:
                pixels = pixels[:, ::-1]
        else:
            scale = self.resize / min(width, height)
            size_w = max(self.resize, round(width * scale))
            size_h = max(self.resize, round(height * scale))
            pixels = self._resize(image, size_h, size_w)
            left, top = (size_w - self.crop) // 2, (size_h - self.crop) // 2
            pixels = pixels[top:top + self.crop, left:left + self.crop]
        return ((pixels / 255 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


@dataclasses.dataclass
class Data:
    train: ArraySource | FolderSource
    val: ArraySource | FolderSource
    val_labels: np.ndarray
    train_labels: np.ndarray
    num_classes: int
    input_shape: tuple[int, int, int]
    description: str


def load_data(args: argparse.Namespace, backend: str) -> Data:
    """Checked and listed before Keras is imported: a bad folder costs no framework start."""
    if args.data in DATASET_NAMES:
        stream = io.StringIO() if args.quiet else sys.stderr
        try:
            with contextlib.redirect_stderr(stream):  # offline: no download
                data = load_dataset(args.data, None, download=False, verbose=not args.quiet)
        except DatasetError as error:
            raise RecipeError(f"--data {args.data}: {error}") from None
        mean, std = IDX_MEAN_STD[args.data]
        train_index, val_index = (_evenly(len(data.x_train), args.limit),
                                  _evenly(len(data.x_test), args.limit))
        y_train, y_val = data.y_train[train_index], data.y_test[val_index]
        return Data(ArraySource(data.x_train[train_index], y_train, mean, std),
                    ArraySource(data.x_test[val_index], y_val, mean, std),
                    np.asarray(y_val, np.int64), np.asarray(y_train, np.int64), 10,
                    (28, 28, 3), f"{args.data} from {data.source}")
    folder = recipe.scan_image_folder(args.data)
    train = [folder.train[i] for i in _evenly(len(folder.train), args.limit)]
    val = [folder.val[i] for i in _evenly(len(folder.val), args.limit)]
    for path, _ in train + val:
        check_image_header(path)
    if importlib.util.find_spec("tensorflow") is None:
        raise RecipeError(f"--data {args.data}: image folders are decoded with tf.io, and "
                          f"TensorFlow is not installed beside Keras' {backend} backend "
                          f"(use {' / '.join(DATASET_NAMES)}, or install tensorflow-cpu)")
    size = args.train_crop_size
    train_source = FolderSource(train, crop=size, resize=size, seed=args.seed)
    val_source = FolderSource(val, crop=args.val_crop_size, resize=args.val_resize_size,
                              seed=args.seed)
    return Data(train_source, val_source, val_source.labels, train_source.labels,
                len(folder.classes), (size, size, 3),
                f"{folder.root} ({len(folder.classes)} classes)")


def make_batches(data: Data, args: argparse.Namespace, devices: Devices, first_epoch: int
                 ) -> tuple[Any, Any]:
    """Keras PyDatasets: the training stream and the validation images, each batch a whole
    global batch (--batch-size per device), so every device gets an equal shard.

    The training stream is one endless sequence of batches: batch i is step
    i % steps_per_epoch of epoch first_epoch + i // steps_per_epoch, in that epoch's
    recipe.epoch_order. What a batch holds is a function of its index alone, never of when
    it is read: Keras reads ahead of the epoch it trains (its symbolic build, tf.data's
    and tf.distribute's prefetching, iterators made at the end of the previous epoch), and
    state set by a callback would be read too late. ``--workers`` threads read and augment
    the next batches ahead (recipe.Lookahead); Keras' own workers are not used (its
    enqueuer restarts an epoch's indices while keeping batches it had read ahead)."""
    global_batch = args.batch_size * devices.count
    steps_per_epoch = -(-len(data.train) // global_batch)
    labels = np.eye(data.num_classes, dtype=np.float32)

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> tuple[int, ...]:
        return tuple(recipe.epoch_order(len(data.train), global_batch, args.seed, epoch))

    def train_batch(index: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, step = divmod(index, steps_per_epoch)
        epoch += first_epoch
        picked = order(epoch)[step * global_batch:(step + 1) * global_batch]
        return (np.stack([data.train.item(i, epoch) for i in picked]),
                labels[data.train_labels[list(picked)]])

    def val_batch(index: int) -> tuple[np.ndarray]:
        # The last batch padded with its last image: its predictions are dropped.
        picked = [min(i, len(data.val) - 1)
                  for i in range(index * global_batch, (index + 1) * global_batch)]
        return (np.stack([data.val.item(i, None) for i in picked]),)

    class Batches(keras.utils.PyDataset):
        def __init__(self, compute: Callable[[int], Any], count: int | None) -> None:
            super().__init__()  # one worker: Keras reads each batch when it needs it
            self.count, self.lookahead = count, recipe.Lookahead(compute, args.workers,
                                                                 limit=count)

        @property
        def num_batches(self) -> int | None:  # None: endless, fit() takes steps_per_epoch
            return self.count

        def __getitem__(self, index: int) -> Any:
            return self.lookahead[index]

    return (Batches(train_batch, None),
            Batches(val_batch, -(-len(data.val) // global_batch)))


# ------------------------------------------------------------------------------ model


def resolve_model(name: str) -> tuple[str, Callable[..., Any]]:
    """("builtin" | "application" | "callable", builder) for ``--model``."""
    from samples.models_tf import BUILTIN_MODELS
    if name in BUILTIN_MODELS:
        return "builtin", BUILTIN_MODELS[name]
    if ":" not in name:
        application = getattr(keras.applications, name, None)
        if name[:1].isupper() and callable(application):
            return "application", application
        raise RecipeError(f"--model {name!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}),"
                          " not a keras.applications name (ResNet50, MobileNetV2, ...) and not "
                          "an import path package.module:callable")
    return "callable", recipe.import_callable(name, _brief)


def build_model(name: str, kind: str, builder: Callable[..., Any], num_classes: int,
                input_shape: tuple[int, int, int], use_doconv: bool) -> Any:
    """The model with logits out, checked; converted to DO-Conv with ``use_doconv``."""
    shape_text = "x".join(map(str, input_shape))
    try:
        if kind == "application":
            try:
                model = builder(weights=None, classes=num_classes, input_shape=input_shape,
                                classifier_activation=None)
            except TypeError:  # an application without that argument
                model = builder(weights=None, classes=num_classes, input_shape=input_shape)
        else:
            model = builder(num_classes=num_classes, input_shape=input_shape)
    except Exception as error:  # noqa: BLE001
        hint = ("; keras.applications have minimum input sizes (32x32 for most, 75x75 for "
                "InceptionV3/InceptionResNetV2/Xception, ...): image folders set it with "
                "--train-crop-size/--val-crop-size, the IDX sets are 28x28"
                if kind == "application" else "")
        raise RecipeError(f"--model {name}: building it for {num_classes} classes and input "
                          f"{shape_text} failed ({_brief(error)}){hint}") from None
    if not isinstance(model, keras.Model) or not (
            isinstance(model, keras.Sequential) or type(model).__name__ == "Functional"):
        raise RecipeError(f"--model {name} returned a {type(model).__name__}, not a Functional "
                          "or Sequential keras.Model")
    if tuple(model.input_shape[1:]) != tuple(input_shape) and not all(
            a in (None, b) for a, b in zip(model.input_shape[1:], input_shape)):
        raise RecipeError(f"--model {name}: its input shape {model.input_shape[1:]} does not "
                          f"take the data's {shape_text} images")
    if tuple(model.output_shape[1:]) != (num_classes,):
        raise RecipeError(f"--model {name}: its output shape {model.output_shape[1:]} is not "
                          f"({num_classes},) for the data's {num_classes} classes")
    if use_doconv:
        try:
            model = importlib.import_module("doconv_tf").convert(model)
        except ValueError as error:
            raise RecipeError(f"--model {name} --doconv: {_brief(error)}") from None
    return model


def make_schedule(args: argparse.Namespace, steps_per_epoch: int) -> Any:
    """recipe.lr_factor per optimizer step, in keras.ops (the step is the optimizer's
    iteration count, which the backup restores)."""
    ops = keras.ops

    class RecipeSchedule(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step: Any) -> Any:
            step = ops.cast(step, "float32")
            epoch = step / steps_per_epoch
            if args.lr_schedule == "step":
                after = ops.power(args.lr_gamma, ops.floor(epoch / args.lr_step_size))
            else:
                span = max(args.epochs - args.warmup_epochs, 1e-12)
                after = 0.5 * (1.0 + ops.cos(math.pi * ops.minimum(
                    (epoch - args.warmup_epochs) / span, 1.0)))
            if args.warmup_epochs:
                warm = (step + 1.0) / (args.warmup_epochs * steps_per_epoch)
                after = ops.where(epoch < args.warmup_epochs, warm, after)
            return args.lr * after

        def get_config(self) -> dict[str, Any]:
            return {}

    return RecipeSchedule()


# --------------------------------------------------------------------------- backup


def load_state(args: argparse.Namespace, devices: int, backend: str) -> dict[str, Any] | None:
    """The backup ``--resume`` continues, checked against this run (RecipeError)."""
    if not args.resume:
        return None
    backup = args.output / BACKUP
    path = backup / STATE
    if not path.is_file():
        raise RecipeError(f"--resume: no checkpoint at {backup} (no {STATE})")
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RecipeError(f"--resume: cannot read {path} ({_brief(error)})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise RecipeError(f"--resume: {path} is not a backup of this recipe")
    if not (backup / "latest.weights.h5").is_file():
        raise RecipeError(f"--resume: {backup} has no latest.weights.h5")
    recipe.check_resume_record(state, args, f"--resume: {backup}", devices, "device(s)")
    if state.get("backend") != backend:
        raise RecipeError(f"--resume: {backup} was written on the {state.get('backend')} "
                          f"backend, this run is on {backend}")
    return state


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def publish_backup(output: Path, write: Callable[[Path], None], epoch: int) -> None:
    """Write a whole backup into a fresh folder, then point output/backup at it by renaming
    a symlink over the old one: the backup is the previous epoch's or the new one, never a
    mixture of weights and metadata of two epochs (BackupAndRestore writes them in turn)."""
    name = f"{BACKUP}-epoch{epoch:04d}"
    staging = output / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write(staging)
    _fsync_tree(staging)
    final = output / name
    shutil.rmtree(final, ignore_errors=True)  # left by a run stopped after this rename
    os.replace(staging, final)
    link = output / f".{BACKUP}.link.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(name)
    os.replace(link, output / BACKUP)
    _fsync_tree(output)
    for old in output.glob(f"{BACKUP}-epoch*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    devices: Devices
    data: Data
    model_kind: str  # "builtin", "application" or "callable"
    builder: Callable[..., Any]
    model: Any
    train_batches: Any
    val_batches: Any
    steps_per_epoch: int


def predict(model: Any, run: Run) -> np.ndarray:
    """Every validation image's predicted class, each counted once."""
    logits = model.predict(run.val_batches, verbose=0)
    return np.asarray(logits)[:len(run.data.val)].argmax(axis=-1)


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(predicted == labels))


def metrics(run: Run, epochs_done: list[dict[str, Any]], **final: Any) -> dict[str, Any]:
    recorded = {**recipe.resume_settings(run.args), "epochs": run.args.epochs,
                "workers": run.args.workers}
    return recipe.metrics_record(framework="keras", world_size=run.devices.count,
                                 model=run.args.model, doconv=run.args.doconv,
                                 settings=recorded, epochs=epochs_done,
                                 backend=run.devices.backend, device=run.devices.kind,
                                 device_names=list(run.devices.names),
                                 keras_version=keras.__version__,
                                 data=run.data.description, **final)


def make_callback(run: Run, epochs_done: list[dict[str, Any]], last: dict[str, Any]) -> Any:
    """Keras' BackupAndRestore, restoring from output/backup at the start of fit (the
    weights, the optimizer's state and step, the epoch), extended to validate after each
    epoch, write metrics.json and publish the backup atomically with this recipe's
    recipe.json."""
    args, output = run.args, run.args.output

    class RecipeBackup(keras.callbacks.BackupAndRestore):
        def on_train_begin(self, logs: Any = None) -> None:
            try:
                super().on_train_begin(logs)
            except Exception as error:  # noqa: BLE001 - h5py's and Keras' errors alike
                raise RecipeError(f"--resume: cannot restore {output / BACKUP} "
                                  f"({_brief(error)})") from None

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if _received_signal is not None:  # fit stops after this step
                self.model.stop_training = True
                last["stopped"] = True

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if last.get("stopped"):  # a part of an epoch: neither validated nor kept
                return
            predicted = predict(self.model, run)
            last["predicted"] = predicted
            entry = {"epoch": epoch + 1, "train_loss": float(logs["loss"]),
                     "val_accuracy": accuracy(predicted, run.data.val_labels),
                     "seconds": time.perf_counter() - self.started}
            epochs_done.append(entry)
            self._current_epoch = epoch + 1
            self._save_model()
            recipe.write_metrics(output, metrics(run, epochs_done))
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {entry['train_loss']:.4f}, "
                  f"val accuracy {entry['val_accuracy']:.2f}%, {entry['seconds']:.1f} s",
                  flush=True)

        def _save_model(self) -> None:
            epoch = self._current_epoch
            state = {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch,
                     "model_name": args.model, "doconv": args.doconv,
                     "world_size": run.devices.count, "backend": run.devices.backend,
                     "settings": recipe.resume_settings(args), "metrics_epochs": epochs_done,
                     "keras_version": keras.__version__}

            def write(folder: Path) -> None:
                # The two files BackupAndRestore reads back, then this recipe's.
                self.model.save_weights(str(folder / "latest.weights.h5"))
                (folder / "training_metadata.json").write_text(
                    json.dumps({"epoch": epoch, "batch": 0}))
                (folder / STATE).write_text(json.dumps(state, indent=1) + "\n")

            publish_backup(output, write, epoch)

    return RecipeBackup(str(output / BACKUP), save_freq="epoch", delete_checkpoint=False)


def save_fused(run: Run, path: Path) -> Any:
    """doconv_tf.fuse(model) (a plain copy without --doconv) saved to ``path`` atomically,
    and that file loaded back in safe mode: the model the fused checks predict with."""
    # Fused from an uncompiled twin holding the trained weights: cloning a compiled model
    # recompiles the copy, and the saved file would then carry this recipe's optimizer and
    # schedule (a class only this script defines).
    twin = build_model(run.args.model, run.model_kind, run.builder, run.data.num_classes,
                       run.data.input_shape, run.args.doconv)
    twin.set_weights(run.model.get_weights())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fuse() warns when there is nothing to fuse
        fused = importlib.import_module("doconv_tf").fuse(twin)
    temporary = path.with_name(f".{path.stem}.tmp.keras")
    try:
        fused.save(str(temporary))
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    with run.devices.scope():
        return keras.models.load_model(str(path), compile=False, safe_mode=True)


def train(run: Run, state: dict[str, Any] | None) -> int:
    args, output = run.args, run.args.output
    epochs_done: list[dict[str, Any]] = list(state["metrics_epochs"]) if state else []
    first = state["epoch"] if state else 0
    print(f"{PROG}: {args.model}{' with DO-Conv' if args.doconv else ''}, Keras "
          f"{keras.__version__} on {run.devices.backend}, {run.devices.count} "
          f"{run.devices.kind} device(s); {run.data.description}: {len(run.data.train)} "
          f"training / {len(run.data.val)} validation images"
          + (f"; resumed after epoch {first}" if state else ""), flush=True)
    last: dict[str, Any] = {}
    callback = make_callback(run, epochs_done, last)
    try:
        run.model.fit(run.train_batches, epochs=args.epochs, callbacks=[callback],
                      steps_per_epoch=run.steps_per_epoch, verbose=0 if args.quiet else 1,
                      shuffle=False)
    except ImageReadError as error:
        fail(str(error), EXIT_FAILED)
    except RecipeError:
        raise
    except Exception as error:  # noqa: BLE001 - an image found broken by a loader thread
        found = re.search(r"cannot read image [^\n]*\)", str(error))
        if found is None:
            raise
        fail(found.group(0), EXIT_FAILED)
    if last.get("stopped") or _received_signal is not None:
        return _stopped(output)
    predicted = last.get("predicted")
    if predicted is None:  # resumed at the end: nothing trained in this process
        predicted = predict(run.model, run)
    val_accuracy = accuracy(predicted, run.data.val_labels)
    loaded = save_fused(run, output / "fused.keras")
    fused_predicted = predict(loaded, run)
    fused_accuracy = accuracy(fused_predicted, run.data.val_labels)
    identical = bool(np.array_equal(fused_predicted, predicted))
    recipe.write_metrics(output, metrics(
        run, epochs_done, val_accuracy=val_accuracy,
        fused_val_accuracy=fused_accuracy if args.doconv else None,
        fused_identical_predictions=identical if args.doconv else None))
    print(f"val accuracy {val_accuracy:.2f}%"
          + (f"; fused {fused_accuracy:.2f}%, {'identical' if identical else 'DIFFERENT'} "
             "predictions" if args.doconv else "") + f"; outputs in {output}", flush=True)
    if not identical:
        fail(f"the fused model's predictions differ from the trained model's on "
             f"{int(np.sum(fused_predicted != predicted))} validation images", EXIT_FAILED)
    return 0


def _stopped(output: Path) -> NoReturn:
    signum = _received_signal or signal.SIGTERM
    kept = ("the last completed epoch's backup is kept (continue with --resume)"
            if (output / BACKUP / STATE).is_file() else "no epoch had completed: no backup")
    sys.stderr.write(f"{PROG}: stopped by {signal.Signals(signum).name}; {kept}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is on disk (each file renamed into place). A normal exit would wait for
    # the epoch's data generator that tf.data still holds half-read (it hangs on
    # TensorFlow), so the process ends here.
    os._exit(128 + signum)


# ------------------------------------------------------------------------------- main


def fail(message: str, status: int = EXIT_USER_ERROR) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def prepare(args: argparse.Namespace) -> tuple[Run, dict[str, Any] | None]:
    """Every check of the command line and the inputs, before anything is written:
    the flags, the data and the backup first (no framework started), then the devices and
    the model."""
    recipe.check_args(args, checkpoint=BACKUP)
    backend = keras_backend_name()
    check_framework_flags(args, backend)
    data = load_data(args, backend)
    state = load_state(args, args.devices, backend)
    devices = setup_devices(args.devices, backend)
    if args.amp:  # before the model exists: its layers take the global policy
        keras.config.set_dtype_policy("mixed_float16" if devices.kind == "gpu"
                                      else "mixed_bfloat16")
    kind, builder = resolve_model(args.model)
    global_batch = args.batch_size * devices.count
    steps_per_epoch = -(-len(data.train) // global_batch)
    keras.utils.set_random_seed(args.seed)
    with devices.scope():
        model = build_model(args.model, kind, builder, data.num_classes, data.input_shape,
                            args.doconv)
        optimizer = keras.optimizers.SGD(make_schedule(args, steps_per_epoch),
                                         momentum=args.momentum,
                                         weight_decay=args.wd or None)
        model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=args.label_smoothing))
    train_batches, val_batches = make_batches(data, args, devices,
                                              state["epoch"] if state else 0)
    return Run(args, devices, data, kind, builder, model, train_batches, val_batches,
               steps_per_epoch), state


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up notes
    try:
        run, state = prepare(args)
        args.output.mkdir(parents=True, exist_ok=True)
    except RecipeError as error:
        fail(str(error))
    except OSError as error:
        fail(f"--output {args.output}: {_brief(error)}")
    signal.signal(signal.SIGTERM, _note_signal)  # stop between steps, keep the last backup
    signal.signal(signal.SIGINT, _note_signal)
    try:
        return train(run, state)
    except RecipeError as error:
        fail(str(error))


if __name__ == "__main__":
    sys.exit(main())
