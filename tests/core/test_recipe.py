"""samples/recipe.py, the recipes' framework-neutral part, and samples/recipe_table.py:
the t distribution against closed forms and table values, Welch's t-test, image-folder
checks, the schedule, atomic writes, metrics.json and the results table (NumPy only)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from samples import recipe, recipe_table
from samples.recipe import RecipeError

HELP = {name: f"{name} as this recipe does it" for name in recipe.RECIPE_HELP_FLAGS}


# --------------------------------------------------------------------- t distribution


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.3, 0.0, 0.7, 1.0, 4.2, 100.0])
def test_t_cdf_matches_the_closed_forms_for_1_and_2_degrees_of_freedom(t):
    assert recipe.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi,
                                                       rel=1e-12, abs=1e-14)
    assert recipe.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)),
                                                       rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("t, df, two_sided_p", [
    (12.7062047362, 1, 0.05), (4.30265272975, 2, 0.05), (2.22813885196, 10, 0.05),
    (2.04227245630, 30, 0.05), (3.16927267261, 10, 0.01), (1.81246112281, 10, 0.10),
    (2.57058183661, 5, 0.05)])
def test_t_cdf_matches_the_critical_value_tables(t, df, two_sided_p):
    assert 2 * (1 - recipe.student_t_cdf(t, df)) == pytest.approx(two_sided_p, rel=1e-8)


def test_t_cdf_tends_to_the_normal_and_has_fractional_degrees_of_freedom():
    for t in (-2.0, 0.5, 1.96):
        normal = 0.5 * (1 + math.erf(t / math.sqrt(2)))
        assert recipe.student_t_cdf(t, 1e7) == pytest.approx(normal, abs=1e-6)
    # Between the neighbouring integer degrees of freedom, monotonically.
    assert recipe.student_t_cdf(2.0, 5) < recipe.student_t_cdf(2.0, 5.5) < \
        recipe.student_t_cdf(2.0, 6)


def test_incomplete_beta_symmetry_and_edges():
    for a, b, x in ((0.5, 3.0, 0.2), (7.0, 0.5, 0.9), (2.5, 2.5, 0.5)):
        assert recipe.regularized_incomplete_beta(a, b, x) + \
            recipe.regularized_incomplete_beta(b, a, 1 - x) == pytest.approx(1.0, rel=1e-12)
    assert recipe.regularized_incomplete_beta(2, 3, 0.0) == 0.0
    assert recipe.regularized_incomplete_beta(2, 3, 1.0) == 1.0
    # I_x(1, 1) = x and I_x(a, 1) = x ** a
    assert recipe.regularized_incomplete_beta(1, 1, 0.3) == pytest.approx(0.3, rel=1e-12)
    assert recipe.regularized_incomplete_beta(3, 1, 0.4) == pytest.approx(0.064, rel=1e-12)
    with pytest.raises(ValueError):
        recipe.regularized_incomplete_beta(0, 1, 0.5)


# --------------------------------------------------------------------- Welch's t-test


def two_sided_tail_by_integration(t: float, df: float) -> float:
    """2 P(T > t), t > 0, by the trapezoidal rule on the density (x = t + s / (1 - s))."""
    density = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    s = np.linspace(0.0, 1.0, 1_000_001)[:-1]
    x = t + s / (1 - s)
    f = density * (1 + x * x / df) ** (-(df + 1) / 2) / (1 - s) ** 2
    return 2 * float(np.sum(f[1:] + f[:-1]) / 2 * (s[1] - s[0]))  # np.trapezoid: NumPy 2 only


def test_welch_t_test_known_values():
    # a = 1..5, b = 2, 4, .., 10: means 3 and 6, variances 2.5 and 10 -> t = -3 / sqrt(2.5),
    # df = 2.5**2 / (0.5**2 / 4 + 2**2 / 4) = 6.25 / 1.0625
    result = recipe.welch_t_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert result.t == pytest.approx(-3 / math.sqrt(2.5), rel=1e-12)
    assert result.df == pytest.approx(6.25 / 1.0625, rel=1e-12)
    df = 6.25 / 1.0625
    assert result.p == pytest.approx(2 * recipe.student_t_cdf(-3 / math.sqrt(2.5), df))
    assert result.p == pytest.approx(two_sided_tail_by_integration(-result.t, df), rel=1e-7)
    # Equal sizes and variances: Welch's df is the pooled test's, n1 + n2 - 2.
    same = recipe.welch_t_test([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert same.df == pytest.approx(4.0) and same.t == pytest.approx(-math.sqrt(1.5))
    assert same.p == pytest.approx(2 * (1 - recipe.student_t_cdf(math.sqrt(1.5), 4)))


def test_welch_t_test_edge_cases():
    assert recipe.welch_t_test([1.0, 1.0], [1.0, 1.0]).p == 1.0
    assert recipe.welch_t_test([2.0, 2.0], [1.0, 1.0]).p == 0.0
    assert recipe.welch_t_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]).p == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        recipe.welch_t_test([1.0], [1.0, 2.0])


def test_mean_std_is_the_sample_standard_deviation():
    assert recipe.mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == \
        pytest.approx((5.0, math.sqrt(32 / 7)))
    assert recipe.mean_std([3.0]) == (3.0, 0.0)


# ------------------------------------------------------------------- image folders


def make(root, files):
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root


def test_scan_lists_classes_and_images_sorted_ignoring_other_files(tmp_path):
    make(tmp_path, ["train/cat/1.JPG", "train/cat/0.png", "train/dog/a.jpeg",
                    "train/dog/sub/b.png", "train/dog/readme.txt", "train/.hidden/x.png",
                    "val/cat/v.png", "val/dog/w.jpg"])
    folder = recipe.scan_image_folder(tmp_path)
    assert folder.classes == ("cat", "dog")
    assert [(p.relative_to(tmp_path).as_posix(), label) for p, label in folder.train] == [
        ("train/cat/0.png", 0), ("train/cat/1.JPG", 0), ("train/dog/a.jpeg", 1),
        ("train/dog/sub/b.png", 1)]
    assert [label for _, label in folder.val] == [0, 1]


@pytest.mark.parametrize("files, message", [
    ([], "no train/ folder"),
    (["train/a/1.png"], "no val/ folder"),
    (["train/", "val/a/1.png"], "train: no class folders"),
    (["train/a/1.png", "train/b/notes.txt", "val/a/1.png", "val/b/1.png"],
     "no images (.jpg, .jpeg, .png) in class folder b"),
    (["train/a/1.png", "train/b/1.png", "val/a/1.png", "val/c/1.png"],
     "different class folders (only in train/: b; only in val/: c)"),
])
def test_scan_refuses_bad_folders_in_one_line(tmp_path, files, message):
    for name in files:
        if name.endswith("/"):
            (tmp_path / name).mkdir(parents=True)
    make(tmp_path, [f for f in files if not f.endswith("/")])
    with pytest.raises(RecipeError) as raised:
        recipe.scan_image_folder(tmp_path)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_scan_refuses_a_missing_folder(tmp_path):
    with pytest.raises(RecipeError, match="no such folder"):
        recipe.scan_image_folder(tmp_path / "nowhere")


# ------------------------------------------------------------------ schedule, seeds


def test_lr_factor_warmup_cosine_and_step():
    assert recipe.lr_factor(0, 10, "cosine") == 1.0
    assert recipe.lr_factor(5, 10, "cosine") == pytest.approx(0.5)
    assert recipe.lr_factor(10, 10, "cosine") == pytest.approx(0.0, abs=1e-12)
    # 2 warm-up epochs of 4 steps: 1/8, 2/8, ... then cosine from 1 over the other 8 epochs
    assert [recipe.lr_factor(s / 4, 10, "cosine", 2, steps_per_epoch=4) for s in range(9)] \
        == pytest.approx([k / 8 for k in range(1, 9)] + [1.0])
    assert recipe.lr_factor(6, 10, "cosine", 2) == pytest.approx(0.5)
    assert [recipe.lr_factor(e, 90, "step", 0, 30, 0.1) for e in (0, 29.9, 30, 60, 89)] == \
        pytest.approx([1, 1, 0.1, 0.01, 0.01])


def test_seeds_depend_only_on_their_inputs():
    assert recipe.sample_seed(3, 1, 7) == recipe.sample_seed(3, 1, 7)
    assert len({tuple(recipe.sample_seed(s, e, i)) for s in (0, 1) for e in (0, 1)
                for i in (0, 1)}) == 8
    assert len({recipe.process_seed(s, e, r) for s in (0, 1) for e in range(3)
                for r in range(4)}) == 24


# ------------------------------------------------------------------------ arguments


def parse(*argv):
    return recipe.recipe_parser("train_x.py", "test", HELP).parse_args(
        ["--model", "resnet20", "--data", "mnist", "--output", "out", *argv])


def test_parser_defaults_and_one_line_errors(capsys):
    args = parse()
    assert (args.epochs, args.batch_size, args.lr_schedule, args.resume) == (90, 32, "cosine",
                                                                              False)
    with pytest.raises(SystemExit) as raised:
        parse("--epochs", "0")
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("train_x.py: error: argument --epochs") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        parse("--label-smoothing", "1.5")


def test_resume_settings_name_the_flag_that_differs(tmp_path):
    saved = recipe.resume_settings(parse("--seed", "1"))
    recipe.check_resume_settings(saved, recipe.resume_settings(parse("--seed", "1",
                                                                     "--epochs", "200")), "ck")
    with pytest.raises(RecipeError, match="written with --seed 1, this run has --seed 0"):
        recipe.check_resume_settings(saved, recipe.resume_settings(parse()), "ck")
    with pytest.raises(RecipeError, match="--amp off, this run has --amp on"):
        recipe.check_resume_settings(saved | {"seed": 0},
                                     recipe.resume_settings(parse("--amp")), "ck")


@pytest.mark.parametrize("change, message", [
    ({}, None),
    ({"model_name": "resnet56"}, "ck is of --model resnet56, not resnet20$"),
    ({"doconv": True}, "ck was trained with --doconv$"),
    ({"settings": None}, r"ck: not a checkpoint of this recipe \(no 'model'\)"),
    ({"world_size": 2}, r"ck was written by 2 device\(s\), this run has 1 \(the data order"),
    ({"epoch": "3"}, r"ck: not a checkpoint of this recipe \(no epoch\)"),
    ({"epoch": True}, r"ck: not a checkpoint of this recipe \(no epoch\)"),
    ({"metrics_epochs": None}, r"ck: not a checkpoint of this recipe \(no epoch\)"),
    ({"epoch": 91}, "ck has 91 epochs, more than --epochs 90$"),
])
def test_resume_record_names_what_this_run_cannot_continue(change, message):
    args = parse()
    record = {"model_name": "resnet20", "doconv": False, "world_size": 1, "epoch": 3,
              "settings": recipe.resume_settings(args), "metrics_epochs": []} | change
    if message is None:
        recipe.check_resume_record(record, args, "ck", 1, "device(s)")
    else:
        with pytest.raises(RecipeError, match=message):
            recipe.check_resume_record(record, args, "ck", 1, "device(s)")


def test_check_args_refuses_clobbering_and_bad_crops(tmp_path):
    (tmp_path / recipe.CHECKPOINT).write_bytes(b"x")
    with pytest.raises(RecipeError, match="pass --resume"):
        recipe.check_args(parse("--output", str(tmp_path)))
    recipe.check_args(parse("--output", str(tmp_path), "--resume"))
    with pytest.raises(RecipeError, match="larger than --val-resize-size"):
        recipe.check_args(parse("--val-crop-size", "300"))


# ------------------------------------------------------------------ files, metrics


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.bin"
    recipe.atomic_write(path, lambda handle: handle.write(b"old"))

    def failing(handle):
        handle.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        recipe.atomic_write(path, failing)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def record(model="resnet20", doconv=False, seed=0, accuracy=90.0, fused=None, identical=None,
           epochs=2):
    return recipe.metrics_record(
        framework="torch", world_size=1, model=model, doconv=doconv, settings={"seed": seed},
        epochs=[{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "val_accuracy": accuracy - 1 + e,
                 "seconds": 10.0} for e in range(epochs)],
        fused_val_accuracy=fused, fused_identical_predictions=identical)


def test_metrics_round_trip(tmp_path):
    recipe.write_metrics(tmp_path, record(accuracy=80.0))
    loaded = recipe.read_metrics(tmp_path)
    assert loaded["val_accuracy"] == 80.0 and loaded["seconds"] == 20.0
    assert loaded["world_size"] == 1 and loaded["epochs"][0]["epoch"] == 1
    (tmp_path / "other.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(RecipeError, match="not a recipe metrics.json"):
        recipe.read_metrics(tmp_path / "other.json")
    with pytest.raises(ValueError, match="lacks"):
        recipe.metrics_record(framework="x", world_size=1, model="m", doconv=False,
                              settings={}, epochs=[{"epoch": 1}])


def test_results_table_has_mean_std_p_value_and_fused_runs(tmp_path, capsys):
    runs = [record(seed=s, accuracy=a) for s, a in ((0, 90.0), (1, 91.0), (2, 92.0))] + \
           [record(doconv=True, seed=s, accuracy=a, fused=a, identical=True)
            for s, a in ((0, 92.0), (1, 93.0), (2, 94.0))]
    for index, run in enumerate(runs):
        recipe.write_metrics(tmp_path / f"run{index}", run)
    assert recipe_table.main([str(tmp_path), "--markdown", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "| resnet20 | Baseline | 3 | 91.00 ± 1.00 | 0: 90.00, 1: 91.00, 2: 92.00 | 2 | 20 |" \
        in text
    assert "| resnet20 | DO-Conv | 3 | 93.00 ± 1.00 |" in text
    p = recipe.welch_t_test([92, 93, 94], [90, 91, 92]).p
    assert f"DO-Conv - baseline +2.00 points; Welch's t-test t = 2.45, df = 4.0, p = {p:.3g}" \
        in text
    assert "fused DO-Conv accuracy per run (seed: %): 0: 92.00, 1: 93.00, 2: 94.00 — " \
           "predictions identical" in text
    assert capsys.readouterr().out.startswith("| model | variant |")


def test_results_table_refuses_an_empty_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        recipe_table.main([str(tmp_path)])
    assert raised.value.code == 2
    assert capsys.readouterr().err.startswith("recipe_table.py: error: no metrics.json")


def test_recipe_module_imports_no_framework():
    frameworks = {"torch", "tensorflow", "keras", "mxnet", "jax"}
    assert not frameworks & set(recipe.__dict__) and not frameworks & set(recipe_table.__dict__)
    import subprocess
    code = ("import sys; import samples.recipe, samples.recipe_table; "
            "print(sorted({'torch', 'tensorflow', 'keras', 'mxnet', 'jax'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(recipe.__file__)))
    assert out.stdout.strip() == "[]"


def test_driver_trains_each_seed_and_variant_once_and_resumes_stopped_runs(tmp_path,
                                                                          monkeypatch, capsys):
    calls = []

    def fake_train(command):  # stands in for samples/train_pt.py
        calls.append(command)
        output = Path(command[command.index("--output") + 1])
        doconv = "--doconv" in command
        seed = int(command[command.index("--seed") + 1])
        accuracy = 90.0 + seed + doconv
        recipe.write_metrics(output, record(doconv=doconv, seed=seed, accuracy=accuracy,
                                            fused=accuracy if doconv else None,
                                            identical=True if doconv else None))
        (output / "fused.pt").write_bytes(b"")
        return 0

    monkeypatch.setattr(recipe_table.subprocess, "call", fake_train)
    monkeypatch.setattr(recipe_table, "plot", lambda records, path: False)
    stopped = tmp_path / "doconv-seed1"
    stopped.mkdir()
    (stopped / recipe.CHECKPOINT).write_bytes(b"")
    assert recipe_table.main(["--run", "--out", str(tmp_path), "--epochs", "2",
                              "--seeds", "0", "1"]) == 0
    assert [(Path(c[c.index("--output") + 1]).name, "--resume" in c) for c in calls] == [
        ("baseline-seed0", False), ("doconv-seed0", False), ("baseline-seed1", False),
        ("doconv-seed1", True)]
    first = calls[0]
    for flag, value in (("--model", "resnet20"), ("--data", "fashion-mnist"), ("--epochs", "2"),
                        ("--batch-size", "128"), ("--workers", "0")):
        assert first[first.index(flag) + 1] == value
    assert "| resnet20 | DO-Conv | 2 | 91.50 ± 0.71 |" in (tmp_path / "table.md").read_text()
    calls.clear()
    assert recipe_table.main(["--run", "--out", str(tmp_path), "--seeds", "0", "1"]) == 0
    assert calls == []  # finished runs are kept
    assert "finished before, kept" in capsys.readouterr().out


# ------------------------------------------------------- helpers of the Keras recipe


def test_check_args_refuses_the_frameworks_own_checkpoint_name(tmp_path):
    parser = recipe.recipe_parser("t", "t", HELP)
    args = parser.parse_args(["--model", "m", "--data", "d", "--output", str(tmp_path)])
    (tmp_path / "backup").mkdir()
    recipe.check_args(args)  # checkpoint.pt by default: nothing there
    with pytest.raises(RecipeError, match="backup exists: pass --resume"):
        recipe.check_args(args, checkpoint="backup")
    args.resume = True
    recipe.check_args(args, checkpoint="backup")


def test_epoch_order_depends_on_seed_and_epoch_only_and_pads_whole_batches():
    order = recipe.epoch_order(10, 4, seed=3, epoch=1)
    assert order == recipe.epoch_order(10, 4, seed=3, epoch=1)
    assert len(order) == 12 and sorted(order[:10]) == list(range(10))
    assert order[10:] == order[:2]  # padded with its first indices
    assert order != recipe.epoch_order(10, 4, seed=3, epoch=2)
    assert order != recipe.epoch_order(10, 4, seed=4, epoch=1)
    assert recipe.epoch_order(2, 8, 0, 0) == recipe.epoch_order(2, 8, 0, 0)[:2] * 4
    with pytest.raises(ValueError):
        recipe.epoch_order(0, 4, 0, 0)


def test_random_resized_crop_box_stays_inside_and_is_seeded():
    boxes = [recipe.random_resized_crop_box(40, 30, np.random.default_rng(seed))
             for seed in range(200)]
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
    assert len(set(boxes)) > 100
    assert boxes[:5] == [recipe.random_resized_crop_box(40, 30, np.random.default_rng(s))
                         for s in range(5)]
    assert recipe.random_resized_crop_box(100, 10, np.random.default_rng(0),
                                          scale=(1.0, 1.0)) == (43, 0, 56, 10)  # the fallback


def test_import_callable_names_each_problem_in_one_line():
    assert recipe.import_callable("os.path:join") is __import__("os").path.join
    for name, message in [("no_such_module_xyz:f", "cannot import no_such_module_xyz (ModuleNotFoundError"),
                          ("os.path:nothing", "os.path has no attribute 'nothing'"),
                          ("os:sep", "sep is not callable")]:
        with pytest.raises(recipe.RecipeError, match=re.escape(f"--model {name}: {message}")):
            recipe.import_callable(name)


def test_lookahead_returns_each_index_value_whatever_the_request_order():
    # A framework reads ahead, restarts its iterator, asks again: every request gets
    # compute(index), and at most depth + 1 values are held.
    import threading
    computed: list[int] = []
    lock = threading.Lock()

    def compute(index: int) -> tuple[int, int]:
        with lock:
            computed.append(index)
        return index, index * index

    for workers in (0, 1, 3):
        computed.clear()
        ahead = recipe.Lookahead(compute, workers, limit=20)
        requests = [0, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 19, 19, 7]
        assert [ahead[i] for i in requests] == [(i, i * i) for i in requests]
        assert len(ahead._pending) <= 2 * workers + 1
        assert max(computed) < 20  # nothing at or past the limit
        if workers == 0:
            assert computed == requests  # computed when asked for, in the caller


def test_lookahead_raises_an_error_when_its_index_is_asked_for():
    def compute(index: int) -> int:
        if index == 2:
            raise RecipeError("cannot read image 2")
        return index

    ahead = recipe.Lookahead(compute, 2)
    assert [ahead[0], ahead[1]] == [0, 1]  # index 2 failed ahead: not raised yet
    with pytest.raises(RecipeError, match="cannot read image 2"):
        ahead[2]
    assert ahead[3] == 3


def test_recipe_parser_takes_each_recipes_own_help_for_every_flag_whose_meaning_differs():
    parser = recipe.recipe_parser("train_x.py", "test", HELP)
    text = " ".join(parser.format_help().split())
    for name in recipe.RECIPE_HELP_FLAGS:
        assert f"{name} as this recipe does it" in text, name
    for partial in ({k: v for k, v in HELP.items() if k != "sync_bn"}, {**HELP, "lr": "x"}):
        with pytest.raises(ValueError, match="recipe_help: expected help for exactly"):
            recipe.recipe_parser("train_x.py", "test", partial)


def test_check_requirements_names_the_flag_the_package_and_the_extra(tmp_path, monkeypatch):
    (tmp_path / "doconv_test_broken.py").write_text("raise RuntimeError('half installed')\n")
    (tmp_path / "doconv_test_needs.py").write_text("import doconv_test_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe.check_requirements([recipe.Requirement("--x", "json", "json", "x")])  # imports
    for module, state in (
            ("doconv_test_absent", "which is not installed"),
            ("doconv_test_absent.sub", "which is not installed"),
            ("doconv_test_broken", "which does not import (RuntimeError: half installed)"),
            ("doconv_test_needs", "which does not import (ModuleNotFoundError: No module "
                                  "named 'doconv_test_absent_dependency')")):
        with pytest.raises(RecipeError) as caught:
            recipe.check_requirements([recipe.Requirement("--x", "json", "json", "x"),
                                       recipe.Requirement("--flag", module, "Pkg", "extra")])
        assert str(caught.value) == f'--flag needs Pkg, {state}: pip install "doconv[extra]"'
