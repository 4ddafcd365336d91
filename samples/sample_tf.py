"""The seed's Keras MNIST demo with plain Conv2D or DOConv2D (any Keras 3 backend).

    python samples/sample_tf.py                 # DO-Conv, 5 epochs, 1 run
    python samples/sample_tf.py --conv conv     # the baseline
    python samples/sample_tf.py --runs 5 --epochs 1

With DO-Conv each run also fuses the model into plain Conv2D layers, saves it as .keras,
reloads it (no custom objects needed) and checks that its test accuracy is identical.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import keras  # noqa: E402

import doconv_tf  # noqa: E402
from samples.common import RunResult, accuracy_table, sample_parser, split_arrays  # noqa: E402
from samples.datasets import Dataset, load_dataset  # noqa: E402

BATCH_SIZE = 32


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


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(accuracy in %, predicted labels)."""
    predicted = np.argmax(model.predict(x, batch_size=256, verbose=0), axis=1)
    return 100.0 * float(np.mean(predicted == y)), predicted


def deterministic(seed: int) -> None:
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


SEED_EPOCHS = 5


def versions() -> str:
    return f"keras {keras.__version__} ({keras.backend.backend()} backend), numpy {np.__version__}"


class _EpochAccuracy(keras.callbacks.Callback):
    """Test accuracy after every epoch; its own time is kept out of the training time."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        super().__init__()
        self.x, self.y = x, y
        self.accuracies: list[float] = []
        self.seconds = 0.0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        start = time.perf_counter()
        self.accuracies.append(accuracy(self.model, self.x, self.y)[0])
        self.seconds += time.perf_counter() - start


def run_once(conv: str, seed: int, epochs: int, data: Dataset, quiet: bool = False, *,
             limit: int | None = None) -> RunResult:
    """One seeded run: fit, test after every epoch; DO-Conv: fuse, save .keras, reload."""
    x_train, y_train, x_test, y_test = split_arrays(data, "NHWC", limit)
    deterministic(seed)
    model = make_model(conv)
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    tracker = _EpochAccuracy(x_test, y_test)
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, shuffle=True,
              verbose=0 if quiet else 2, callbacks=[tracker])
    seconds = time.perf_counter() - start - tracker.seconds
    fused_accuracy = fused_identical = None
    if conv == "doconv":
        _, predicted = accuracy(model, x_test, y_test)
        fused = doconv_tf.fuse(model)
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "fused.keras"
            fused.save(path)
            reloaded = keras.models.load_model(path)  # plain Keras layers: no custom objects
        if any(isinstance(layer, doconv_tf.DOConv2D) for layer in reloaded.layers):
            raise RuntimeError("the fused model still holds DOConv2D layers")
        fused_accuracy, fused_predicted = accuracy(reloaded, x_test, y_test)
        fused_identical = bool(np.array_equal(fused_predicted, predicted))
    return RunResult(conv, seed, tracker.accuracies, fused_accuracy, seconds, fused_identical)


def main(argv: list[str] | None = None) -> dict:
    parser = sample_parser("DO-Conv in Keras 3: the seed's MNIST demo.", epochs=SEED_EPOCHS)
    args = parser.parse_args(argv)
    dataset = load_dataset(args.dataset, args.data_dir, download=args.download,
                           verbose=not args.quiet)
    runs = []
    for k in range(args.runs):
        result = run_once(args.conv, args.seed + k, args.epochs, dataset, args.quiet,
                          limit=args.limit)
        runs.append(result)
        line = f"run {k + 1}: test accuracy {result.accuracy:.2f}%"
        if result.fused_accuracy is not None:
            line += (f", fused, saved and reloaded {result.fused_accuracy:.2f}% "
                     f"({'identical' if result.fused_identical else 'DIFFERENT'} predictions)")
        print(line)
    name = "DO-Conv" if args.conv == "doconv" else "Baseline"
    rows = {name: [r.accuracy for r in runs]}
    if args.conv == "doconv":
        rows["DO-Conv fused"] = [r.fused_accuracy for r in runs]
    table = accuracy_table(rows, baseline=name)
    print(f"{versions()}; {args.dataset}, {len(dataset.x_train[:args.limit])} train / "
          f"{len(dataset.x_test[:args.limit])} test images, {args.epochs} epochs")
    print(table)
    identical = all(r.fused_identical for r in runs) if args.conv == "doconv" else None
    if args.conv == "doconv":
        print("fused accuracy identical: " + ("yes" if identical else "NO"))
    return {"conv": args.conv, "runs": runs, "table": table, "fused_identical": identical,
            "backend": keras.backend.backend()}


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result["fused_identical"] is False else 0)
