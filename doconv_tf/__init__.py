"""doconv for Keras 3 (TensorFlow and JAX backends; the layer uses ``keras.ops`` only).

* ``DOConv2D``: Keras' Conv2D arguments plus keyword-only ``D_mul``; registered for
  ``.keras`` saving as ``doconv>DOConv2D``. ``layer.kernel`` is the composed HWIO kernel,
  ``layer.fuse()`` a Conv2D (a DepthwiseConv2D for a depthwise layer),
  ``layer.to_params()`` / ``DOConv2D.from_params(...)`` the core's container.
* ``convert`` / ``fuse``: whole Sequential and Functional models.
* ``to_params``, ``export_params`` / ``import_params``: whole models, keyed by layer name.
* ``load_legacy_weights``: the original reference Keras layer's D and W ('kernel').
"""

from .layer import DOConv2D
from .models import convert, export_params, fuse, import_params, load_legacy_weights, to_params

__all__ = ["DOConv2D", "convert", "fuse", "to_params", "export_params", "import_params",
           "load_legacy_weights"]
