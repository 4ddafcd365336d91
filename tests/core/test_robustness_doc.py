"""docs/robustness.md is current, and its script fails on a row that is not a clear error."""

import numpy as np
import pytest

from robustness_doc import check_section, load_script


def test_core_section_is_current():
    check_section("core")


def test_the_table_has_at_least_60_adapter_rows():
    text = load_script().DOC.read_text()
    counts = {name: sum(1 for line in text.split(f"<!-- section: {name} -->")[1]
                        .split(f"<!-- end: {name} -->")[0].splitlines()
                        if line.startswith("| ") and not line.startswith("| #"))
              for name in ("torch", "keras", "gluon")}
    assert sum(counts.values()) >= 60 and min(counts.values()) >= 20, counts


@pytest.mark.parametrize("run, problem", [
    (lambda: None, "raised nothing"),
    (lambda: {}["key"], "raised KeyError, not ValueError/TypeError"),
    (lambda: (_ for _ in ()).throw(ValueError("something else")),
     "the message does not name 'argument'"),
])
def test_a_bad_row_fails(run, problem):
    script = load_script()
    assert script.evaluate(script.Row("call", "argument", run)).problem == problem


def test_a_row_that_changes_state_fails():
    script = load_script()
    values = np.zeros(3)

    def run():
        values[0] = 1
        raise ValueError("argument is wrong")

    outcome = script.evaluate(script.Row("call", "argument", run, lambda: values.copy()))
    assert outcome.problem == "state changed before the error"
    assert script.evaluate(script.Row("call", "literal", lambda: int("x"),
                                      lambda: values.copy())).problem is None


def test_main_exits_1_on_a_failing_row(monkeypatch, capsys):
    script = load_script()
    monkeypatch.setitem(script.ROWS, "core",
                        lambda files: iter([script.Row("f()", "x", lambda: None)]))
    assert script.main(["--section", "core", "--rows-only"]) == 1
    assert "FAIL f(): raised nothing" in capsys.readouterr().err
