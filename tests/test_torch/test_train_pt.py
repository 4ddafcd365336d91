"""samples/train_pt.py, the training recipe, end to end on tiny data: under torchrun with two
gloo processes (resume, fused deploy, validation across ranks, SIGTERM), every bad input as
one line, the built-in models, and the DDP benchmark's smoke run.

Each run is a subprocess with one thread per process; the bad-input runs start together.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import doconv_torch
from samples import models_pt, train_pt
from tests import recipe_checks
from tests.recipe_checks import write_image_folder
from tests.test_torch import train_models

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "samples" / "train_pt.py")
TINY = "tests.test_torch.train_models:tiny"
TIMEOUT_S = 120
SIZE = ["--train-crop-size", "16", "--val-resize-size", "16", "--val-crop-size", "16"]
# The step schedule does not depend on --epochs, so a 1-epoch run continued to 2 follows
# the same learning rates as a 2-epoch run (a cosine schedule is stretched over --epochs).
RECIPE = ["--model", TINY, "--doconv", "--batch-size", "4", "--workers", "1", "--quiet",
          "--lr", "0.05", "--lr-schedule", "step", "--lr-step-size", "1", "--lr-gamma", "0.5",
          *SIZE]


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def torchrun(nproc: int = 2) -> list[str]:
    # --standalone: a free port of its own, so runs beside other tests never collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc)]


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=environment(),
                          cwd=REPO, timeout=TIMEOUT_S, **kwargs)


def run_recipe(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    result = run([*torchrun(nproc), SCRIPT, *args])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, folder) -> Path:
    """Two epochs under torchrun, uninterrupted, with the ONNX export."""
    output = tmp_path_factory.mktemp("straight")
    run_recipe("--data", str(folder), "--epochs", "2", "--output", str(output), "--onnx",
               *RECIPE)
    return output


def load(path: Path):
    return torch.load(path, weights_only=True)


def val_batch(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images as the recipe feeds them, and their labels."""
    scan = train_pt.recipe.scan_image_folder(folder)
    images = train_pt.FolderImages(scan.val, train=False, crop=16, resize=16, seed=0)
    x, y = zip(*(images[i] for i in range(len(images))))
    return torch.stack(x), torch.tensor(y)


def trained_doconv(output: Path) -> torch.nn.Module:
    model = doconv_torch.convert(train_models.tiny(num_classes=3))
    model.load_state_dict(load(output / "checkpoint.pt")["model"])
    return model.eval()


# ------------------------------------------------------------------- torchrun, 2 ranks


def test_resumed_run_ends_bit_identical_to_uninterrupted(tmp_path, folder, straight):
    run_recipe("--data", str(folder), "--epochs", "1", "--output", str(tmp_path), *RECIPE)
    assert load(tmp_path / "checkpoint.pt")["epoch"] == 1
    result = run_recipe("--data", str(folder), "--epochs", "2", "--output", str(tmp_path),
                        "--resume", *RECIPE)
    assert "resumed after epoch 1" in result.stdout
    resumed, uninterrupted = load(tmp_path / "checkpoint.pt"), load(straight / "checkpoint.pt")
    assert resumed["epoch"] == uninterrupted["epoch"] == 2
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for index, state in uninterrupted["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][index]["momentum_buffer"],
                           state["momentum_buffer"])
    def measured(epochs):  # all but the wall time
        return [{k: v for k, v in entry.items() if k != "seconds"} for entry in epochs]

    assert measured(resumed["metrics_epochs"]) == measured(uninterrupted["metrics_epochs"])


def test_metrics_record_every_epoch_and_fused_equals_unfused(folder, straight):
    metrics = train_pt.recipe.read_metrics(straight)
    assert (metrics["world_size"], metrics["model"], metrics["doconv"]) == (2, TINY, True)
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert all(e["train_loss"] > 0 and e["seconds"] > 0 for e in metrics["epochs"])
    assert metrics["fused_identical_predictions"] is True
    assert metrics["fused_val_accuracy"] == metrics["val_accuracy"] == \
        metrics["epochs"][-1]["val_accuracy"]
    # Every one of the 9 validation images counted once, although the ranks hold 5 each:
    # the accuracy is the trained model's on the whole set, recomputed here.
    x, y = val_batch(folder)
    with torch.no_grad():
        predicted = trained_doconv(straight)(x).argmax(dim=1)
    assert len(y) == 9
    assert metrics["val_accuracy"] == pytest.approx(100.0 * float((predicted == y).float().mean()))
    assert sorted(p.name for p in straight.iterdir()) == [
        "checkpoint.pt", "fused.onnx", "fused.pt", "metrics.json"]  # no temporary files left


def test_fused_weights_load_strictly_into_the_plain_model_and_match(folder, straight):
    plain = train_models.tiny(num_classes=3)
    plain.load_state_dict(load(straight / "fused.pt"), strict=True)
    plain.eval()
    assert not doconv_torch.doconv_layers(plain)
    x, _ = val_batch(folder)
    with torch.no_grad():
        expected, fused = trained_doconv(straight)(x), plain(x)
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(fused.argmax(dim=1), expected.argmax(dim=1))
    import onnxruntime
    session = onnxruntime.InferenceSession(str(straight / "fused.onnx"))
    name = session.get_inputs()[0].name
    np.testing.assert_allclose(session.run(None, {name: x.numpy()})[0], fused.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_checkpoint_holds_only_plain_data_and_the_resume_keys(straight):
    checkpoint = load(straight / "checkpoint.pt")  # weights_only: no code, no classes
    assert {"model", "optimizer", "scheduler", "epoch", "model_name", "doconv", "world_size",
            "settings"} <= set(checkpoint)
    assert checkpoint["settings"]["seed"] == 0 and checkpoint["settings"]["batch_size"] == 4


def test_sigterm_keeps_a_loadable_checkpoint_and_exits_nonzero(tmp_path, folder):
    command = [*torchrun(), SCRIPT, "--data", str(folder), "--epochs", "1000",
               "--output", str(tmp_path), *RECIPE]
    returncode, stderr = recipe_checks.terminate_after(command, tmp_path / "checkpoint.pt",
                                                       environment(), REPO, TIMEOUT_S)
    assert returncode != 0, stderr
    # torchrun owns its workers' shutdown: it forwards the signal and kills a worker not gone
    # within its grace period (a loaded machine can exceed it), so rank 0's "stopped by
    # SIGTERM" line is checked on one process (below); here what must hold either way.
    checkpoint = load(tmp_path / "checkpoint.pt")
    assert 1 <= checkpoint["epoch"] < 1000
    assert len(checkpoint["metrics_epochs"]) == checkpoint["epoch"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_sigterm_on_one_process_exits_143(tmp_path, folder):
    command = [sys.executable, SCRIPT, "--data", str(folder), "--epochs", "1000",
               "--output", str(tmp_path), *RECIPE]
    returncode, stderr = recipe_checks.terminate_after(command, tmp_path / "checkpoint.pt",
                                                       environment(), REPO, TIMEOUT_S)
    assert returncode == 143, stderr
    assert "Traceback" not in stderr
    assert "train_pt.py: stopped by SIGTERM; the last completed epoch's checkpoint is kept" in stderr
    assert load(tmp_path / "checkpoint.pt")["epoch"] >= 1


def test_sigterm_to_the_process_group_with_worker_processes_exits_143(tmp_path, folder):
    # Slurm and systemd signal the whole group, the data-loading workers too. The signal is
    # sent as the first checkpoint appears, while the next epoch's workers start (spawned:
    # seconds of importing torch before any code of the recipe runs in them).
    command = [sys.executable, SCRIPT, "--data", str(folder), "--epochs", "1000",
               "--output", str(tmp_path), *RECIPE, "--workers", "2"]
    returncode, stderr = recipe_checks.terminate_after(command, tmp_path / "checkpoint.pt",
                                                       environment(), REPO, TIMEOUT_S,
                                                       group=True)
    assert returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "exited unexpectedly" not in stderr, stderr[-3000:]
    assert "train_pt.py: stopped by SIGTERM; the last completed epoch's checkpoint is kept" in stderr
    checkpoint = load(tmp_path / "checkpoint.pt")
    assert 1 <= checkpoint["epoch"] < 1000
    assert len(checkpoint["metrics_epochs"]) == checkpoint["epoch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.json"]


def test_bad_input_under_torchrun_fails_on_every_rank_without_hanging(tmp_path):
    result = run([*torchrun(), SCRIPT, "--model", "resnet20", "--data",
                  str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert result.returncode != 0
    message = f"train_pt.py: error: --data {tmp_path / 'missing'}: no such folder"
    # Each rank checks on its own and fails with its one line; but torchrun SIGTERMs the
    # other rank as soon as one fails, so on a loaded machine a rank still importing torch
    # ends by that signal first (about 1 run in 4 here): one or two lines.
    assert result.stderr.count(message) in (1, 2), result.stderr
    if result.stderr.count(message) == 1:
        assert "exitcode  : -15" in result.stderr, result.stderr  # torchrun's SIGTERM
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ bad input, 1 process


def _bad_cases(root: Path, folder: Path, straight: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, the expected message's core); each case in its own folder."""
    data = ["--data", str(folder)]
    return {
        **recipe_checks.bad_data_cases(root, TINY),
        "model does not import": (["--model", "tests.test_torch.no_such_module:tiny", *data],
                                  "cannot import tests.test_torch.no_such_module"),
        "model is not an nn.Module": (["--model", "tests.test_torch.train_models:not_a_module",
                                       *data], "returned a int, not a torch.nn.Module"),
        "unknown built-in": (["--model", "resnet21", *data],
                             "--model 'resnet21': not a built-in model"),
        **recipe_checks.bad_resume_cases(RECIPE, data, straight, "checkpoint.pt", "resnet20"),
        "checkpoint of another world size": (
            RECIPE + [*data, "--resume", "--epochs", "2", "--output", str(straight)],
            "was written by 2 process(es), this run has 1"),
    }


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, folder, straight):
    """Every bad-input case, started together: the results, and whether the checkpoint
    the resumes were refused left as it was."""
    root = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(root, folder, straight)
    assert sorted(cases) == sorted(BAD_CASES)
    before = recipe_checks.snapshot(straight)
    results = recipe_checks.run_refused(SCRIPT, cases, root, environment(), REPO, TIMEOUT_S)
    return results, before == recipe_checks.snapshot(straight)


BAD_CASES = ["missing data", "empty data folder", "no class folders", "empty class folder",
             "mismatched classes",
             "unreadable image", "model does not import", "model is not an nn.Module",
             "unknown built-in", "missing checkpoint", "checkpoint of another model",
             "checkpoint with another doconv setting", "checkpoint of another world size",
             "checkpoint with other settings", "existing checkpoint without --resume"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_writes_nothing(bad_runs, case, straight):
    results, straight_unchanged = bad_runs
    recipe_checks.assert_refused("train_pt.py", case, results[case],
                                 {straight: straight_unchanged})


def test_unreadable_image_found_while_training_is_one_line(tmp_path):
    # A truncated JPEG passes Pillow's up-front check (verify() reads no JPEG data) and
    # fails to decode in a data-loading worker: the recipe's one line, not the
    # DataLoader's traceback, and no checkpoint.
    folder = write_image_folder(tmp_path / "images", train=2, val=1)
    truncated = recipe_checks.write_truncated_jpeg(folder / "train" / "class0" / "cut.jpg")
    result = run([sys.executable, SCRIPT, "--data", str(folder), "--epochs", "1",
                  "--output", str(tmp_path / "out"), *RECIPE])
    recipe_checks.assert_failed_while_training("train_pt.py", result,
                                               f"cannot read image {truncated} (",
                                               tmp_path / "out" / "checkpoint.pt")


@pytest.mark.parametrize("module, flags, message", [
    ("onnxscript", ["--onnx"],
     '--onnx needs onnxscript, which is not installed: pip install "doconv[onnx]"'),
    ("PIL", [], '--data (an image folder) needs Pillow, which is not installed: '
                'pip install "doconv[samples]"')])
def test_a_missing_optional_package_is_one_line_before_training(tmp_path, folder, module, flags,
                                                                message):
    output = tmp_path / "out"
    result = run(recipe_checks.without_modules(SCRIPT, [module], [
        "--data", str(folder), "--epochs", "1", "--output", str(output), *RECIPE, *flags]))
    recipe_checks.assert_refused("train_pt.py", module, (result.returncode, result.stdout,
                                                         result.stderr, output, message), {})


# ------------------------------------------------------------------ IDX data, models


def test_idx_data_reaches_the_model_with_three_channels(tmp_path):
    result = run([sys.executable, SCRIPT, "--model", TINY, "--data", "mnist", "--limit", "40",
                  "--epochs", "1", "--batch-size", "8", "--workers", "0", "--quiet",
                  "--output", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    metrics = train_pt.recipe.read_metrics(tmp_path)
    assert metrics["doconv"] is False and metrics["fused_val_accuracy"] is None
    assert len(metrics["epochs"]) == 1 and 0 <= metrics["val_accuracy"] <= 100
    plain = train_models.tiny(num_classes=10)
    plain.load_state_dict(load(tmp_path / "fused.pt"), strict=True)


def test_idx_data_trains_without_pillow(tmp_path):
    result = run(recipe_checks.without_modules(SCRIPT, ["PIL"], [
        "--model", TINY, "--data", "mnist", "--limit", "16", "--epochs", "1", "--batch-size",
        "8", "--workers", "0", "--quiet", "--output", str(tmp_path)]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "fused.pt").is_file()


@pytest.mark.parametrize("name, parameters", [
    ("resnet18", 11_689_512), ("resnet50", 25_557_032), ("mobilenet_v2", 3_504_872)])
def test_imagenet_builtins_have_torchvisions_parameters_and_keys(name, parameters):
    model = models_pt.BUILTIN_MODELS[name](num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == parameters  # torchvision's counts
    keys = set(model.state_dict())
    expected = {"resnet18": {"conv1.weight", "layer1.0.bn2.running_var",
                             "layer2.0.downsample.0.weight", "layer4.1.conv2.weight",
                             "fc.bias"},
                "resnet50": {"layer1.0.conv3.weight", "layer4.2.bn3.num_batches_tracked",
                             "layer3.0.downsample.1.running_mean"},
                "mobilenet_v2": {"features.0.0.weight", "features.1.conv.0.0.weight",
                                 "features.1.conv.2.weight", "features.2.conv.3.running_var",
                                 "features.18.1.bias", "classifier.1.weight"}}[name]
    assert expected <= keys


@pytest.mark.parametrize("name", sorted(models_pt.BUILTIN_MODELS))
def test_builtins_take_28x28_three_channel_input_and_convert(name):
    model = models_pt.BUILTIN_MODELS[name](num_classes=10).eval()
    x = torch.randn(2, 3, 28, 28)
    doconv = doconv_torch.convert(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(doconv(x), model(x), rtol=1e-4, atol=1e-4)
    assert model(x).shape == (2, 10)


def test_resnet20_and_56_have_the_papers_depth_and_size():
    for name, convs, parameters in (("resnet20", 19, 0.27e6), ("resnet56", 55, 0.85e6)):
        model = models_pt.BUILTIN_MODELS[name]()
        assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == convs
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.01)


def test_ddp_benchmark_smoke_prints_the_side_by_side_ratios(tmp_path):
    markdown = tmp_path / "bench.md"
    result = run([sys.executable, str(REPO / "benchmarks" / "bench_ddp_torch.py"), "--smoke",
                  "--markdown", str(markdown)])
    assert result.returncode == 0, result.stderr[-3000:]
    text = markdown.read_text()
    for needle in ("| 1 process |", "| 2 processes (DDP) |", "doconv / native",
                   "DDP ratio - single-process ratio"):
        assert needle in text, text


def test_help_says_what_this_recipe_does_as_the_readme_flag_tables_do():
    # Each recipe's own words for the flags whose meaning differs (batch per process or
    # device, loader processes or threads, its checkpoint, its --amp/--sync-bn/--onnx).
    recipe_checks.assert_help_matches_readme("train_pt.py", recipe_checks.recipe_help(
        SCRIPT, environment(), REPO))
