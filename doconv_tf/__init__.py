"""doconv for Keras 3 (TensorFlow, JAX and PyTorch backends; the layers use ``keras.ops`` only).

* ``DOConv1D``, ``DOConv2D``, ``DOConv3D``: Keras' Conv1D/Conv2D/Conv3D arguments plus
  keyword-only ``D_mul`` (DOConv1D takes padding 'causal' as Conv1D does); registered for
  ``.keras`` saving as ``doconv>DOConv1D`` etc. ``layer.kernel`` is the composed kernel in
  Keras' layout, ``layer.fuse()`` the Conv layer of the same rank (a DepthwiseConv1D or
  DepthwiseConv2D for a depthwise layer Keras has one for), ``layer.to_params()`` /
  ``DOConv2D.from_params(...)`` / ``layer.set_params(...)`` the core's container.
* ``convert`` / ``fuse``: uncompiled copies of whole Sequential and Functional models, any mix
  of ranks.
* ``doconv_layers``: {layer name: DO-Conv layer} of a model.
* ``export_params`` / ``import_params``: whole models in the portable container, by layer name.
* ``load_legacy``: the original reference Keras layer's W ('kernel'), D and bias, for a whole
  model; 2-D only, as the original; returns a ``LegacyLoadReport``.
"""

from doconv_core import LegacyLoadReport

from .layer import DOConv1D, DOConv2D, DOConv3D
from .model import convert, doconv_layers, export_params, fuse, import_params, load_legacy

__all__ = ["DOConv1D", "DOConv2D", "DOConv3D", "convert", "fuse", "doconv_layers",
           "export_params", "import_params", "load_legacy", "LegacyLoadReport"]
