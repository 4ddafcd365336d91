"""samples/sample_gluoncv.py on tiny generated IDX data: both models by default, the table,
fusion."""

import json

from sample_checks import (
    check_comparison, check_one_model, check_shared_command_line, epoch_accuracies, tiny)
from samples import sample_gluoncv


def test_default_trains_baseline_and_doconv_and_fuses(tiny_mnist, tmp_path, capsys):
    args = ["--epochs", "2", "--runs", "2", "--save-dir", str(tmp_path), *tiny(tiny_mnist)]
    comparison = sample_gluoncv.main(args)
    check_comparison(comparison, capsys.readouterr().out, seeds=[0, 1], epochs=2,
                     min_accuracy=50)
    # The fused nets were exported as plain symbol + params: two native convolutions.
    graph = json.loads((tmp_path / "sample_gluoncv_fused_seed1-symbol.json").read_text())
    ops = [node["op"] for node in graph["nodes"]]
    assert ops.count("Convolution") == 2
    assert set(ops) == {"null", "Convolution", "Activation", "Pooling", "Flatten",
                        "FullyConnected"}
    assert epoch_accuracies(sample_gluoncv.main(args)) == epoch_accuracies(comparison)


def test_conv_flag_trains_one_model(tiny_mnist, capsys):
    check_one_model(sample_gluoncv.main, tiny_mnist, capsys)


def test_the_sample_takes_the_shared_command_line(capsys):
    check_shared_command_line(sample_gluoncv.main, capsys)
