"""Running the ``doconv`` command as a user does, for every env's CLI tests, and the
property every run must have: success, or one ``doconv: error:`` line with nothing written."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from hypothesis import strategies as st

from doconv_core.compose import compose_kernel
from doconv_core.spec import extra_state_record, read_extra_state
from strategies import layer_specs

REPO = Path(__file__).resolve().parents[1]


def run_doconv(*args: object, cwd: Path | None = None, timeout: float = 300,
               file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """``python -m doconv_core ARGS`` in a subprocess (this checkout first on the path).
    ``file_size_limit``: the most bytes the command may write to any one file
    (RLIMIT_FSIZE), so that a write fails as on a full disk."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    preexec = None
    if file_size_limit is not None:
        def preexec() -> None:
            import resource
            import signal
            # Ignored, SIGXFSZ leaves the failing write() to return EFBIG, as ENOSPC would.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, "-m", "doconv_core", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd or REPO,
                          timeout=timeout, preexec_fn=preexec)


def run_in_process(*args: object) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``doconv_core.cli.main(ARGS)`` in this process (for
    property tests: no interpreter start per example). Any exception but SystemExit escapes:
    the command must never raise one."""
    from doconv_core import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main([str(a) for a in args])
        except SystemExit as error:  # argparse's usage errors
            status = error.code
    return status, out.getvalue(), err.getvalue()


def assert_one_line_error(status: int, stdout: str, stderr: str, pattern: str = "",
                          expected_status: int = 1) -> None:
    """Exit status 1 (or ``expected_status``), nothing on stdout, exactly one line on stderr:
    ``doconv: error: ...`` matching ``pattern``, no traceback."""
    assert status == expected_status, (status, stdout, stderr)
    assert stdout == "", stdout
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), stderr
    assert lines[0].startswith("doconv: error: "), lines[0]
    assert "Traceback" not in stderr
    assert re.search(pattern, lines[0]), (pattern, lines[0])


def leftovers(directory: Path, keep: Sequence[Path]) -> list[str]:
    """Files in ``directory`` other than ``keep``: outputs or temporary files a failed run
    must not leave."""
    kept = {Path(p).name for p in keep}
    return sorted(p.name for p in Path(directory).iterdir() if p.name not in kept)


def assert_failed_cleanly(result: tuple[int, str, str], directory: Path,
                          keep: Sequence[Path], pattern: str = "") -> None:
    """One ``doconv: error:`` line, exit 1, and nothing new in ``directory``."""
    assert_one_line_error(*result, pattern)
    assert leftovers(directory, keep) == [], "a failed run left files"


# -- the command's property tests: state dicts, their mutations, the expected fusion ---------
LAYER_PREFIXES = ("features.0.", "head.")


@st.composite
def state_dicts(draw, dtypes=("float16", "float32", "float64")) -> dict[str, np.ndarray]:
    """A valid flat state dict as doconv_torch saves it (NumPy arrays; bfloat16 as an
    ml_dtypes array): one or two DO-Conv layers of ranks 1-3 with their extra state, and an
    entry beside them."""
    state: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for prefix in LAYER_PREFIXES[:draw(st.integers(1, 2))]:
        spec = draw(layer_specs(rank=draw(st.integers(1, 3))))
        dtype = _dtype(draw(st.sampled_from(dtypes)))
        state[prefix + "W"] = rng.standard_normal(spec.W_shape).astype(dtype)
        if spec.has_D:
            state[prefix + "D"] = (0.1 * rng.standard_normal(spec.D_shape)).astype(dtype)
        if spec.bias:
            state[prefix + "bias"] = rng.standard_normal(spec.out_channels).astype(dtype)
        state[prefix + "_extra_state"] = np.array(
            extra_state_record(spec.rank, spec.groups, spec.kernel_size), np.int64)
    state["bn.running_mean"] = rng.standard_normal(3).astype(np.float32)
    return state


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


STATE_MUTATIONS = ("W shape", "D shape", "bias shape", "dtype", "extra state", "drop key",
                   "rename key", "D_mul", "empty W")


@st.composite
def mutated_states(draw, dtypes=("float16", "float32", "float64")
                   ) -> tuple[dict[str, np.ndarray], list[str]]:
    """(a state dict from ``state_dicts``, changed 0 to 2 times at the level of its arrays:
    shapes, dtypes, extra-state values, keys; the changes made)."""
    state = draw(state_dicts(dtypes))
    done = []
    for _ in range(draw(st.integers(0, 2))):
        prefixes = sorted({k[:-1] for k in state if k.endswith(".W")})
        if not prefixes:
            break
        kind = draw(st.sampled_from(STATE_MUTATIONS))
        prefix = draw(st.sampled_from(prefixes))
        done.append(kind)
        if kind.endswith("shape") and prefix + kind.split()[0] in state:
            key = prefix + kind.split()[0]
            shape = list(state[key].shape)
            axis = draw(st.integers(0, len(shape) - 1))
            shape[axis] = draw(st.integers(0, 4))
            state[key] = np.zeros(shape, state[key].dtype)
        elif kind == "dtype":
            key = draw(st.sampled_from(sorted(state)))
            state[key] = state[key].astype(draw(st.sampled_from(
                ["int64", "int32", "bool", "float16", "float32", "float64"])))
        elif kind == "extra state":
            values = draw(st.lists(st.integers(-2, 5), min_size=0, max_size=7))
            state[prefix + "_extra_state"] = np.array(values, np.int64)
        elif kind == "drop key":
            state.pop(draw(st.sampled_from(sorted(state))))
        elif kind == "rename key":
            key = draw(st.sampled_from(sorted(state)))
            state[draw(st.sampled_from(["weight", "W", "D", "x.W"]))] = state.pop(key)
        elif kind == "D_mul" and prefix + "D" in state:  # below the kernel volume, or above
            D_mul = draw(st.integers(1, 3 * state[prefix + "D"].shape[1]))
            for part in ("W", "D"):
                shape = state[prefix + part].shape[:2] + (D_mul,)
                state[prefix + part] = np.ones(shape, state[prefix + part].dtype)
        elif kind == "empty W":
            state[prefix + "W"] = np.zeros((0,) + state[prefix + "W"].shape[1:],
                                           state[prefix + "W"].dtype)
    return state, done


def expected_fusion(entries: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What fusing ``entries`` must give, computed apart from the command: each layer (a W
    with an extra state) becomes ``weight``, composed in float32 for 16-bit floats and stored
    in W's dtype; every other entry as it is."""
    def is_array(key: str, ndim: int | None = None) -> bool:
        value = entries.get(key)
        return isinstance(value, np.ndarray) and ndim in (None, value.ndim)

    # A layer: a 3-D W array and an extra-state array (a W that is no tensor is carried).
    layers = {key[:-len("_extra_state")] for key in entries
              if isinstance(key, str) and key.endswith("_extra_state") and is_array(key)
              and is_array(key[:-len("_extra_state")] + "W", 3)}
    dropped = {prefix + part for prefix in layers for part in ("D", "_extra_state")}
    fused = {}
    for key, value in entries.items():
        prefix = key[:-1] if isinstance(key, str) else None
        if prefix in layers and key.endswith("W"):
            _, groups, kernel_size = read_extra_state(entries[prefix + "_extra_state"].tolist())
            work = np.float32 if value.dtype.itemsize < 4 else value.dtype
            D = entries.get(prefix + "D")
            with np.errstate(over="ignore", invalid="ignore"):  # a mutated file's inf, nan
                fused[prefix + "weight"] = compose_kernel(
                    None if D is None else D.astype(work), value.astype(work), groups=groups,
                    kernel_size=kernel_size).astype(value.dtype)
        elif key not in dropped:
            fused[key] = value
    return fused


def assert_same_entries(found: dict, expected: dict) -> None:
    assert sorted(found, key=repr) == sorted(expected, key=repr)
    for key, value in expected.items():
        if not isinstance(value, np.ndarray):  # a .pt file's other values, carried over
            assert found[key] == value, key
            continue
        got = np.asarray(found[key])
        # Byte order is the file's, not the value's: safetensors is little-endian only.
        assert (got.dtype.newbyteorder("=") == value.dtype.newbyteorder("=")
                and got.shape == value.shape), (key, got.dtype, value.dtype)
        native = [np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
                  for array in (got, value)]
        assert np.array_equal(native[0].view(np.uint8), native[1].view(np.uint8)), key


def check_fuse_property(source: Path, out: Path, read_input, read_output, *args: object) -> bool:
    """The command's property on one input file: ``doconv fuse SOURCE OUT`` either succeeds
    with what ``expected_fusion`` gives for the file as ``read_input`` (the reference reader)
    reads it, and ``inspect`` succeeds too, or both fail with one ``doconv: error:`` line,
    exit 1 and nothing written. Returns whether it succeeded."""
    directory = source.parent
    result = run_in_process("fuse", source, out, *args)
    if result[0] != 0:
        assert_failed_cleanly(result, directory, [source])
        return False
    assert_same_entries(read_output(out), expected_fusion(read_input(source)))
    out.unlink()
    assert leftovers(directory, [source]) == []
    status, stdout, stderr = run_in_process("inspect", source)
    assert status == 0 and stderr == "" and "DO-Conv layer(s)" in stdout, (status, stderr)
    return True
