import io

import pytest

from samples.common import accuracy_table, progress, sample_parser


def test_accuracy_table_has_the_seeds_form():
    table = accuracy_table({"Baseline": [98.0, 99.0], "DO-Conv": [99.0, 99.5]}, "Baseline")
    lines = table.splitlines()
    assert lines[0] == "|  | run1 | run2 | avg | + |"
    assert lines[2] == "| Baseline | 98.00 | 99.00 | 98.500 | - |"
    assert lines[3] == "| DO-Conv | 99.00 | 99.50 | 99.250 | +0.750 |"


def test_sample_parser_defaults_and_validation(capsys):
    args = sample_parser("demo", epochs=15).parse_args([])
    assert (args.conv, args.runs, args.epochs, args.seed, args.dataset) == (
        "doconv", 1, 15, 0, "mnist")
    with pytest.raises(SystemExit):
        sample_parser("demo", epochs=15).parse_args(["--epochs", "0"])
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_progress_yields_everything_and_draws_a_bar():
    stream = io.StringIO()
    assert list(progress(range(5), 5, "epoch 1", stream=stream)) == [0, 1, 2, 3, 4]
    assert "epoch 1 [" in stream.getvalue() and "5/5" in stream.getvalue()
