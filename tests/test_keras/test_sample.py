"""Smoke test of samples/sample_tf.py on tiny generated IDX data."""

from samples import sample_tf


def test_sample_runs_fuses_and_reports(tiny_mnist, capsys):
    args = ["--epochs", "2", "--runs", "2", "--data-dir", str(tiny_mnist), "--no-download",
            "--quiet"]
    result = sample_tf.main(args)
    out = capsys.readouterr().out
    assert result["conv"] == "doconv" and result["fused_identical"] is True
    assert len(result["runs"]) == 2
    for run in result["runs"]:
        assert len(run.epoch_accuracy) == 2 and run.fused_accuracy == run.accuracy
        assert 0 <= run.accuracy <= 100 and run.seconds > 0
    assert "| DO-Conv |" in out and "| DO-Conv fused |" in out and "| run1 | run2 | avg | + |" in out
    assert "fused accuracy identical: yes" in out
    assert out.count("(identical predictions)") == 2
    # Determinism: the same seed gives the same accuracies; the baseline runs too.
    again = sample_tf.main(args)
    assert [r.epoch_accuracy for r in again["runs"]] == [r.epoch_accuracy for r in result["runs"]]
    baseline = sample_tf.main(["--conv", "conv"] + args[:2] + args[4:])
    assert "| Baseline |" in baseline["table"] and baseline["fused_identical"] is None
