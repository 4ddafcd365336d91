"""doconv for MXNet Gluon 1.x: the ``DOConv1D``, ``DOConv2D`` and ``DOConv3D`` layers and
whole-net operations.

* ``layer``: ``DOConv1D``, ``DOConv2D``, ``DOConv3D``, nn.Conv1D/2D/3D's arguments with
  ``D_mul`` added, on one base class ``DOConvND``; ``to_params``, ``set_params``,
  ``from_params`` (the core's ``DOConvParams``) and ``fuse``.
* ``model``: ``convert`` and ``fuse`` (each returns a new net; nets may mix ranks),
  ``doconv_layers``, ``export_params`` / ``import_params`` (the portable .npz every adapter
  reads) and ``load_legacy`` (the original 2-D Gluon layer's arrays).

The math is specified once in ``doconv_core``.
"""

from .layer import DOConv1D, DOConv2D, DOConv3D, DOConvND
from .model import (
    LegacyLoadReport,
    convert,
    doconv_layers,
    export_params,
    fuse,
    import_params,
    load_legacy,
)

__all__ = ["DOConv1D", "DOConv2D", "DOConv3D", "DOConvND", "convert", "fuse", "doconv_layers",
           "export_params", "import_params", "load_legacy", "LegacyLoadReport"]
