"""doconv for Keras 3 (TensorFlow, JAX and PyTorch backends; the layer uses ``keras.ops`` only).

* ``DOConv2D``: Keras' Conv2D arguments plus keyword-only ``D_mul``; registered for
  ``.keras`` saving as ``doconv>DOConv2D``. ``layer.kernel`` is the composed HWIO kernel,
  ``layer.fuse()`` a Conv2D (a DepthwiseConv2D for a depthwise layer),
  ``layer.to_params()`` / ``DOConv2D.from_params(...)`` / ``layer.set_params(...)`` the
  core's container.
* ``convert`` / ``fuse``: copies of whole Sequential and Functional models.
* ``doconv_layers``: {layer name: DOConv2D} of a model.
* ``export_params`` / ``import_params``: whole models in the portable container, by layer name.
* ``load_legacy``: the original reference Keras layer's W ('kernel'), D and bias, for a whole
  model; returns a ``LegacyLoadReport``.
"""

from doconv_core import LegacyLoadReport

from .layer import DOConv2D
from .model import convert, doconv_layers, export_params, fuse, import_params, load_legacy

__all__ = ["DOConv2D", "convert", "fuse", "doconv_layers", "export_params", "import_params",
           "load_legacy", "LegacyLoadReport"]
