"""What the three samples' smoke tests check alike (each sample runs in its framework's env)."""

from __future__ import annotations

import re
from typing import Any, Callable

import pytest

from samples import common


def tiny(data_dir) -> list[str]:
    """Flags that point a sample at the tests' tiny IDX files, offline and quiet."""
    return ["--dataset", "mnist", "--data-dir", str(data_dir), "--no-download", "--quiet"]


def check_comparison(comparison: common.Comparison, out: str, seeds: list[int], epochs: int,
                     min_accuracy: float) -> None:
    """Both models trained per seed, learned, fused identically, and the printed table holds
    the run's own numbers in the seed's format."""
    assert list(comparison.results) == ["plain", "doconv"]
    for conv, runs in comparison.results.items():
        assert [(r.conv, r.seed, len(r.epoch_accuracy)) for r in runs] == \
            [(conv, seed, epochs) for seed in seeds]
        assert all(r.accuracy > min_accuracy and r.seconds > 0 for r in runs), \
            "the sample did not learn (chance is 10%)"
    assert comparison.fused_identical is True and common.exit_status(comparison) == 0
    assert [r.fused_accuracy for r in comparison.results["doconv"]] == \
        comparison.accuracies("doconv")
    n = len(seeds)
    base, do = comparison.accuracies("plain"), comparison.accuracies("doconv")
    cells = lambda values: " | ".join(f"{v:.2f}" for v in values)  # noqa: E731
    gain = sum(do) / n - sum(base) / n
    assert "|  | " + " | ".join(f"run{k + 1}" for k in range(n)) + " | avg | + |" in out
    assert f"| Baseline | {cells(base)} | {sum(base) / n:.3f} | - |" in out
    assert f"| DO-Conv | {cells(do)} | {sum(do) / n:.3f} | {gain:+.3f} |" in out
    assert f"| DO-Conv fused | {cells(do)} | {sum(do) / n:.3f} | {gain:+.3f} |" in out
    assert f"predictions identical to DO-Conv's in {n} of {n} runs" in out
    assert "DIFFERENT" not in out
    assert len(re.findall(rf"^run \d/{n}, seed \d: Baseline .*, DO-Conv .*, fused: identical "
                          r"predictions$", out, re.M)) == n


def epoch_accuracies(comparison: common.Comparison) -> dict[str, list[list[float]]]:
    """Every run's accuracy after every epoch: equal for equal seeds (determinism)."""
    return {conv: [r.epoch_accuracy for r in runs] for conv, runs in comparison.results.items()}


def check_one_model(main: Callable[[list[str]], Any], data_dir, capsys) -> None:
    """``--conv plain`` trains the baseline alone."""
    comparison = main(["--conv", "plain", "--epochs", "1", "--runs", "1", *tiny(data_dir)])
    out = capsys.readouterr().out
    assert list(comparison.results) == ["plain"] and comparison.fused_identical is None
    assert re.search(r"^\| Baseline \| \d+\.\d\d \| \d+\.\d{3} \| - \|$", out, re.M)
    assert "DO-Conv" not in out.split("\n\n")[-1]
    assert common.exit_status(comparison) == 0


def check_shared_command_line(main: Callable[[list[str]], Any], capsys) -> None:
    """The sample's --help lists exactly samples.common's flags and defaults."""
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    options = capsys.readouterr().out.split("options:")[1]
    assert options == common.sample_parser("x").format_help().split("options:")[1]
