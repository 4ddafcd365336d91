"""The seed's Keras MNIST demo (any Keras 3 backend): Conv2D(32, 3) -> Conv2D(8, 3) ->
Dense(10), plain Conv2D (the baseline) and DOConv2D trained side by side, then each DO-Conv
model fused to plain Conv2D layers.

Each fused model is saved as .keras, reloaded without custom objects and tested again: its
predictions must be identical.

    python samples/sample_tf.py                        # 5 runs of 5 epochs each, as in the seed
    python samples/sample_tf.py --conv doconv --runs 1
    python samples/sample_tf.py --help                 # the command line all samples share
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# TensorFlow's C++ log prints a harmless error-level line about its own tf.data graph on
# every fit; real failures still raise Python exceptions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import keras  # noqa: E402

import doconv_tf  # noqa: E402
from samples.common import (  # noqa: E402
    Comparison, ProgressBar, RunResult, epoch_label, exit_status, run_sample, split_arrays)
from samples.datasets import Dataset  # noqa: E402

BATCH_SIZE = 32
SEED_EPOCHS = 5


def make_model(conv: str) -> keras.Model:
    """Conv(32, 3, relu) -> Conv(8, 3, relu) -> Flatten -> Dense(10, softmax), as in the seed."""
    layer = doconv_tf.DOConv2D if conv == "doconv" else keras.layers.Conv2D
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layer(32, 3, activation="relu"),
        layer(8, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray,
             batch_size: int = 1000) -> tuple[float, np.ndarray]:
    """(accuracy in %, predicted labels). Eager calls: model.predict would trace a function
    per model, and TensorFlow warns about retracing after a few models."""
    predicted = np.concatenate([
        np.argmax(keras.ops.convert_to_numpy(model(x[start:start + batch_size], training=False)),
                  axis=1)
        for start in range(0, len(x), batch_size)])
    return 100.0 * float(np.mean(predicted == y)), predicted


def deterministic(seed: int) -> None:
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def versions() -> str:
    return f"keras {keras.__version__} ({keras.backend.backend()} backend), numpy {np.__version__}"


class _EpochAccuracy(keras.callbacks.Callback):
    """Test accuracy after every epoch (its own time kept out of the training time), and the
    samples' progress bar on stderr instead of Keras' log lines on stdout."""

    def __init__(self, x: np.ndarray, y: np.ndarray, label: Callable[[int], str], steps: int,
                 quiet: bool) -> None:
        super().__init__()
        self.x, self.y = x, y
        self.label, self.steps, self.quiet = label, steps, quiet
        self.accuracies: list[float] = []
        self.predicted: np.ndarray | None = None
        self.seconds = 0.0
        self.bar: ProgressBar | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.bar = ProgressBar(self.steps, self.label(epoch + 1), enabled=not self.quiet)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.bar.update(batch + 1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.bar.close()
        start = time.perf_counter()
        test_accuracy, self.predicted = accuracy(self.model, self.x, self.y)
        self.accuracies.append(test_accuracy)
        self.seconds += time.perf_counter() - start


def run_once(conv: str, seed: int, epochs: int, data: Dataset, quiet: bool = False, *,
             limit: int | None = None, save_dir: Path | None = None) -> RunResult:
    """One seeded run: fit, test after every epoch; DO-Conv: fuse, save .keras, reload, test."""
    x_train, y_train, x_test, y_test = split_arrays(data, "NHWC", limit)
    deterministic(seed)
    model = make_model(conv)
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    tracker = _EpochAccuracy(x_test, y_test, lambda epoch: epoch_label(conv, seed, epoch, epochs),
                             -(-len(x_train) // BATCH_SIZE), quiet)
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True, verbose=0,
              callbacks=[tracker])
    seconds = time.perf_counter() - start - tracker.seconds
    fused_accuracy = fused_identical = None
    if conv == "doconv":
        fused = doconv_tf.fuse(model)
        with tempfile.TemporaryDirectory() as scratch:
            directory = save_dir if save_dir is not None else Path(scratch)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"sample_tf_fused_seed{seed}.keras"
            fused.save(path)
            reloaded = keras.models.load_model(path)  # plain Keras layers: no custom objects
        if any(isinstance(layer, doconv_tf.DOConv2D) for layer in reloaded.layers):
            raise RuntimeError("the fused model still holds DOConv2D layers")
        fused_accuracy, fused_predicted = accuracy(reloaded, x_test, y_test)
        fused_identical = bool(np.array_equal(fused_predicted, tracker.predicted))
    return RunResult(conv, seed, tracker.accuracies, fused_accuracy, seconds, fused_identical)


def main(argv: Sequence[str] | None = None) -> Comparison:
    return run_sample(__doc__.split("\n\n")[0], run_once, SEED_EPOCHS, versions, argv)


if __name__ == "__main__":
    sys.exit(exit_status(main()))
