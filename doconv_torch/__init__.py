"""doconv for PyTorch: DOConv1d, DOConv2d and DOConv3d, drop-ins for nn.Conv1d, nn.Conv2d and
nn.Conv3d, and whole-model convert/fuse.

Train with DO-Conv, then ``fuse`` back to plain convs for deployment::

    model = doconv_torch.convert(model)      # a copy: identical outputs, extra trainable D
    ...                                      # train
    plain = doconv_torch.fuse(model)         # a copy with plain nn.Conv1d/2d/3d; loads into
                                             # the original architecture

The public API is the one every adapter offers (``doconv_core.testing.api``). The math
lives in ``doconv_core``; this package converts layouts and calls it.
"""

from ._ckernel import backend as composition_backend
from .layer import DOConv1d, DOConv2d, DOConv3d
from .model import (
    LegacyLoadReport,
    convert,
    doconv_layers,
    export_params,
    fuse,
    import_params,
    load_legacy,
)

__all__ = ["DOConv1d", "DOConv2d", "DOConv3d", "convert", "fuse", "doconv_layers",
           "export_params", "import_params", "load_legacy", "LegacyLoadReport",
           "composition_backend"]
