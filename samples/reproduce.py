"""Reproduce the seed's demo tables: N seeded baseline runs and N DO-Conv runs of one framework.

    python samples/reproduce.py --framework torch --dataset fashion-mnist --out docs/results

Writes ``<out>/<framework>-<dataset>.md`` (the seed's table, every DO-Conv run's fused
accuracy, wall times, machine, command) and ``<out>/<framework>-<dataset>.png`` (test
accuracy per epoch, mean and min-max band). Each sample module provides ``run_once``
(samples.common.RunOnce), ``SEED_EPOCHS`` and ``versions()``; the loop over runs is the
samples' own (samples.common.compare).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samples.common import (  # noqa: E402
    CONV_KINDS, ROW_NAMES, RunResult, compare, fused_summary, results_table)
from samples.datasets import add_dataset_arguments, load_dataset  # noqa: E402
from doconv_core.testing.machine import machine_description  # noqa: E402

MODULES = {"torch": "samples.sample_pt", "tf": "samples.sample_tf", "mx": "samples.sample_gluoncv"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=sorted(MODULES), required=True)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="default: the seed's")
    parser.add_argument("--seed", type=int, default=0, help="run k uses seed + k")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    parser.add_argument("--quiet", action="store_true")
    add_dataset_arguments(parser)
    args = parser.parse_args(argv)
    if args.runs < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error(f"--runs and --epochs must be >= 1, got {args.runs} and {args.epochs}")
    return args


def markdown_report(framework: str, dataset: str, source: str, results: dict[str, list[RunResult]],
                    machine: str, command: str, versions: str) -> str:
    lines = [f"### {framework}, {dataset}", "", results_table(results), ""]
    if results.get("doconv"):
        lines.append(fused_summary(results["doconv"]))
    for conv, runs in results.items():
        seconds = sum(r.seconds for r in runs)
        lines.append(f"Wall time, {ROW_NAMES[conv]}: {seconds:.0f} s for {len(runs)} runs "
                     f"({seconds / len(runs):.1f} s per run).")
    lines += ["", f"Data: {source}.", f"Machine: {machine}; {versions}.", "",
              f"Command: `{command}`", ""]
    return "\n".join(lines)


def plot(path: Path, title: str, results: dict[str, list[RunResult]]) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install 'doconv[samples]' "
                         "(or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    figure, axes = plt.subplots(figsize=(6, 4))
    for conv, runs in results.items():
        curves = np.array([r.epoch_accuracy for r in runs])
        epochs = np.arange(1, curves.shape[1] + 1)
        axes.plot(epochs, curves.mean(0), marker="o",
                  label=f"{ROW_NAMES[conv]} (mean of {len(runs)})")
        axes.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.25)
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    module = importlib.import_module(MODULES[args.framework])
    data = load_dataset(args.dataset, args.data_dir, download=args.download,
                        verbose=not args.quiet)
    epochs = args.epochs or module.SEED_EPOCHS
    results = compare(lambda conv, seed: module.run_once(conv, seed, epochs, data, args.quiet),
                      CONV_KINDS, range(args.seed, args.seed + args.runs),
                      report=lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.framework}-{args.dataset}"
    command = "python samples/reproduce.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    where = Path(data.source).resolve()
    root = Path(__file__).resolve().parents[1]
    shown = where.relative_to(root) if where.is_relative_to(root) else where
    source = (f"{len(data.x_train)} training / {len(data.x_test)} test images from "
              f"{shown}" + (" (the committed MNIST subset)" if data.is_subset else ""))
    report = markdown_report(args.framework, args.dataset, source, results,
                             machine_description(), command, module.versions())
    (out / f"{stem}.md").write_text(report)
    print(report)
    if args.plot:
        plot(out / f"{stem}.png", f"{args.framework}: {args.dataset}", results)
    return {"results": results, "report": out / f"{stem}.md"}


if __name__ == "__main__":
    main()
