"""The transfer model trained here and exported for the other frameworks (tox env ``cross``
loads it into each of them); this framework's own predictions, unfused and fused, must
match the NumPy reference of the exported parameters."""

import os

import transfer_models
from doconv_core import crosscheck

FRAMEWORK = "mx"


def test_transfer_model_exports_and_predicts_like_the_reference(tmp_path):
    directory = os.environ.get("DOCONV_ARTIFACTS") or str(tmp_path)
    transfer_models.export(FRAMEWORK, directory)
    table, failures, passed = crosscheck.compare_transfer(directory, [FRAMEWORK])
    assert not failures, "\n".join(failures)
    assert passed == 1
