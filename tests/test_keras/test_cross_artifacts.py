"""Keras' artifacts for the cross-framework suite (tox env ``cross`` compares them), written
as ``keras-tf``, ``keras-jax`` or ``keras-torch`` after the backend in use.

Written to $DOCONV_ARTIFACTS (tox sets it) or, outside tox, to a temporary folder; either
way this backend's results are checked against the NumPy reference here too.
"""

import dataclasses
import os

import keras
import numpy as np

from doconv_core import DOConvParams
from doconv_core.testing import crosscheck
from kutils import BACKEND, float64, gradients, layer_class, to_keras, to_nchw
from test_reference import keras_reason

FRAMEWORK = {"tensorflow": "keras-tf", "jax": "keras-jax", "torch": "keras-torch"}[BACKEND]


def unsupported_reason(case, dtype):
    reason = keras_reason(case)
    if reason is None and case.spec.padding_mode != "zeros" and case.spec.padding != "valid":
        reason = "Keras pads with zeros only"
    return reason


def compute(case, dtype, inputs, R):
    # With 'valid' padding nothing is padded: the padding mode does not change the function.
    spec = dataclasses.replace(case.spec, padding_mode="zeros")
    params = DOConvParams(spec, W=inputs["W"], D=inputs["D"], bias=inputs["bias"])
    with float64():
        layer = layer_class(spec.rank).from_params(params, data_format="channels_last",
                                                   dtype=dtype)
        x = to_keras(inputs["x"], "channels_last")
        y = to_nchw(keras.ops.convert_to_numpy(layer(x)), "channels_last")
        grads = gradients(layer, x, to_keras(R, "channels_last"))
        exported = layer.to_params()
    return {"output": y, "kernel": exported.kernel(),
            "grad_x": to_nchw(grads["x"], "channels_last"),
            "grad_D": grads.get("D"), "grad_W": np.transpose(grads["W"], (2, 1, 0)),
            "grad_bias": grads.get("bias")}


def test_write_cross_artifacts(tmp_path):
    directory = os.environ.get("DOCONV_ARTIFACTS") or str(tmp_path)
    crosscheck.produce_artifacts(directory, FRAMEWORK, compute, unsupported_reason)
    artifacts, failures = crosscheck.self_check(directory, FRAMEWORK)
    assert not failures, "\n".join(failures)
    produced = {case for case, _ in artifacts.results}
    assert len(produced) >= 20
    # Every rank's expressible cases are produced; only inexpressible ones are left out.
    cases = crosscheck.cross_cases()
    assert {case.spec.rank for case in cases if case.name in produced} == {1, 2, 3}
    for case in cases:
        assert (case.name in produced) is (unsupported_reason(case, "float32") is None), \
            case.name
    assert np.isfinite(next(iter(artifacts.results.values()))["output"]).all()
