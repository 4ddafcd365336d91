"""tests/check_pins.py, the check every tox env runs first: it must fail on what is not pinned."""

import subprocess
import sys
from pathlib import Path

import pytest

import check_pins

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def constraints(tmp_path):
    (tmp_path / "base.txt").write_text("# shared\nnumpy==2.4.6\n")
    path = tmp_path / "env.txt"
    path.write_text("-c base.txt\nml-dtypes==0.6.0  # a comment\nKeras==3.15.1\n")
    return path


def test_reads_includes_and_normalises_names(constraints):
    assert check_pins.read_constraints(constraints) == {
        "numpy": "2.4.6", "ml-dtypes": "0.6.0", "keras": "3.15.1"}


def test_everything_pinned_passes(constraints):
    frozen = ["numpy==2.4.6", "ml_dtypes==0.6.0", "keras==3.15.1",
              "doconv @ file:///tmp/doconv-0.1.0-0.editable-py3-none-any.whl"]
    assert check_pins.unpinned(frozen, check_pins.read_constraints(constraints)) == []


def test_unpinned_name_wrong_version_and_direct_url_fail(constraints):
    frozen = ["numpy==2.4.6", "tensorflow==2.21.0", "keras==3.16.0",
              "ml-dtypes @ file:///wheels/ml_dtypes-0.6.0.whl"]
    assert check_pins.unpinned(frozen, check_pins.read_constraints(constraints)) == [
        "tensorflow==2.21.0 (not in the constraints)",
        "keras==3.16.0 (the constraints pin 3.15.1)",
        "ml-dtypes @ file:///wheels/ml_dtypes-0.6.0.whl (not installed from an index at a "
        "version)",
    ]


def test_a_line_that_is_not_a_pin_is_refused(tmp_path):
    path = tmp_path / "loose.txt"
    path.write_text("numpy>=2\n")
    with pytest.raises(ValueError, match=r"loose.txt:1: expected NAME==VERSION or -c FILE, "
                                         r"got 'numpy>=2'"):
        check_pins.read_constraints(path)


def _run_on_this_env(tmp_path, drop=None):
    """tests/check_pins.py on the running env against its own freeze, less ``drop``."""
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    pins = [line for line in frozen if "==" in line and not line.startswith(drop or "\0")]
    path = tmp_path / "constraints.txt"
    path.write_text("\n".join(pins) + "\n")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "check_pins.py"), str(path)],
                            capture_output=True, text=True)
    dropped = [line for line in frozen if drop and line.startswith(drop)]
    return result, dropped


def test_the_command_passes_on_an_env_its_file_pins(tmp_path):
    result, _ = _run_on_this_env(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("check_pins: all ")


def test_the_command_fails_on_an_env_with_an_unpinned_package(tmp_path):
    result, dropped = _run_on_this_env(tmp_path, drop="pytest==")
    assert result.returncode == 1
    assert "1 installed distribution(s) not pinned" in result.stderr
    assert f"  {dropped[0]} (not in the constraints)" in result.stderr


def test_the_command_refuses_a_missing_file(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "check_pins.py"),
                             str(tmp_path / "absent.txt")], capture_output=True, text=True)
    assert result.returncode == 2
    missing = tmp_path / "absent.txt"
    assert result.stderr.strip() == f"check_pins: constraints file {missing} does not exist"
