"""The transfer model trained here and exported for the other frameworks (tox env ``cross``
loads it into each of them); this framework's own predictions, unfused and fused, must
match the NumPy reference of the exported parameters. The parameter files are safetensors;
the .npz files earlier doconv releases wrote (versions 1 and 2) still import."""

import os

import transfer_models


def test_transfer_model_exports_and_predicts_like_the_reference(tmp_path):
    framework = "mx"
    failures = transfer_models.export_and_check(
        framework, os.environ.get("DOCONV_ARTIFACTS") or str(tmp_path))
    assert not failures, "\n".join(failures)


def test_old_npz_parameter_files_still_import(tmp_path):
    framework = "mx"
    failures = transfer_models.check_old_npz_imports(framework, str(tmp_path))
    assert not failures, "\n".join(failures)
