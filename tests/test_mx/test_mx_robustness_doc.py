"""docs/robustness.md's Gluon rows: each a clear error before any change, and current."""

from robustness_doc import check_section


def test_gluon_section_is_current():
    check_section("gluon")
