"""The training recipe's framework-neutral part (NumPy and the standard library only).

Every framework's recipe (``samples/train_pt.py`` now; the Keras and Gluon ones later) binds
this module: the same command line (``recipe_parser``), the same image-folder checks
(``scan_image_folder``), the same learning-rate schedule (``lr_factor``), the same
per-sample augmentation seeds (``sample_seed``), the same outputs (``metrics.json`` through
``write_metrics``, every file written by ``atomic_write``) and, for ``recipe_table.py``,
Welch's t-test (``welch_t_test``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from samples.common import _OneLineErrorParser, _positive
from samples.datasets import DATASET_NAMES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # case-insensitive
CHECKPOINT = "checkpoint.pt"  # the framework's own container; the name is shared
METRICS = "metrics.json"
METRICS_VERSION = 1
LR_SCHEDULES = ("cosine", "step")
T = TypeVar("T")

# The flags a resumed run must share with the run that wrote the checkpoint: anything that
# changes what an epoch computes. --epochs may grow; --workers, --output, --quiet and
# --onnx change nothing that is computed.
RESUME_FLAGS = ("model", "doconv", "data", "batch_size", "lr", "momentum", "wd", "lr_schedule",
                "lr_step_size", "lr_gamma", "warmup_epochs", "label_smoothing", "seed", "amp",
                "sync_bn", "train_crop_size", "val_resize_size", "val_crop_size", "limit")
# The flags whose meaning is each recipe's own: recipe_parser takes their help from it.
RECIPE_HELP_FLAGS = ("model", "batch_size", "workers", "amp", "sync_bn", "output", "resume",
                     "onnx")


class RecipeError(ValueError):
    """A user's mistake or bad input: reported as one line, never with a traceback."""


# ----------------------------------------------------------------------- command line


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def recipe_parser(prog: str, description: str, recipe_help: Mapping[str, str]
                  ) -> argparse.ArgumentParser:
    """The command line every framework's recipe shares. ``recipe_help``: the recipe's own
    help for each of RECIPE_HELP_FLAGS (by dest; ``%(default)s`` as in argparse), so that
    each recipe's --help says what that recipe does."""
    missing = [name for name in RECIPE_HELP_FLAGS if name not in recipe_help]
    if missing or set(recipe_help) - set(RECIPE_HELP_FLAGS):
        raise ValueError(f"recipe_help: expected help for exactly {RECIPE_HELP_FLAGS}, got "
                         f"{tuple(recipe_help)}")
    parser = _OneLineErrorParser(prog=prog, description=description)
    add = parser.add_argument
    add("--model", required=True, metavar="NAME", help=recipe_help["model"])
    add("--data", required=True, metavar="DIR|NAME",
        help=f"an ImageNet-layout folder (DIR/train/<class>/*.jpg|png, DIR/val/<class>/*) or "
             f"{' / '.join(DATASET_NAMES)} (the IDX sets of samples/datasets.py; offline, "
             "mnist is the committed 4,000 / 1,000 subset)")
    add("--doconv", action="store_true",
        help="convert the model's convs to DO-Conv before training (fused for deployment)")
    add("--epochs", type=_positive, default=90, metavar="N", help="(default: %(default)s)")
    add("--batch-size", type=_positive, default=32, metavar="N", help=recipe_help["batch_size"])
    add("--lr", type=_non_negative_float, default=0.1, help="(default: %(default)s)")
    add("--momentum", type=_non_negative_float, default=0.9, help="(default: %(default)s)")
    add("--wd", type=_non_negative_float, default=1e-4, help="weight decay (default: %(default)s)")
    add("--lr-schedule", choices=LR_SCHEDULES, default="cosine",
        help="after the warm-up, per step (default: %(default)s)")
    add("--lr-step-size", type=_positive, default=30, metavar="EPOCHS",
        help="step: multiply by --lr-gamma every this many epochs (default: %(default)s)")
    add("--lr-gamma", type=_non_negative_float, default=0.1, help="(default: %(default)s)")
    add("--warmup-epochs", type=_non_negative_int, default=0, metavar="N",
        help="linear warm-up from lr/steps (default: %(default)s)")
    add("--label-smoothing", type=_fraction, default=0.0, help="(default: %(default)s)")
    add("--seed", type=int, default=0, help="(default: %(default)s)")
    add("--workers", type=_non_negative_int, default=2, metavar="N", help=recipe_help["workers"])
    add("--amp", action="store_true", help=recipe_help["amp"])
    add("--sync-bn", action="store_true", help=recipe_help["sync_bn"])
    add("--train-crop-size", type=_positive, default=224, metavar="PX",
        help="image folders: random-resized crop (default: %(default)s)")
    add("--val-resize-size", type=_positive, default=256, metavar="PX",
        help="image folders: shorter side before the center crop (default: %(default)s)")
    add("--val-crop-size", type=_positive, default=224, metavar="PX",
        help="image folders: center crop (default: %(default)s)")
    add("--limit", type=_positive, default=None, metavar="N",
        help="only the first N training and validation images (smoke runs, timing)")
    add("--output", type=Path, required=True, metavar="DIR", help=recipe_help["output"])
    add("--resume", action="store_true", help=recipe_help["resume"])
    add("--onnx", action="store_true", help=recipe_help["onnx"])
    add("--quiet", action="store_true", help="no progress bar")
    return parser


def check_args(args: argparse.Namespace, checkpoint: str = CHECKPOINT) -> None:
    """Flag combinations argparse cannot check; RecipeError on the first. ``checkpoint``:
    the name of the framework's checkpoint (file or folder) inside --output."""
    if args.val_crop_size > args.val_resize_size:
        raise RecipeError(f"--val-crop-size {args.val_crop_size} is larger than "
                          f"--val-resize-size {args.val_resize_size}")
    if args.warmup_epochs >= args.epochs and args.warmup_epochs:
        raise RecipeError(f"--warmup-epochs {args.warmup_epochs} leaves no epoch after the "
                          f"warm-up (--epochs {args.epochs})")
    output = args.output
    if output.exists() and not output.is_dir():
        raise RecipeError(f"--output {output} exists and is not a folder")
    if not args.resume and (output / checkpoint).exists():
        raise RecipeError(f"{output / checkpoint} exists: pass --resume to continue it or "
                          "choose another --output")


def resume_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a resumed run must repeat (RESUME_FLAGS), as JSON-like primitives."""
    return {name: _primitive(getattr(args, name)) for name in RESUME_FLAGS}


def check_resume_settings(saved: Mapping[str, Any], current: Mapping[str, Any],
                          source: str) -> None:
    """RecipeError naming the first flag that differs from the checkpoint's run."""
    for name in RESUME_FLAGS:
        if name not in saved:
            raise RecipeError(f"{source}: not a checkpoint of this recipe (no {name!r})")
        if saved[name] != current[name]:
            flag = "--" + name.replace("_", "-")
            raise RecipeError(f"{source} was written with {flag} {_show(saved[name])}, this "
                              f"run has {flag} {_show(current[name])}")


def check_resume_record(record: Mapping[str, Any], args: argparse.Namespace, source: str,
                        world_size: int, unit: str) -> None:
    """RecipeError where this run cannot continue the checkpoint ``record`` (a dict holding
    model_name, doconv, settings, world_size, epoch and metrics_epochs): another model or
    --doconv setting, another resume flag, another count of ``unit`` ("process(es)" or
    "device(s)"), or more epochs than --epochs. ``source`` starts each message."""
    if record.get("model_name") != args.model:
        raise RecipeError(f"{source} is of --model {record.get('model_name')}, "
                          f"not {args.model}")
    if record.get("doconv") != args.doconv:
        raise RecipeError(f"{source} was trained "
                          f"{'with' if record.get('doconv') else 'without'} --doconv")
    settings = record.get("settings")
    check_resume_settings(settings if isinstance(settings, Mapping) else {},
                          resume_settings(args), source)
    if record.get("world_size") != world_size:
        raise RecipeError(f"{source} was written by {record.get('world_size')} {unit}, this "
                          f"run has {world_size} (the data order and the result depend on it)")
    epoch = record.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0 \
            or not isinstance(record.get("metrics_epochs"), list):
        raise RecipeError(f"{source}: not a checkpoint of this recipe (no epoch)")
    if epoch > args.epochs:
        raise RecipeError(f"{source} has {epoch} epochs, more than --epochs {args.epochs}")


def _primitive(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def _show(value: Any) -> str:
    return {True: "on", False: "off", None: "unset"}.get(value, str(value)) \
        if isinstance(value, (bool, type(None))) else str(value)


# ---------------------------------------------------------------------- image folders


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """An ImageNet-layout folder: class names (sorted) and (path, label) per split."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[Path, int], ...]
    val: tuple[tuple[Path, int], ...]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def scan_image_folder(root: str | os.PathLike[str]) -> ImageFolder:
    """Check and list ``root/train/<class>/*`` and ``root/val/<class>/*``.

    RecipeError when root, train or val is missing, a split has no class folders or no
    images, a class folder has no image, or train and val have different classes. Files
    with other extensions are ignored (a README, .DS_Store); images are not opened here.
    """
    root = Path(root)
    if not root.is_dir():
        raise RecipeError(f"--data {root}: no such folder")
    splits: dict[str, dict[str, list[Path]]] = {}
    for split in ("train", "val"):
        directory = root / split
        if not directory.is_dir():
            raise RecipeError(f"--data {root}: no {split}/ folder (expected "
                              f"{split}/<class>/*{'|'.join(IMAGE_EXTENSIONS)})")
        classes = sorted(p.name for p in directory.iterdir()
                         if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise RecipeError(f"--data {directory}: no class folders")
        files = {name: sorted(p for p in (directory / name).rglob("*") if is_image(p))
                 for name in classes}
        empty = [name for name, paths in files.items() if not paths]
        if empty:
            raise RecipeError(f"--data {directory}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                              f"in class folder{'s' if len(empty) > 1 else ''} "
                              f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}")
        splits[split] = files
    train_classes, val_classes = list(splits["train"]), list(splits["val"])
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        parts = ([f"only in train/: {', '.join(only_train[:5])}"] if only_train else []) + \
                ([f"only in val/: {', '.join(only_val[:5])}"] if only_val else [])
        raise RecipeError(f"--data {root}: train/ and val/ have different class folders "
                          f"({'; '.join(parts)})")
    classes = tuple(train_classes)

    def pairs(split: str) -> tuple[tuple[Path, int], ...]:
        return tuple((path, label) for label, name in enumerate(classes)
                     for path in splits[split][name])

    return ImageFolder(root, classes, pairs("train"), pairs("val"))


# ------------------------------------------------------------------- schedule, seeds


def lr_factor(epoch: float, epochs: int, schedule: str, warmup_epochs: int = 0,
              step_size: int = 30, gamma: float = 0.1, steps_per_epoch: int = 1) -> float:
    """The learning rate's multiplier at ``epoch`` (fractional: step / steps_per_epoch).

    A linear warm-up over ``warmup_epochs`` (its first step at 1 / warm-up steps), then
    cosine to 0 at ``epochs`` or a step decay by ``gamma`` every ``step_size`` epochs
    (counted from the start, as in torchvision's reference recipe).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule: expected one of {LR_SCHEDULES}, got {schedule!r}")
    if epoch < warmup_epochs:
        warmup_steps = warmup_epochs * steps_per_epoch
        return (epoch * steps_per_epoch + 1) / warmup_steps
    if schedule == "step":
        return gamma ** int(epoch // step_size)
    span = max(epochs - warmup_epochs, 1e-12)
    return 0.5 * (1.0 + math.cos(math.pi * min((epoch - warmup_epochs) / span, 1.0)))


def sample_seed(seed: int, epoch: int, index: int) -> list[int]:
    """The entropy for one training sample's augmentation in one epoch (for
    ``numpy.random.default_rng``). Derived from the sample itself, so the augmentation
    depends neither on the process history (resume) nor on which rank or data-loading
    worker draws the sample."""
    return [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch, index, 0x5EED]


def process_seed(seed: int, epoch: int, rank: int) -> int:
    """The framework RNG's seed for one process in one epoch (dropout, ...), reset at the
    start of every epoch so that a resumed run draws what the uninterrupted one drew."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**63 - 1)


def epoch_order(count: int, global_batch: int, seed: int, epoch: int) -> list[int]:
    """The training samples' order in one epoch, a function of (seed, epoch) alone (so a
    resumed run draws what the uninterrupted one drew), padded by repeating its first
    indices to a whole number of global batches, as DistributedSampler pads its ranks:
    every device gets equal shards and no sample is dropped."""
    import numpy as np  # here: the module's other users need only the standard library

    if count < 1 or global_batch < 1:
        raise ValueError(f"count and global_batch must be >= 1, got {count}, {global_batch}")
    order = np.random.default_rng([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch,
                                   0x0DE7]).permutation(count).tolist()
    padded = -(-count // global_batch) * global_batch
    while len(order) < padded:
        order += order[:padded - len(order)]
    return order


class Lookahead(Generic[T]):
    """``compute(index)`` for each index asked for, with the ``depth`` indices after it
    (below ``limit``) computed ahead by ``workers`` threads; with no workers, computed
    when asked for. ``compute`` must be a pure function of the index (a batch's content
    never depends on when it is read), so a value computed ahead is the one asked for
    whenever that is, and no order of requests (a framework restarting its iterator,
    prefetching across an epoch's end) changes what a request returns. An error in
    ``compute`` is raised when its index is asked for."""

    def __init__(self, compute: Callable[[int], T], workers: int, *,
                 depth: int | None = None, limit: int | None = None) -> None:
        self._compute, self._limit = compute, limit
        self._depth = 2 * workers if depth is None else depth
        self._pool = (concurrent.futures.ThreadPoolExecutor(workers,
                                                             thread_name_prefix="recipe-data")
                      if workers else None)
        self._pending: dict[int, concurrent.futures.Future[T]] = {}
        self._lock = threading.Lock()

    def __getitem__(self, index: int) -> T:
        if self._pool is None:
            return self._compute(index)
        with self._lock:
            wanted = range(index, index + 1 + self._depth)
            if self._limit is not None:
                wanted = range(index, max(index + 1, min(wanted.stop, self._limit)))
            for stale in [key for key in self._pending if key not in wanted]:
                self._pending.pop(stale).cancel()
            for key in wanted:
                if key not in self._pending:
                    self._pending[key] = self._pool.submit(self._compute, key)
            future = self._pending.pop(index)
        return future.result()


def brief_error(error: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters of the message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def import_callable(name: str, brief: Callable[[BaseException], str] = brief_error
                    ) -> Callable[..., Any]:
    """The callable ``--model package.module:callable`` names (dots in ``callable`` reach
    attributes), or a one-line RecipeError; ``brief`` words an import's own error."""
    module_name, _, attribute = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any failure of user code is the user's
        raise RecipeError(f"--model {name}: cannot import {module_name} "
                          f"({brief(error)})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise RecipeError(f"--model {name}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise RecipeError(f"--model {name}: {attribute} is not callable")
    return target


@dataclasses.dataclass(frozen=True)
class Requirement:
    """An optional package a run's flags need: ``needed_by`` names the flag as the user
    wrote it, ``module`` is what the recipe imports, ``package`` what pip installs and
    ``extra`` doconv's extra (pyproject.toml) that installs it."""

    needed_by: str
    module: str
    package: str
    extra: str


# What the PyTorch and Gluon recipes decode image folders with (Keras': tf.io).
PILLOW = Requirement("--data (an image folder)", "PIL", "Pillow", "samples")


def check_requirements(requirements: Iterable[Requirement]) -> None:
    """RecipeError naming the first requirement that does not import, the flag that needs
    it and the extra that installs it: found before anything is trained, not when the
    flag's work begins."""
    for need in requirements:
        try:
            importlib.import_module(need.module)
        except Exception as error:  # noqa: BLE001 - a broken install fails in any way
            missing = (isinstance(error, ModuleNotFoundError) and error.name is not None
                       and f"{need.module}.".startswith(f"{error.name}."))
            state = ("is not installed" if missing else
                     f"does not import ({brief_error(error)})")
            raise RecipeError(f"{need.needed_by} needs {need.package}, which {state}: "
                              f"pip install \"doconv[{need.extra}]\"") from None


def random_resized_crop_box(width: int, height: int, rng: Any,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): torchvision's RandomResizedCrop sampling (10 tries, then
    the central crop at the nearest allowed aspect ratio), drawn from ``rng`` (a
    ``numpy.random.Generator``): every recipe's training crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


# ----------------------------------------------------------------------------- files


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """``write(handle)`` into a temporary file beside ``path``, fsync, then rename over it:
    ``path`` is either the old file or the complete new one, never a partial one."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut once the folder is synced
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def metrics_record(*, framework: str, world_size: int, model: str, doconv: bool,
                   settings: Mapping[str, Any], epochs: Sequence[Mapping[str, Any]],
                   val_accuracy: float | None = None,
                   fused_val_accuracy: float | None = None,
                   fused_identical_predictions: bool | None = None,
                   **extra: Any) -> dict[str, Any]:
    """metrics.json's content. ``epochs``: one {"epoch", "train_loss", "val_accuracy",
    "seconds"} per finished epoch (accuracies in %, seconds of training and validation);
    the fused fields stay None until the run has finished and fused its model."""
    for entry in epochs:
        missing = {"epoch", "train_loss", "val_accuracy", "seconds"} - set(entry)
        if missing:
            raise ValueError(f"epochs: entry {entry} lacks {sorted(missing)}")
    return {"version": METRICS_VERSION, "framework": framework, "world_size": world_size,
            "model": model, "doconv": doconv, "settings": dict(settings),
            "epochs": [dict(entry) for entry in epochs],
            "val_accuracy": val_accuracy if val_accuracy is not None else
            (epochs[-1]["val_accuracy"] if epochs else None),
            "fused_val_accuracy": fused_val_accuracy,
            "fused_identical_predictions": fused_identical_predictions,
            "seconds": sum(float(entry["seconds"]) for entry in epochs), **extra}


def write_metrics(directory: str | os.PathLike[str], record: Mapping[str, Any]) -> Path:
    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / METRICS
    text = json.dumps(record, indent=1, sort_keys=False) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))
    return path


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A metrics.json (or a folder holding one); RecipeError if unreadable or not ours."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RecipeError(f"{path}: cannot read ({type(error).__name__}: {error})") from None
    if not isinstance(record, dict) or not {"model", "doconv", "epochs"} <= set(record):
        raise RecipeError(f"{path}: not a recipe metrics.json")
    record["path"] = str(path)
    return record


# ------------------------------------------------------------------------ statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for one value)."""
    if not values:
        raise ValueError("values: expected at least one")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    # Lentz's method for the incomplete beta's continued fraction (converges for
    # x < (a + 1) / (a + b + 2); the caller uses the symmetry otherwise).
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                          -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@dataclasses.dataclass(frozen=True)
class TTest:
    t: float
    df: float
    p: float  # two-sided


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> TTest:
    """Welch's unequal-variance t-test of mean(a) != mean(b), two-sided."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"each sample needs at least 2 values, got {len(a)} and {len(b)}")
    (mean_a, sd_a), (mean_b, sd_b) = mean_std(a), mean_std(b)
    va, vb = sd_a ** 2 / len(a), sd_b ** 2 / len(b)
    if va + vb == 0.0:  # both constant: the means are equal or certainly differ
        same = mean_a == mean_b
        return TTest(0.0 if same else math.copysign(math.inf, mean_a - mean_b),
                     float(len(a) + len(b) - 2), 1.0 if same else 0.0)
    t = (mean_a - mean_b) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    p = regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return TTest(t, df, min(1.0, p))
