"""The seed's PyTorch demo: its 3-layer stride-2 CNN on MNIST, plain nn.Conv2d (the
baseline) and DO-Conv trained side by side, then each DO-Conv model fused to nn.Conv2d.

Each fused model's state_dict is saved, reloaded into the nn.Conv2d architecture and
tested again: its predictions must be identical (the seed's sample_pt_with_fusion.py).

    python samples/sample_pt.py                        # 5 runs of 15 epochs each, as in the seed
    python samples/sample_pt.py --conv doconv --runs 1
    python samples/sample_pt.py --help                 # the command line all samples share
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import doconv_torch  # noqa: E402
from samples.common import (  # noqa: E402
    Comparison, RunResult, epoch_label, exit_status, progress, run_sample, split_arrays)
from samples.datasets import Dataset, iterate_minibatches  # noqa: E402

BATCH_SIZE = 32
LEARNING_RATE = 0.01
MOMENTUM = 0.9
SEED_EPOCHS = 15


def build_model(conv: type[nn.Module] = nn.Conv2d) -> nn.Sequential:
    """The seed's network (PyTorch's "What is torch.nn really?" CNN) with ``conv`` layers."""
    return nn.Sequential(
        conv(1, 16, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        conv(16, 16, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        conv(16, 10, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # the seed's Lambda(x.view(x.size(0), -1)), picklable
    )


def predict(model: nn.Module, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    model.eval()
    labels = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(torch.from_numpy(x[start:start + batch_size]))
            labels.append(logits.argmax(dim=1).numpy())
    return np.concatenate(labels)


def versions() -> str:
    return f"torch {torch.__version__}, numpy {np.__version__}"


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    predicted = predict(model, x)
    return 100.0 * float(np.mean(predicted == y)), predicted


def fuse_save_reload(model: nn.Module, directory: Path, name: str) -> nn.Module:
    """Fuse, save the plain state_dict, load it into the nn.Conv2d architecture."""
    path = directory / f"sample_pt_fused_{name}.pt"
    torch.save(doconv_torch.fuse(model).state_dict(), path)
    plain = build_model(nn.Conv2d)
    plain.load_state_dict(torch.load(path, weights_only=True))
    return plain


def run_once(conv: str, seed: int, epochs: int, data: Dataset, quiet: bool = False, *,
             limit: int | None = None, save_dir: Path | None = None) -> RunResult:
    """One seeded run: train, test after every epoch; DO-Conv: fuse, save, reload, test."""
    torch.use_deterministic_algorithms(True)
    # One thread: the seed's network is tiny, so a second one only waits, and on a busy
    # machine it waits for a busy core (a run then took 10-50x longer on 2 cores).
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = split_arrays(data, "NCHW", limit)
    torch.manual_seed(seed)
    model = build_model(doconv_torch.DOConv2d if conv == "doconv" else nn.Conv2d)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    steps = -(-len(x_train) // BATCH_SIZE)
    epoch_accuracy = []
    seconds = 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        model.train()
        batches = iterate_minibatches(x_train, y_train, BATCH_SIZE, shuffle=True,
                                      seed=seed * 1000 + epoch)
        for xb, yb in progress(batches, steps, epoch_label(conv, seed, epoch + 1, epochs),
                               enabled=not quiet):
            loss = F.cross_entropy(model(torch.from_numpy(xb)), torch.from_numpy(yb))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds += time.perf_counter() - start
        test_accuracy, predicted = accuracy(model, x_test, y_test)
        epoch_accuracy.append(test_accuracy)
    fused_accuracy = fused_identical = None
    if conv == "doconv":
        with tempfile.TemporaryDirectory() as scratch:
            directory = save_dir if save_dir is not None else Path(scratch)
            directory.mkdir(parents=True, exist_ok=True)
            plain = fuse_save_reload(model, directory, f"seed{seed}")
            fused_accuracy, fused_predicted = accuracy(plain, x_test, y_test)
        fused_identical = bool(np.array_equal(fused_predicted, predicted))
    return RunResult(conv, seed, epoch_accuracy, fused_accuracy, seconds, fused_identical)


def main(argv: Sequence[str] | None = None) -> Comparison:
    return run_sample(__doc__.split("\n\n")[0], run_once, SEED_EPOCHS, versions, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main()))
