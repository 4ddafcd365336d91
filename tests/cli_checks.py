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

from hypothesis import settings

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


def fuzz_settings(share: float = 1.0, minimum: int = 5) -> settings:
    """The loaded hypothesis profile's example budget (CI's bounded one, or
    HYPOTHESIS_PROFILE=long's), scaled by ``share`` for readers whose every example costs
    a framework's load and save."""
    return settings(max_examples=max(minimum, int(settings().max_examples * share)))
