"""The validated hyper-parameters of one DO-Conv layer, shared by every adapter.

Adapters translate their native argument names to these (Keras' ``filters`` is
``out_channels``, ``strides`` is ``stride``, ...) and let this module reject bad
values, so every framework gives the same message for the same mistake.
"""

from __future__ import annotations

import dataclasses
import math
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


RANKS = (1, 2, 3)
_TUPLE_WORDS = {1: "a sequence of one of them", 2: "a pair of them", 3: "a triple of them"}


def check_rank(value: Any) -> int:
    """The number of spatial axes: 1, 2 or 3."""
    try:
        rank = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        rank = None
    if rank not in RANKS:
        raise ValueError(f"rank must be 1, 2 or 3 (spatial axes), got {value!r}")
    return rank


def check_tuple(name: str, value: Any, rank: int = 2, *, minimum: int = 1) -> tuple[int, ...]:
    """An int or a sequence of ``rank`` ints, each >= minimum, as a tuple of ``rank`` ints."""
    words = f"an integer >= {minimum} or {_TUPLE_WORDS[rank]}"
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be {words}, got {_describe(value)}")
    if isinstance(value, Sequence) or (hasattr(value, "__len__") and hasattr(value, "__iter__")):
        items = list(value)
        if len(items) != rank:
            raise ValueError(f"{name} must be {words}, got {len(items)} values: {value!r}")
        try:
            return tuple(check_int(name, item, minimum=minimum) for item in items)
        except ValueError:
            raise ValueError(f"{name} must be {words}, got {value!r}") from None
    try:
        number = check_int(name, value, minimum=minimum)
    except ValueError:
        raise ValueError(f"{name} must be {words}, got {_describe(value)}") from None
    return (number,) * rank


def check_pair(name: str, value: Any, *, minimum: int = 1) -> Pair:
    """An int or a sequence of two ints, each >= minimum, as a pair."""
    return check_tuple(name, value, 2, minimum=minimum)  # type: ignore[return-value]


def padding_strings(rank: int) -> tuple[str, ...]:
    """'valid' and 'same'; 'causal' (Keras' Conv1D) too for one spatial axis."""
    return PADDING_STRINGS + (("causal",) if rank == 1 else ())


def check_padding(value: Any, rank: int = 2) -> Padding:
    """'valid', 'same' ('causal' for rank 1; any case), an int >= 0 or ``rank`` of them."""
    strings = padding_strings(rank)
    words = (", ".join(repr(p) for p in strings) + f", an integer >= 0 or "
             f"{_TUPLE_WORDS[rank]}")
    if isinstance(value, str):
        lowered = value.lower()
        if lowered not in strings:
            raise ValueError(f"padding must be {words}, got {value!r}")
        return lowered
    try:
        return check_tuple("padding", value, rank, minimum=0)
    except ValueError:
        raise ValueError(f"padding must be {words}, got {_describe(value)}") from None


def check_padding_mode(value: Any) -> str:
    if not isinstance(value, str) or value not in PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {', '.join(repr(m) for m in PADDING_MODES)}, "
            f"got {value!r}"
        )
    return value


def kernel_volume_words(kernel_size: Sequence[int] | int) -> str:
    """How messages name the kernel's volume: 'kernel height*width = 9 for a 3x3 kernel';
    an int is a volume whose shape is not known ('kernel volume = 9')."""
    if isinstance(kernel_size, int):
        return f"kernel volume = {kernel_size}"
    volume = math.prod(kernel_size)
    if len(kernel_size) == 1:
        return f"kernel length = {volume}"
    shape = "x".join(str(k) for k in kernel_size)
    what = {2: "kernel height*width", 3: "kernel volume"}[len(kernel_size)]
    return f"{what} = {volume} for a {shape} kernel"


def check_D_mul(value: Any, kernel_size: Sequence[int] | int) -> int:
    """Resolve D_mul: default the kernel volume (M*N in 2-D); >= it when it is > 1; 1 for a
    kernel of one element (no D). ``kernel_size`` may be a bare volume (a file that records
    the kernel's volume but not its shape)."""
    mn = kernel_size if isinstance(kernel_size, int) else math.prod(kernel_size)
    if value is None:
        return mn
    number = check_int("D_mul", value)
    if mn == 1 and number != 1:
        if isinstance(kernel_size, int):
            one = "one-element"
        else:
            one = "x".join("1" for _ in kernel_size) if len(kernel_size) > 1 else "length-1"
        raise ValueError(
            f"D_mul must be 1 or None for a {one} kernel (it has no depthwise part), got {number}"
        )
    if number < mn:
        # With D_mul below the kernel volume the fixed identity is all zeros and the layer
        # starts dead.
        raise ValueError(f"D_mul must be >= {kernel_volume_words(kernel_size)}, got {number}")
    return number


EXTRA_STATE_VERSION = 1


def extra_state_record(rank: int, groups: int, kernel_size: Sequence[int]) -> list[int]:
    """The record of what a layer's parameter shapes do not tell (written by doconv_torch as
    a layer's ``_extra_state``, read by the ``doconv`` command):
    ``[version, rank, groups, *kernel_size]``."""
    return [EXTRA_STATE_VERSION, rank, groups, *kernel_size]


def read_extra_state(values: Sequence[Any]) -> tuple[int, int, tuple[int, ...]]:
    """(rank, groups, kernel_size) from an extra-state record; a ValueError saying what it
    should be for anything else (another version, a rank outside 1-3, a length that does
    not match the rank, values below 1, numbers that are not integers)."""
    expected = f"[{EXTRA_STATE_VERSION}, rank, groups, *kernel_size] with rank 1, 2 or 3"
    shown = list(values)[:8] if isinstance(values, Sequence) else values
    try:
        numbers = [None if isinstance(v, bool) else operator.index(v) for v in values]
    except TypeError:
        numbers = [None]
    if None in numbers or len(numbers) < 4 or numbers[0] != EXTRA_STATE_VERSION or \
            numbers[1] not in RANKS or len(numbers) != 3 + numbers[1] or min(numbers) < 1:
        raise ValueError(f"an extra-state record must be {expected}, got {shown!r}")
    return numbers[1], numbers[2], tuple(numbers[3:])


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One DO-Conv layer's hyper-parameters, validated and normalised on construction.

    ``rank`` is the number of spatial axes (1, 2 or 3; keyword-only, default 2); kernel_size,
    stride, dilation and explicit padding hold one int per axis. ``in_channels`` may be None
    while a framework defers it to the first call (Keras, Gluon); ``with_in_channels``
    completes the spec then. Canonical shapes (doconv-math.md), with MN the kernel volume
    (M*N in 2-D): D (C_in, MN, D_mul), W (C_out, C_in/g, D_mul), bias (C_out,), composed
    kernel (C_out, C_in/g, *kernel_size).
    """

    in_channels: int | None
    out_channels: int
    kernel_size: tuple[int, ...]
    # Defaults are ints so that every rank takes them; all three become tuples of ``rank``.
    stride: tuple[int, ...] = 1
    padding: Padding = 0
    dilation: tuple[int, ...] = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    D_mul: int | None = dataclasses.field(default=None, kw_only=True)
    rank: int = dataclasses.field(default=2, kw_only=True)

    def __post_init__(self) -> None:
        rank = check_rank(self.rank)
        object.__setattr__(self, "rank", rank)
        normal = {
            "out_channels": check_int("out_channels", self.out_channels),
            "kernel_size": check_tuple("kernel_size", self.kernel_size, rank),
            "stride": check_tuple("stride", self.stride, rank),
            "padding": check_padding(self.padding, rank),
            "dilation": check_tuple("dilation", self.dilation, rank),
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
        """The kernel's volume: M*N in 2-D, its length in 1-D, M*N*P in 3-D."""
        return math.prod(self.kernel_size)

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
    def kernel_shape(self) -> tuple[int, ...]:
        """The composed kernel's shape: (C_out, C_in/g, *kernel_size), OIHW in 2-D."""
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

    def resolve_padding(self, in_sizes: Sequence[int]) -> tuple[Pair, ...]:
        """(before, after) per spatial axis for an input of spatial size ``in_sizes``.

        'same' follows TensorFlow (and PyTorch, which allows it for stride 1 only):
        total = max((ceil(n/s) - 1)*s + (k - 1)*d + 1 - n, 0), the smaller half first.
        'causal' (1-D) pads (k - 1)*d before and nothing after.
        """
        self._check_sizes(in_sizes)
        if self.padding == "valid":
            return ((0, 0),) * self.rank
        if self.padding == "causal":
            return tuple(((k - 1) * d, 0) for k, d in zip(self.kernel_size, self.dilation))
        if self.padding == "same":
            pads = []
            for n, k, s, d in zip(in_sizes, self.kernel_size, self.stride, self.dilation):
                out = -(-n // s)
                total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        return tuple((p, p) for p in self.padding)

    def _check_sizes(self, in_sizes: Sequence[int | None]) -> None:
        if len(in_sizes) != self.rank:
            raise ValueError(f"a {self.rank}-D layer's input has {self.rank} spatial "
                             f"size(s), got {len(in_sizes)}: {tuple(in_sizes)}")

    def fixed_padding(self) -> tuple[Pair, ...]:
        """(before, after) per spatial axis for a padding that does not depend on the input
        size: explicit, 'valid', 'causal', or 'same' with stride 1; a ValueError for strided
        'same'."""
        if self.padding == "same" and any(s != 1 for s in self.stride):
            raise ValueError(f"padding 'same' with stride {self.stride} depends on the input "
                             "size; it has no fixed padding")
        # With stride 1 'same' pads the same at any size.
        return self.resolve_padding((1,) * self.rank)

    def output_size(self, in_sizes: Sequence[int | None]) -> tuple[int | None, ...]:
        """The output's spatial size (None where the input's is unknown); a ValueError for an
        input too small to give one output position."""
        self._check_sizes(in_sizes)
        known = [1 if n is None else n for n in in_sizes]
        pads = self.resolve_padding(known)
        sizes = []
        for n, (before, after), k, s, d in zip(
            in_sizes, pads, self.kernel_size, self.stride, self.dilation
        ):
            sizes.append(None if n is None else (n + before + after - (k - 1) * d - 1) // s + 1)
        if any(size is not None and size < 1 for size in sizes):
            raise ValueError(
                f"an input of spatial size {tuple(in_sizes)} is too small for kernel_size "
                f"{self.kernel_size} with dilation {self.dilation} and padding {self.padding!r}"
            )
        return tuple(sizes)

    def normalized(self) -> "ConvSpec":
        """The same layer function with its padding spelled one way: explicit pads where
        'same' does not depend on the input size (stride 1, even (k-1)*d), 'valid' for no
        padding, and padding mode 'zeros' where nothing is padded."""
        padding = self.padding
        totals = [(k - 1) * d for k, d in zip(self.kernel_size, self.dilation)]
        if padding == "same":
            if all(s == 1 for s in self.stride) and not any(t % 2 for t in totals):
                padding = tuple(t // 2 for t in totals)
        if padding == "causal" and not any(totals):
            padding = "valid"
        if padding == (0,) * self.rank:
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
        """'valid', 'same' (or, in 1-D, 'causal') where that padding computes this spec's
        function (for frameworks that take only those), else None; a string padding is kept."""
        if isinstance(self.padding, str):
            return self.padding
        for padding in padding_strings(self.rank):
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
