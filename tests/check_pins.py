"""Fail when a tox env holds a distribution its constraints file does not pin exactly.

    python tests/check_pins.py constraints/tf.txt

Reads ``pip freeze`` of the running interpreter and the constraints file (following its
``-c``/``-r`` includes). Every frozen distribution must be pinned there with ``==`` at the
version installed; the project itself (installed from the working tree) is exempt. A
constraint on a distribution nothing requires pins nothing, so the check is on what is
installed, not on what the file says.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PROJECT = "doconv"


def canonical(name: str) -> str:
    """PEP 503 normalisation: pip freeze says ``ml_dtypes``, a constraints file may say
    ``ml-dtypes``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path, seen: set[Path] | None = None) -> dict[str, str]:
    """{canonical name: exact version} from a constraints file and the files it includes."""
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen:
        return {}
    seen.add(path)
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        include = re.fullmatch(r"-[cr]\s*(\S+)", line)
        if include:
            pins.update(read_constraints(path.parent / include.group(1), seen))
            continue
        pin = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)", line)
        if pin is None:
            raise ValueError(f"{path}:{number}: expected NAME==VERSION or -c FILE, "
                             f"got {raw.strip()!r}")
        pins[canonical(pin.group(1))] = pin.group(2)
    return pins


def unpinned(frozen: list[str], pins: dict[str, str]) -> list[str]:
    """The ``pip freeze`` lines that ``pins`` does not pin exactly, with the reason."""
    problems = []
    for line in frozen:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exact = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        name = re.match(r"(?:-e\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        key = canonical((exact or name).group(1)) if (exact or name) else line
        if key == PROJECT:
            continue
        if exact is None:
            problems.append(f"{line} (not installed from an index at a version)")
        elif key not in pins:
            problems.append(f"{line} (not in the constraints)")
        elif pins[key] != exact.group(2):
            problems.append(f"{line} (the constraints pin {pins[key]})")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python tests/check_pins.py CONSTRAINTS_FILE", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"check_pins: constraints file {path} does not exist", file=sys.stderr)
        return 2
    frozen = subprocess.run([sys.executable, "-m", "pip", "freeze"], check=True,
                            capture_output=True, text=True).stdout.splitlines()
    problems = unpinned(frozen, read_constraints(path))
    if problems:
        print(f"check_pins: {len(problems)} installed distribution(s) not pinned by {path}:",
              file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"check_pins: all {len(frozen)} installed distributions pinned by {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
