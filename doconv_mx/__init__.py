"""doconv for MXNet Gluon 1.x: the ``DOConv2D`` layer and whole-net operations.

* ``layer``: ``DOConv2D``, nn.Conv2D's arguments with ``D_mul`` added; ``to_params``,
  ``set_params``, ``from_params`` (the core's ``DOConvParams``) and ``fuse``.
* ``model``: ``convert`` and ``fuse`` (each returns a new net), ``doconv_layers``,
  ``export_params`` / ``import_params`` (the portable .npz every adapter reads) and
  ``load_legacy`` (the original Gluon layer's arrays).

The math is specified once in ``doconv_core``.
"""

from .layer import DOConv2D
from .model import (
    LegacyLoadReport,
    convert,
    doconv_layers,
    export_params,
    fuse,
    import_params,
    load_legacy,
)

__all__ = ["DOConv2D", "convert", "fuse", "doconv_layers", "export_params", "import_params",
           "load_legacy", "LegacyLoadReport"]
