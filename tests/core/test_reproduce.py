"""samples/reproduce.py's protocol and report, driven by a fake sample module."""

import sys
import types

import numpy as np

from samples import reproduce
from samples.common import RunResult
from samples.datasets import write_idx


def fake_sample():
    module = types.ModuleType("fake_sample")
    module.SEED_EPOCHS = 3
    module.calls = []

    def run_once(conv, seed, epochs, dataset, quiet=False, *, limit=None, save_dir=None):
        module.calls.append((conv, seed, epochs, len(dataset.x_train)))
        base = 90.0 + seed + (1.0 if conv == "doconv" else 0.0)
        curve = [base - (epochs - e) for e in range(1, epochs + 1)]
        if conv == "plain":
            return RunResult(conv, seed, curve, None, 2.0)
        return RunResult(conv, seed, curve, curve[-1], 2.0, fused_identical=True)

    module.run_once = run_once
    module.versions = lambda: "fakeframework 1.0"
    return module


def tiny_dataset(directory):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8))


def test_reproduce_runs_the_protocol_and_writes_the_report(tmp_path, monkeypatch):
    module = fake_sample()
    monkeypatch.setitem(sys.modules, "fake_sample", module)
    monkeypatch.setitem(reproduce.MODULES, "torch", "fake_sample")
    tiny_dataset(tmp_path)
    out = reproduce.main(["--framework", "torch", "--runs", "2", "--seed", "5", "--data-dir",
                          str(tmp_path), "--out", str(tmp_path / "out"), "--no-plot", "--quiet"])
    # Baseline and DO-Conv side by side per seed, as the samples run them.
    assert module.calls == [("plain", 5, 3, 20), ("doconv", 5, 3, 20),
                            ("plain", 6, 3, 20), ("doconv", 6, 3, 20)]
    report = out["report"].read_text()
    assert "| Baseline | 95.00 | 96.00 | 95.500 | - |" in report
    assert "| DO-Conv | 96.00 | 97.00 | 96.500 | +1.000 |" in report
    assert "| DO-Conv fused | 96.00 | 97.00 | 96.500 | +1.000 |" in report
    assert ("Fused DO-Conv (plain convs, saved and reloaded): predictions identical to "
            "DO-Conv's in 2 of 2 runs.") in report
    assert "Wall time, Baseline: 4 s for 2 runs" in report
    assert "fakeframework 1.0" in report and "Command: `python samples/reproduce.py --framework torch" in report
