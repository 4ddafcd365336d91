"""The three training recipes' shared test pieces: a tiny learnable image folder, the bad
inputs every recipe refuses alike, and starting many refused runs together.

Each framework's test file adds its own cases (its model types, its device flags) to these.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

# name -> (arguments, the core of the expected one-line message)
Cases = dict[str, tuple[list[str], str]]
# name -> (exit status, stdout, stderr, --output folder, expected message)
Results = dict[str, tuple[int, str, str, Path, str]]


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit grayscale (H, W) or RGB (H, W, 3) PNG, written with zlib alone (Pillow is
    in none of the Keras envs)."""
    pixels = np.ascontiguousarray(pixels, np.uint8)
    height, width = pixels.shape[:2]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    header = struct.pack(">IIBBBBB", width, height, 8, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    rows = b"".join(b"\x00" + pixels[row].tobytes() for row in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def write_image_folder(root: Path, classes: int = 3, train: int = 8, val: int = 3, *,
                       jpeg: bool = True) -> Path:
    """Learnable 16x16 images in ImageNet's layout (class k: a bright vertical band at
    columns 5k..5k+4). Image 0 of each class is grayscale (decoded to 3 channels); with
    ``jpeg`` image 1 is a JPEG (needs Pillow), the rest PNGs. 3 validation images per class
    make an odd count, so two ranks or devices split the last batch unevenly."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 60, (16, 16, 3)).astype(np.uint8)
                pixels[:, 5 * label:5 * label + 5] = 255
                image = pixels[..., 0] if index == 0 else pixels
                if jpeg and index == 1:
                    from PIL import Image
                    Image.fromarray(image).save(folder / f"{index}.jpg")
                else:
                    (folder / f"{index}.png").write_bytes(png_bytes(image))
    return root


def bad_data_cases(root: Path, model: str) -> Cases:
    """The data folders every recipe refuses before it starts, each made under ``root``."""
    empty = root / "empty"
    empty.mkdir()
    no_classes = root / "no_classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "val").mkdir()
    empty_class = root / "empty_class"
    (empty_class / "train" / "a").mkdir(parents=True)
    (empty_class / "val" / "a").mkdir(parents=True)
    (empty_class / "train" / "a" / "notes.txt").write_text("not an image")
    mismatched = write_image_folder(root / "mismatched", train=1, val=1, jpeg=False)
    (mismatched / "val" / "class2").rename(mismatched / "val" / "other")
    unreadable = write_image_folder(root / "unreadable", train=1, val=1, jpeg=False)
    bad_image = unreadable / "train" / "class1" / "bad.png"
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return {
        "missing data": (["--model", model, "--data", str(root / "nowhere")],
                         f"--data {root / 'nowhere'}: no such folder"),
        "empty data folder": (["--model", model, "--data", str(empty)],
                              f"--data {empty}: no train/ folder"),
        "no class folders": (["--model", model, "--data", str(no_classes)],
                             f"--data {no_classes / 'train'}: no class folders"),
        "empty class folder": (["--model", model, "--data", str(empty_class)],
                               "no images (.jpg, .jpeg, .png) in class folder a"),
        "mismatched classes": (["--model", model, "--data", str(mismatched)],
                               ("train/ and val/ have different class folders (only in "
                                "train/: class2; only in val/: other)")),
        "unreadable image": (["--model", model, "--data", str(unreadable)],
                             f"cannot read image {bad_image}"),
    }


def bad_resume_cases(trained: Sequence[str], data: Sequence[str], straight: Path,
                     checkpoint: str, other_model: str) -> Cases:
    """The resumes every recipe refuses. ``trained``: the flags ``straight`` (a finished
    two-epoch run) was trained with, --doconv among them, without --data or --output;
    ``checkpoint``: what the recipe keeps in --output (file or folder)."""
    model = trained[trained.index("--model") + 1]
    resume = ["--resume", "--epochs", "2"]
    at_straight = [*data, *resume, "--output", str(straight)]
    without_doconv = [a for a in trained if a != "--doconv"]
    return {
        "missing checkpoint": (["--model", model, *data, *resume],
                               "--resume: no checkpoint at"),
        "checkpoint of another model": ([*trained, *at_straight, "--model", other_model],
                                        f"is of --model {model}, not {other_model}"),
        "checkpoint with another doconv setting": ([*without_doconv, *at_straight],
                                                   "was trained with --doconv"),
        "checkpoint with other settings": ([*trained, *at_straight, "--seed", "1"],
                                           "was written with --seed 0, this run has --seed 1"),
        "existing checkpoint without --resume": (
            [*trained, *data, "--output", str(straight)],
            f"{straight / checkpoint} exists: pass --resume"),
    }


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (links followed), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_refused(script: str, cases: Mapping[str, tuple[list[str], str]], root: Path,
                env: Mapping[str, str], cwd: Path, timeout: float) -> Results:
    """Every case started together in its own process (a case without --output gets a new
    folder under ``root``), then waited for."""
    started = {}
    for index, (name, (arguments, message)) in enumerate(cases.items()):
        if "--output" not in arguments:
            arguments = [*arguments, "--output", str(root / f"out{index}")]
        output = Path(arguments[arguments.index("--output") + 1])
        started[name] = (subprocess.Popen([sys.executable, script, *arguments],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=dict(env), cwd=cwd),
                         output, message)
    results: Results = {}
    for name, (process, output, message) in started.items():
        stdout, stderr = process.communicate(timeout=timeout)
        results[name] = (process.returncode, stdout, stderr, output, message)
    return results


def assert_refused(prog: str, name: str, result: tuple[int, str, str, Path, str],
                   kept: Mapping[Path, bool]) -> None:
    """The recipe's refusal: exit 2, one line naming the problem on stderr, nothing on
    stdout, and no output written: a new --output folder never made, an existing one
    (``kept``: folder -> whether its files are as they were) left as it was."""
    status, stdout, stderr, output, message = result
    assert status == 2, (name, stderr)
    assert stderr.count("\n") == 1 and stderr.startswith(f"{prog}: error: "), (name, stderr)
    assert message in stderr, (name, stderr)
    assert "Traceback" not in stderr, name
    assert stdout == "", (name, stdout)  # nothing began
    if output in kept:
        assert kept[output], name  # the checkpoint that was refused is as it was
    else:
        assert not output.exists(), name


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut to 60% of its bytes: it passes Pillow's up-front check (verify() reads no
    JPEG data) and fails only when decoded, while training."""
    import io

    from PIL import Image
    buffer = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) * 6 // 10])
    with Image.open(path) as image:
        image.verify()
    return path


def assert_failed_while_training(prog: str, result: subprocess.CompletedProcess,
                                 message_start: str, absent: Path) -> None:
    """A failure found while training: exit 1, the recipe's one line (no traceback), and
    ``absent`` (the checkpoint) never written."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.startswith(f"{prog}: error: {message_start}"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, \
        result.stderr[-3000:]
    assert not absent.exists()


def terminate_after(command: Sequence[str], marker: Path, env: Mapping[str, str], cwd: Path,
                    timeout: float, *, group: bool = False) -> tuple[int, str]:
    """Start ``command``, send it SIGTERM once ``marker`` (its first checkpoint) exists;
    its exit status and stderr. ``group``: the command starts its own process group and
    the signal goes to the whole group (its data workers too), as Slurm, systemd and a
    terminal send it."""
    import os
    import signal
    import time
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(env), cwd=cwd, start_new_session=group)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"no {marker.name} appeared"
            time.sleep(0.05)
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if group:  # no worker outlives the test
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return process.returncode, stderr


# ------------------------------------------------------------- --help vs the README

README = Path(__file__).resolve().parents[1] / "README.md"
RECIPE_COLUMNS = ("train_pt.py", "train_tf.py", "train_gluoncv.py")  # the per-recipe table's
NO_SUCH_FLAG = "no such flag"
HELP_ENV = {"COLUMNS": "1000"}  # argparse wraps at the terminal's width; unwrapped to compare


def _plain(text: str) -> str:
    return " ".join(text.replace("`", "").replace("\\|", "|").split())


def _cells(line: str) -> list[str]:
    import re
    return [_plain(cell) for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def readme_flag_tables(readme: Path = README) -> tuple[list[list[str]], list[list[str]]]:
    """The rows of the README's two recipe flag tables under "### Shared flags": the shared
    one (flags, default, text) and the per-recipe one (flag, default, one cell per recipe
    of RECIPE_COLUMNS)."""
    text = readme.read_text().split("### Shared flags\n", 1)[1]
    tables: list[list[list[str]]] = []
    rows: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("|"):
            rows.append(_cells(line))
        elif rows:
            tables.append(rows[2:])  # without the header and its rule
            rows = []
            if len(tables) == 2:
                break
        elif line.startswith("#"):
            break
    assert len(tables) == 2, "README: the shared and the per-recipe flag tables"
    assert all(len(row) == 2 + len(RECIPE_COLUMNS) for row in tables[1]), tables[1]
    return tables[0], tables[1]


def help_entries(help_text: str) -> dict[str, tuple[str, str | None]]:
    """--help (printed with HELP_ENV) as {long flag: (its help without the default, the
    default or None)}."""
    import re
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in help_text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            invocation, _, rest = line.strip().partition("  ")
            current = [rest]
            for flag in re.findall(r"--[\w-]+", invocation):
                entries[flag] = current
        elif line.startswith("    ") and current is not None:
            current.append(line)
    result = {}
    for flag, parts in entries.items():
        text = _plain(" ".join(parts))
        found = re.search(r"\s*\(default: ([^()]*)\)$", text)
        result[flag] = ((text[:found.start()] if found else text),
                        found.group(1) if found else None)
    return result


def _same_default(readme: str, shown: str) -> bool:
    try:
        return float(readme) == float(shown)
    except ValueError:
        return readme == shown


def assert_help_matches_readme(prog: str, help_text: str, readme: Path = README) -> None:
    """``prog``'s --help lists exactly the README's flags for it, with the README's defaults,
    and for each flag of the per-recipe table the README's words for ``prog``."""
    import re
    shared, own = readme_flag_tables(readme)
    entries = help_entries(help_text)
    column = 2 + RECIPE_COLUMNS.index(prog)

    def check_default(flag: str, readme_default: str) -> None:
        shown = entries[flag][1]
        assert shown is None or _same_default(readme_default, shown), \
            (prog, flag, readme_default, shown)

    expected: set[str] = {"--help"}
    for flags_cell, defaults_cell, _ in shared:
        flags = re.findall(r"--[\w-]+", flags_cell)
        defaults = defaults_cell.split(", ")
        expected.update(flags)
        for flag, default in zip(flags, defaults if len(defaults) == len(flags) else []):
            assert flag in entries, (prog, flag)
            check_default(flag, default)
    for row in own:
        (flag,), default, text = re.findall(r"--[\w-]+", row[0]), row[1], row[column]
        if text.startswith(NO_SUCH_FLAG):
            assert flag not in entries, (prog, flag)
            continue
        expected.add(flag)
        assert entries.get(flag, (None,))[0] == text, (prog, flag, entries.get(flag), text)
        check_default(flag, default)
    assert set(entries) == expected, (prog, sorted(set(entries) ^ expected))


def recipe_help(script: str, env: Mapping[str, str], cwd: Path) -> str:
    """``script --help``, printed unwrapped (exit 0, nothing on stderr)."""
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                            env={**env, **HELP_ENV}, cwd=cwd, timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr[-3000:]
    return result.stdout


def without_modules(script: str, modules: Sequence[str], arguments: Sequence[str]) -> list[str]:
    """The command line running ``script`` (as ``__main__``) with ``modules`` unimportable,
    as if their packages were not installed: None in sys.modules makes ``import`` fail."""
    code = ("import runpy, sys; "
            f"sys.modules.update(dict.fromkeys({list(modules)!r})); "
            f"sys.argv = [{script!r}, *sys.argv[1:]]; "
            f"runpy.run_path({script!r}, run_name='__main__')")
    return [sys.executable, "-c", code, *arguments]
