"""The transfer model trained here and exported for the other frameworks (tox env ``cross``
loads it into each of them); this framework's own predictions, unfused and fused, must
match the NumPy reference of the exported parameters."""

import os

import keras
import transfer_models


def test_transfer_model_exports_and_predicts_like_the_reference(tmp_path):
    framework = {"tensorflow": "keras-tf", "jax": "keras-jax",
                 "torch": "keras-torch"}[keras.backend.backend()]
    failures = transfer_models.export_and_check(
        framework, os.environ.get("DOCONV_ARTIFACTS") or str(tmp_path))
    assert not failures, "\n".join(failures)
