"""What the three sample scripts share: their command line, progress bar and result table."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from samples.datasets import Dataset, add_dataset_arguments, to_float32

T = TypeVar("T")


def sample_parser(description: str, *, epochs: int, runs: int = 1) -> argparse.ArgumentParser:
    """The flags every sample takes; defaults follow the seed's demo for that framework."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--conv", choices=("conv", "doconv"), default="doconv",
                        help="plain convolutions (the baseline) or DO-Conv")
    parser.add_argument("--runs", type=_positive, default=runs, help="independent seeded runs")
    parser.add_argument("--epochs", type=_positive, default=epochs)
    parser.add_argument("--seed", type=int, default=0, help="run k uses seed + k")
    parser.add_argument("--limit", type=_positive, default=None,
                        help="use only the first N training and test images (smoke runs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataset_arguments(parser)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def progress(items: Iterable[T], total: int, label: str, *, enabled: bool = True,
             stream=sys.stderr) -> Iterator[T]:
    """A dependency-free progress bar drawn on one line of stderr."""
    start = last_drawn = time.perf_counter()
    width = 30
    for index, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        # Redraw at most five times a second (and at the end): a terminal is slow.
        if enabled and (index == total or now - last_drawn >= 0.2):
            last_drawn = now
            filled = width * index // total
            elapsed = time.perf_counter() - start
            stream.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{index}/{total} {elapsed:5.1f}s")
            stream.flush()
    if enabled:
        stream.write("\n")


def accuracy_table(rows: dict[str, Sequence[float]], baseline: str | None = None) -> str:
    """The seed's table: one row per variant, run1..runN, avg and the gain over ``baseline``.

    Accuracies are percentages.
    """
    runs = max(len(values) for values in rows.values())
    header = ["", *(f"run{k + 1}" for k in range(runs)), "avg", "+"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base_avg = None
    if baseline is not None and baseline in rows:
        base_avg = sum(rows[baseline]) / len(rows[baseline])
    for name, values in rows.items():
        avg = sum(values) / len(values)
        gain = "-" if base_avg is None or name == baseline else f"{avg - base_avg:+.3f}"
        cells = [f"{v:.2f}" for v in values] + [""] * (runs - len(values))
        lines.append("| " + " | ".join([name, *cells, f"{avg:.3f}", gain]) + " |")
    return "\n".join(lines)


@dataclasses.dataclass
class RunResult:
    """One seeded training run of a sample; accuracies are test-set percentages."""

    conv: str
    seed: int
    epoch_accuracy: list[float]  # after each epoch
    fused_accuracy: float | None  # DO-Conv only: the fused, saved and reloaded plain model
    seconds: float  # training wall time
    fused_identical: bool | None = None  # DO-Conv only: the same predictions on every image

    @property
    def accuracy(self) -> float:
        return self.epoch_accuracy[-1]


def split_arrays(data: Dataset, layout: str, limit: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 images in ``layout``, the first ``limit``."""
    return (to_float32(data.x_train[:limit], layout), data.y_train[:limit],
            to_float32(data.x_test[:limit], layout), data.y_test[:limit])
