"""docs/robustness.md's PyTorch rows: each a clear error before any change, and current."""

from robustness_doc import check_section


def test_torch_section_is_current():
    check_section("torch")
