"""Train a classifier with or without DO-Conv in Gluon (MXNet), data-parallel over N devices.

    python samples/train_gluoncv.py --model cifar_resnet20_v1 --data fashion-mnist --epochs 3 \\
        --doconv --output runs/r20-gluon
    python samples/train_gluoncv.py --model resnet18_v1b --data /data/imagenet --devices 4 \\
        --batch-size 64 --doconv --output runs/r18-gluon
    ... --resume                     # continue DIR/checkpoint.json up to --epochs

GluonCV's training practice with DO-Conv as the one change: ``--model`` is a
``gluoncv.model_zoo`` name (built with ``get_model(name, classes=..., pretrained=False)``) or
``package.module:callable`` called with ``num_classes=`` and returning a HybridBlock;
``--doconv`` converts it with ``doconv_mx.convert`` after initialisation. The net is
hybridized and trained by a ``gluon.Trainer`` whose kvstore sums the gradients of the
``--devices`` contexts (GPUs where present, else CPU contexts), each batch split over them.
Outputs in ``--output``: checkpoint.json with its .params and .states (every epoch),
metrics.json (the schema of samples/recipe.py, shared with the other recipes), and the fused
net exported as fused-symbol.json + fused-0000.params, which ``gluon.SymbolBlock.imports``
loads without doconv.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, os.getcwd())  # --model package.module:callable from where it is run

# Before MXNet loads: operators with a non-deterministic variant pick the deterministic one.
os.environ.setdefault("MXNET_ENFORCE_DETERMINISM", "1")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402

import doconv_mx  # noqa: E402
from samples import recipe  # noqa: E402
from samples.common import ProgressBar, _positive  # noqa: E402
from samples.datasets import DATASET_NAMES, DatasetError, load_dataset  # noqa: E402
from samples.recipe import RecipeError  # noqa: E402

PROG = "train_gluoncv.py"
CHECKPOINT = "checkpoint.json"  # names the .params and .states files of the same epoch
CHECKPOINT_FORMAT = "doconv-recipe-checkpoint-gluon"
CHECKPOINT_VERSION = 1
FUSED_PREFIX = "fused"  # fused-symbol.json, fused-0000.params
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IDX_MEAN_STD = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}  # as train_pt.py
EXAMPLE_MODELS = ("cifar_resnet20_v1", "cifar_resnet56_v1", "resnet18_v1b", "resnet50_v1b",
                  "mobilenetv2_1.0")
EXIT_USER_ERROR = 2
EXIT_FUSED_DIFFER = 1


class ImageReadError(RecipeError):
    """An image that cannot be decoded; found while training, it ends the run in one line."""


class Stopped(Exception):
    """SIGTERM or SIGINT arrived."""


_received_signal: int | None = None


def _note_signal(signum: int, frame: Any) -> None:
    global _received_signal
    _received_signal = signum


# ----------------------------------------------------------------------- command line


HELP = {
    "model": f"a gluoncv.model_zoo name (e.g. {', '.join(EXAMPLE_MODELS)}; "
             "pretrained=False) or package.module:callable, called with num_classes= and "
             "returning a HybridBlock with Gluon's native convs",
    "batch_size": "per device (default: %(default)s)",
    "workers": "data-loading threads; 0: load in the training loop (default: %(default)s)",
    "amp": "not available (an error): the Gluon recipe trains in float32",
    "sync_bn": "not available (an error): BatchNorm statistics are per device, device 0's "
               "copied to the others every epoch",
    "output": f"{CHECKPOINT} + .params + .states (every epoch), {recipe.METRICS}, "
              f"{FUSED_PREFIX}-symbol.json + {FUSED_PREFIX}-0000.params",
    "resume": f"continue from DIR/{CHECKPOINT} up to --epochs (same flags and --devices)",
    "onnx": "not available (an error): mx.onnx.export_model converts the exported fused "
            "model",
}


def parser() -> argparse.ArgumentParser:
    result = recipe.recipe_parser(PROG, __doc__.split("\n\n")[0], HELP)
    result.add_argument("--devices", type=_positive, default=1, metavar="N",
                        help="data-parallel on N devices: GPUs where present, else N CPU "
                             "contexts (default: %(default)s)")
    return result


def check_gluon_args(args: argparse.Namespace) -> None:
    """The shared flags Gluon does not honour: a one-line error rather than ignoring them."""
    recipe.check_args(args, checkpoint=CHECKPOINT)
    if args.amp:
        raise RecipeError("--amp: the Gluon recipe trains in float32 only")
    if args.sync_bn:
        raise RecipeError("--sync-bn: not available in the Gluon recipe (BatchNorm statistics "
                          "are per device; device 0's are copied to the others every epoch)")
    if args.onnx:
        raise RecipeError("--onnx: the Gluon recipe exports MXNet's symbol + params "
                          "(fused-symbol.json, fused-0000.params); mx.onnx.export_model "
                          "converts them where the onnx package is installed")


def contexts(count: int) -> list[mx.Context]:
    """``count`` GPUs where there is a GPU, else ``count`` CPU contexts."""
    gpus = mx.context.num_gpus()
    if gpus:
        if count > gpus:
            raise RecipeError(f"--devices {count}: only {gpus} GPU(s) here")
        return [mx.gpu(i) for i in range(count)]
    return [mx.cpu(i) for i in range(count)]


# ------------------------------------------------------------------------------ model


def resolve_model(name: str) -> Callable[[int], gluon.HybridBlock]:
    """A builder of ``num_classes`` for ``--model``: a model-zoo name or an import path."""
    if ":" in name:
        target = _import_callable(name)
        return lambda num_classes: target(num_classes=num_classes)
    from gluoncv import model_zoo

    names = model_zoo.get_model_list()
    if name.lower() not in names:
        import difflib

        close = ([known for known in names if name.lower() in known][:3]
                 or difflib.get_close_matches(name.lower(), names, n=3))
        raise RecipeError(f"--model {name!r}: not a gluoncv.model_zoo name ("
                          + (f"close: {', '.join(close)}" if close else
                             f"e.g. {', '.join(EXAMPLE_MODELS)}")
                          + ") and not an import path package.module:callable")
    return lambda num_classes: model_zoo.get_model(name, classes=num_classes, pretrained=False)


def _import_callable(name: str) -> Callable[..., Any]:
    return recipe.import_callable(name, _brief)


def build_model(name: str, builder: Callable[[int], Any], num_classes: int, use_doconv: bool,
                ctx: Sequence[mx.Context], input_shape: tuple[int, ...],
                seed: int) -> gluon.HybridBlock:
    """The net, initialised (seeded, MSRAPrelu as GluonCV's ImageNet recipe) on ``ctx``,
    converted to DO-Conv with ``use_doconv``, hybridized."""
    mx.random.seed(seed)
    np.random.seed(seed)
    try:
        net = builder(num_classes)
    except Exception as error:  # noqa: BLE001
        raise RecipeError(f"--model {name}: building it with num_classes={num_classes} failed "
                          f"({_brief(error)})") from None
    if not isinstance(net, gluon.HybridBlock):
        raise RecipeError(f"--model {name} returned a {type(net).__name__}, not a "
                          "mxnet.gluon.HybridBlock")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a builder that initialised its own parameters
        net.initialize(mx.init.MSRAPrelu(), ctx=list(ctx))
    try:
        net(mx.nd.zeros(input_shape, ctx=ctx[0]))  # shapes that wait for the first input
    except Exception as error:  # noqa: BLE001 - the model's code, or MXNet on its graph
        raise RecipeError(f"--model {name}: a forward pass of a {input_shape} batch failed "
                          f"({_brief(error)})") from None
    if use_doconv:
        try:
            net = doconv_mx.convert(net)
        except ValueError as error:
            raise RecipeError(f"--model {name} --doconv: {_brief(error)}") from None
    net.hybridize()
    return net


def _brief(error: BaseException) -> str:
    # MXNet's errors carry the C++ source location before the message and a stack trace
    # after it: keep the message.
    text = str(error).split("Stack trace:")[0].rsplit("MXNetError: ", 1)[-1]
    text = " ".join(text.split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


# ------------------------------------------------------------------------------- data


class FolderImages(gluon.data.vision.ImageFolderDataset):
    """An ImageNet-layout folder's images: Gluon's ImageFolderDataset listed by
    ``recipe.scan_image_folder`` and decoded with Pillow to RGB (grayscale replicated), so
    that every recipe sees the same files and pixels and a damaged file is an error.
    Training: a random-resized crop and a horizontal flip drawn from a seed of (seed, epoch,
    image index) alone, so that neither the loading thread nor a resume changes them
    (Gluon's RandomResizedCrop draws from Python's process-wide ``random``); validation:
    Resize (shorter side) and CenterCrop. Then ToTensor and Normalize. The loader's
    threads call it at once, so its transforms are operator calls, not Gluon blocks: a
    block builds its graph in a name scope that is not thread-safe (``_to_input``)."""

    def __init__(self, items: Sequence[tuple[Path, int]], classes: Sequence[str], root: Path,
                 *, train: bool, crop: int, resize: int, seed: int) -> None:
        self._given = [(str(path), label) for path, label in items]
        self._classes = list(classes)
        self.train, self.crop, self.resize, self.seed = train, crop, resize, seed
        self.epoch = 0  # set before each epoch's DataLoader starts
        super().__init__(str(root), flag=1)

    def _list_images(self, root: str) -> None:  # ImageFolderDataset's own scan, replaced
        self.synsets, self.items = self._classes, self._given

    def __getitem__(self, index: int) -> tuple[mx.nd.NDArray, int]:
        from PIL import Image  # only image folders need Pillow (``requirements``)

        path, label = self.items[index]
        try:  # Pillow, not OpenCV's imread, which fills a truncated JPEG with gray silently
            with Image.open(path) as opened:
                pixels = np.asarray(opened.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ImageReadError(f"cannot read image {path} ({_brief(error)})") from None
        image = mx.nd.array(pixels, dtype=np.uint8)
        if self.train:
            rng = np.random.default_rng(recipe.sample_seed(self.seed, self.epoch, index))
            height, width = image.shape[:2]
            left, top, right, bottom = recipe.random_resized_crop_box(width, height, rng)
            image = mx.image.fixed_crop(image, left, top, right - left, bottom - top,
                                        size=(self.crop, self.crop), interp=1)
            if rng.random() < 0.5:
                image = mx.nd.flip(image, axis=1)
        else:
            image = _resize_center_crop(image, self.resize, self.crop)
        return _to_input(image), label


def _resize_center_crop(image: mx.nd.NDArray, resize: int, crop: int) -> mx.nd.NDArray:
    """Gluon's ``Resize(resize, keep_ratio=True)`` then ``CenterCrop(crop)``: their
    operators, bilinear."""
    image = mx.nd.image.resize(image, resize, True, 1)
    return mx.image.center_crop(image, (crop, crop), 1)[0]


def _to_input(image: mx.nd.NDArray) -> mx.nd.NDArray:
    """Gluon's ``ToTensor`` then ``Normalize`` (ImageNet's mean and std): their operators.
    As hybridized blocks, loader threads building their graph at once failed at random
    (``block.name_scope()``: 'NoneType' object has no attribute '__exit__')."""
    return mx.nd.image.normalize(mx.nd.image.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


class IdxImages(gluon.data.Dataset):
    """MNIST-style 28x28 uint8 images, normalised and replicated to 3 channels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        pixels = (self.images[index].astype(np.float32) / 255 - self.mean) / self.std
        return np.repeat(pixels[None], 3, axis=0), int(self.labels[index])


@dataclasses.dataclass
class Data:
    train: Any
    val: Any
    val_labels: np.ndarray
    num_classes: int
    input_size: int  # the training crop (the model is initialised with it)
    description: str


def _evenly(count: int, limit: int | None) -> np.ndarray:
    """``limit`` indices spread over ``count`` (every class of a class-sorted folder), or
    all; the same subset as train_pt.py's --limit."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


def check_images(items: Sequence[tuple[Path, int]]) -> None:
    """RecipeError naming the first file Pillow cannot identify or verify."""
    from PIL import Image

    for path, _ in items:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise RecipeError(f"--data: cannot read image {path} ({_brief(error)})") from None


def load_data(args: argparse.Namespace) -> Data:
    if args.data in DATASET_NAMES:
        stream = io.StringIO() if args.quiet else sys.stderr
        try:
            with contextlib.redirect_stderr(stream):
                data = load_dataset(args.data, None, download=False, verbose=not args.quiet)
        except DatasetError as error:
            raise RecipeError(f"--data {args.data}: {error}") from None
        mean, std = IDX_MEAN_STD[args.data]
        train_index = _evenly(len(data.x_train), args.limit)
        val_index = _evenly(len(data.x_test), args.limit)
        x_val, y_val = data.x_test[val_index], data.y_test[val_index]
        return Data(IdxImages(data.x_train[train_index], data.y_train[train_index], mean, std),
                    IdxImages(x_val, y_val, mean, std), np.asarray(y_val, dtype=np.int64), 10,
                    int(data.x_train.shape[-1]), f"{args.data} from {data.source}")
    folder = recipe.scan_image_folder(args.data)
    train = [folder.train[i] for i in _evenly(len(folder.train), args.limit)]
    val = [folder.val[i] for i in _evenly(len(folder.val), args.limit)]
    check_images(train + val)
    return Data(FolderImages(train, folder.classes, folder.root / "train", train=True,
                             crop=args.train_crop_size, resize=args.train_crop_size,
                             seed=args.seed),
                FolderImages(val, folder.classes, folder.root / "val", train=False,
                             crop=args.val_crop_size, resize=args.val_resize_size,
                             seed=args.seed),
                np.array([label for _, label in val], dtype=np.int64), len(folder.classes),
                args.train_crop_size, f"{folder.root} ({len(folder.classes)} classes)")


class _Batches(gluon.data.Sampler):
    """A fixed list of batches of indices, as DataLoader's batch_sampler."""

    def __init__(self, batches: Sequence[Sequence[int]]) -> None:
        self._batches = [list(batch) for batch in batches]

    def __iter__(self):
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def loader(dataset: Any, batches: Sequence[Sequence[int]], workers: int) -> gluon.data.DataLoader:
    # Threads, not processes: decoding and resizing are MXNet operators, which run outside
    # the GIL, and a thread cannot die of the SIGTERM a scheduler sends the process group
    # (a dead worker process leaves the loader waiting for its 120 s timeout).
    return gluon.data.DataLoader(dataset, batch_sampler=_Batches(batches), num_workers=workers,
                                 thread_pool=True)


# ------------------------------------------------------------------------- schedule


class RecipeSchedule(mx.lr_scheduler.LRScheduler):
    """``recipe.lr_factor`` per step, as train_pt.py's LambdaLR (GluonCV's LRScheduler ends
    its cosine at the last step and starts its linear warm-up at its base rate, so it
    cannot follow the shared --lr-schedule exactly). The optimizer calls it with the number
    of the update it is making, 1 for the first."""

    def __init__(self, args: argparse.Namespace, steps_per_epoch: int) -> None:
        super().__init__(base_lr=args.lr)
        self.epochs, self.schedule = args.epochs, args.lr_schedule
        self.warmup, self.step_size, self.gamma = (args.warmup_epochs, args.lr_step_size,
                                                   args.lr_gamma)
        self.steps_per_epoch = steps_per_epoch

    def __call__(self, num_update: int) -> float:
        step = max(num_update - 1, 0)
        return self.base_lr * recipe.lr_factor(step / self.steps_per_epoch, self.epochs,
                                               self.schedule, self.warmup, self.step_size,
                                               self.gamma, self.steps_per_epoch)


# ------------------------------------------------------------------------- checkpoint


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(output: Path, args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """The checkpoint ``--resume`` continues, checked against this run (RecipeError); its
    .params and .states must be the ones it names, byte for byte (SHA-256)."""
    path = output / CHECKPOINT
    if not path.is_file():
        raise RecipeError(f"--resume: no checkpoint at {path}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RecipeError(f"--resume: cannot read {path} ({_brief(error)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise RecipeError(f"--resume: {path} is not a checkpoint of this recipe")
    recipe.check_resume_record(manifest, args, f"--resume: {path}", world_size, "device(s)")
    for part in ("params", "states"):
        entry = manifest.get(part)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                or Path(entry["file"]).name != entry["file"]:
            raise RecipeError(f"--resume: {path} names no {part} file")
        file = output / entry["file"]
        if not file.is_file():
            raise RecipeError(f"--resume: {file}, named by {path}, is missing")
        if _sha256(file) != entry.get("sha256"):
            raise RecipeError(f"--resume: {file} is not the file {path} was written with "
                              "(its SHA-256 differs)")
    return manifest


def _write_file(path: Path, save: Callable[[str], None]) -> None:
    """``save(temporary path)`` beside ``path``, synced, renamed over ``path``."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save(temporary)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_checkpoint(output: Path, run: Run, manifest: dict[str, Any]) -> None:
    """This epoch's .params and .states under names of their own, then checkpoint.json
    naming them (the atomic switch), then the previous epoch's files removed: a crash at
    any point leaves a checkpoint.json whose files are complete and its own."""
    epoch = manifest["epoch"]
    files = {"params": output / f"checkpoint-epoch{epoch:04d}.params",
             "states": output / f"checkpoint-epoch{epoch:04d}.states"}
    _write_file(files["params"], run.net.save_parameters)
    states = optimizer_states(run.trainer)
    _write_file(files["states"], lambda temporary: mx.nd.save(temporary, states))
    for part, file in files.items():
        manifest[part] = {"file": file.name, "sha256": _sha256(file)}
    text = json.dumps(manifest, indent=1) + "\n"
    recipe.atomic_write(output / CHECKPOINT, lambda handle: handle.write(text.encode()))
    for stale in output.glob("checkpoint-epoch*.*"):
        if stale.name not in {file.name for file in files.values()}:
            stale.unlink(missing_ok=True)


def optimizer_states(trainer: gluon.Trainer) -> dict[str, mx.nd.NDArray]:
    """Device 0's momentum per parameter index, as NDArrays (mx.nd.save's format: loading
    runs no code, unlike Trainer.save_states's pickle). The devices' states are equal."""
    states = {}
    for index, state in trainer._updaters[0].states.items():
        if state is not None:
            if not isinstance(state, mx.nd.NDArray):
                raise RecipeError("the optimizer keeps states other than one array per "
                                  "parameter; the checkpoint cannot hold them")
            states[str(index)] = state.as_in_context(mx.cpu())
    return states


def restore_optimizer_states(trainer: gluon.Trainer, path: Path) -> None:
    try:
        saved = mx.nd.load(str(path))
    except mx.base.MXNetError as error:
        raise RecipeError(f"--resume: cannot read {path} ({_brief(error)})") from None
    if isinstance(saved, list) and not saved:  # no momentum (--momentum 0): saved as {}
        saved = {}
    if not isinstance(saved, dict):
        raise RecipeError(f"--resume: {path} holds no optimizer states of this recipe")
    params = trainer._params
    for key, array in saved.items():
        index = int(key) if key.isdigit() else -1
        if not 0 <= index < len(params) or array.shape != params[index].shape:
            raise RecipeError(f"--resume: {path} does not fit --model (state {key!r})")
    for updater, ctx in zip(trainer._updaters, trainer._contexts):
        updater.states = {int(key): array.copyto(ctx) for key, array in saved.items()}
        updater.states_synced = dict.fromkeys(updater.states, True)


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    ctx: list[mx.Context]
    data: Data
    builder: Callable[[int], Any]
    net: gluon.HybridBlock
    trainer: gluon.Trainer
    loss: gluon.loss.Loss
    steps_per_epoch: int


def make_run(args: argparse.Namespace, ctx: list[mx.Context], data: Data,
             builder: Callable[[int], Any], net: gluon.HybridBlock,
             manifest: dict[str, Any] | None) -> Run:
    steps_per_epoch = math.ceil(len(data.train) / (args.batch_size * len(ctx)))
    done = manifest["epoch"] * steps_per_epoch if manifest else 0
    optimizer = mx.optimizer.SGD(learning_rate=args.lr, momentum=args.momentum, wd=args.wd,
                                 lr_scheduler=RecipeSchedule(args, steps_per_epoch),
                                 begin_num_update=done)
    # update_on_kvstore=False: the kvstore sums the gradients, each device's updater applies
    # them, so the momentum lives in the Trainer's updaters, where the checkpoint finds it.
    trainer = gluon.Trainer(net.collect_params(), optimizer, kvstore="device",
                            update_on_kvstore=False)
    if manifest is not None:
        restore_optimizer_states(trainer, args.output / manifest["states"]["file"])
    loss = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=args.label_smoothing == 0)
    return Run(args, ctx, data, builder, net, trainer, loss, steps_per_epoch)


def _targets(run: Run, labels: mx.nd.NDArray) -> mx.nd.NDArray:
    smoothing = run.args.label_smoothing
    if not smoothing:
        return labels
    classes = run.data.num_classes  # (1 - e) one-hot + e / classes, as PyTorch's
    return mx.nd.one_hot(labels, classes, on_value=1 - smoothing + smoothing / classes,
                         off_value=smoothing / classes)


def train_epoch(run: Run, epoch: int) -> float:
    """One epoch; the mean training loss. Stopped on a signal between steps."""
    args, ctx = run.args, run.ctx
    global_batch = args.batch_size * len(ctx)
    order = recipe.epoch_order(len(run.data.train), global_batch, args.seed, epoch)
    batches = [order[i:i + global_batch] for i in range(0, len(order), global_batch)]
    run.data.train.epoch = epoch
    mx.random.seed(recipe.process_seed(args.seed, epoch, 0))  # dropout: as uninterrupted
    bar = ProgressBar(len(batches), f"epoch {epoch + 1}/{args.epochs}", enabled=not args.quiet)
    loss_sum, count = 0.0, 0
    with contextlib.closing(bar):
        for step, (x, y) in enumerate(loader(run.data.train, batches, args.workers), 1):
            if _received_signal is not None:
                raise Stopped
            xs = gluon.utils.split_and_load(x, ctx, even_split=True)
            ys = gluon.utils.split_and_load(y, ctx, even_split=True)
            with autograd.record():
                losses = [run.loss(run.net(xi), _targets(run, yi)) for xi, yi in zip(xs, ys)]
            autograd.backward(losses)
            run.trainer.step(x.shape[0])
            loss_sum += sum(float(part.asnumpy().astype(np.float64).sum()) for part in losses)
            count += x.shape[0]
            bar.update(step)
    if _received_signal is not None:
        raise Stopped
    return loss_sum / count


def sync_statistics(net: gluon.Block, ctx: Sequence[mx.Context]) -> None:
    """Give every device device 0's BatchNorm statistics (the parameters without gradient),
    which the checkpoint holds: each device has updated its own on its own slices."""
    for param in net.collect_params().values():
        if param.grad_req == "null" and len(ctx) > 1:
            source = param.data(ctx[0])
            for other in ctx[1:]:
                source.copyto(param.data(other))
    mx.nd.waitall()


def predict(net: gluon.Block, run: Run) -> np.ndarray:
    """Every validation image's predicted class, in order, the batches split over the
    devices."""
    ctx, size = run.ctx, run.args.batch_size * len(run.ctx)
    count = len(run.data.val)
    batches = [list(range(i, min(i + size, count))) for i in range(0, count, size)]
    predicted = []
    for x, _ in loader(run.data.val, batches, run.args.workers):
        parts = gluon.utils.split_and_load(x, ctx[:min(len(ctx), x.shape[0])],
                                           even_split=False)
        predicted += [net(part).argmax(axis=1).asnumpy().astype(np.int64) for part in parts]
    return np.concatenate(predicted)


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(predicted == labels))


def export_fused(run: Run) -> tuple[np.ndarray | None, dict[str, str]]:
    """The fused net exported as fused-symbol.json + fused-0000.params, reloaded with
    SymbolBlock.imports (as a deployment would) and its validation predictions (None
    without --doconv: nothing was fused). The files are written under temporary names and
    renamed once the reload has worked."""
    output = run.args.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fuse() warns when there is nothing to fuse
        fused = doconv_mx.fuse(run.net)
    fused.hybridize()
    x, _ = next(iter(loader(run.data.val, [[0]], 0)))
    fused(x.as_in_context(run.ctx[0]))  # builds the graph export() writes
    temporary = output / f".{FUSED_PREFIX}-{os.getpid()}"
    names = {"symbol": f"{FUSED_PREFIX}-symbol.json", "params": f"{FUSED_PREFIX}-0000.params"}
    written = {"symbol": Path(f"{temporary}-symbol.json"),
               "params": Path(f"{temporary}-0000.params")}
    try:
        fused.export(str(temporary))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it cannot infer the input's type: harmless
            deployed = gluon.SymbolBlock.imports(str(written["symbol"]), ["data"],
                                                 str(written["params"]), ctx=run.ctx)
        predicted = predict(deployed, run) if run.args.doconv else None
        for part in ("params", "symbol"):
            with open(written[part], "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(written[part], output / names[part])
    finally:
        for file in written.values():
            file.unlink(missing_ok=True)
    return predicted, names


def metrics(run: Run, epochs_done: list[dict[str, Any]], **final: Any) -> dict[str, Any]:
    settings = {**recipe.resume_settings(run.args), "epochs": run.args.epochs,
                "workers": run.args.workers, "devices": len(run.ctx)}
    return recipe.metrics_record(framework="gluon", world_size=len(run.ctx),
                                 model=run.args.model, doconv=run.args.doconv,
                                 settings=settings, epochs=epochs_done,
                                 device=run.ctx[0].device_type,
                                 threads=_omp_threads(),
                                 mxnet_version=mx.__version__,
                                 gluoncv_version=_gluoncv_version(),
                                 data=run.data.description, **final)


def _gluoncv_version() -> str | None:
    """GluonCV's version where it is installed (``--model package.module:callable`` trains
    without it)."""
    try:
        import gluoncv
    except ImportError:
        return None
    return gluoncv.__version__


def _omp_threads() -> int | None:
    """OMP_NUM_THREADS when set to a number (MXNet's operators then use that many)."""
    text = os.environ.get("OMP_NUM_THREADS", "")
    return int(text) if text.isdigit() else None


def train(run: Run, manifest: dict[str, Any] | None) -> int:
    args, output = run.args, run.args.output
    epochs_done: list[dict[str, Any]] = list(manifest["metrics_epochs"]) if manifest else []
    first = manifest["epoch"] if manifest else 0
    print(f"{PROG}: {args.model}{' with DO-Conv' if args.doconv else ''} on "
          f"{len(run.ctx)} {run.ctx[0].device_type} device(s); {run.data.description}: "
          f"{len(run.data.train)} training / {len(run.data.val)} validation images"
          + (f"; resumed after epoch {first}" if manifest else ""), flush=True)
    predicted = None
    for epoch in range(first, args.epochs):
        start = time.perf_counter()
        try:
            train_loss = train_epoch(run, epoch)
        except Stopped:
            return _stopped(run)
        except ImageReadError as error:
            fail(str(error), 1)
        sync_statistics(run.net, run.ctx)
        predicted = predict(run.net, run)
        entry = {"epoch": epoch + 1, "train_loss": train_loss,
                 "val_accuracy": accuracy(predicted, run.data.val_labels),
                 "seconds": time.perf_counter() - start}
        epochs_done.append(entry)
        save_checkpoint(output, run, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch + 1,
            "model_name": args.model, "doconv": args.doconv, "world_size": len(run.ctx),
            "settings": recipe.resume_settings(args), "metrics_epochs": epochs_done,
            "mxnet_version": mx.__version__})
        recipe.write_metrics(output, metrics(run, epochs_done))
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, "
              f"val accuracy {entry['val_accuracy']:.2f}%, {entry['seconds']:.1f} s", flush=True)
        if _received_signal is not None:
            return _stopped(run)
    if predicted is None:  # resumed at the end: nothing trained in this process
        predicted = predict(run.net, run)
    val_accuracy = accuracy(predicted, run.data.val_labels)
    fused_predicted, _ = export_fused(run)
    if fused_predicted is None:
        fused_predicted = predicted
    fused_accuracy = accuracy(fused_predicted, run.data.val_labels)
    identical = bool(np.array_equal(fused_predicted, predicted))
    recipe.write_metrics(output, metrics(
        run, epochs_done, val_accuracy=val_accuracy,
        fused_val_accuracy=fused_accuracy if args.doconv else None,
        fused_identical_predictions=identical if args.doconv else None))
    print(f"val accuracy {val_accuracy:.2f}%"
          + (f"; fused {fused_accuracy:.2f}%, "
             f"{'identical' if identical else 'DIFFERENT'} predictions" if args.doconv else "")
          + f"; outputs in {output}", flush=True)
    if not identical:
        fail(f"the fused model's predictions differ from the trained model's on "
             f"{int(np.sum(fused_predicted != predicted))} validation images", EXIT_FUSED_DIFFER)
    return 0


def _stopped(run: Run) -> int:
    signum = _received_signal or signal.SIGTERM
    kept = ("the last completed epoch's checkpoint is kept (continue with --resume)"
            if (run.args.output / CHECKPOINT).is_file()
            else "no epoch had completed: no checkpoint")
    sys.stderr.write(f"{PROG}: stopped by {signal.Signals(signum).name}; {kept}\n")
    return 128 + signum


# ------------------------------------------------------------------------------- main


def fail(message: str, status: int = EXIT_USER_ERROR) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def requirements(args: argparse.Namespace) -> list[recipe.Requirement]:
    """The optional packages this run's flags need (pyproject.toml's extras)."""
    needs = []
    if ":" not in args.model:
        needs.append(recipe.Requirement("--model (a gluoncv.model_zoo name)", "gluoncv",
                                        "gluoncv", "mx"))
    if args.data not in DATASET_NAMES:
        needs.append(recipe.PILLOW)
    return needs


def prepare(args: argparse.Namespace) -> tuple[list[mx.Context], Data, Callable[[int], Any],
                                                gluon.HybridBlock, dict[str, Any] | None]:
    """Every check of the command line and the inputs, before anything is written: flags,
    devices, model name, data, checkpoint, then the model built and the checkpoint loaded."""
    check_gluon_args(args)
    recipe.check_requirements(requirements(args))
    ctx = contexts(args.devices)
    builder = resolve_model(args.model)
    data = load_data(args)
    manifest = load_manifest(args.output, args, len(ctx)) if args.resume else None
    net = build_model(args.model, builder, data.num_classes, args.doconv, ctx,
                      (1, 3, data.input_size, data.input_size), args.seed)
    if manifest is not None:
        path = args.output / manifest["params"]["file"]
        try:
            net.load_parameters(str(path), ctx=ctx)
        except (mx.base.MXNetError, AssertionError, ValueError, KeyError) as error:
            raise RecipeError(f"--resume: the checkpoint's weights do not fit --model "
                              f"{args.model} ({_brief(error)})") from None
    return ctx, data, builder, net, manifest


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        ctx, data, builder, net, manifest = prepare(args)
        args.output.mkdir(parents=True, exist_ok=True)
    except RecipeError as error:
        fail(str(error))
    except OSError as error:
        fail(f"--output {args.output}: {_brief(error)}")
    signal.signal(signal.SIGTERM, _note_signal)
    signal.signal(signal.SIGINT, _note_signal)
    return train(make_run(args, ctx, data, builder, net, manifest), manifest)


if __name__ == "__main__":
    sys.exit(main())
