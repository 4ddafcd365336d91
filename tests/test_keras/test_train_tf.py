"""samples/train_tf.py, the Keras training recipe, end to end on tiny data, on this env's
backend: data-parallel on 2 CPU devices (TensorFlow: MirroredStrategy over an image folder;
JAX: DataParallel over MNIST; torch: 1 device, which is all Keras offers there), resume ==
uninterrupted bit for bit, fused == unfused, fused.keras loading without doconv, and every
bad input as one line.

Each recipe run is a subprocess (the device split happens before TensorFlow or JAX starts);
the bad-input runs start together and most fail before Keras is imported. Tests that only
make sense on one backend are defined only there (never a skip that counts as a pass).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import keras

from tests import recipe_checks
from tests.recipe_checks import png_bytes, write_image_folder

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "samples" / "train_tf.py")
TINY = "tests.test_keras.train_models:tiny"
TIMEOUT_S = 180
BACKEND = keras.backend.backend()
# TensorFlow reads image folders (tf.io); the other backends have no TensorFlow in their
# envs and train on the IDX sets (a folder is refused there, tested below).
DEVICES = 1 if BACKEND == "torch" else 2
FOLDER_DATA = BACKEND == "tensorflow"
SIZE = ["--train-crop-size", "16", "--val-resize-size", "16", "--val-crop-size", "16"]
# The step schedule does not depend on --epochs, so a 1-epoch run continued to 2 follows
# the same learning rates as a 2-epoch run. --workers is left at its default (2 loader
# threads): what users run, and where batches were once fed out of their (seed, epoch) order.
RECIPE = ["--model", TINY, "--doconv", "--batch-size", "4", "--quiet",
          "--lr", "0.05", "--lr-schedule", "step", "--lr-step-size", "1", "--lr-gamma", "0.5",
          "--devices", str(DEVICES), *SIZE]


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), KERAS_BACKEND=BACKEND,
               TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)
    return env


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=environment(),
                          cwd=REPO, timeout=TIMEOUT_S)


def run_recipe(*args: str) -> subprocess.CompletedProcess:
    result = run([sys.executable, SCRIPT, *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), jpeg=False)


@pytest.fixture(scope="module")
def data(folder) -> list[str]:
    if FOLDER_DATA:
        return ["--data", str(folder)]
    return ["--data", "mnist", "--limit", "24", "--quiet"]  # --quiet: no dataset notice


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> Path:
    """Two epochs, uninterrupted."""
    output = tmp_path_factory.mktemp("straight")
    result = run_recipe(*data, "--epochs", "2", "--output", str(output), *RECIPE)
    assert f"on {BACKEND}, {DEVICES} cpu device(s)" in result.stdout
    return output


def weights(output: Path) -> dict[str, np.ndarray]:
    """Every array of the backup's weights file (the model's and the optimizer's)."""
    import h5py  # Keras' own dependency
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(output / "backup" / "latest.weights.h5", "r") as handle:
        handle.visititems(lambda name, item: arrays.__setitem__(name, item[()])
                          if isinstance(item, h5py.Dataset) else None)
    return arrays


def read_metrics(output: Path) -> dict:
    return json.loads((output / "metrics.json").read_text())


# ---------------------------------------------------------------------- good runs


def test_resumed_run_ends_bit_identical_to_uninterrupted(tmp_path, data, straight):
    run_recipe(*data, "--epochs", "1", "--output", str(tmp_path), *RECIPE)
    assert json.loads((tmp_path / "backup" / "recipe.json").read_text())["epoch"] == 1
    result = run_recipe(*data, "--epochs", "2", "--output", str(tmp_path), "--resume", *RECIPE)
    assert "resumed after epoch 1" in result.stdout
    resumed, uninterrupted = weights(tmp_path), weights(straight)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) > 10
    assert any("optimizer" in key for key in resumed)  # momentum and step count too
    for key, value in uninterrupted.items():
        assert np.array_equal(resumed[key], value), key

    def measured(record):  # all but the wall times
        return [{k: v for k, v in entry.items() if k != "seconds"} for entry in record["epochs"]]

    assert measured(read_metrics(tmp_path)) == measured(read_metrics(straight))


def test_two_processes_with_the_same_flags_train_the_same_weights(tmp_path, data):
    # The built-in model's initial weights come from --seed (keras.utils.set_random_seed),
    # not from draws fixed when samples/models_tf.py was imported.
    outputs = [tmp_path / "first", tmp_path / "second"]
    flags = [*data, "--model", "resnet20", "--epochs", "1", "--batch-size", "4", "--quiet",
             "--seed", "1", "--devices", str(DEVICES), *SIZE]
    processes = [subprocess.Popen([sys.executable, SCRIPT, *flags, "--output", str(output)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=environment(), cwd=REPO) for output in outputs]
    for process in processes:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
        assert process.returncode == 0, stderr[-3000:]
    first, second = weights(outputs[0]), weights(outputs[1])
    assert first.keys() == second.keys() and len(first) > 50
    for key, value in first.items():
        assert np.array_equal(second[key], value), key
    assert read_metrics(outputs[0])["epochs"][0]["train_loss"] == \
        read_metrics(outputs[1])["epochs"][0]["train_loss"]


def test_metrics_record_every_epoch_and_fused_equals_unfused(tmp_path, straight):
    metrics = read_metrics(straight)
    assert (metrics["framework"], metrics["backend"]) == ("keras", BACKEND)
    assert (metrics["world_size"], metrics["model"], metrics["doconv"]) == (DEVICES, TINY, True)
    assert len(set(metrics["device_names"])) == DEVICES  # what the strategy trained on
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert all(e["train_loss"] > 0 and e["seconds"] > 0 for e in metrics["epochs"])
    assert metrics["fused_identical_predictions"] is True
    assert metrics["fused_val_accuracy"] == metrics["val_accuracy"] == \
        metrics["epochs"][-1]["val_accuracy"]
    assert metrics["settings"]["batch_size"] == 4 and metrics["settings"]["seed"] == 0
    assert sorted(p.name for p in straight.iterdir()) == [
        "backup", "backup-epoch0002", "fused.keras", "metrics.json"]  # no temporary files
    assert os.readlink(straight / "backup") == "backup-epoch0002"
    from samples import recipe_table  # reads Keras runs as it reads PyTorch's
    assert recipe_table.main([str(straight / "metrics.json"), "--markdown",
                              str(tmp_path / "table.md")]) == 0
    assert f"| {TINY} | DO-Conv | 1 |" in (tmp_path / "table.md").read_text()


def test_fused_keras_loads_with_keras_alone_in_safe_mode(straight):
    # A process where importing doconv fails: the file needs Keras' own layers only.
    code = ("import sys, json; sys.modules['doconv_tf'] = sys.modules['doconv_core'] = None\n"
            "import numpy as np, keras\n"
            f"model = keras.models.load_model({str(straight / 'fused.keras')!r})\n"
            "kinds = sorted({type(layer).__module__.split('.')[0] for layer in model.layers})\n"
            "out = model.predict(np.zeros((2,) + model.input_shape[1:], 'float32'), verbose=0)\n"
            "print(json.dumps({'kinds': kinds, 'shape': list(out.shape),\n"
            "                  'convs': [type(l).__name__ for l in model.layers\n"
            "                            if 'Conv' in type(l).__name__]}))")
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    classes = 3 if FOLDER_DATA else 10
    assert loaded == {"kinds": ["keras"], "shape": [2, classes], "convs": ["Conv2D", "Conv2D"]}


def test_builtin_resnet20_matches_the_pytorch_recipes_network():
    from samples import models_tf
    model = models_tf.resnet20(num_classes=10, input_shape=(28, 28, 3))
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert len(convs) == 19 and trainable == 269_722  # models_pt.resnet20's parameters
    x = np.random.default_rng(0).standard_normal((2, 28, 28, 3)).astype("float32")
    assert tuple(model(x).shape) == (2, 10)


def test_builtin_resnet20_is_drawn_from_the_seed_each_layer_its_own_draw():
    from samples import models_tf

    def kernels(seed: int) -> list[np.ndarray]:
        keras.utils.set_random_seed(seed)
        model = models_tf.resnet20(num_classes=10, input_shape=(28, 28, 3))
        return [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]

    first, again, other = kernels(1), kernels(1), kernels(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other) if a.std() > 0)
    same_shape = [w for w in first if w.shape == (3, 3, 16, 16)]  # layer1's 6 convs
    assert len(same_shape) == 6 and len({w.tobytes() for w in same_shape}) == 6


def test_training_batches_follow_the_seed_and_epoch_order_under_default_workers(monkeypatch):
    # Keras reads batches ahead (its symbolic build, tf.data's prefetching, the next epoch's
    # iterator made at the end of this one): every step must still train on the batch the
    # (seed, epoch) order names, from the first epoch or from a resumed one.
    from samples import recipe, train_tf
    monkeypatch.setattr(train_tf, "keras", keras)  # what main() sets once Keras is imported
    count, batch, epochs = 22, 4, 3  # 6 steps an epoch, the last one padded
    images = np.repeat(np.arange(count, dtype=np.uint8), 28 * 28).reshape(count, 28, 28)
    labels = np.arange(count) % 2
    source = train_tf.ArraySource(images, labels, 0.0, 1.0)  # pixels: index / 255
    data = train_tf.Data(source, source, labels, labels, 2, (28, 28, 3), "indices")
    args = train_tf.parser().parse_args(["--model", "m", "--data", "d", "--output", "o",
                                         "--batch-size", str(batch), "--seed", "3"])
    assert args.workers == 2  # the default
    steps = -(-count // batch)
    seen: list[list[int]] = []

    class Recorder(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.pool, self.dense = keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)

        def call(self, x):
            return self.dense(self.pool(x))

        def train_step(self, *state_and_data):  # JAX: (state, data); TensorFlow, torch: (data,)
            x = keras.ops.convert_to_numpy(state_and_data[-1][0])
            seen.append(np.rint(x[:, 0, 0, 0] * 255).astype(int).tolist())
            return super().train_step(*state_and_data)

    def expected(epoch: int) -> list[list[int]]:
        order = recipe.epoch_order(count, batch, args.seed, epoch)
        return [order[step * batch:(step + 1) * batch] for step in range(steps)]

    for first in (0, 1):  # an uninterrupted run, then one resumed after epoch 1
        seen.clear()
        model = Recorder()
        model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(
            from_logits=True), run_eagerly=True)
        batches, _ = train_tf.make_batches(data, args, types.SimpleNamespace(count=1), first)
        model.fit(batches, epochs=epochs, initial_epoch=first, steps_per_epoch=steps,
                  verbose=0, shuffle=False)
        assert seen == [b for epoch in range(first, epochs) for b in expected(epoch)], first


@pytest.mark.parametrize("group", [False, True], ids=["process", "process group"])
def test_sigterm_stops_between_steps_keeping_the_last_backup(tmp_path, data, group):
    # group: the signal reaches the loader workers as well (Slurm, systemd, a terminal)
    command = [sys.executable, SCRIPT, *data, "--epochs", "1000", "--output", str(tmp_path),
               *RECIPE]
    returncode, stderr = recipe_checks.terminate_after(command, tmp_path / "backup" / "recipe.json",
                                                       environment(), REPO, TIMEOUT_S,
                                                       group=group)
    assert returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM; the last completed epoch's backup is kept" in stderr
    assert "Traceback" not in stderr
    state = json.loads((tmp_path / "backup" / "recipe.json").read_text())
    assert 1 <= state["epoch"] < 1000 and len(state["metrics_epochs"]) == state["epoch"]
    assert not (tmp_path / "fused.keras").exists()


@pytest.mark.parametrize("flags", [
    ["--lr-schedule", "cosine", "--warmup-epochs", "2"],
    ["--lr-schedule", "step", "--lr-step-size", "2", "--lr-gamma", "0.5", "--warmup-epochs", "1"]])
def test_learning_rate_per_step_is_the_shared_schedule(monkeypatch, flags):
    from samples import recipe, train_tf
    monkeypatch.setattr(train_tf, "keras", keras)  # what main() sets once Keras is imported
    args = train_tf.parser().parse_args(["--model", "m", "--data", "d", "--output", "o",
                                         "--epochs", "5", "--lr", "0.2", *flags])
    schedule, steps_per_epoch = train_tf.make_schedule(args, 3), 3
    for step in range(5 * steps_per_epoch + 2):
        expected = args.lr * recipe.lr_factor(step / steps_per_epoch, 5, args.lr_schedule,
                                              args.warmup_epochs, args.lr_step_size,
                                              args.lr_gamma, steps_per_epoch)
        got = float(schedule(step))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), step


# ------------------------------------------------------------------------ bad input


def _bad_cases(root: Path, folder: Path, data: list[str], straight: Path
               ) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, the expected message's core); each case in its own folder."""
    at_straight = [*data, "--resume", "--epochs", "2", "--output", str(straight)]
    cases = {
        **recipe_checks.bad_data_cases(root, TINY),
        "model does not import": (["--model", "tests.test_keras.no_such_module:tiny", *data],
                                  "cannot import tests.test_keras.no_such_module"),
        "model is not a keras model": (["--model", "tests.test_keras.train_models:not_a_model",
                                        *data], "returned a int, not a Functional or Sequential"),
        "unknown model": (["--model", "resnet21", *data],
                          "--model 'resnet21': not a built-in model (resnet20), not a "
                          "keras.applications name"),
        "application below its minimum input size": (
            ["--model", "ResNet50", "--data", "mnist", "--limit", "24", "--quiet"],
            "--model ResNet50: building it for 10 classes and input 28x28x3 failed"),
        **recipe_checks.bad_resume_cases(RECIPE, data, straight, "backup", "resnet20"),
        "onnx": (["--model", TINY, *data, "--onnx"], "--onnx: the Keras recipe deploys"),
    }
    if DEVICES > 1:
        one_device = [a if a != str(DEVICES) else "1" for a in RECIPE]
        cases["checkpoint of another device count"] = (
            one_device + at_straight, f"was written by {DEVICES} device(s), this run has 1")
    if BACKEND == "torch":
        cases["more than one device"] = (["--model", TINY, *data, "--devices", "2"],
                                         "--devices 2: Keras' torch backend trains on one device")
    if BACKEND != "jax":
        cases["sync-bn"] = (["--model", TINY, *data, "--sync-bn"],
                            f"--sync-bn: not available on the {BACKEND} backend")
    if not FOLDER_DATA:
        cases["image folder without TensorFlow"] = (
            ["--model", TINY, "--data", str(folder)],
            f"image folders are decoded with tf.io, and TensorFlow is not installed beside "
            f"Keras' {BACKEND} backend")
    return cases


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, folder, data, straight):
    """Every bad-input case, started together: {name: (status, stdout, stderr, output,
    message)} and whether the refused backup was left as it was."""
    root = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(root, folder, data, straight)
    before = recipe_checks.snapshot(straight)
    results = recipe_checks.run_refused(SCRIPT, cases, root, environment(), REPO, TIMEOUT_S)
    return results, before == recipe_checks.snapshot(straight)


def test_bad_input_is_one_line_and_writes_nothing(bad_runs, straight):
    results, straight_unchanged = bad_runs
    assert len(results) >= 16
    for name, result in results.items():
        recipe_checks.assert_refused("train_tf.py", name, result, {straight: straight_unchanged})


if FOLDER_DATA:
    def test_image_that_fails_to_decode_while_training_is_one_line(tmp_path):
        # A PNG whose header is fine and whose pixel data is cut short passes the up-front
        # check and fails in tf.io while training: one line, exit 1, no backup.
        folder = write_image_folder(tmp_path / "images", train=2, val=1, jpeg=False)
        whole = png_bytes(np.random.default_rng(1).integers(0, 255, (32, 32, 3)))
        cut = folder / "train" / "class0" / "cut.png"
        cut.write_bytes(whole[:60])
        result = run([sys.executable, SCRIPT, "--data", str(folder), "--epochs", "1",
                      "--output", str(tmp_path / "out"), *RECIPE])
        recipe_checks.assert_failed_while_training("train_tf.py", result,
                                                   f"cannot read image {cut} (",
                                                   tmp_path / "out" / "backup")


# ------------------------------------------------------------------------ benchmark


BENCH = str(REPO / "benchmarks" / "bench_ddp_keras.py")

if BACKEND == "torch":
    def test_ddp_benchmark_refuses_the_torch_backend():
        result = run([sys.executable, BENCH, "--smoke"])
        assert result.returncode == 1 and "tensorflow and jax only" in result.stderr
else:
    def test_ddp_benchmark_smoke_prints_the_side_by_side_ratios(tmp_path):
        markdown = tmp_path / "bench.md"
        result = run([sys.executable, BENCH, "--smoke", "--markdown", str(markdown)])
        assert result.returncode == 0, result.stderr[-3000:]
        text = markdown.read_text()
        for needle in ("| 1 device |", "| 2 devices |", "doconv / native",
                       "2-device ratio - 1-device ratio", f"backend {BACKEND}"):
            assert needle in text, text


def test_help_says_what_this_recipe_does_as_the_readme_flag_tables_do():
    # Each recipe's own words for the flags whose meaning differs (batch per process or
    # device, loader processes or threads, its checkpoint, its --amp/--sync-bn/--onnx).
    recipe_checks.assert_help_matches_readme("train_tf.py", recipe_checks.recipe_help(
        SCRIPT, environment(), REPO))
