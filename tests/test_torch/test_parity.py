"""Table-driven parity with nn.Conv2d over its constructor arguments.

Given nn.Conv2d's kernel (embedded with DOConv2d.from_conv), DOConv2d gives the same
output shape and values (rtol 1e-5, atol 1e-6 in float32), and ``fuse()`` returns an
nn.Conv2d whose attributes equal the native module's.
"""

import pytest
import torch
from torch import nn

from doconv_torch import DOConv2d

ARGUMENTS = [
    ((3, 8, 3), dict()),
    ((3, 8, 3), dict(bias=False)),
    ((3, 8, (3, 5)), dict(stride=(1, 2), padding=(2, 1))),
    ((4, 8, 3), dict(stride=2, padding=1, groups=2)),
    ((4, 4, 3), dict(padding=1, groups=4)),                       # depthwise
    ((4, 12, 3), dict(padding=1, groups=4)),                      # depthwise, multiplier 3
    ((4, 8, 3), dict(padding="same")),
    ((4, 8, 4), dict(padding="same", dilation=2)),                # even kernel: asymmetric
    ((4, 8, (2, 3)), dict(padding="same", padding_mode="reflect")),
    ((4, 8, (2, 4)), dict(padding="same")),                       # zeros: F.conv2d's 'same'
    ((4, 8, 3), dict(padding="valid", stride=3)),
    ((4, 8, 3), dict(padding=2, dilation=(2, 1))),
    ((4, 8, 3), dict(padding=1, padding_mode="reflect")),
    ((4, 8, 3), dict(padding=(1, 2), padding_mode="replicate")),
    ((4, 8, 3), dict(padding=2, padding_mode="circular", stride=2)),
    ((4, 8, 1), dict()),
    ((4, 8, 1), dict(stride=2, padding=1)),                        # 1x1 with padding
    ((4, 8, (1, 3)), dict(padding=(0, 1), groups=2, bias=False)),
    ((6, 6, 5), dict(padding="same", groups=3, padding_mode="circular")),
    ((4, 8, 3), dict(dtype=torch.float64, device="cpu")),
]
IDS = [f"{args}-{kwargs}" for args, kwargs in ARGUMENTS]
ATTRIBUTES = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "padding_mode", "transposed", "output_padding", "training"]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("args, kwargs", ARGUMENTS, ids=IDS)
def test_parity_with_nn_conv2d(args, kwargs):
    native = nn.Conv2d(*args, **kwargs)
    layer = DOConv2d(*args, **kwargs)
    for name in ATTRIBUTES:
        assert getattr(layer, name) == getattr(native, name), name
    # The F.pad argument of the non-zero padding modes (a list or tuple in nn.Conv2d).
    assert list(layer._reversed_padding_repeated_twice) == list(
        native._reversed_padding_repeated_twice)
    assert layer.weight.shape == native.weight.shape
    assert layer.weight.dtype == native.weight.dtype
    assert (layer.bias is None) == (native.bias is None)

    converted = DOConv2d.from_conv(native)
    dtype = native.weight.dtype
    x = torch.randn(2, args[0], 11, 9, dtype=dtype)
    y_native = native(x)
    y = converted(x)
    assert y.shape == y_native.shape and y.dtype == y_native.dtype
    torch.testing.assert_close(y, y_native, rtol=1e-5, atol=1e-6)

    with torch.no_grad():
        if converted.D is not None:
            converted.D.normal_(0, 0.3)
    fused = converted.fuse()
    assert type(fused) is nn.Conv2d
    for name in ATTRIBUTES:
        assert getattr(fused, name) == getattr(native, name), name
    assert fused.weight.dtype == native.weight.dtype
    assert fused.weight.device == native.weight.device
    assert (fused.bias is None) == (native.bias is None)
    assert repr(fused) == repr(native)
    torch.testing.assert_close(fused(x), converted(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(padding="same", stride=2), dict(groups=3),
                                    dict(padding_mode="mirror"), dict(padding="full")],
                         ids=str)
def test_rejects_what_nn_conv2d_rejects(kwargs):
    with pytest.raises(ValueError):
        nn.Conv2d(4, 6, 3, **kwargs)
    with pytest.raises(ValueError):
        DOConv2d(4, 6, 3, **kwargs)
