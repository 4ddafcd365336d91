"""The seed's Gluon MNIST demo (LeNet-like) with plain convolutions or DO-Conv.

python samples/sample_gluoncv.py --conv {conv,doconv} [--runs N] [--epochs E]

With --conv doconv each run also fuses the trained net into plain nn.Conv2D layers,
exports it (symbol + params), reloads it with SymbolBlock.imports and evaluates it again:
the accuracy printed for the reloaded plain net must equal the DO-Conv net's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("MXNET_ENFORCE_DETERMINISM", "1")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

import doconv_mx  # noqa: E402
from samples.common import (  # noqa: E402
    RunResult, accuracy_table, progress, sample_parser, split_arrays)
from samples.datasets import Dataset, iterate_minibatches, load_dataset  # noqa: E402

BATCH_SIZE = 100
LEARNING_RATE = 0.03


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


SEED_EPOCHS = 10


def versions() -> str:
    import gluoncv  # noqa: F401  (its presence is part of the environment)

    return f"mxnet {mx.__version__}, numpy {np.__version__}"


def run_once(conv: str, seed: int, epochs: int, data: Dataset, quiet: bool = False, *,
             limit: int | None = None) -> RunResult:
    """One seeded run: train, test after every epoch; DO-Conv: fuse, export, reload."""
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
        for xb, yb in progress(batches, steps, f"{conv} seed {seed} epoch {epoch + 1}/{epochs}",
                               enabled=not quiet):
            data_b, label_b = mx.nd.array(xb), mx.nd.array(yb)
            with autograd.record():
                loss = loss_fn(net(data_b), label_b)
            loss.backward()
            trainer.step(len(xb))
        mx.nd.waitall()
        seconds += time.perf_counter() - start
        epoch_accuracy.append(evaluate(net, x_test, y_test)[0])
    fused_accuracy = fused_identical = None
    if conv == "doconv":
        _, predicted = evaluate(net, x_test, y_test)
        doconv_mx.fuse(net)
        net.hybridize()
        with tempfile.TemporaryDirectory() as tmp:
            prefix = os.path.join(tmp, "fused")
            net(mx.nd.array(x_test[:1]))  # builds the cached graph that export() writes
            net.export(prefix)
            plain = gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"],
                                              prefix + "-0000.params")
        fused_accuracy, fused_predicted = evaluate(plain, x_test, y_test)
        fused_identical = bool(np.array_equal(fused_predicted, predicted))
    return RunResult(conv, seed, epoch_accuracy, fused_accuracy, seconds, fused_identical)


def main(argv: list[str] | None = None) -> dict:
    parser = sample_parser("MXNet Gluon MNIST demo with DO-Conv", epochs=SEED_EPOCHS)
    args = parser.parse_args(argv)
    ds = load_dataset(args.dataset, args.data_dir, download=args.download, verbose=not args.quiet)
    runs = []
    for run in range(args.runs):
        result = run_once(args.conv, args.seed + run, args.epochs, ds, args.quiet,
                          limit=args.limit)
        runs.append(result)
        line = f"run {run + 1}: {args.conv} accuracy {result.accuracy:.2f}%"
        if result.fused_accuracy is not None:
            verdict = "identical" if result.fused_identical else "DIFFERENT"
            line += (f"; fused + exported + reloaded plain net {result.fused_accuracy:.2f}%"
                     f" ({verdict} predictions)")
        print(line)
    accuracies = [r.accuracy for r in runs]
    fused = [r.fused_accuracy for r in runs if r.fused_accuracy is not None]
    name = "DO-Conv" if args.conv == "doconv" else "Baseline"
    rows = {name: accuracies}
    if fused:
        rows["DO-Conv fused"] = fused
    table = accuracy_table(rows, baseline=name if args.conv == "conv" else None)
    print(table)
    return {"conv": args.conv, "accuracies": accuracies, "fused_accuracies": fused,
            "fused_identical": all(r.fused_identical for r in runs) if fused else None,
            "runs": runs, "average": sum(accuracies) / len(accuracies), "table": table,
            "dataset": ds.name, "subset": ds.is_subset}


if __name__ == "__main__":
    main()
