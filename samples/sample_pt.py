"""The seed's PyTorch demo: a 3-layer stride-2 CNN on MNIST, plain conv vs DO-Conv.

After training with DO-Conv the model is fused to plain nn.Conv2d, its state_dict is
saved, reloaded into the nn.Conv2d architecture, and its test accuracy is checked to be
identical (the seed's sample_pt_with_fusion.py use case).

    python samples/sample_pt.py --conv conv      # baseline
    python samples/sample_pt.py --conv doconv    # DO-Conv, then fuse, save, reload
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import doconv_torch  # noqa: E402
from samples.common import (  # noqa: E402
    RunResult, accuracy_table, progress, sample_parser, split_arrays)
from samples.datasets import Dataset, iterate_minibatches, load_dataset  # noqa: E402

BATCH_SIZE = 32
LEARNING_RATE = 0.01
MOMENTUM = 0.9
ROW_NAMES = {"conv": "Baseline", "doconv": "DO-Conv"}


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


SEED_EPOCHS = 15


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
    """One seeded run: train, test after every epoch, and for DO-Conv fuse, save, reload."""
    torch.use_deterministic_algorithms(True)
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
        for xb, yb in progress(batches, steps, f"{ROW_NAMES[conv]} seed {seed} epoch "
                               f"{epoch + 1}/{epochs}", enabled=not quiet):
            loss = F.cross_entropy(model(torch.from_numpy(xb)), torch.from_numpy(yb))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds += time.perf_counter() - start
        epoch_accuracy.append(accuracy(model, x_test, y_test)[0])
    fused_accuracy = fused_identical = None
    if conv == "doconv":
        _, predicted = accuracy(model, x_test, y_test)
        with tempfile.TemporaryDirectory() as scratch:
            directory = save_dir if save_dir is not None else Path(scratch)
            directory.mkdir(parents=True, exist_ok=True)
            plain = fuse_save_reload(model, directory, f"seed{seed}")
            fused_accuracy, fused_predicted = accuracy(plain, x_test, y_test)
        fused_identical = bool(np.array_equal(fused_predicted, predicted))
    return RunResult(conv, seed, epoch_accuracy, fused_accuracy, seconds, fused_identical)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = sample_parser(__doc__.splitlines()[0], epochs=SEED_EPOCHS, runs=5)
    parser.add_argument("--save-dir", default=None,
                        help="where the fused models go (default: a temporary directory)")
    args = parser.parse_args(argv)
    data = load_dataset(args.dataset, args.data_dir, download=args.download,
                        verbose=not args.quiet)
    row = ROW_NAMES[args.conv]
    runs = []
    for run in range(args.runs):
        result = run_once(args.conv, args.seed + run, args.epochs, data, args.quiet,
                          limit=args.limit,
                          save_dir=Path(args.save_dir) if args.save_dir else None)
        runs.append(result)
        print(f"{row} run {run + 1}: test accuracy {result.accuracy:.2f}%", flush=True)
        if result.fused_accuracy is not None:
            print(f"  fused to nn.Conv2d, saved, reloaded: test accuracy "
                  f"{result.fused_accuracy:.2f}% "
                  f"({'identical' if result.fused_identical else 'DIFFERENT'} predictions)",
                  flush=True)
    accuracies = [r.accuracy for r in runs]
    table = accuracy_table({row: accuracies}, baseline=ROW_NAMES["conv"])
    subset = " (committed MNIST subset)" if getattr(data, "is_subset", False) else ""
    print(f"\nTest accuracy (%) on {args.dataset}{subset}, {args.epochs} epoch(s) per run:")
    print(table)
    outcome: dict[str, Any] = {"conv": args.conv, "accuracies": accuracies, "runs": runs,
                               "average": sum(accuracies) / len(accuracies), "table": table}
    if args.conv == "doconv":
        identical = all(r.fused_identical for r in runs)
        outcome["fused_accuracies"] = [r.fused_accuracy for r in runs]
        outcome["fused_identical"] = identical
        print(f"Fused model accuracy identical to DO-Conv: {'yes' if identical else 'NO'}")
    return outcome


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome.get("fused_identical", True) else 1)
