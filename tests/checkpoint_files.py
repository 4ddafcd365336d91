"""Test helper: corrupt a saved parameter file on purpose (the import tests of every env)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def rewrite_npz(path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Apply ``change`` to the raw arrays of the ``.npz`` at ``path`` and save them back as
    they are, bypassing save_params' checks."""
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    change(arrays)
    np.savez(path, **arrays)


def as_int64(key: str) -> Callable[[dict[str, np.ndarray]], None]:
    """A ``change`` that stores one array as int64."""
    def change(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = arrays[key].astype(np.int64)
    return change
