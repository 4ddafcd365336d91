"""doconv_core: the framework-free DO-Conv math (NumPy only).

The formulas are specified in doconv-math.md and documented once, here:

* ``ConvSpec``: validated layer hyper-parameters and canonical shapes
  D (C_in, M*N, D_mul), W (C_out, C_in/g, D_mul), kernel (C_out, C_in/g, M, N).
* ``compose_kernel``, ``compose_kernel_vjp``, ``identity_d``, ``embed_kernel``, ``fuse``.
* ``conv2d``, ``doconv2d``, ``doconv2d_features``: NumPy reference convolutions, and
  ``conv2d_vjp``, ``doconv2d_vjp``: their gradients, the oracle for the adapters' autograd.
* ``DOConvParams``, ``save_params``, ``load_params``: the portable container (safetensors;
  ``.npz`` versions 1 and 2 still load); ``read_safetensors``, ``read_safetensors_header``,
  ``write_safetensors``, ``is_safetensors``: the safetensors format in NumPy alone.
* ``prepare_import``, ``prepare_legacy``, ``check_state_keys``: every import validated whole
  before any layer changes (the path all adapters' imports take); ``LegacyLoadReport``.
* ``layer_filter``: the ``include`` rule of every adapter's ``convert``.
* ``import_legacy_torch``, ``import_legacy_tf``, ``import_legacy_gluon``: the authors'
  original checkpoints.
"""

from .compose import (
    check_params,
    compose_kernel,
    compose_kernel_vjp,
    embed_kernel,
    fuse,
    hwio_to_oihw,
    identity_d,
    nchw_to_nhwc,
    nhwc_to_nchw,
    oihw_to_hwio,
)
from .checkpoint import (
    ROOT_NAME,
    LegacyLoadReport,
    check_layers_ready,
    check_state_keys,
    export_layers,
    import_layers,
    prepare_import,
    prepare_legacy,
)
from .legacy import LegacyImport, import_legacy_gluon, import_legacy_tf, import_legacy_torch
from .params import (
    FORMAT_VERSION,
    CheckpointError,
    assignable_params,
    DOConvParams,
    checkpoint_array,
    load_params,
    match_layers,
    save_params,
)
from .reference import (
    conv,
    conv2d,
    conv2d_vjp,
    conv_vjp,
    doconv,
    doconv2d,
    doconv2d_features,
    doconv2d_vjp,
    doconv_features,
    doconv_vjp,
    pad_input,
)
from .tensorfile import is_safetensors, read_safetensors, read_safetensors_header, write_safetensors
from .selection import Include, layer_filter, nothing_to_convert, nothing_to_fuse
from .spec import (
    PADDING_MODES,
    RANKS,
    ConvSpec,
    check_D_mul,
    check_int,
    check_pair,
    check_padding,
    check_rank,
    check_tuple,
)

__version__ = "0.1.0"

__all__ = [
    "ConvSpec", "PADDING_MODES", "RANKS", "check_D_mul", "check_int", "check_pair",
    "check_padding", "check_rank", "check_tuple",
    "check_params", "compose_kernel", "compose_kernel_vjp", "embed_kernel", "fuse",
    "identity_d", "oihw_to_hwio", "hwio_to_oihw", "nchw_to_nhwc", "nhwc_to_nchw",
    "conv", "conv_vjp", "doconv", "doconv_features", "doconv_vjp",
    "conv2d", "conv2d_vjp", "doconv2d", "doconv2d_features", "doconv2d_vjp", "pad_input",
    "DOConvParams", "save_params", "load_params", "match_layers", "CheckpointError", "FORMAT_VERSION",
    "checkpoint_array", "prepare_import", "prepare_legacy", "check_state_keys",
    "LegacyLoadReport", "ROOT_NAME", "Include", "layer_filter", "nothing_to_convert",
    "nothing_to_fuse", "assignable_params", "check_layers_ready", "export_layers", "import_layers",
    "LegacyImport", "import_legacy_torch", "import_legacy_tf", "import_legacy_gluon",
    "read_safetensors", "read_safetensors_header", "write_safetensors", "is_safetensors",
]
