"""doconv for PyTorch: DOConv2d, a drop-in for nn.Conv2d, and whole-model convert/fuse.

Train with DO-Conv, then ``fuse`` back to plain nn.Conv2d for deployment::

    model = doconv_torch.convert(model)      # a copy: identical outputs, extra trainable D
    ...                                      # train
    plain = doconv_torch.fuse(model)         # a copy with plain nn.Conv2d; loads into the
                                             # original architecture

The public API is the one every adapter offers (``doconv_core.testing.api``). The math
lives in ``doconv_core``; this package converts layouts and calls it.
"""

from ._ckernel import backend as composition_backend
from .layer import DOConv2d
from .model import (
    LegacyLoadReport,
    convert,
    doconv_layers,
    export_params,
    fuse,
    import_params,
    load_legacy,
)

__all__ = ["DOConv2d", "convert", "fuse", "doconv_layers", "export_params", "import_params",
           "load_legacy", "LegacyLoadReport", "composition_backend"]
