"""What the three sample scripts share: the command line, the baseline-vs-DO-Conv loop, the
progress bar, the result table and the exit status.

Each sample provides only its framework's part: ``run_once`` (one seeded training run of one
model, see ``RunOnce``), ``SEED_EPOCHS`` (the seed demo's epochs) and ``versions()``; its
``main`` is ``run_sample(...)`` with those.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn, Protocol, TextIO, TypeVar

import numpy as np

from samples.datasets import (
    DATASET_NAMES, SUBSET_DIR, Dataset, DatasetError, load_dataset, load_dir, to_float32)

T = TypeVar("T")

CONV_KINDS = ("plain", "doconv")  # the order they train in, baseline first
ROW_NAMES = {"plain": "Baseline", "doconv": "DO-Conv"}
FUSED_ROW = "DO-Conv fused"
SUBSET = "mnist-subset"  # the committed 4,000 / 1,000 MNIST images: offline, about a minute
DEFAULT_RUNS = 5  # the seed's tables average five runs


@dataclasses.dataclass
class RunResult:
    """One seeded training run of a sample; accuracies are test-set percentages."""

    conv: str  # "plain" or "doconv"
    seed: int
    epoch_accuracy: list[float]  # after each epoch
    fused_accuracy: float | None  # DO-Conv only: the fused, saved and reloaded plain model
    seconds: float  # training wall time
    fused_identical: bool | None = None  # DO-Conv only: the same predictions on every image

    @property
    def accuracy(self) -> float:
        return self.epoch_accuracy[-1]


class RunOnce(Protocol):
    """A sample's training run: train ``conv`` ("plain" or "doconv") for ``epochs`` with
    ``seed``, test after every epoch; a DO-Conv model is then fused, saved (to ``save_dir``
    or a temporary directory), reloaded as a plain model and tested again."""

    def __call__(self, conv: str, seed: int, epochs: int, data: Dataset, quiet: bool = False,
                 *, limit: int | None = None, save_dir: Path | None = None) -> RunResult: ...


# ----------------------------------------------------------------------- command line


class _OneLineErrorParser(argparse.ArgumentParser):
    """A user's mistake is one line on stderr and exit status 2, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def sample_parser(description: str) -> argparse.ArgumentParser:
    """The command line of every sample: the same flags, the same defaults."""
    parser = _OneLineErrorParser(description=description)
    parser.add_argument("--conv", choices=("both", *CONV_KINDS), default="both",
                        help="train the plain-conv baseline and DO-Conv side by side (both), or "
                             "only one of them (default: both)")
    parser.add_argument("--runs", type=_positive, metavar="N", default=DEFAULT_RUNS,
                        help=f"seeded runs per model (default: {DEFAULT_RUNS}, as in the seed)")
    parser.add_argument("--epochs", type=_positive, metavar="N", default=None,
                        help="epochs per run (default: the seed demo's: PyTorch 15, Keras 5, "
                             "Gluon 10)")
    parser.add_argument("--seed", type=int, metavar="S", default=0,
                        help="run k uses seed S + k, for both models (default: 0)")
    parser.add_argument("--dataset", choices=(SUBSET, *DATASET_NAMES), default=SUBSET,
                        help=f"{SUBSET}: the 4,000 training / 1,000 test MNIST images committed "
                             "in samples/data; mnist, fashion-mnist: the full sets, found "
                             "locally or downloaded (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="directory holding the four IDX files of --dataset mnist or "
                             "fashion-mnist (no fallback)")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never touch the network")
    parser.add_argument("--limit", type=_positive, metavar="N", default=None,
                        help="use only the first N training and test images (smoke runs)")
    parser.add_argument("--save-dir", type=Path, metavar="DIR", default=None,
                        help="keep the fused models here (default: a temporary directory)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def load_sample_data(args: argparse.Namespace) -> Dataset:
    """The data set the parsed command line names."""
    if args.dataset == SUBSET:
        return dataclasses.replace(load_dir(SUBSET_DIR, "mnist"), is_subset=True)
    return load_dataset(args.dataset, args.data_dir, download=args.download,
                        verbose=not args.quiet)


# ------------------------------------------------------------------------ the driver


@dataclasses.dataclass
class Comparison:
    """What a sample run produced: the results per model kind, one per run, and the table."""

    results: dict[str, list[RunResult]]  # "plain" / "doconv" -> one result per run
    table: str
    epochs: int

    def accuracies(self, conv: str) -> list[float]:
        return [r.accuracy for r in self.results[conv]]

    @property
    def fused_identical(self) -> bool | None:
        """Whether every fused DO-Conv model predicted exactly as before fusing (None: no
        DO-Conv run)."""
        runs = self.results.get("doconv")
        return None if not runs else all(r.fused_identical for r in runs)


def compare(train: Callable[[str, int], RunResult], convs: Sequence[str], seeds: Sequence[int],
            report: Callable[[str], None] = print) -> dict[str, list[RunResult]]:
    """``train(conv, seed)`` for every seed and model kind, the kinds side by side per seed;
    reports one line per seed."""
    results: dict[str, list[RunResult]] = {conv: [] for conv in convs}
    for k, seed in enumerate(seeds, 1):
        for conv in convs:
            results[conv].append(train(conv, seed))
        report(run_line(k, len(seeds), [results[conv][-1] for conv in convs]))
    return results


def run_line(k: int, runs: int, results: Sequence[RunResult]) -> str:
    """``run 1/5, seed 0: Baseline 80.80% (3.2 s), DO-Conv 85.30% (3.9 s), fused: ...``"""
    parts = [f"{ROW_NAMES[r.conv]} {r.accuracy:.2f}% ({r.seconds:.1f} s)" for r in results]
    for r in results:
        if r.fused_accuracy is not None:
            parts.append("fused: identical predictions" if r.fused_identical else
                         f"fused: {r.fused_accuracy:.2f}%, DIFFERENT predictions")
    return f"run {k}/{runs}, seed {results[0].seed}: " + ", ".join(parts)


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


def results_table(results: dict[str, list[RunResult]]) -> str:
    """Rows Baseline, DO-Conv and DO-Conv fused (the reloaded plain model), as run."""
    rows = {ROW_NAMES[conv]: [r.accuracy for r in runs] for conv, runs in results.items()}
    if results.get("doconv"):
        rows[FUSED_ROW] = [r.fused_accuracy for r in results["doconv"]]
    return accuracy_table(rows, baseline=ROW_NAMES["plain"])


def fused_summary(doconv: Sequence[RunResult]) -> str:
    """Whether the fused DO-Conv models predicted exactly as before fusing, in one line."""
    differ = sum(not r.fused_identical for r in doconv)
    verdict = (f"predictions identical to DO-Conv's in {len(doconv)} of {_runs(len(doconv))}"
               if not differ else
               f"DIFFERENT predictions from DO-Conv's in {differ} of {_runs(len(doconv))}")
    return f"Fused DO-Conv (plain convs, saved and reloaded): {verdict}."


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def run_sample(description: str, run_once: RunOnce, seed_epochs: int,
               versions: Callable[[], str], argv: Sequence[str] | None = None) -> Comparison:
    """A sample's main: parse the shared command line, train, print the table."""
    parser = sample_parser(description)
    args = parser.parse_args(argv)
    if args.data_dir is not None and args.dataset == SUBSET:
        parser.error("--data-dir needs --dataset mnist or fashion-mnist")
    try:
        data = load_sample_data(args)
    except DatasetError as error:
        parser.error(str(error))
    epochs = args.epochs or seed_epochs
    convs = CONV_KINDS if args.conv == "both" else (args.conv,)
    n_train, n_test = len(data.x_train[:args.limit]), len(data.x_test[:args.limit])
    print(f"{versions()}; {args.dataset}: {n_train} training / {n_test} test images; "
          f"{' and '.join(ROW_NAMES[c] for c in convs)}, {_runs(args.runs)} of {epochs} "
          f"epochs each", flush=True)

    def train(conv: str, seed: int) -> RunResult:
        return run_once(conv, seed, epochs, data, args.quiet, limit=args.limit,
                        save_dir=args.save_dir)

    results = compare(train, convs, range(args.seed, args.seed + args.runs),
                      report=lambda line: print(line, flush=True))
    comparison = Comparison(results, results_table(results), epochs)
    print(f"\nTest accuracy (%), {args.dataset}, {epochs} epochs:")
    print(comparison.table)
    if "doconv" in results:
        print(fused_summary(results["doconv"]))
    return comparison


def exit_status(comparison: Comparison) -> int:
    """1 if a fused model's predictions differ from its DO-Conv model's, else 0."""
    return 1 if comparison.fused_identical is False else 0


# ---------------------------------------------------------------------- per framework


def split_arrays(data: Dataset, layout: str, limit: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): float32 images in ``layout``, the first ``limit``."""
    return (to_float32(data.x_train[:limit], layout), data.y_train[:limit],
            to_float32(data.x_test[:limit], layout), data.y_test[:limit])


def epoch_label(conv: str, seed: int, epoch: int, epochs: int) -> str:
    """The progress bar's label: ``DO-Conv seed 0 epoch 3/15``."""
    return f"{ROW_NAMES[conv]} seed {seed} epoch {epoch}/{epochs}"


class ProgressBar:
    """A dependency-free progress bar on one line of stderr, erased when closed: the terminal
    keeps only the results, which go to stdout."""

    def __init__(self, total: int, label: str, *, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.start = self.last_drawn = time.perf_counter()
        self.drawn = ""

    def update(self, done: int) -> None:
        now = time.perf_counter()
        # Redraw at most five times a second (and at the end): a terminal is slow.
        if self.enabled and (done == self.total or now - self.last_drawn >= 0.2):
            self.last_drawn = now
            width = 30
            filled = width * done // self.total
            self.drawn = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{done}/{self.total} {now - self.start:5.1f}s")
            self.stream.write("\r" + self.drawn)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.drawn:
            self.stream.write("\r" + " " * len(self.drawn) + "\r")
            self.stream.flush()


def progress(items: Iterable[T], total: int, label: str, *, enabled: bool = True,
             stream: TextIO | None = None) -> Iterator[T]:
    """``items``, drawing a ProgressBar as they go."""
    bar = ProgressBar(total, label, enabled=enabled, stream=stream)
    for index, item in enumerate(items, 1):
        yield item
        bar.update(index)
    bar.close()
