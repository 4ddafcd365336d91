"""Train a classifier with or without DO-Conv, on one process or under torchrun (DDP).

    python samples/train_pt.py --model resnet20 --data fashion-mnist --epochs 3 --doconv \\
        --output runs/r20-doconv
    torchrun --nproc_per_node 2 samples/train_pt.py --model resnet18 --data /data/imagenet \\
        --batch-size 64 --doconv --output runs/r18-doconv
    ... --resume                     # continue DIR/checkpoint.pt up to --epochs

``--model`` is a built-in (samples/models_pt.py) or ``package.module:callable`` returning a
plain nn.Module; ``--doconv`` converts it with ``doconv_torch.convert`` before training and
the recipe is otherwise the same. The outputs in ``--output``: checkpoint.pt (every epoch),
metrics.json, fused.pt (the fused plain state_dict; it loads into the model built without
--doconv) and, with --onnx, fused.onnx. The flags, the folder checks and metrics.json are
shared with the other frameworks' recipes (samples/recipe.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, os.getcwd())  # --model package.module:callable from where it is run

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler  # noqa: E402

import doconv_torch  # noqa: E402
from samples import recipe  # noqa: E402
from samples.common import ProgressBar  # noqa: E402
from samples.datasets import DATASET_NAMES, DatasetError, load_dataset  # noqa: E402
from samples.models_pt import BUILTIN_MODELS  # noqa: E402
from samples.recipe import RecipeError  # noqa: E402

PROG = "train_pt.py"
CHECKPOINT_FORMAT = "doconv-recipe-checkpoint"
CHECKPOINT_VERSION = 1
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IDX_MEAN_STD = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
EXIT_USER_ERROR = 2
EXIT_FUSED_DIFFER = 1


class ImageReadError(RecipeError):
    """An image that Pillow cannot read; found while training, it ends the run in one line."""


class Stopped(Exception):
    """SIGTERM or SIGINT arrived; every rank stops at the same step."""


# ------------------------------------------------------------------------- processes


@dataclasses.dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def processes_from_env() -> Processes:
    """The rank, world size and local rank torchrun sets (one process without them)."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, str(default))
        try:
            values[name] = int(text)
        except ValueError:
            raise RecipeError(f"environment variable {name}={text!r} is not an integer") from None
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise RecipeError(f"RANK={values['RANK']} is not in 0..WORLD_SIZE-1 "
                          f"(WORLD_SIZE={values['WORLD_SIZE']})")
    device = (torch.device("cuda", values["LOCAL_RANK"]) if torch.cuda.is_available()
              else torch.device("cpu"))
    return Processes(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], device)


_received_signal: int | None = None


def _note_signal(signum: int, frame: Any) -> None:
    global _received_signal
    _received_signal = signum


def stop_requested(processes: Processes) -> bool:
    """Whether any rank has received SIGTERM or SIGINT (one small all-reduce per call, so
    that all ranks stop at the same step and none waits for a peer that has left)."""
    flag = _received_signal is not None
    if processes.distributed:
        tensor = torch.tensor([int(flag)], device=processes.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        flag = bool(tensor.item())
    return flag


# What a scheduler (SIGTERM) or a terminal (SIGINT) sends the whole process group.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _data_worker_init(worker_id: int) -> None:
    # A data-loading worker leaves the stop signals to its training process, which stops
    # cleanly at the next step and then ends its workers (``batches``); a worker killed
    # first would fail the step instead. It was started with them blocked (``batches``):
    # ignored from here on, one that arrived while it started is discarded.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # POSIX
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def _stop_signals_blocked():
    """The stop signals held back in this thread: a worker process started meanwhile
    inherits the mask, so a group signal cannot kill it in the seconds a spawned
    interpreter takes to reach ``_data_worker_init``; this process gets any on leaving."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX: no group signals to hold back
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def batches(data_loader: DataLoader):
    """Iterate ``data_loader``, its worker processes always shut down on leaving, also on
    an error: at interpreter exit multiprocessing would SIGTERM them, which they ignore."""
    with _stop_signals_blocked():  # iter() starts the workers
        iterator = iter(data_loader)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


# ------------------------------------------------------------------------------ model


def resolve_model(name: str) -> Callable[..., Any]:
    """The builder ``--model`` names: a built-in or ``package.module:callable``."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    if ":" not in name:
        raise RecipeError(f"--model {name!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}) "
                          "and not an import path package.module:callable")
    return recipe.import_callable(name, _brief)


def build_model(name: str, builder: Callable[..., Any], num_classes: int,
                use_doconv: bool) -> nn.Module:
    """``builder(num_classes=...)``, checked; converted to DO-Conv with ``use_doconv``."""
    try:
        model = builder(num_classes=num_classes)
    except Exception as error:  # noqa: BLE001
        raise RecipeError(f"--model {name}: calling it with num_classes={num_classes} failed "
                          f"({_brief(error)})") from None
    if not isinstance(model, nn.Module):
        raise RecipeError(f"--model {name} returned a {type(model).__name__}, not a "
                          "torch.nn.Module")
    if use_doconv:
        try:
            model = doconv_torch.convert(model)
        except ValueError as error:
            raise RecipeError(f"--model {name} --doconv: {_brief(error)}") from None
    return model


_brief = recipe.brief_error


# ------------------------------------------------------------------------------- data


def _normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (pixels - mean_t) / std_t


class FolderImages(Dataset):
    """Images of an ImageNet-layout folder, decoded with Pillow to RGB (grayscale
    replicated). Training: random-resized crop and horizontal flip, drawn from a seed
    derived from (seed, epoch, image index) alone; validation: resize and center crop."""

    def __init__(self, items: Sequence[tuple[Path, int]], *, train: bool, crop: int,
                 resize: int, seed: int) -> None:
        self.items, self.train, self.crop, self.resize, self.seed = items, train, crop, resize, seed
        self.epoch = 0  # set before each epoch's DataLoader starts its workers

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image  # only image folders need Pillow (``requirements``)

        path, label = self.items[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise ImageReadError(f"cannot read image {path} ({_brief(error)})") from None
        if self.train:
            rng = np.random.default_rng(recipe.sample_seed(self.seed, self.epoch, index))
            box = recipe.random_resized_crop_box(image.width, image.height, rng)
            image = image.resize((self.crop, self.crop), Image.BILINEAR, box=box)
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            scale = self.resize / min(image.width, image.height)
            size = (max(self.resize, round(image.width * scale)),
                    max(self.resize, round(image.height * scale)))
            image = image.resize(size, Image.BILINEAR)
            left, top = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        return _normalise(pixels.float().div_(255), IMAGENET_MEAN, IMAGENET_STD), label


class IdxImages(Dataset):
    """MNIST-style 28x28 uint8 images, normalised and replicated to 3 channels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> None:
        self.images, self.labels, self.mean, self.std = images, labels, mean, std
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = torch.from_numpy(self.images[index]).float().div_(255)
        return ((pixels - self.mean) / self.std).expand(3, -1, -1), int(self.labels[index])


@dataclasses.dataclass
class Data:
    train: Dataset
    val: Dataset
    val_labels: np.ndarray
    num_classes: int
    description: str


def _evenly(count: int, limit: int | None) -> np.ndarray:
    """Indices of ``limit`` items spread over ``count`` (a class-sorted folder keeps every
    class), or all."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))


def check_images(items: Sequence[tuple[Path, int]]) -> None:
    """RecipeError naming the first file Pillow cannot identify or verify (headers and
    checksums; a decode error found later while training also ends the run in one line)."""
    from PIL import Image

    for path, _ in items:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise RecipeError(f"--data: cannot read image {path} ({_brief(error)})") from None


def load_data(args: argparse.Namespace, quiet: bool) -> Data:
    if args.data in DATASET_NAMES:
        # Offline: no download; mnist falls back to the committed subset (with a notice).
        stream = io.StringIO() if quiet else sys.stderr
        try:
            with contextlib.redirect_stderr(stream):
                data = load_dataset(args.data, None, download=False, verbose=not quiet)
        except DatasetError as error:
            raise RecipeError(f"--data {args.data}: {error}") from None
        mean, std = IDX_MEAN_STD[args.data]
        train_index, val_index = (_evenly(len(data.x_train), args.limit),
                                  _evenly(len(data.x_test), args.limit))
        x_val, y_val = data.x_test[val_index], data.y_test[val_index]
        return Data(IdxImages(data.x_train[train_index], data.y_train[train_index], mean, std),
                    IdxImages(x_val, y_val, mean, std), np.asarray(y_val), 10,
                    f"{args.data} from {data.source}")
    folder = recipe.scan_image_folder(args.data)
    train = [folder.train[i] for i in _evenly(len(folder.train), args.limit)]
    val = [folder.val[i] for i in _evenly(len(folder.val), args.limit)]
    check_images(train + val)
    return Data(FolderImages(train, train=True, crop=args.train_crop_size,
                             resize=args.train_crop_size, seed=args.seed),
                FolderImages(val, train=False, crop=args.val_crop_size,
                             resize=args.val_resize_size, seed=args.seed),
                np.array([label for _, label in val]), len(folder.classes),
                f"{folder.root} ({len(folder.classes)} classes)")


# ------------------------------------------------------------------------- checkpoint


def load_checkpoint(path: Path, args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """The checkpoint ``--resume`` continues, checked against this run (RecipeError)."""
    if not path.is_file():
        raise RecipeError(f"--resume: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling errors have many types
        raise RecipeError(f"--resume: cannot read {path} ({_brief(error)})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise RecipeError(f"--resume: {path} is not a checkpoint of this recipe")
    recipe.check_resume_record(checkpoint, args, f"--resume: {path}", world_size,
                               "process(es)")
    return checkpoint


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    recipe.atomic_write(path, lambda handle: torch.save(state, handle))


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
    """Everything one process trains with."""

    args: argparse.Namespace
    processes: Processes
    data: Data
    builder: Callable[..., Any]
    model: nn.Module  # unwrapped
    trained: nn.Module  # what the steps call: DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module


def make_sampler(dataset: Dataset, processes: Processes, shuffle: bool, seed: int
                 ) -> DistributedSampler:
    return DistributedSampler(dataset, num_replicas=processes.world_size, rank=processes.rank,
                              shuffle=shuffle, seed=seed, drop_last=False)


def loader(run: Run, dataset: Dataset, sampler: DistributedSampler, epoch: int) -> DataLoader:
    # A fresh loader per epoch, its generator seeded from (seed, epoch): nothing about an
    # epoch depends on how many epochs this process ran before.
    generator = torch.Generator().manual_seed(recipe.process_seed(run.args.seed, epoch, 0))
    # Workers start with spawn, not fork: a child forked while the parent's OpenMP, gloo or
    # other threads hold a lock can wait on it forever (seen here under torchrun: a data
    # worker stuck in a futex before its first batch, its rank waiting for it).
    context = "spawn" if run.args.workers > 0 else None
    return DataLoader(dataset, batch_size=run.args.batch_size, sampler=sampler,
                      num_workers=run.args.workers, worker_init_fn=_data_worker_init,
                      generator=generator, pin_memory=run.processes.device.type == "cuda",
                      multiprocessing_context=context)


def autocast(run: Run):
    if not run.args.amp:
        return contextlib.nullcontext()
    if run.processes.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def train_epoch(run: Run, epoch: int) -> float:
    """One epoch; the mean training loss over all ranks' samples. Stopped on a signal."""
    args, processes = run.args, run.processes
    sampler = make_sampler(run.data.train, processes, shuffle=True, seed=args.seed)
    sampler.set_epoch(epoch)
    run.data.train.epoch = epoch
    torch.manual_seed(recipe.process_seed(args.seed, epoch, processes.rank))  # dropout etc.
    data_loader = loader(run, run.data.train, sampler, epoch)
    run.trained.train()
    bar = ProgressBar(len(data_loader), f"epoch {epoch + 1}/{args.epochs}",
                      enabled=processes.is_main and not args.quiet)
    loss_sum = torch.zeros((), dtype=torch.float64, device=processes.device)
    count = 0
    with batches(data_loader) as iterator, contextlib.closing(bar):
        for step, (x, y) in enumerate(iterator, 1):
            if stop_requested(processes):
                raise Stopped
            x, y = x.to(processes.device, non_blocking=True), y.to(processes.device)
            with autocast(run):
                loss = run.criterion(run.trained(x), y)
            run.optimizer.zero_grad(set_to_none=True)
            if run.scaler is not None:
                run.scaler.scale(loss).backward()
                run.scaler.step(run.optimizer)
                run.scaler.update()
            else:
                loss.backward()
                run.optimizer.step()
            run.scheduler.step()
            loss_sum += loss.detach().double() * len(y)
            count += len(y)
            bar.update(step)
    totals = torch.stack([loss_sum, torch.tensor(float(count), dtype=torch.float64,
                                                 device=processes.device)])
    if processes.distributed:
        dist.all_reduce(totals)
    return float(totals[0] / totals[1])


def sync_buffers(model: nn.Module, processes: Processes) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), which the checkpoint
    holds: each rank has updated its own on its own batches since DDP last broadcast."""
    if processes.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def predict(model: nn.Module, run: Run) -> np.ndarray:
    """Every validation image's predicted class, each counted once, on every rank.

    The sampler pads the ranks to equal length by repeating the first images; position j
    of rank r is global position r + j * world_size, and positions past the data set's
    length are that padding.
    """
    processes = run.processes
    sampler = make_sampler(run.data.val, processes, shuffle=False, seed=0)
    indices = torch.tensor(list(iter(sampler)), dtype=torch.int64)
    model.eval()
    predicted = []
    with torch.no_grad(), batches(loader(run, run.data.val, sampler, 0)) as iterator:
        for x, _ in iterator:
            predicted.append(model(x.to(processes.device)).argmax(dim=1).cpu())
    local = torch.cat(predicted) if predicted else torch.zeros(0, dtype=torch.int64)
    total = len(run.data.val)
    result = np.full(total, -1, dtype=np.int64)
    if processes.distributed:
        mine = torch.stack([indices, local]).to(processes.device)
        gathered = [torch.empty_like(mine) for _ in range(processes.world_size)]
        dist.all_gather(gathered, mine)
        parts = [(rank, part.cpu()) for rank, part in enumerate(gathered)]
    else:
        parts = [(0, torch.stack([indices, local]))]
    for rank, part in parts:
        positions = rank + processes.world_size * np.arange(part.shape[1])
        keep = positions < total
        result[part[0].numpy()[keep]] = part[1].numpy()[keep]
    if (result < 0).any():
        raise RuntimeError("validation missed images: the sampler's layout has changed")
    return result


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(predicted == labels))


def checkpoint_state(run: Run, epoch: int, epochs_done: list[dict[str, Any]]) -> dict[str, Any]:
    """Tensors, primitives, dicts and lists only: it loads with weights_only=True."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else {},
            "epoch": epoch, "model_name": run.args.model, "doconv": run.args.doconv,
            "world_size": run.processes.world_size,
            "settings": recipe.resume_settings(run.args), "metrics_epochs": epochs_done,
            "torch_version": str(torch.__version__)}


def metrics(run: Run, epochs_done: list[dict[str, Any]], **final: Any) -> dict[str, Any]:
    settings = {**recipe.resume_settings(run.args), "epochs": run.args.epochs,
                "workers": run.args.workers}
    return recipe.metrics_record(framework="torch", world_size=run.processes.world_size,
                                 model=run.args.model, doconv=run.args.doconv,
                                 settings=settings, epochs=epochs_done,
                                 device=run.processes.device.type,
                                 threads=torch.get_num_threads(),
                                 torch_version=str(torch.__version__),
                                 data=run.data.description, **final)


# ------------------------------------------------------------------------------- main


def fail(message: str, status: int = EXIT_USER_ERROR) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def requirements(args: argparse.Namespace) -> list[recipe.Requirement]:
    """The optional packages this run's flags need (pyproject.toml's extras)."""
    needs = []
    if args.data not in DATASET_NAMES:
        needs.append(recipe.PILLOW)
    if args.onnx:  # torch.onnx's exporter
        needs += [recipe.Requirement("--onnx", name, name, "onnx")
                  for name in ("onnx", "onnxscript")]
    return needs


def prepare(args: argparse.Namespace, processes: Processes
            ) -> tuple[Data, Callable[..., Any], nn.Module, dict[str, Any] | None]:
    """Every check of the command line and the inputs, before anything is written or any
    process group exists (so every rank fails alike, on its own): data, model, checkpoint."""
    recipe.check_args(args)
    recipe.check_requirements(requirements(args))
    if args.sync_bn and processes.device.type != "cuda":
        raise RecipeError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel)")
    builder = resolve_model(args.model)
    data = load_data(args, quiet=not processes.is_main or args.quiet)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args.model, builder, data.num_classes, args.doconv)
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(args.output / recipe.CHECKPOINT, args, processes.world_size)
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise RecipeError(f"--resume: the checkpoint's weights do not fit --model "
                              f"{args.model} ({_brief(error)})") from None
    return data, builder, model, checkpoint


def make_run(args: argparse.Namespace, processes: Processes, data: Data,
             builder: Callable[..., Any], model: nn.Module,
             checkpoint: dict[str, Any] | None) -> Run:
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(processes.device)
    trained: nn.Module = model
    if processes.distributed:
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[processes.local_rank] if processes.device.type == "cuda" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.wd)
    steps_per_epoch = math.ceil(math.ceil(len(data.train) / processes.world_size)
                                / args.batch_size)

    def factor(step: int) -> float:
        return recipe.lr_factor(step / steps_per_epoch, args.epochs, args.lr_schedule,
                                args.warmup_epochs, args.lr_step_size, args.lr_gamma,
                                steps_per_epoch)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = (torch.amp.GradScaler("cuda") if args.amp and processes.device.type == "cuda"
              else None)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler is not None and checkpoint["scaler"]:
            scaler.load_state_dict(checkpoint["scaler"])
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    return Run(args, processes, data, builder, model, trained, optimizer, scheduler, scaler,
               criterion)


def fused_model(run: Run) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The fused plain model, as loaded from its state_dict into the plain architecture."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fuse() warns when there is nothing to fuse
        fused_state = {key: value.detach().cpu().clone() for key, value in
                       doconv_torch.fuse(run.model).state_dict().items()}
    torch.manual_seed(run.args.seed)
    plain = build_model(run.args.model, run.builder, run.data.num_classes, use_doconv=False)
    plain.load_state_dict(fused_state, strict=True)
    return plain.to(run.processes.device), fused_state


def export_onnx(model: nn.Module, run: Run, path: Path) -> None:
    """The fused model as ONNX with a dynamic batch axis, written atomically."""
    size = run.args.val_crop_size if isinstance(run.data.val, FolderImages) else 28
    example = torch.zeros(2, 3, size, size, device=run.processes.device)  # 2: not specialised
    temporary = path.with_name(f".{path.name}.tmp")
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # notes about torchvision's ops it did not find
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (example,), str(temporary), dynamo=True,
                              external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        os.replace(temporary, path)
    finally:
        onnx_log.setLevel(level)
        temporary.unlink(missing_ok=True)


def train(run: Run, checkpoint: dict[str, Any] | None) -> int:
    args, processes = run.args, run.processes
    output = args.output
    epochs_done: list[dict[str, Any]] = list(checkpoint["metrics_epochs"]) if checkpoint else []
    first = checkpoint["epoch"] if checkpoint else 0
    if processes.is_main:
        print(f"{PROG}: {args.model}{' with DO-Conv' if args.doconv else ''}, "
              f"{processes.world_size} process(es) on {processes.device.type}, "
              f"{torch.get_num_threads()} thread(s) each; {run.data.description}: "
              f"{len(run.data.train)} training / {len(run.data.val)} validation images"
              + (f"; resumed after epoch {first}" if checkpoint else ""), flush=True)
    predicted = None
    for epoch in range(first, args.epochs):
        start = time.perf_counter()
        try:
            train_loss = train_epoch(run, epoch)
        except Stopped:
            return _stopped(run)
        except ImageReadError as error:
            fail(_last_line(error), 1)
        sync_buffers(run.model, processes)
        predicted = predict(run.model, run)
        entry = {"epoch": epoch + 1, "train_loss": train_loss,
                 "val_accuracy": accuracy(predicted, run.data.val_labels),
                 "seconds": time.perf_counter() - start}
        epochs_done.append(entry)
        if processes.is_main:
            save_checkpoint(output / recipe.CHECKPOINT, checkpoint_state(run, epoch + 1,
                                                                         epochs_done))
            recipe.write_metrics(output, metrics(run, epochs_done))
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss:.4f}, "
                  f"val accuracy {entry['val_accuracy']:.2f}%, {entry['seconds']:.1f} s",
                  flush=True)
        if stop_requested(processes):
            return _stopped(run)
    if predicted is None:  # resumed at the end: nothing trained in this process
        sync_buffers(run.model, processes)
        predicted = predict(run.model, run)
    val_accuracy = accuracy(predicted, run.data.val_labels)
    plain, fused_state = fused_model(run)
    fused_predicted = predict(plain, run) if args.doconv else predicted
    fused_accuracy = accuracy(fused_predicted, run.data.val_labels)
    identical = bool(np.array_equal(fused_predicted, predicted))
    if processes.is_main:
        recipe.atomic_write(output / "fused.pt", lambda handle: torch.save(fused_state, handle))
        extra = {}
        if args.onnx:
            export_onnx(plain, run, output / "fused.onnx")
            extra["onnx"] = "fused.onnx"
        recipe.write_metrics(output, metrics(
            run, epochs_done, val_accuracy=val_accuracy,
            fused_val_accuracy=fused_accuracy if args.doconv else None,
            fused_identical_predictions=identical if args.doconv else None, **extra))
        print(f"val accuracy {val_accuracy:.2f}%"
              + (f"; fused {fused_accuracy:.2f}%, "
                 f"{'identical' if identical else 'DIFFERENT'} predictions" if args.doconv
                 else "") + f"; outputs in {output}", flush=True)
    if not identical:
        fail(f"the fused model's predictions differ from the trained model's on "
             f"{int(np.sum(fused_predicted != predicted))} validation images", EXIT_FUSED_DIFFER)
    return 0


def _stopped(run: Run) -> int:
    signum = _received_signal or signal.SIGTERM
    if run.processes.is_main:
        kept = ("the last completed epoch's checkpoint is kept (continue with --resume)"
                if (run.args.output / recipe.CHECKPOINT).is_file()
                else "no epoch had completed: no checkpoint")
        sys.stderr.write(f"{PROG}: stopped by {signal.Signals(signum).name}; {kept}\n")
    return 128 + signum


def _last_line(error: BaseException) -> str:
    # A worker's exception comes back carrying its traceback: keep the message itself.
    line = str(error).strip().splitlines()[-1]
    marker = f"{type(error).__name__}: "
    return line.split(marker, 1)[1] if marker in line else line


HELP = {
    "model": f"a built-in ({', '.join(BUILTIN_MODELS)}: samples/models_pt.py) or "
             "package.module:callable, called with num_classes= and returning an nn.Module "
             "with PyTorch's native convs",
    "batch_size": "per process (default: %(default)s)",
    "workers": "DataLoader worker processes per training process; 0: load in the training "
               "process (default: %(default)s)",
    "amp": "mixed precision: bf16 autocast on CPU, fp16 with loss scaling on CUDA",
    "sync_bn": "SyncBatchNorm across the processes (CUDA only: an error on CPU)",
    "output": f"{recipe.CHECKPOINT} (every epoch), {recipe.METRICS}, fused.pt (and "
              "fused.onnx with --onnx)",
    "resume": f"continue from DIR/{recipe.CHECKPOINT} up to --epochs (same flags and number "
              "of processes)",
    "onnx": "also export the fused model to DIR/fused.onnx",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = recipe.recipe_parser(PROG, __doc__.split("\n\n")[0], HELP)
    args = parser.parse_args(argv)
    # Subnormal floats (from BatchNorm statistics early in training) made CPU convolutions
    # 3x slower; flushed to zero (deterministically). Set before any torch op starts the
    # intra-op threads, which take the floating-point mode of the thread that creates them.
    torch.set_flush_denormal(True)
    try:
        processes = processes_from_env()
        data, builder, model, checkpoint = prepare(args, processes)
        if processes.is_main:
            args.output.mkdir(parents=True, exist_ok=True)
    except RecipeError as error:
        fail(str(error))
    except OSError as error:
        fail(f"--output {args.output}: {_brief(error)}")
    signal.signal(signal.SIGTERM, _note_signal)
    signal.signal(signal.SIGINT, _note_signal)
    torch.use_deterministic_algorithms(True)
    if processes.device.type == "cuda":
        torch.cuda.set_device(processes.device)
        torch.backends.cudnn.benchmark = False
    if processes.distributed:
        dist.init_process_group("nccl" if processes.device.type == "cuda" else "gloo",
                                init_method="env://")
    try:
        status = train(make_run(args, processes, data, builder, model, checkpoint), checkpoint)
        if processes.distributed and status == 0:
            dist.barrier()  # no rank tears the group down while another still talks
        return status
    finally:
        if processes.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    if torch.cuda.is_available():  # cuBLAS needs this for deterministic algorithms
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    sys.exit(main())
