"""samples/sample_tf.py on tiny generated IDX data: both models by default, the table, fusion."""

from sample_checks import (
    check_comparison, check_one_model, check_shared_command_line, epoch_accuracies, tiny)
from samples import sample_tf


def test_default_trains_baseline_and_doconv_and_fuses(tiny_mnist, tmp_path, capsys):
    args = ["--epochs", "2", "--runs", "2", "--save-dir", str(tmp_path), *tiny(tiny_mnist)]
    comparison = sample_tf.main(args)
    out = capsys.readouterr().out
    check_comparison(comparison, out, seeds=[0, 1], epochs=2, min_accuracy=50)
    # Keras' own log lines stay out of the results (the progress bar is on stderr).
    assert "Epoch 1/2" not in out
    # The fused model was saved as a plain .keras file.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sample_tf_fused_seed0.keras", "sample_tf_fused_seed1.keras"]
    assert epoch_accuracies(sample_tf.main(args)) == epoch_accuracies(comparison)


def test_conv_flag_trains_one_model(tiny_mnist, capsys):
    check_one_model(sample_tf.main, tiny_mnist, capsys)


def test_the_sample_takes_the_shared_command_line(capsys):
    check_shared_command_line(sample_tf.main, capsys)
