import re
import os

import keras

import doconv_tf


def test_keras_loaded_the_backend_tox_asked_for():
    assert os.environ["KERAS_BACKEND"] in ("tensorflow", "jax", "torch")
    assert keras.backend.backend() == os.environ["KERAS_BACKEND"]


def test_layer_module_uses_keras_ops_only():
    # The layer must run on any backend: no TensorFlow or JAX calls in its source.
    source = open(doconv_tf.layer.__file__).read() + open(doconv_tf.model.__file__).read()
    # (Naming the backend is fine: the TensorFlow CPU channels_first path is chosen by name.)
    assert "tensorflow" not in source.replace("TensorFlow", "").replace(
        '_BACKEND == "tensorflow"', "")
    assert not re.search(r"(?<![\w.])tf\.", source)
    # The one jax use: telling an eager array from a tracer, for the kernel cache.
    imports = re.findall(r"^\s*((?:import|from) jax\b[^#\n]*)", source, re.M)
    assert [line.strip() for line in imports] == ["from jax.core import Tracer as _JaxTracer"]
