"""The Keras suite runs unchanged on the TensorFlow (tox env tf) and JAX (keras-jax) backends.

Keras picks its backend from KERAS_BACKEND when first imported; tox sets it per env. A
mismatch would silently test the wrong backend, so it stops the session here.
"""

import os

import pytest

import keras

EXPECTED = os.environ.get("KERAS_BACKEND")
if EXPECTED is None:
    raise pytest.UsageError(
        "KERAS_BACKEND is not set: run this suite through tox (tox -e tf / tox -e keras-jax), "
        "or set KERAS_BACKEND=tensorflow or jax yourself")
if keras.backend.backend() != EXPECTED:
    raise pytest.UsageError(
        f"Keras loaded the {keras.backend.backend()!r} backend but KERAS_BACKEND is "
        f"{EXPECTED!r}; another import chose the backend first")


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    # Layer names and the global dtype policy must not leak between tests.
    keras.backend.clear_session(free_memory=False)  # gc.collect() per test cost minutes
    yield
    keras.config.set_dtype_policy("float32")
