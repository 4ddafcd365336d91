"""docs/robustness.md's Keras rows: each a clear error before any change, on every backend."""

import keras

from robustness_doc import check_section


def test_keras_section_is_current():
    # The section's text is written from the TensorFlow backend (docs/robustness.py); JAX and
    # PyTorch check that every row is a clear error before any change.
    check_section("keras", text=keras.backend.backend() == "tensorflow")
