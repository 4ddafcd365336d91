"""The seed's Gluon MNIST demo (LeNet-like, tanh): plain nn.Conv2D (the baseline) and DO-Conv
trained side by side, then each DO-Conv net fused to plain nn.Conv2D layers.

Each fused net is exported (symbol + params), reloaded with SymbolBlock.imports and tested
again: its predictions must be identical.

    python samples/sample_gluoncv.py                   # 5 runs of 10 epochs each, as in the seed
    python samples/sample_gluoncv.py --conv doconv --runs 1
    python samples/sample_gluoncv.py --help            # the command line all samples share
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("MXNET_ENFORCE_DETERMINISM", "1")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

import doconv_mx  # noqa: E402
from samples.common import (  # noqa: E402
    Comparison, RunResult, epoch_label, exit_status, progress, run_sample, split_arrays)
from samples.datasets import Dataset, iterate_minibatches  # noqa: E402

BATCH_SIZE = 100
LEARNING_RATE = 0.03
SEED_EPOCHS = 10


def build_net(conv: str) -> nn.HybridSequential:
    """Conv(20, 5) tanh, maxpool, Conv(50, 5) tanh, maxpool, Dense(500) tanh, Dense(10) tanh:
    the seed's network, tanh on the logits included."""
    layer = doconv_mx.DOConv2D if conv == "doconv" else nn.Conv2D
    net = nn.HybridSequential()
    with net.name_scope():
        net.add(layer(20, kernel_size=(5, 5), activation="tanh"),
                nn.MaxPool2D(pool_size=(2, 2), strides=(2, 2)),
                layer(50, kernel_size=(5, 5), activation="tanh"),
                nn.MaxPool2D(pool_size=(2, 2), strides=(2, 2)),
                nn.Flatten(),
                nn.Dense(500, activation="tanh"),
                nn.Dense(10, activation="tanh"))
    return net


def evaluate(net, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(accuracy in %, predicted labels)."""
    predicted = np.concatenate([
        net(mx.nd.array(xb)).argmax(axis=1).asnumpy().astype(np.int64)
        for xb, _ in iterate_minibatches(x, y, BATCH_SIZE)])
    return 100.0 * float(np.mean(predicted == y)), predicted


def versions() -> str:
    import gluoncv  # noqa: F401  (its presence is part of the environment)

    return f"mxnet {mx.__version__}, numpy {np.__version__}"


def run_once(conv: str, seed: int, epochs: int, data: Dataset, quiet: bool = False, *,
             limit: int | None = None, save_dir: Path | None = None) -> RunResult:
    """One seeded run: train, test after every epoch; DO-Conv: fuse, export, reload, test."""
    x_train, y_train, x_test, y_test = split_arrays(data, "NCHW", limit)
    mx.random.seed(seed)
    np.random.seed(seed)
    net = build_net(conv)
    net.initialize(mx.init.Xavier(magnitude=2.24))
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": LEARNING_RATE})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    steps = -(-len(x_train) // BATCH_SIZE)
    epoch_accuracy, seconds = [], 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        batches = iterate_minibatches(x_train, y_train, BATCH_SIZE, shuffle=True,
                                      seed=seed * 1000 + epoch)
        for xb, yb in progress(batches, steps, epoch_label(conv, seed, epoch + 1, epochs),
                               enabled=not quiet):
            data_b, label_b = mx.nd.array(xb), mx.nd.array(yb)
            with autograd.record():
                loss = loss_fn(net(data_b), label_b)
            loss.backward()
            trainer.step(len(xb))
        mx.nd.waitall()
        seconds += time.perf_counter() - start
        test_accuracy, predicted = evaluate(net, x_test, y_test)
        epoch_accuracy.append(test_accuracy)
    fused_accuracy = fused_identical = None
    if conv == "doconv":
        net = doconv_mx.fuse(net)  # a new net of plain nn.Conv2D layers
        net.hybridize()
        with tempfile.TemporaryDirectory() as scratch:
            directory = save_dir if save_dir is not None else Path(scratch)
            directory.mkdir(parents=True, exist_ok=True)
            prefix = str(directory / f"sample_gluoncv_fused_seed{seed}")
            net(mx.nd.array(x_test[:1]))  # builds the cached graph that export() writes
            net.export(prefix)
            with warnings.catch_warnings():
                # It cannot infer the input's type before the first call: harmless.
                warnings.filterwarnings("ignore", message="Cannot decide type")
                plain = gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"],
                                                  prefix + "-0000.params")
        fused_accuracy, fused_predicted = evaluate(plain, x_test, y_test)
        fused_identical = bool(np.array_equal(fused_predicted, predicted))
    return RunResult(conv, seed, epoch_accuracy, fused_accuracy, seconds, fused_identical)


def main(argv: Sequence[str] | None = None) -> Comparison:
    return run_sample(__doc__.split("\n\n")[0], run_once, SEED_EPOCHS, versions, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main()))
