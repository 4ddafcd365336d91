"""The validated hyper-parameters of one DO-Conv layer, shared by every adapter.

Adapters translate their native argument names to these (Keras' ``filters`` is
``out_channels``, ``strides`` is ``stride``, ...) and let this module reject bad
values, so every framework gives the same message for the same mistake.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Mapping, Sequence, Union

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PADDING_STRINGS = ("valid", "same")

Pair = tuple[int, int]
Padding = Union[str, Pair]


def native_spec(names: Mapping[str, str], *args: Any, **kwargs: Any) -> "ConvSpec":
    """``ConvSpec(*args, **kwargs)`` whose ValueErrors say the framework's argument names:
    ``names`` maps a canonical name to the framework's (Keras' {"out_channels": "filters"})."""
    try:
        return ConvSpec(*args, **kwargs)
    except ValueError as error:
        message = str(error)
        for canonical, native in names.items():
            if message.startswith(canonical + " "):
                message = native + message[len(canonical):]
                break
        raise ValueError(message) from None


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int >= minimum; bools and floats are refused, numpy ints accepted."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {_describe(value)}")
    try:
        result = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {_describe(value)}"
        ) from None
    if result < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {result}")
    return result


def check_pair(name: str, value: Any, *, minimum: int = 1) -> Pair:
    """An int or a sequence of two ints, each >= minimum, as a pair."""
    if isinstance(value, (str, bytes)):
        raise ValueError(
            f"{name} must be an integer >= {minimum} or a pair of them, got {_describe(value)}"
        )
    if isinstance(value, Sequence) or (hasattr(value, "__len__") and hasattr(value, "__iter__")):
        items = list(value)
        if len(items) != 2:
            raise ValueError(
                f"{name} must be an integer >= {minimum} or a pair of them, "
                f"got {len(items)} values: {value!r}"
            )
        try:
            return (check_int(name, items[0], minimum=minimum),
                    check_int(name, items[1], minimum=minimum))
        except ValueError:
            raise ValueError(
                f"{name} must be an integer >= {minimum} or a pair of them, got {value!r}"
            ) from None
    try:
        number = check_int(name, value, minimum=minimum)
    except ValueError:
        raise ValueError(
            f"{name} must be an integer >= {minimum} or a pair of them, got {_describe(value)}"
        ) from None
    return (number, number)


def check_padding(value: Any) -> Padding:
    """'valid', 'same' (any case), an int >= 0 or a pair of them."""
    if isinstance(value, str):
        lowered = value.lower()
        if lowered not in PADDING_STRINGS:
            raise ValueError(
                "padding must be 'valid', 'same', an integer >= 0 or a pair of them, "
                f"got {value!r}"
            )
        return lowered
    try:
        return check_pair("padding", value, minimum=0)
    except ValueError:
        raise ValueError(
            "padding must be 'valid', 'same', an integer >= 0 or a pair of them, "
            f"got {_describe(value)}"
        ) from None


def check_padding_mode(value: Any) -> str:
    if not isinstance(value, str) or value not in PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {', '.join(repr(m) for m in PADDING_MODES)}, "
            f"got {value!r}"
        )
    return value


def check_D_mul(value: Any, kernel_size: Pair) -> int:
    """Resolve D_mul: default M*N; >= M*N when M*N > 1; 1 for a 1x1 kernel (no D)."""
    mn = kernel_size[0] * kernel_size[1]
    if value is None:
        return mn
    number = check_int("D_mul", value)
    if mn == 1 and number != 1:
        raise ValueError(
            f"D_mul must be 1 or None for a 1x1 kernel (it has no depthwise part), got {number}"
        )
    if number < mn:
        # With D_mul < M*N the fixed identity is all zeros and the layer starts dead.
        raise ValueError(
            f"D_mul must be >= kernel height*width = {mn} for a "
            f"{kernel_size[0]}x{kernel_size[1]} kernel, got {number}"
        )
    return number


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One DO-Conv layer's hyper-parameters, validated and normalised on construction.

    ``in_channels`` may be None while a framework defers it to the first call
    (Keras, Gluon); ``with_in_channels`` completes the spec then. Canonical shapes
    (doconv-math.md): D (C_in, M*N, D_mul), W (C_out, C_in/g, D_mul), bias (C_out,),
    composed kernel (C_out, C_in/g, M, N).
    """

    in_channels: int | None
    out_channels: int
    kernel_size: Pair
    stride: Pair = (1, 1)
    padding: Padding = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    D_mul: int | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        normal = {
            "out_channels": check_int("out_channels", self.out_channels),
            "kernel_size": check_pair("kernel_size", self.kernel_size),
            "stride": check_pair("stride", self.stride),
            "padding": check_padding(self.padding),
            "dilation": check_pair("dilation", self.dilation),
            "groups": check_int("groups", self.groups),
            "padding_mode": check_padding_mode(self.padding_mode),
        }
        if not isinstance(self.bias, bool):
            raise ValueError(f"bias must be True or False, got {_describe(self.bias)}")
        normal["D_mul"] = check_D_mul(self.D_mul, normal["kernel_size"])
        if normal["out_channels"] % normal["groups"]:
            raise ValueError(
                f"out_channels must be divisible by groups ({normal['groups']}), "
                f"got {normal['out_channels']}"
            )
        if self.in_channels is not None:
            in_channels = check_int("in_channels", self.in_channels)
            if in_channels % normal["groups"]:
                raise ValueError(
                    f"in_channels must be divisible by groups ({normal['groups']}), "
                    f"got {in_channels}"
                )
            normal["in_channels"] = in_channels
        for key, value in normal.items():
            object.__setattr__(self, key, value)

    # -- derived shapes ------------------------------------------------------
    @property
    def mn(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def has_D(self) -> bool:
        """False for a 1x1 kernel: the layer is then a plain conv with kernel W."""
        return self.mn > 1

    @property
    def in_per_group(self) -> int:
        return self._known_in_channels() // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def D_shape(self) -> tuple[int, int, int] | None:
        return (self._known_in_channels(), self.mn, self.D_mul) if self.has_D else None

    @property
    def W_shape(self) -> tuple[int, int, int]:
        return (self.out_channels, self.in_per_group, self.D_mul)

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """The composed kernel's OIHW shape."""
        return (self.out_channels, self.in_per_group) + self.kernel_size

    @property
    def fan_in(self) -> int:
        """The fan-in of the equivalent plain conv kernel, for initialising W."""
        return self.in_per_group * self.mn

    def _known_in_channels(self) -> int:
        if self.in_channels is None:
            raise ValueError("in_channels is not known yet (deferred until the first input)")
        return self.in_channels

    # -- completing and checking ---------------------------------------------
    def with_in_channels(self, in_channels: int) -> "ConvSpec":
        return dataclasses.replace(self, in_channels=in_channels)

    def check_input_channels(self, channels: int, name: str = "input") -> None:
        """The error a layer gives for an input with the wrong channel count."""
        expected = self._known_in_channels()
        if channels != expected:
            raise ValueError(
                f"{name} must have {expected} channels (the layer's in_channels), "
                f"got {channels}"
            )

    def resolve_padding(self, in_hw: Sequence[int]) -> tuple[Pair, Pair]:
        """((top, bottom), (left, right)) for an input of spatial size in_hw.

        'same' follows TensorFlow (and PyTorch, which allows it for stride 1 only):
        total = max((ceil(n/s) - 1)*s + (k - 1)*d + 1 - n, 0), the smaller half first.
        """
        if self.padding == "valid":
            return ((0, 0), (0, 0))
        if self.padding == "same":
            pads = []
            for n, k, s, d in zip(in_hw, self.kernel_size, self.stride, self.dilation):
                out = -(-n // s)
                total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
                pads.append((total // 2, total - total // 2))
            return (pads[0], pads[1])
        ph, pw = self.padding
        return ((ph, ph), (pw, pw))

    def fixed_padding(self) -> tuple[Pair, Pair]:
        """((top, bottom), (left, right)) for a padding that does not depend on the input size:
        explicit, 'valid', or 'same' with stride 1; a ValueError for strided 'same'."""
        if self.padding == "same" and self.stride != (1, 1):
            raise ValueError(f"padding 'same' with stride {self.stride} depends on the input "
                             "size; it has no fixed padding")
        return self.resolve_padding((1, 1))  # with stride 1 'same' pads the same at any size

    def output_size(self, in_hw: Sequence[int | None]) -> tuple[int | None, int | None]:
        """The output's spatial size (None where the input's is unknown); a ValueError for an
        input too small to give one output position."""
        known = [1 if n is None else n for n in in_hw]
        pads = self.resolve_padding(known)
        sizes = []
        for n, (before, after), k, s, d in zip(
            in_hw, pads, self.kernel_size, self.stride, self.dilation
        ):
            sizes.append(None if n is None else (n + before + after - (k - 1) * d - 1) // s + 1)
        if any(size is not None and size < 1 for size in sizes):
            raise ValueError(
                f"an input of spatial size {tuple(in_hw)} is too small for kernel_size "
                f"{self.kernel_size} with dilation {self.dilation} and padding {self.padding!r}"
            )
        return (sizes[0], sizes[1])

    def normalized(self) -> "ConvSpec":
        """The same layer function with its padding spelled one way: explicit pads where
        'same' does not depend on the input size (stride 1, even (k-1)*d), 'valid' for no
        padding, and padding mode 'zeros' where nothing is padded."""
        padding = self.padding
        if padding == "same":
            totals = [(k - 1) * d for k, d in zip(self.kernel_size, self.dilation)]
            if self.stride == (1, 1) and not any(t % 2 for t in totals):
                padding = (totals[0] // 2, totals[1] // 2)
        if padding == (0, 0):
            padding = "valid"
        mode = "zeros" if padding == "valid" else self.padding_mode
        return dataclasses.replace(self, padding=padding, padding_mode=mode)

    def same_function(self, other: "ConvSpec") -> bool:
        """True when both specs describe the same layer function (an unknown in_channels
        matches any)."""
        a, b = self, other
        if a.in_channels is None and b.in_channels is not None:
            a = a.with_in_channels(b.in_channels)
        if b.in_channels is None and a.in_channels is not None:
            b = b.with_in_channels(a.in_channels)
        return a.normalized() == b.normalized()

    def string_padding(self) -> str | None:
        """'valid' or 'same' where that padding computes this spec's function (for
        frameworks that take only those two), else None; a string padding is kept."""
        if isinstance(self.padding, str):
            return self.padding
        for padding in PADDING_STRINGS:
            if self.same_function(dataclasses.replace(self, padding=padding,
                                                      padding_mode="zeros")):
                return padding
        return None

    # -- serialisation ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        config = dataclasses.asdict(self)
        for key in ("kernel_size", "stride", "dilation"):
            config[key] = list(config[key])
        if not isinstance(self.padding, str):
            config["padding"] = list(self.padding)
        return config

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ConvSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - names
        missing = {"in_channels", "out_channels", "kernel_size"} - set(config)
        if unknown or missing:
            raise ValueError(
                "a layer spec needs the keys "
                f"{sorted(names)}; got unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        return cls(**config)
