"""Test helper: load docs/robustness.py (a script, not a package) and check one section."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "robustness.py"


def load_script():
    spec = importlib.util.spec_from_file_location("doconv_robustness_doc", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def check_section(name: str, *, text: bool = True) -> None:
    """Assert every row of ``name`` is a clear error before any change and, with ``text``,
    that docs/robustness.md holds exactly this run's section."""
    script = load_script()
    document, outcomes = script.section(name)
    problems = [f"{o.row.call}: {o.problem} ({type(o.error).__name__}: {o.error})"
                for o in outcomes if o.problem]
    assert problems == []
    if text:
        current = script.DOC.read_text()
        assert script.replace_section(current, name, document) == current, (
            f"docs/robustness.md's {name} section is stale: run "
            f"python docs/robustness.py --section {name} --write")
