"""The recipe's results table: several runs' metrics.json, baseline against DO-Conv.

    python samples/recipe_table.py runs/*/metrics.json [--markdown PATH] [--plot PATH]
    python samples/recipe_table.py --run --out runs/r20-fmnist [--epochs N] [--seeds 0 1 2]

Reading: groups the runs by model and variant (baseline: without --doconv; DO-Conv: with),
prints a markdown table of the final validation accuracy (mean +- sample std over seeds,
each run's figure), Welch's t-test p-value of DO-Conv against the baseline, every DO-Conv
run's fused accuracy and whether its predictions were identical, and the wall time.
``--plot`` also draws validation accuracy per epoch (needs matplotlib).

Driving (``--run``): the docs/results.md protocol: ``samples/train_pt.py`` for each seed,
baseline then DO-Conv, one process, into ``OUT/<variant>-seed<k>``, then the table
(``OUT/table.md``, and ``OUT/accuracy.png`` when matplotlib is there). A run that already
has its fused.pt is kept, and a stopped one is resumed, so the loop can be restarted.
NumPy / stdlib only (the t distribution is samples/recipe.py's own).
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samples import recipe  # noqa: E402
from samples.common import _OneLineErrorParser  # noqa: E402
from samples.recipe import RecipeError  # noqa: E402

PROG = "recipe_table.py"
VARIANT_NAMES = {False: "Baseline", True: "DO-Conv"}
# The docs/results.md protocol: ResNet-20 on the full Fashion-MNIST, one process (two
# threads) on this project's 2-core machines; epochs sized so 3 seeds x 2 variants take about
# an hour where a training step is slow (0.5 s at batch 128 with two threads on an AVX2-only
# AMD EPYC: about 250 s per epoch with validation; 0.17 s, a third of that, on an Intel Xeon
# of the same size).
# --workers 0: the IDX images are in memory, and a loader process would take a core from the
# two the training threads use.
PROTOCOL = {"model": "resnet20", "data": "fashion-mnist", "epochs": 3, "batch_size": 128,
            "lr": 0.1, "wd": 5e-4, "workers": 0, "seeds": (0, 1, 2)}


def group_runs(records: Sequence[dict[str, Any]]) -> dict[tuple[str, bool], list[dict[str, Any]]]:
    """(model, doconv) -> the runs, in seed order."""
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("val_accuracy") is None:
            raise RecipeError(f"{record['path']}: the run has no finished epoch")
        groups[record["model"], bool(record["doconv"])].append(record)
    for runs in groups.values():
        runs.sort(key=lambda r: (r.get("settings", {}).get("seed", 0), r["path"]))
    return dict(groups)


def _seed(record: dict[str, Any]) -> str:
    return str(record.get("settings", {}).get("seed", "?"))


def results_table(records: Sequence[dict[str, Any]]) -> str:
    """The markdown table (and a line per model on fused runs and the t-test)."""
    groups = group_runs(records)
    header = ("| model | variant | runs | val accuracy % (mean ± std) | per run (seed: %) | "
              "epochs | wall time per run (s) |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    notes = []
    for model in sorted({model for model, _ in groups}):
        for doconv in (False, True):
            runs = groups.get((model, doconv))
            if not runs:
                continue
            accuracies = [float(r["val_accuracy"]) for r in runs]
            mean, std = recipe.mean_std(accuracies)
            per_run = ", ".join(f"{_seed(r)}: {a:.2f}" for r, a in zip(runs, accuracies))
            epochs = sorted({len(r["epochs"]) for r in runs})
            seconds, _ = recipe.mean_std([float(r.get("seconds", 0.0)) for r in runs])
            lines.append(f"| {model} | {VARIANT_NAMES[doconv]} | {len(runs)} | "
                         f"{mean:.2f} ± {std:.2f} | {per_run} | "
                         f"{', '.join(map(str, epochs))} | {seconds:.0f} |")
        base, do = groups.get((model, False)), groups.get((model, True))
        if base and do:
            gain = (recipe.mean_std([r["val_accuracy"] for r in do])[0]
                    - recipe.mean_std([r["val_accuracy"] for r in base])[0])
            if len(base) >= 2 and len(do) >= 2:
                test = recipe.welch_t_test([r["val_accuracy"] for r in do],
                                           [r["val_accuracy"] for r in base])
                notes.append(f"{model}: DO-Conv - baseline {gain:+.2f} points; Welch's t-test "
                             f"t = {test.t:.2f}, df = {test.df:.1f}, p = {test.p:.3g} "
                             "(two-sided)")
            else:
                notes.append(f"{model}: DO-Conv - baseline {gain:+.2f} points; the t-test "
                             "needs at least 2 runs of each")
        if do:
            fused = ", ".join(
                f"{_seed(r)}: " + ("not fused (run stopped?)" if r.get("fused_val_accuracy")
                                   is None else f"{r['fused_val_accuracy']:.2f}"
                                   + ("" if r.get("fused_identical_predictions")
                                      else " (DIFFERENT predictions)"))
                for r in do)
            identical = all(r.get("fused_identical_predictions") for r in do)
            notes.append(f"{model}: fused DO-Conv accuracy per run (seed: %): {fused}"
                         + (" — predictions identical to the unfused model's in every run"
                            if identical else ""))
    return "\n".join(lines + [""] + notes)


def plot(records: Sequence[dict[str, Any]], path: Path) -> bool:
    """Validation accuracy per epoch, one line per run; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(6, 4))
    colours = {False: "tab:blue", True: "tab:orange"}
    labelled = set()
    for record in records:
        doconv = bool(record["doconv"])
        label = f"{record['model']} {VARIANT_NAMES[doconv]}"
        axes.plot([e["epoch"] for e in record["epochs"]],
                  [e["val_accuracy"] for e in record["epochs"]], color=colours[doconv],
                  alpha=0.8, label=None if label in labelled else label)
        labelled.add(label)
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation accuracy (%)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def metrics_paths(paths: Sequence[Path]) -> list[Path]:
    """metrics.json files: given directly, in a given run folder, or one level below."""
    found = []
    for path in paths:
        if path.is_dir() and not (path / recipe.METRICS).is_file():
            found += sorted(path.glob(f"*/{recipe.METRICS}"))
        else:
            found.append(path / recipe.METRICS if path.is_dir() else path)
    return found


def drive(out: Path, epochs: int, seeds: Sequence[int], extra: Sequence[str]) -> list[Path]:
    """Train every seed's baseline and DO-Conv run (skipping finished ones)."""
    script = Path(__file__).resolve().parent / "train_pt.py"
    runs = []
    for seed in seeds:
        for doconv in (False, True):
            directory = out / f"{'doconv' if doconv else 'baseline'}-seed{seed}"
            runs.append(directory)
            if (directory / "fused.pt").is_file():
                print(f"{directory}: finished before, kept", flush=True)
                continue
            command = [sys.executable, str(script), "--model", PROTOCOL["model"],
                       "--data", PROTOCOL["data"], "--epochs", str(epochs),
                       "--batch-size", str(PROTOCOL["batch_size"]), "--lr", str(PROTOCOL["lr"]),
                       "--wd", str(PROTOCOL["wd"]), "--workers", str(PROTOCOL["workers"]),
                       "--seed", str(seed),
                       "--output", str(directory), *(["--doconv"] if doconv else []), *extra]
            if (directory / recipe.CHECKPOINT).is_file():
                command.append("--resume")
            print("$ " + " ".join(command[1:]), flush=True)
            status = subprocess.call(command)
            if status != 0:
                raise RecipeError(f"{' '.join(command[1:])} exited with status {status}")
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = _OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path,
                        help="metrics.json files or run folders (or folders of run folders)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also plot accuracy per epoch here (needs matplotlib)")
    parser.add_argument("--run", action="store_true",
                        help="first train the docs/results.md protocol into --out")
    parser.add_argument("--out", type=Path, default=None, help="--run: the runs' folder")
    parser.add_argument("--epochs", type=int, default=PROTOCOL["epochs"],
                        help="--run: epochs per run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(PROTOCOL["seeds"]),
                        help="--run: seeds (default: 0 1 2)")
    parser.add_argument("--train-args", default="", metavar="ARGS",
                        help="--run: more train_pt.py flags, e.g. '--workers 1 --quiet'")
    args = parser.parse_args(argv)
    try:
        if args.run:
            if args.out is None:
                parser.error("--run needs --out DIR")
            if args.epochs < 1:
                parser.error("--epochs must be >= 1")
            args.paths = [*args.paths, *drive(args.out, args.epochs, args.seeds,
                                              args.train_args.split())]
            args.markdown = args.markdown or args.out / "table.md"
            args.plot = args.plot or args.out / "accuracy.png"
        if not args.paths:
            parser.error("give metrics.json files or run folders, or --run --out DIR")
        records = [recipe.read_metrics(path) for path in metrics_paths(args.paths)]
        if not records:
            raise RecipeError(f"no {recipe.METRICS} in {', '.join(map(str, args.paths))}")
        text = results_table(records)
    except RecipeError as error:
        parser.exit(2, f"{PROG}: error: {error}\n")
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        recipe.atomic_write(args.markdown, lambda handle: handle.write((text + "\n").encode()))
    if args.plot:
        print(f"plot: {args.plot}" if plot(records, args.plot)
              else "plot: skipped (matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
