"""samples/train_gluoncv.py, the Gluon training recipe, end to end on tiny data: two CPU
contexts (--devices 2), resume, the fused export loaded by SymbolBlock.imports in a process
without doconv, SIGTERM, every bad input as one line, a model-zoo net on IDX data, and the
learning-rate schedule against recipe.lr_factor; and the two-device benchmark's smoke run.

Each run is a subprocess with one OpenMP thread; the bad-input runs start together.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon

import doconv_mx
from samples import recipe, recipe_table, train_gluoncv
from tests import recipe_checks
from tests.recipe_checks import write_image_folder
from tests.test_mx import train_models

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "samples" / "train_gluoncv.py")
TINY = "tests.test_mx.train_models:tiny"
TIMEOUT_S = 120
SIZE = ["--train-crop-size", "16", "--val-resize-size", "16", "--val-crop-size", "16"]
# The step schedule does not depend on --epochs, so a 1-epoch run continued to 2 follows
# the same learning rates as a 2-epoch run (a cosine schedule is stretched over --epochs).
RECIPE = ["--model", TINY, "--doconv", "--batch-size", "4", "--workers", "1", "--quiet",
          "--lr", "0.05", "--lr-schedule", "step", "--lr-step-size", "1", "--lr-gamma", "0.5",
          *SIZE]
TWO = ["--devices", "2"]


def environment() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=environment(),
                          cwd=REPO, timeout=TIMEOUT_S, **kwargs)


def run_recipe(*args: str) -> subprocess.CompletedProcess:
    result = run([sys.executable, SCRIPT, *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, folder) -> Path:
    """Two epochs on two CPU contexts, uninterrupted."""
    output = tmp_path_factory.mktemp("straight")
    # Two loader threads (the default), where the resumed run has one: the same numbers.
    run_recipe("--data", str(folder), "--epochs", "2", "--output", str(output), *TWO, *RECIPE,
               "--workers", "2")
    return output


def manifest(output: Path) -> dict:
    return json.loads((output / "checkpoint.json").read_text())


def checkpoint_arrays(output: Path) -> tuple[dict, dict]:
    saved = manifest(output)
    return (mx.nd.load(str(output / saved["params"]["file"])),
            mx.nd.load(str(output / saved["states"]["file"])))


def val_batch(folder: Path) -> tuple[mx.nd.NDArray, np.ndarray]:
    """The validation images as the recipe feeds them, and their labels."""
    scan = recipe.scan_image_folder(folder)
    images = train_gluoncv.FolderImages(scan.val, scan.classes, folder / "val", train=False,
                                        crop=16, resize=16, seed=0)
    x, y = zip(*(images[i] for i in range(len(images))))
    return mx.nd.stack(*x), np.array(y)


def trained_doconv(output: Path) -> gluon.HybridBlock:
    """The checkpoint's DO-Conv net, built as the recipe builds it (one context)."""
    net = train_models.tiny(num_classes=3)
    net.initialize(mx.init.MSRAPrelu())
    net(mx.nd.zeros((1, 3, 16, 16)))
    net = doconv_mx.convert(net)
    net.load_parameters(str(output / manifest(output)["params"]["file"]))
    return net


# --------------------------------------------------------------------- two devices


def test_resumed_run_ends_bit_identical_to_uninterrupted(tmp_path, folder, straight):
    run_recipe("--data", str(folder), "--epochs", "1", "--output", str(tmp_path), *TWO,
               *RECIPE)
    assert manifest(tmp_path)["epoch"] == 1
    result = run_recipe("--data", str(folder), "--epochs", "2", "--output", str(tmp_path),
                        "--resume", *TWO, *RECIPE)
    assert "resumed after epoch 1" in result.stdout
    (params, states), (expected_params, expected_states) = (checkpoint_arrays(tmp_path),
                                                            checkpoint_arrays(straight))
    assert manifest(tmp_path)["epoch"] == manifest(straight)["epoch"] == 2
    assert params.keys() == expected_params.keys() and states.keys() == expected_states.keys()
    assert len(states) == len([k for k in params if not k.endswith(("running_mean",
                                                                    "running_var"))])
    for key, value in [*expected_params.items(), *expected_states.items()]:
        mine = params[key] if key in params else states[key]
        assert np.array_equal(mine.asnumpy(), value.asnumpy()), key

    def measured(epochs):  # all but the wall time
        return [{k: v for k, v in entry.items() if k != "seconds"} for entry in epochs]

    assert measured(manifest(tmp_path)["metrics_epochs"]) == \
        measured(manifest(straight)["metrics_epochs"])
    assert (tmp_path / "fused-0000.params").read_bytes() == \
        (straight / "fused-0000.params").read_bytes()


def test_metrics_record_every_epoch_and_fused_equals_unfused(folder, straight):
    metrics = recipe.read_metrics(straight)
    assert (metrics["framework"], metrics["world_size"], metrics["model"],
            metrics["doconv"]) == ("gluon", 2, TINY, True)
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert all(e["train_loss"] > 0 and e["seconds"] > 0 for e in metrics["epochs"])
    assert metrics["fused_identical_predictions"] is True
    assert metrics["fused_val_accuracy"] == metrics["val_accuracy"] == \
        metrics["epochs"][-1]["val_accuracy"]
    # All 9 validation images, although the last batch splits 5 + 4 over the devices: the
    # accuracy is the checkpoint's net's on the whole set, recomputed here on one context.
    x, y = val_batch(folder)
    predicted = trained_doconv(straight)(x).argmax(axis=1).asnumpy()
    assert len(y) == 9
    assert metrics["val_accuracy"] == pytest.approx(100.0 * float(np.mean(predicted == y)))
    saved = manifest(straight)
    assert sorted(p.name for p in straight.iterdir()) == sorted([
        "checkpoint.json", saved["params"]["file"], saved["states"]["file"],
        "fused-0000.params", "fused-symbol.json", "metrics.json"])  # no temporary files left
    assert saved["params"]["file"] == "checkpoint-epoch0002.params"  # epoch 1's removed


def test_results_table_reads_the_gluon_runs_unchanged(straight):
    text = recipe_table.results_table([recipe.read_metrics(straight)])
    assert f"| {TINY} | DO-Conv | 1 |" in text
    assert "predictions identical to the unfused model's in every run" in text


def test_fused_export_loads_with_symbolblock_alone_and_matches(tmp_path, folder, straight):
    x, _ = val_batch(folder)
    np.save(tmp_path / "x.npy", x.asnumpy())
    # A process that imports mxnet and numpy only; doconv must not be needed, or importable.
    code = (
        "import sys, warnings\n"
        "sys.modules['doconv_mx'] = None; sys.modules['doconv_core'] = None\n"
        "import numpy as np, mxnet as mx\n"
        "warnings.simplefilter('ignore')\n"
        f"out = {str(straight)!r}\n"
        "net = mx.gluon.SymbolBlock.imports(out + '/fused-symbol.json', ['data'],\n"
        "                                   out + '/fused-0000.params')\n"
        f"x = mx.nd.array(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, net(x).asnumpy())\n"
        "assert not [m for m in sys.modules if m.startswith('doconv') and sys.modules[m]]\n")
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    deployed = np.load(tmp_path / "y.npy")
    expected = trained_doconv(straight)(x).asnumpy()
    np.testing.assert_allclose(deployed, expected, rtol=1e-4, atol=1e-5)
    assert np.array_equal(deployed.argmax(axis=1), expected.argmax(axis=1))
    assert "DOConv" not in (straight / "fused-symbol.json").read_text()


def test_checkpoint_manifest_names_its_files_by_hash_and_holds_the_resume_keys(straight):
    saved = manifest(straight)
    assert {"format", "epoch", "model_name", "doconv", "world_size", "settings", "params",
            "states", "metrics_epochs"} <= set(saved)
    assert saved["world_size"] == 2 and saved["settings"]["batch_size"] == 4
    for part in ("params", "states"):
        assert train_gluoncv._sha256(straight / saved[part]["file"]) == saved[part]["sha256"]


def test_a_failure_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from types import SimpleNamespace

    net = gluon.nn.Dense(2, in_units=3)
    net.initialize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"momentum": 0.9})
    with autograd.record():
        loss = net(mx.nd.ones((2, 3))).sum()
    loss.backward()
    trainer.step(2)
    run = SimpleNamespace(net=net, trainer=trainer)
    train_gluoncv.save_checkpoint(tmp_path, run, {"epoch": 1})
    before = (tmp_path / "checkpoint.json").read_text()

    def broken(trainer):
        raise OSError("disk full")

    monkeypatch.setattr(train_gluoncv, "optimizer_states", broken)
    with pytest.raises(OSError, match="disk full"):
        train_gluoncv.save_checkpoint(tmp_path, run, {"epoch": 2})
    assert (tmp_path / "checkpoint.json").read_text() == before
    saved = json.loads(before)
    for part in ("params", "states"):
        assert train_gluoncv._sha256(tmp_path / saved[part]["file"]) == saved[part]["sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # epoch 2's params, written before the failure, are an orphan the manifest never names
    assert saved["params"]["file"] == "checkpoint-epoch0001.params"


def test_folder_images_read_by_many_threads_at_once_are_as_read_alone(folder):
    # The loader's threads read the dataset at once while the main thread builds a graph.
    # Its transforms were hybridized Gluon blocks, whose first calls built their graph in a
    # name scope that is not thread-safe: `--workers 2` on an image folder failed 1 run in 3
    # or 4 ('NoneType' object has no attribute '__exit__'), this loop about 1 trial in 10.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    scan = recipe.scan_image_folder(folder)
    threads = 4

    def dataset(train: bool):
        return train_gluoncv.FolderImages(scan.train if train else scan.val, scan.classes,
                                          folder, train=train, crop=12, resize=14, seed=3)

    alone = {train: [dataset(train)[i][0].asnumpy() for i in range(threads - 1)]
             for train in (True, False)}

    def build_a_block() -> None:
        net = gluon.nn.HybridSequential()
        net.add(gluon.nn.Dense(2))
        net.initialize()
        net.hybridize()
        net(mx.nd.zeros((1, 3)))

    with ThreadPoolExecutor(threads) as pool:
        for trial in range(100):
            for train in (True, False):
                fresh, start = dataset(train), threading.Barrier(threads)

                def read(index: int) -> np.ndarray:
                    start.wait()
                    return fresh[index][0].asnumpy()

                def build() -> None:
                    start.wait()
                    build_a_block()

                futures = [pool.submit(read, i) for i in range(threads - 1)]
                built = pool.submit(build)
                for index, future in enumerate(futures):
                    assert future.result(timeout=60).tobytes() == \
                        alone[train][index].tobytes(), (trial, train, index)
                built.result(timeout=60)


def test_sigterm_to_the_process_group_keeps_a_loadable_checkpoint_and_exits_143(tmp_path,
                                                                                folder):
    # The whole group, as Slurm and systemd signal it, with the default --workers (threads).
    command = [sys.executable, SCRIPT, "--data", str(folder), "--epochs", "1000",
               "--output", str(tmp_path), *TWO, *RECIPE, "--workers", "2"]
    returncode, stderr = recipe_checks.terminate_after(command, tmp_path / "checkpoint.json",
                                                       environment(), REPO, TIMEOUT_S,
                                                       group=True)
    assert returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    saved = manifest(tmp_path)
    assert 1 <= saved["epoch"] < 1000 and len(saved["metrics_epochs"]) == saved["epoch"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    checkpoint_arrays(tmp_path)  # loads


# ------------------------------------------------------------------ bad input


def _bad_cases(root: Path, folder: Path, straight: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, the expected message's core); each case in its own folder."""
    tampered = root / "tampered"
    shutil.copytree(straight, tampered)
    params = tampered / manifest(tampered)["params"]["file"]
    params.write_bytes(params.read_bytes()[:-4] + b"\0\0\0\0")
    data = ["--data", str(folder)]
    resume = ["--resume", "--epochs", "2"]
    return {
        **recipe_checks.bad_data_cases(root, TINY),
        "model does not import": (["--model", "tests.test_mx.no_such_module:tiny", *data],
                                  "cannot import tests.test_mx.no_such_module"),
        "model is not a HybridBlock": (["--model", "tests.test_mx.train_models:not_a_block",
                                        *data], "returned a int, not a mxnet.gluon.HybridBlock"),
        "unknown model-zoo name": (["--model", "resnet20_v1", *data],
                                   "--model 'resnet20_v1': not a gluoncv.model_zoo name "
                                   "(close: cifar_resnet20_v1"),
        "flag Gluon cannot honour": (["--model", TINY, *data, "--onnx"],
                                     "--onnx: the Gluon recipe exports MXNet's symbol"),
        **recipe_checks.bad_resume_cases([*RECIPE, *TWO], data, straight, "checkpoint.json",
                                         "cifar_resnet20_v1"),
        "checkpoint of another device count": (RECIPE + [*data, *resume, "--output",
                                                         str(straight)],
                                               "was written by 2 device(s), this run has 1"),
        "checkpoint with a changed params file": (RECIPE + [*data, *TWO, *resume, "--output",
                                                            str(tampered)],
                                                  "is not the file"),
    }


BAD_CASES = ["missing data", "empty data folder", "no class folders", "empty class folder",
             "mismatched classes", "unreadable image", "model does not import",
             "model is not a HybridBlock", "unknown model-zoo name", "flag Gluon cannot honour",
             "missing checkpoint", "checkpoint of another model",
             "checkpoint with another doconv setting", "checkpoint of another device count",
             "checkpoint with other settings", "checkpoint with a changed params file",
             "existing checkpoint without --resume"]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, folder, straight):
    """Every bad-input case, started together: the results, and per refused checkpoint
    folder whether it was left as it was."""
    root = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(root, folder, straight)
    assert sorted(cases) == sorted(BAD_CASES)
    kept = [straight, root / "tampered"]
    before = [recipe_checks.snapshot(output) for output in kept]
    results = recipe_checks.run_refused(SCRIPT, cases, root, environment(), REPO, TIMEOUT_S)
    return results, {output: recipe_checks.snapshot(output) == snapshot
                     for output, snapshot in zip(kept, before)}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_writes_nothing(bad_runs, case):
    results, kept = bad_runs
    recipe_checks.assert_refused("train_gluoncv.py", case, results[case], kept)


def test_unreadable_image_found_while_training_is_one_line(tmp_path):
    # A truncated JPEG passes Pillow's up-front check (verify() reads no JPEG data) and
    # fails to decode in a loading thread: the recipe's one line and no checkpoint (OpenCV,
    # Gluon's usual decoder, would have filled the missing part with gray).
    folder = write_image_folder(tmp_path / "images", train=2, val=1)
    truncated = recipe_checks.write_truncated_jpeg(folder / "train" / "class0" / "cut.jpg")
    result = run([sys.executable, SCRIPT, "--data", str(folder), "--epochs", "1",
                  "--output", str(tmp_path / "out"), *RECIPE])
    recipe_checks.assert_failed_while_training("train_gluoncv.py", result,
                                               f"cannot read image {truncated} (",
                                               tmp_path / "out" / "checkpoint.json")


@pytest.mark.parametrize("module, model, message", [
    ("gluoncv", "cifar_resnet20_v1", '--model (a gluoncv.model_zoo name) needs gluoncv, which '
                                     'is not installed: pip install "doconv[mx]"'),
    ("PIL", TINY, '--data (an image folder) needs Pillow, which is not installed: '
                  'pip install "doconv[samples]"')])
def test_a_missing_optional_package_is_one_line_before_training(tmp_path, folder, module,
                                                                model, message):
    output = tmp_path / "out"
    result = run(recipe_checks.without_modules(SCRIPT, [module], [
        "--data", str(folder), "--epochs", "1", "--output", str(output), *RECIPE,
        "--model", model]))
    recipe_checks.assert_refused("train_gluoncv.py", module, (result.returncode, result.stdout,
                                                              result.stderr, output, message), {})


def test_a_model_of_its_own_on_idx_data_trains_without_gluoncv_and_pillow(tmp_path):
    result = run(recipe_checks.without_modules(SCRIPT, ["gluoncv", "PIL"], [
        "--model", TINY, "--data", "mnist", "--limit", "16", "--epochs", "1", "--batch-size",
        "8", "--workers", "0", "--quiet", "--output", str(tmp_path)]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert recipe.read_metrics(tmp_path)["gluoncv_version"] is None


# ---------------------------------------------------------- model zoo, IDX data


def test_model_zoo_net_on_idx_data_converts_fuses_and_deploys(tmp_path):
    result = run([sys.executable, SCRIPT, "--model", "cifar_resnet20_v1", "--doconv", "--data",
                  "mnist", "--limit", "24", "--epochs", "1", "--batch-size", "8",
                  "--workers", "0", "--quiet", "--output", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = recipe.read_metrics(tmp_path)
    assert metrics["world_size"] == 1 and metrics["fused_identical_predictions"] is True
    assert len(metrics["epochs"]) == 1 and 0 <= metrics["val_accuracy"] <= 100
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = gluon.SymbolBlock.imports(str(tmp_path / "fused-symbol.json"), ["data"],
                                        str(tmp_path / "fused-0000.params"))
    assert net(mx.nd.zeros((2, 3, 28, 28))).shape == (2, 10)


# ------------------------------------------------------------------- schedule


@pytest.mark.parametrize("schedule, warmup", [("cosine", 1), ("step", 0), ("step", 2)])
def test_trainer_learning_rate_per_step_is_recipe_lr_factor(schedule, warmup):
    """The Trainer over two contexts (kvstore, one updater per device) uses, at step s
    (0-based), lr * lr_factor(s / steps_per_epoch), as train_pt.py's LambdaLR; an optimizer
    resumed with begin_num_update continues the same sequence."""
    parser = train_gluoncv.parser()
    args = parser.parse_args(["--model", "m", "--data", "d", "--output", "o", "--lr", "0.4",
                              "--epochs", "4", "--lr-schedule", schedule, "--lr-step-size",
                              "1", "--lr-gamma", "0.5", "--warmup-epochs", str(warmup)])
    steps_per_epoch, ctx = 3, [mx.cpu(0), mx.cpu(1)]
    expected = [0.4 * recipe.lr_factor(s / steps_per_epoch, 4, schedule, warmup, 1, 0.5,
                                       steps_per_epoch) for s in range(12)]

    def learning_rates(begin: int, steps: int) -> list[float]:
        net = gluon.nn.Dense(2, in_units=3)
        net.initialize(ctx=ctx)
        optimizer = mx.optimizer.SGD(
            learning_rate=args.lr, momentum=0.9,
            lr_scheduler=train_gluoncv.RecipeSchedule(args, steps_per_epoch),
            begin_num_update=begin)
        trainer = gluon.Trainer(net.collect_params(), optimizer, kvstore="device",
                                update_on_kvstore=False)
        rates = []
        for _ in range(steps):
            with autograd.record():
                losses = [net(mx.nd.ones((2, 3), ctx=c)).sum() for c in ctx]
            autograd.backward(losses)
            trainer.step(4)
            rates.append(trainer.learning_rate)  # the rate of the update just made
        return rates

    assert learning_rates(0, 12) == pytest.approx(expected, rel=1e-12)
    assert learning_rates(7, 5) == pytest.approx(expected[7:], rel=1e-12)
    if warmup:
        assert expected[0] == pytest.approx(0.4 / (warmup * steps_per_epoch))
    assert not math.isnan(sum(expected))


# ------------------------------------------------------------------------ benchmark


def test_two_device_benchmark_smoke_prints_the_side_by_side_ratios(tmp_path):
    markdown = tmp_path / "bench.md"
    result = run([sys.executable, str(REPO / "benchmarks" / "bench_ddp_gluon.py"), "--smoke",
                  "--markdown", str(markdown)])
    assert result.returncode == 0, result.stderr[-3000:]
    text = markdown.read_text()
    for needle in ("| 1 device |", "| 2 devices (kvstore) |", "doconv / native",
                   "two-device ratio - one-device ratio"):
        assert needle in text, text


def test_help_says_what_this_recipe_does_as_the_readme_flag_tables_do():
    # Each recipe's own words for the flags whose meaning differs (batch per process or
    # device, loader processes or threads, its checkpoint, its --amp/--sync-bn/--onnx).
    recipe_checks.assert_help_matches_readme("train_gluoncv.py", recipe_checks.recipe_help(
        SCRIPT, environment(), REPO))
