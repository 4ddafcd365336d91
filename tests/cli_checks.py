"""Running the ``doconv`` command as a user does, for every env's CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_doconv(*args: object, cwd: Path | None = None, timeout: float = 300
               ) -> subprocess.CompletedProcess:
    """``python -m doconv_core ARGS`` in a subprocess (this checkout first on the path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "doconv_core", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd or REPO,
                          timeout=timeout)
