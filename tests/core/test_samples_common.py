"""samples/common.py: the samples' shared command line, driver, table and exit status."""

import ast
import io
from pathlib import Path

import pytest

from samples import common
from samples.common import RunResult, accuracy_table, progress, run_sample, sample_parser

SAMPLES = Path(common.__file__).parent
SAMPLE_FILES = ["sample_pt.py", "sample_tf.py", "sample_gluoncv.py"]


def test_accuracy_table_has_the_seeds_form():
    table = accuracy_table({"Baseline": [98.0, 99.0], "DO-Conv": [99.0, 99.5]}, "Baseline")
    lines = table.splitlines()
    assert lines[0] == "|  | run1 | run2 | avg | + |"
    assert lines[2] == "| Baseline | 98.00 | 99.00 | 98.500 | - |"
    assert lines[3] == "| DO-Conv | 99.00 | 99.50 | 99.250 | +0.750 |"


def test_the_shared_command_line_and_its_defaults():
    parser = sample_parser("demo")
    flags = {option for action in parser._actions for option in action.option_strings}
    assert flags == {"-h", "--help", "--conv", "--runs", "--epochs", "--seed", "--dataset",
                     "--data-dir", "--no-download", "--limit", "--save-dir", "--quiet"}
    assert vars(parser.parse_args([])) == {
        "conv": "both", "runs": 5, "epochs": None, "seed": 0, "dataset": "mnist-subset",
        "data_dir": None, "download": True, "limit": None, "save_dir": None, "quiet": False}


def test_every_sample_takes_the_shared_command_line():
    """Read, not imported (no environment holds all three frameworks): each sample has the
    parts run_sample needs and adds no flag of its own."""
    run_once_args = ["conv", "seed", "epochs", "data", "quiet", "limit", "save_dir"]
    for name in SAMPLE_FILES:
        tree = ast.parse((SAMPLES / name).read_text())
        functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
        run_once = functions["run_once"].args
        assert [a.arg for a in run_once.args + run_once.kwonlyargs] == run_once_args, name
        assert "versions" in functions, name
        assert any(isinstance(target, ast.Name) and target.id == "SEED_EPOCHS"
                   for node in tree.body if isinstance(node, ast.Assign)
                   for target in node.targets), name
        calls = {node.func.id for node in ast.walk(functions["main"])
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert calls == {"run_sample"}, name
        source = (SAMPLES / name).read_text()
        assert "add_argument" not in source and "ArgumentParser" not in source, name


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["--runs", "two"], "argument --runs: must be a positive integer, got 'two'"),
    (["--conv", "conv"], "argument --conv: invalid choice: 'conv'"),
    (["--data-dir", "/tmp"], "--data-dir needs --dataset mnist or fashion-mnist"),
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "/nonexistent does not exist"),
])
def test_a_users_mistake_is_one_line_and_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        run_sample("demo", fake_run_once(), 3, lambda: "fake 1.0", argv)
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert ": error: " in captured.err and message in captured.err


def fake_run_once(fused_identical=True, calls=None):
    def run_once(conv, seed, epochs, data, quiet=False, *, limit=None, save_dir=None):
        if calls is not None:
            calls.append((conv, seed, epochs, len(data.x_train[:limit]), quiet, save_dir))
        accuracy = 90.0 + seed + (1.0 if conv == "doconv" else 0.0)
        curve = [accuracy - epochs + e for e in range(1, epochs + 1)]
        if conv == "plain":
            return RunResult(conv, seed, curve, None, 1.0)
        return RunResult(conv, seed, curve, accuracy if fused_identical else accuracy - 1, 1.5,
                         fused_identical)

    return run_once


def test_run_sample_compares_both_models_side_by_side(tmp_path, capsys):
    calls = []
    comparison = run_sample("demo", fake_run_once(calls=calls), 3, lambda: "fake 1.0",
                            ["--runs", "2", "--seed", "5", "--limit", "100", "--quiet",
                             "--save-dir", str(tmp_path)])
    # The committed subset by default, the seed's epochs, baseline and DO-Conv per seed.
    assert calls == [("plain", 5, 3, 100, True, tmp_path), ("doconv", 5, 3, 100, True, tmp_path),
                     ("plain", 6, 3, 100, True, tmp_path), ("doconv", 6, 3, 100, True, tmp_path)]
    assert comparison.epochs == 3 and comparison.accuracies("doconv") == [96.0, 97.0]
    assert comparison.fused_identical is True and common.exit_status(comparison) == 0
    out = capsys.readouterr().out
    assert out.startswith("fake 1.0; mnist-subset: 100 training / 100 test images; "
                          "Baseline and DO-Conv, 2 runs of 3 epochs each\n")
    assert out.split("\n", 1)[1] == """\
run 1/2, seed 5: Baseline 95.00% (1.0 s), DO-Conv 96.00% (1.5 s), fused: identical predictions
run 2/2, seed 6: Baseline 96.00% (1.0 s), DO-Conv 97.00% (1.5 s), fused: identical predictions

Test accuracy (%), mnist-subset, 3 epochs:
|  | run1 | run2 | avg | + |
|---|---|---|---|---|
| Baseline | 95.00 | 96.00 | 95.500 | - |
| DO-Conv | 96.00 | 97.00 | 96.500 | +1.000 |
| DO-Conv fused | 96.00 | 97.00 | 96.500 | +1.000 |
Fused DO-Conv (plain convs, saved and reloaded): predictions identical to DO-Conv's in 2 of 2 runs.
"""


def test_different_fused_predictions_make_the_exit_status_1(capsys):
    comparison = run_sample("demo", fake_run_once(fused_identical=False), 3, lambda: "fake",
                            ["--conv", "doconv", "--runs", "1", "--epochs", "2", "--limit", "10"])
    out = capsys.readouterr().out
    assert list(comparison.results) == ["doconv"] and comparison.fused_identical is False
    assert common.exit_status(comparison) == 1
    assert "fused: 90.00%, DIFFERENT predictions" in out
    assert "DIFFERENT predictions from DO-Conv's in 1 of 1 run" in out
    assert "| DO-Conv | 91.00 | 91.000 | - |" in out  # no baseline, no gain


def test_progress_yields_everything_and_draws_a_bar():
    stream = io.StringIO()
    assert list(progress(range(5), 5, "epoch 1", stream=stream)) == [0, 1, 2, 3, 4]
    assert "epoch 1 [" in stream.getvalue() and "5/5" in stream.getvalue()
