"""DOConv1D, DOConv2D, DOConv3D: DO-Conv layers with nn.Conv1D/2D/3D's arguments, composing
their kernels with Gluon ops.

The three share one base class, ``DOConvND``, whose ``rank`` (1, 2 or 3 spatial axes) each
subclass sets. The math (shapes, c(o, i), D_diag, fusion) is doconv_core's; this module
converts Gluon's layouts at its edge.
"""

from __future__ import annotations

from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet.gluon import nn

import doconv_core
from doconv_core import ConvSpec, DOConvParams
from doconv_core.spec import native_spec

from . import _versions
from ._init import KernelInit

__all__ = ["DOConvND", "DOConv1D", "DOConv2D", "DOConv3D"]

# The one layout per rank MXNet 1.9's CPU Convolution runs (channels first).
LAYOUTS = {1: "NCW", 2: "NCHW", 3: "NCDHW"}
ACTIVATIONS = ("relu", "sigmoid", "tanh", "softrelu", "softsign")
# ConvSpec's canonical argument names -> Gluon's, so messages name what the user typed.
_NATIVE_NAMES = {"out_channels": "channels", "stride": "strides", "bias": "use_bias"}


def _spec(rank: int, channels: Any, kernel_size: Any, strides: Any, padding: Any,
          dilation: Any, groups: Any, use_bias: Any, in_channels: int | None,
          D_mul: Any) -> ConvSpec:
    """ConvSpec of ``rank`` spatial axes from Gluon arguments; ValueErrors name the Gluon
    argument."""
    # Gluon's convs take no padding strings: only explicit zero padding exists in Gluon.
    padding = doconv_core.check_tuple("padding", padding, rank, minimum=0)
    return native_spec(_NATIVE_NAMES, in_channels, channels, kernel_size, strides, padding,
                       dilation, groups, bias=use_bias, D_mul=D_mul, rank=rank)


def _native_class(rank: int) -> type:
    """Gluon's conv of ``rank`` spatial axes: nn.Conv1D, nn.Conv2D or nn.Conv3D."""
    return getattr(nn, f"Conv{rank}D")


def _gluon_padding(spec: ConvSpec) -> tuple[int, ...]:
    """The Gluon conv's padding (each axis padded alike on both sides, with zeros) for
    ``spec``; a ValueError where Gluon has none ('same' that depends on the input size or
    pads one side more, 'causal', another padding mode)."""
    name = f"nn.Conv{spec.rank}D"
    try:
        pads = spec.fixed_padding()
    except ValueError as error:
        raise ValueError(f"padding {spec.padding!r} has no Gluon equivalent here: "
                         f"{error}") from None
    if any(before != after for before, after in pads):
        raise ValueError(
            f"padding {spec.padding!r} has no Gluon equivalent here: it pads (before, after) "
            f"= {pads} per spatial axis for kernel_size={spec.kernel_size} and "
            f"dilation={spec.dilation}, and {name} pads both sides of an axis alike")
    if any(before for before, _ in pads) and spec.padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros' for Gluon (its Convolution pads with "
                         f"zeros only), got {spec.padding_mode!r}")
    return tuple(before for before, _ in pads)


def _identity_block(F: Any, mn: int, D_mul: int, dtype: Any, ctx: Any = None) -> Any:
    """D_diag's per-channel (1, MN, D_mul) block as graph ops (exports with the symbol)."""
    kwargs = {"ctx": ctx} if ctx is not None else {}
    dtype = np.dtype(dtype).name
    copies, rest = divmod(D_mul, mn)
    block = F.tile(F.eye(mn, dtype=dtype, **kwargs), reps=(1, copies))
    if rest:
        block = F.concat(block, F.zeros((mn, rest), dtype=dtype, **kwargs), dim=1)
    return F.reshape(block, shape=(1, mn, D_mul))


def _reshape(F: Any, x: Any, shape: tuple) -> Any:
    """Reshape; imperatively a view (the Reshape operator would copy the array)."""
    return x.reshape(shape) if isinstance(x, mx.nd.NDArray) else F.reshape(x, shape=shape)


def _copy_settings(source: Any, target: Any) -> None:
    """A parameter's training settings onto another parameter."""
    target.lr_mult = source.lr_mult
    target.wd_mult = source.wd_mult
    target.grad_req = source.grad_req


class DOConvND(nn.HybridBlock):
    """The DO-Conv layer of ``rank`` spatial axes, shared by DOConv1D, DOConv2D and DOConv3D
    (build those; ``isinstance(layer, DOConvND)`` matches all three).

    Parameters ``W`` (C_out, C_in/g, D_mul), ``D`` (C_in, MN, D_mul) with MN the kernel's
    volume (absent for a kernel of one element) and ``bias`` (C_out,). ``in_channels=0``
    defers C_in to the first input, as Gluon's convs do.

    Unhybridized inference reuses the composed kernel while W and D hold the values it was
    composed from; a hybridized layer composes it in its graph on every call, which ``fuse``
    removes for deployment.
    """

    rank: int | None = None  # spatial axes: 1, 2 or 3 in the subclasses

    def __init__(self, channels: int, kernel_size: Any, strides: Any, padding: Any,
                 dilation: Any, groups: int, layout: str, activation: str | None,
                 use_bias: bool, weight_initializer: Any, bias_initializer: Any,
                 in_channels: int, *, D_mul: int | None = None, **kwargs: Any) -> None:
        rank = self.rank
        if rank is None:
            raise TypeError("DOConvND is the base of DOConv1D, DOConv2D and DOConv3D; build "
                            "one of those")
        if layout != LAYOUTS[rank]:
            raise ValueError(f"layout must be {LAYOUTS[rank]!r} (MXNet 1.9's CPU Convolution "
                             f"supports no other {rank}-D layout), got {layout!r}")
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be None or one of {ACTIVATIONS}, "
                             f"got {activation!r}")
        in_channels = doconv_core.check_int("in_channels", in_channels, minimum=0)
        spec = _spec(rank, channels, kernel_size, strides, padding, dilation, groups, use_bias,
                     in_channels or None, D_mul)
        super().__init__(**kwargs)
        self._spec = spec
        self._layout = layout
        self._activation = activation
        self._weight_initializer = weight_initializer
        self._bias_initializer = bias_initializer
        self._kwargs = {"kernel": spec.kernel_size, "stride": spec.stride,
                        "dilate": spec.dilation, "pad": spec.padding,
                        "num_filter": spec.out_channels, "num_group": spec.groups,
                        "no_bias": not spec.bias, "layout": layout}
        self._cache: dict[Any, tuple] = {}  # (ctx, dtype) -> (W, D, stamp, K); see _cached_kernel
        self._identities: dict[Any, Any] = {}  # (ctx, dtype) -> D_diag block (imperative calls)
        I_g = in_channels // spec.groups
        with self.name_scope():
            self.W = self.params.get(
                "W", shape=(spec.out_channels, I_g, spec.D_mul),
                init=KernelInit(weight_initializer, spec.kernel_size),
                allow_deferred_init=True)
            if spec.has_D:
                self.D = self.params.get("D", shape=(in_channels, spec.mn, spec.D_mul),
                                         init="zeros", allow_deferred_init=True)
            else:
                self.D = None
            if spec.bias:
                self.bias = self.params.get("bias", shape=(spec.out_channels,),
                                            init=bias_initializer, allow_deferred_init=True)
            else:
                self.bias = None
            self.act = (nn.Activation(activation, prefix=activation + "_")
                        if activation is not None else None)

    def __getstate__(self) -> dict[str, Any]:
        """Copies (deepcopy, pickle) start without the kernels composed for this layer."""
        return {**self.__dict__, "_cache": {}, "_identities": {}}

    # -- hyper-parameters ------------------------------------------------------
    @property
    def spec(self) -> ConvSpec:
        """The layer's ConvSpec (in_channels None until known)."""
        spec = self._spec
        if spec.in_channels is None and self.W.shape[1] > 0:
            # Known from W's shape: a hybridized parent inferred it, or set_data gave it.
            return spec.with_in_channels(self.W.shape[1] * spec.groups)
        return spec

    @property
    def layout(self) -> str:
        return self._layout

    def _alias(self) -> str:
        return "doconv"

    def __repr__(self) -> str:
        s = self.spec
        return (f"{type(self).__name__}({s.in_channels} -> {s.out_channels}, "
                f"kernel_size={s.kernel_size}, stride={s.stride}, padding={s.padding}, "
                f"dilation={s.dilation}, groups={s.groups}, D_mul={s.D_mul}, "
                f"bias={s.bias}, layout={self._layout!r}, activation={self._activation!r})")

    def cast(self, dtype: Any) -> None:
        self._cache = {}  # kernels composed in the old dtype are no longer needed
        self._identities = {}
        super().cast(dtype)

    def _channel_axis(self) -> int:
        return self._layout.find("C")

    def _complete(self, in_channels: int) -> None:
        """Fix C_in (deferred init): validates, then gives W and D their full shapes."""
        spec = self.spec
        if spec.in_channels is None:
            spec = spec.with_in_channels(in_channels)  # raises before any change
            self._spec = spec
            self.W.shape = spec.W_shape
            if self.D is not None:
                self.D.shape = spec.D_shape
        else:
            spec.check_input_channels(in_channels)

    def _check_input(self, shape: tuple) -> None:
        """ValueError for an input this layer cannot take, raised before Gluon's deferred
        initialisation fixes in_channels from it."""
        ndim = self.rank + 2
        if len(shape) != ndim:
            raise ValueError(f"input must be {ndim}-D ({self._layout}), got shape "
                             f"{tuple(shape)}")
        spec, channels = self.spec, shape[self._channel_axis()]
        if spec.in_channels is not None:
            spec.check_input_channels(channels)
        else:
            spec.with_in_channels(channels)  # validates only

    def infer_shape(self, x: Any, *args: Any) -> None:
        """Deferred init from the first input (Gluon calls this before initialising)."""
        self._check_input(x.shape)
        self._complete(x.shape[self._channel_axis()])

    # -- forward -----------------------------------------------------------------
    def _compose(self, F: Any, W: Any, D: Any, ctx: Any = None, *, owned: bool = False
                 ) -> Any:
        """The (C_out, C_in/g, *kernel_size) kernel as one batched product, with Gluon ops.

        ``owned``: imperatively, return an array that owns its storage rather than a reshaped
        view; MKL-DNN lays a conv's weights out once only for such arrays.
        """
        s = self.spec
        kernel_size, g, O_g, S, mn = s.kernel_size, s.groups, s.out_per_group, s.D_mul, s.mn
        spatial = tuple(range(2, 2 + self.rank))
        if D is None:  # (C_out, C_in/g, 1) -> (C_out, C_in/g, 1, ..., 1)
            # An array of its own, never W itself: the conv may lay its weight input out
            # for MKL-DNN in place, and W must stay a plain parameter (docs/design.md).
            return F.reshape(W, shape=(0, 0) + (1,) * self.rank)
        D_total = F.broadcast_add(D, self._identity(F, ctx))
        # Batch b = group*(C_in/g) + i, which is c(o, i): (g*I_g, O_g, S) x (g*I_g, MN, S).
        # Each layout change below is a full copy of W or K, so the common cases take fewer.
        if g == 1:  # b = i: swap W's first two axes directly; the last swap writes the kernel
            K = F.batch_dot(F.transpose(W, axes=(1, 0, 2)), D_total, transpose_b=True)
            return F.transpose(_reshape(F, K, (0, 0) + kernel_size), axes=(1, 0) + spatial)
        if s.in_channels == g:  # C_in/g == 1 (depthwise): W is already (g, O_g, S)
            K = F.batch_dot(_reshape(F, W, (g, O_g, S)), D_total, transpose_b=True)
        else:
            W_batched = _reshape(F, F.transpose(_reshape(F, W, (g, O_g, -1, S)),
                                                axes=(0, 2, 1, 3)), (-3, -2))
            K = F.batch_dot(W_batched, D_total, transpose_b=True)  # (g*I_g, O_g, MN)
            K = F.transpose(_reshape(F, K, (g, -1, O_g, mn)), axes=(0, 2, 1, 3))
        shape = (s.out_channels, -1) + kernel_size
        return F.reshape(K, shape=shape) if owned else _reshape(F, K, shape)

    def _identity(self, F: Any, ctx: Any) -> Any:
        """D_diag's (1, MN, D_mul) block: graph ops in a symbol, one cached array imperatively."""
        s = self._spec
        if F is not mx.nd:
            return _identity_block(F, s.mn, s.D_mul, self.W.dtype)
        key = (ctx, np.dtype(self.W.dtype).name)
        block = self._identities.get(key)
        if block is None:  # saves three op dispatches per imperative call
            # The core's D_diag, one channel of it: a constant, never part of a recorded graph.
            block = mx.nd.array(doconv_core.identity_d(1, s.mn, s.D_mul, np.float64),
                                ctx=ctx, dtype=key[1])
            self._identities[key] = block
        return block

    def _shape_ties(self, F: Any, x: Any, W: Any, D: Any) -> tuple[Any, Any]:
        """Let a hybridized parent's symbolic shape inference find C_in for W and D.

        While C_in is unknown the graph adds zeros shaped from x's channel count to W and D
        (no gradient, values never read), from which shape inference reaches them.
        """
        s = self._spec
        # (N, C, spatial volume): no slice refers to an axis a wrong input may lack, so such
        # an input fails in the Convolution below with its own message.
        first = F.slice_axis(F.reshape(x, shape=(0, 0, -1)), axis=0, begin=0, end=1)
        first = F.slice_axis(first, axis=2, begin=0, end=1)
        probe = F.zeros_like(F.BlockGrad(F.reshape(first, shape=(-1,))))  # (C_in,)
        zeros_W = F.broadcast_to(F.reshape(probe, shape=(s.groups, 1, -1, 1)),
                                 shape=(s.groups, s.out_per_group, 0, s.D_mul))
        W = F.elemwise_add(W, F.reshape(zeros_W, shape=(-3, -2)))
        if D is not None:
            zeros_D = F.broadcast_to(F.reshape(probe, shape=(-1, 1, 1)),
                                     shape=(0, s.mn, s.D_mul))
            D = F.elemwise_add(D, zeros_D)
        return W, D

    def clear_cache(self) -> None:
        """Drop the cached inference kernel; needed only after writes that bypass MXNet's
        engine (another framework writing W or D's memory through DLPack, raw pointers)."""
        self._cache = {}

    def _cached_kernel(self, W: Any, D: Any) -> Any:
        """Imperative inference: reuse K while W and D hold the values it came from."""
        key = (W.context, W.dtype)
        entry = self._cache.get(key)
        if _versions.available():
            stamp = (_versions.version(W), None if D is None else _versions.version(D))
            # Same arrays, no write completed since: the entry holds the arrays, so their
            # engine variables stay theirs (no address reuse by a later array).
            if (entry is not None and entry[0] is W and entry[1] is D and entry[2] == stamp
                    and stamp[0] is not None and (D is None or stamp[1] is not None)):
                return entry[3]
            K = self._compose(mx.nd, W, D, W.context, owned=True)
            self._drop_other_contexts()
            self._cache[key] = (W, D, stamp, K)
            return K
        if entry is not None and entry[2] is None:  # an entry holding copies of W and D
            W0, D0, _, K = entry
            if W0.shape == W.shape and (D is None) == (D0 is None) and (
                    D is None or D0.shape == D.shape):
                # Exact equality (|a - b| <= 0; NaN never equal) as one fused op per array.
                same = [mx.nd.contrib.allclose(a, b, rtol=0, atol=0, equal_nan=False)
                        for a, b in ((W, W0), (D, D0)) if a is not None]
                if all(flag.asscalar() == 1 for flag in same):
                    return K
        K = self._compose(mx.nd, W, D, W.context, owned=True)
        self._drop_other_contexts()
        self._cache[key] = (W.copy(), None if D is None else D.copy(), None, K)
        return K

    def _drop_other_contexts(self) -> None:
        """Forget kernels for contexts W no longer lives on (after reset_ctx)."""
        live = set(self.W.list_ctx())
        for key in [k for k in self._cache if k[0] not in live]:
            del self._cache[key]

    def forward(self, x: Any, *args: Any) -> Any:
        # Check the input here: once hybridized, hybrid_forward only sees symbols.
        if isinstance(x, mx.nd.NDArray):
            self._check_input(x.shape)
        return super().forward(x, *args)

    def hybrid_forward(self, F: Any, x: Any, W: Any, D: Any = None, bias: Any = None) -> Any:
        if F is mx.nd:
            if autograd.is_recording():
                self._cache = {}
                kernel = self._compose(F, W, D, x.context)
            else:
                kernel = self._cached_kernel(W, D)
        else:
            if self.spec.in_channels is None:
                W, D = self._shape_ties(F, x, W, D)
            kernel = self._compose(F, W, D)
        args = (x, kernel) if bias is None else (x, kernel, bias)
        out = F.Convolution(*args, name="fwd", **self._kwargs)
        return self.act(out) if self.act is not None else out

    # -- parameters in the canonical layout ------------------------------------
    def _require_initialized(self, what: str) -> None:
        if self.spec.in_channels is None or self.W._data is None:
            raise ValueError(f"{what} needs an initialized layer with known in_channels: "
                             "call initialize() and run one input through it first")

    def to_params(self) -> DOConvParams:
        """The layer's parameters as the core's DOConvParams (canonical layout)."""
        self._require_initialized("to_params")
        D, W, bias = _arrays(self)
        return DOConvParams(self.spec, W, D, bias)

    def _initialize_called(self) -> bool:
        """Whether initialize() reached W (it holds data or waits for a deferred shape)."""
        return self.W._data is not None or self.W._deferred_init != ()

    def set_params(self, params: DOConvParams) -> None:
        """Load DOConvParams whose spec matches this layer (completes a deferred C_in)."""
        params = doconv_core.assignable_params(params, self.spec)
        if not self._initialize_called():
            raise ValueError("set_params needs initialize() to have been called on the layer")
        self._complete(params.spec.in_channels)
        # Paused: inside autograd.record() MXNet refuses writes to arrays marked for autograd
        # (not to frozen ones), which would fail an import halfway.
        with autograd.pause():
            for param, array in ((self.W, params.W), (self.D, params.D),
                                 (self.bias, params.bias)):
                if param is not None:
                    param.set_data(mx.nd.array(array, dtype=param.dtype))
                    if param._data is None:
                        param._finish_deferred_init()
        self._cache = {}

    @classmethod
    def from_params(cls, params: DOConvParams, **kwargs: Any) -> "DOConvND":
        """A new initialized layer holding ``params``; kwargs: layout, activation, ctx, prefix.
        ``DOConvND.from_params`` builds the layer of the params' rank."""
        if not isinstance(params, DOConvParams):
            raise ValueError(f"params must be DOConvParams, got {type(params).__name__}")
        s = params.spec
        layer_class = LAYER_CLASSES[s.rank] if cls.rank is None else cls
        if layer_class.rank != s.rank:
            raise ValueError(f"params hold a {s.rank}-D layer (kernel_size {s.kernel_size}); "
                             f"{cls.__name__} is {cls.rank}-D: use "
                             f"{LAYER_CLASSES[s.rank].__name__}")
        ctx = kwargs.pop("ctx", None)
        layer = layer_class(s.out_channels, s.kernel_size, s.stride, _gluon_padding(s),
                            s.dilation, s.groups, use_bias=s.bias, in_channels=s.in_channels,
                            D_mul=s.D_mul, **kwargs)
        layer.initialize(ctx=ctx)
        layer.cast(params.W.dtype)
        layer.set_params(DOConvParams(layer.spec, params.W, params.D, params.bias))
        return layer

    def fuse(self) -> nn.HybridBlock:
        """Gluon's conv of this rank (nn.Conv1D, nn.Conv2D or nn.Conv3D) computing the same
        function (kernel composed once, same bias), its weight trained like W (lr_mult,
        wd_mult, grad_req) and its bias like this bias."""
        self._require_initialized("fuse")
        s = self.spec
        kernel, bias = doconv_core.fuse(*_arrays(self), s)
        conv = _native_class(self.rank)(
            s.out_channels, s.kernel_size, s.stride, s.padding, s.dilation, s.groups,
            self._layout, in_channels=s.in_channels, activation=self._activation,
            use_bias=s.bias, weight_initializer=self._weight_initializer,
            bias_initializer=self._bias_initializer, prefix=self.prefix)
        conv.initialize(ctx=self.W.list_ctx())
        conv.cast(self.W.dtype)
        conv.weight.set_data(mx.nd.array(kernel, dtype=self.W.dtype))
        _copy_settings(self.W, conv.weight)
        if bias is not None:
            conv.bias.set_data(mx.nd.array(bias, dtype=self.W.dtype))
            _copy_settings(self.bias, conv.bias)
        return conv


# Each class below is DOConvND with its rank and Gluon's constructor of that rank (names,
# order and defaults), ``D_mul`` added as a keyword.
class DOConv1D(DOConvND):
    """A 1-D DO-Conv layer with nn.Conv1D's arguments (layout NCW); ``D_mul`` (>= the
    kernel size, default the kernel size) added. See DOConvND."""

    rank = 1

    def __init__(self, channels: int, kernel_size: Any, strides: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, layout: str = "NCW",
                 activation: str | None = None, use_bias: bool = True,
                 weight_initializer: Any = None, bias_initializer: Any = "zeros",
                 in_channels: int = 0, *, D_mul: int | None = None, **kwargs: Any) -> None:
        super().__init__(channels, kernel_size, strides, padding, dilation, groups, layout,
                         activation, use_bias, weight_initializer, bias_initializer,
                         in_channels, D_mul=D_mul, **kwargs)


class DOConv2D(DOConvND):
    """A 2-D DO-Conv layer with nn.Conv2D's arguments (layout NCHW); ``D_mul`` (>= M*N,
    default M*N) added. See DOConvND."""

    rank = 2

    def __init__(self, channels: int, kernel_size: Any, strides: Any = (1, 1),
                 padding: Any = (0, 0), dilation: Any = (1, 1), groups: int = 1,
                 layout: str = "NCHW", activation: str | None = None, use_bias: bool = True,
                 weight_initializer: Any = None, bias_initializer: Any = "zeros",
                 in_channels: int = 0, *, D_mul: int | None = None, **kwargs: Any) -> None:
        super().__init__(channels, kernel_size, strides, padding, dilation, groups, layout,
                         activation, use_bias, weight_initializer, bias_initializer,
                         in_channels, D_mul=D_mul, **kwargs)


class DOConv3D(DOConvND):
    """A 3-D DO-Conv layer with nn.Conv3D's arguments (layout NCDHW); ``D_mul`` (>= the
    kernel volume M*N*P, default M*N*P) added. See DOConvND."""

    rank = 3

    def __init__(self, channels: int, kernel_size: Any, strides: Any = (1, 1, 1),
                 padding: Any = (0, 0, 0), dilation: Any = (1, 1, 1), groups: int = 1,
                 layout: str = "NCDHW", activation: str | None = None, use_bias: bool = True,
                 weight_initializer: Any = None, bias_initializer: Any = "zeros",
                 in_channels: int = 0, *, D_mul: int | None = None, **kwargs: Any) -> None:
        super().__init__(channels, kernel_size, strides, padding, dilation, groups, layout,
                         activation, use_bias, weight_initializer, bias_initializer,
                         in_channels, D_mul=D_mul, **kwargs)


LAYER_CLASSES = {1: DOConv1D, 2: DOConv2D, 3: DOConv3D}


def _arrays(layer: DOConvND) -> tuple:
    """(D, W, bias) as NumPy arrays, D and bias None where the layer has none."""
    return (None if layer.D is None else layer.D.data().asnumpy(), layer.W.data().asnumpy(),
            None if layer.bias is None else layer.bias.data().asnumpy())
