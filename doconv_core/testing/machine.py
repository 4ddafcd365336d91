"""A one-line description of the machine, for the figures the samples and benchmarks report."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping


def machine_description(extra: Mapping[str, str] | None = None) -> str:
    """CPU model, core count, OS, Python and ``extra`` (name -> version): a figure's context."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [f"{cpu}, {os.cpu_count()} logical cores", f"{platform.system()} {platform.machine()}",
             f"Python {platform.python_version()}"]
    parts += [f"{name} {version}" for name, version in (extra or {}).items()]
    return "; ".join(parts)
