"""doconv for MXNet Gluon 1.x: ``DOConv2D``, whole-net ``convert``/``fuse``, parameter I/O.

The math (shapes, c(o, i), D_diag, embedding, fusion) is specified once in ``doconv_core``;
this module converts Gluon's layouts at its edge and composes the kernel with Gluon ops.

Caching: unhybridized inference (autograd not recording) reuses the composed kernel while W
and D are the arrays it was composed from and no write to them has completed since. MXNet
counts the writes to every NDArray in its engine variable; ``_versions`` reads that count
(the C API has no call for it), so the check costs microseconds, keeps no copy of W or D and
waits only for writes already pushed to W and D. Reusing the same kernel array also lets
MKL-DNN keep its reordered weights, which is most of the saving. Where the count cannot be
read (a build whose layout the probe does not recognise), W and D are compared exactly with
copies instead. A hybridized block runs one CachedOp graph in which the composition is a
node; MXNet 1.x cannot hold a parameter-only subgraph constant, so there the kernel is
recomposed per call. ``fuse`` removes that cost for deployment.

Deferred ``in_channels``: ``infer_shape`` completes W and D from the first input. Under a
hybridized parent, Gluon infers shapes symbolically instead; batch_dot infers no input
shapes from its output, so while C_in is unknown the graph adds zeros shaped from the
input's channel count (``_shape_ties``), which lets MXNet's shape inference reach W and D.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Union

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, initializer
from mxnet.gluon import nn

import doconv_core
from doconv_core import CheckpointError, ConvSpec, DOConvParams, LegacyImport
from doconv_mx import _versions

__all__ = ["DOConv2D", "convert", "fuse", "export_params", "import_params",
           "load_legacy_params"]

LAYOUTS = ("NCHW",)  # MXNet 1.9's CPU Convolution runs 2-D convs in NCHW only
ACTIVATIONS = ("relu", "sigmoid", "tanh", "softrelu", "softsign")
# ConvSpec's canonical argument names -> Gluon's, so messages name what the user typed.
_NATIVE_NAMES = {"out_channels": "channels", "stride": "strides", "bias": "use_bias"}
_CANONICAL_RE = re.compile(r"^(out_channels|stride|bias)\b")


def _spec(channels: Any, kernel_size: Any, strides: Any, padding: Any, dilation: Any,
          groups: Any, use_bias: Any, in_channels: int | None, D_mul: Any) -> ConvSpec:
    """ConvSpec from Gluon arguments; ValueErrors name the Gluon argument."""
    # nn.Conv2D takes no padding strings: only explicit zero padding exists in Gluon.
    padding = doconv_core.check_pair("padding", padding, minimum=0)
    try:
        return ConvSpec(in_channels, channels, kernel_size, strides, padding, dilation, groups,
                        bias=use_bias, D_mul=D_mul)
    except ValueError as error:
        message = _CANONICAL_RE.sub(lambda m: _NATIVE_NAMES[m.group(1)], str(error))
        raise ValueError(message) from None


class _KernelInit(initializer.Initializer):
    """Initialises W (C_out, C_in/g, D_mul) chunk by chunk as an OIHW conv kernel.

    Each block of M*N columns is drawn like nn.Conv2D's weight of the same shape, so its
    scale uses the plain conv's fan-in (C_in/g*M*N). ``inner`` None: the initializer given
    to ``initialize()`` (Gluon's global default), exactly as nn.Conv2D does.
    """

    def __init__(self, inner: Any, kernel_size: tuple[int, int]) -> None:
        super().__init__()
        self._inner = inner
        self._kernel_size = tuple(kernel_size)

    def _init_weight(self, desc: Any, arr: mx.nd.NDArray) -> None:
        inner = self._inner if self._inner is not None else getattr(desc, "global_init", None)
        inner = initializer.create(inner if inner is not None else "uniform")
        C_out, I_g, S = arr.shape
        M, N = self._kernel_size
        mn = M * N
        chunks = []
        for _ in range(-(-S // mn)):  # init-time only: a few chunks, not a forward loop
            chunk = mx.nd.zeros((C_out, I_g, M, N), dtype=arr.dtype, ctx=arr.context)
            inner._init_weight(desc, chunk)
            chunks.append(chunk.reshape((C_out, I_g, mn)))
        arr[:] = mx.nd.concat(*chunks, dim=2)[:, :, :S]


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


class DOConv2D(nn.HybridBlock):
    """A DO-Conv layer with nn.Conv2D's arguments; ``D_mul`` (>= M*N, default M*N) added.

    Parameters ``W`` (C_out, C_in/g, D_mul), ``D`` (C_in, M*N, D_mul; absent for 1x1) and
    ``bias`` (C_out,). ``in_channels=0`` defers C_in to the first input, like nn.Conv2D.
    """

    def __init__(self, channels: int, kernel_size: Any, strides: Any = (1, 1),
                 padding: Any = (0, 0), dilation: Any = (1, 1), groups: int = 1,
                 layout: str = "NCHW", activation: str | None = None, use_bias: bool = True,
                 weight_initializer: Any = None, bias_initializer: Any = "zeros",
                 in_channels: int = 0, *, D_mul: int | None = None, **kwargs: Any) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be 'NCHW' (MXNet 1.9's CPU Convolution supports no "
                             f"other 2-D layout), got {layout!r}")
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be None or one of {ACTIVATIONS}, "
                             f"got {activation!r}")
        in_channels = doconv_core.check_int("in_channels", in_channels, minimum=0)
        spec = _spec(channels, kernel_size, strides, padding, dilation, groups, use_bias,
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
                init=_KernelInit(weight_initializer, spec.kernel_size),
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

    # -- hyper-parameters ------------------------------------------------------
    @property
    def spec(self) -> ConvSpec:
        """The layer's ConvSpec (in_channels None until known)."""
        if self._spec.in_channels is None and self.W.shape[1] > 0:
            # A hybridized parent inferred W's shape symbolically, without calling _complete.
            self._spec = self._spec.with_in_channels(self.W.shape[1] * self._spec.groups)
        return self._spec

    @property
    def layout(self) -> str:
        return self._layout

    def _alias(self) -> str:
        return "doconv"

    def __repr__(self) -> str:
        s = self._spec
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
        if self.spec.in_channels is None:
            spec = self._spec.with_in_channels(in_channels)  # raises before any change
            self._spec = spec
            self.W.shape = spec.W_shape
            if self.D is not None:
                self.D.shape = spec.D_shape
        else:
            self._spec.check_input_channels(in_channels)

    def _check_input(self, shape: tuple) -> None:
        """ValueError for an input this layer cannot take, raised before Gluon's deferred
        initialisation fixes in_channels from it."""
        if len(shape) != 4:
            raise ValueError(f"input must be 4-D ({self._layout}), got shape {tuple(shape)}")
        if self.spec.in_channels is not None:
            self._spec.check_input_channels(shape[self._channel_axis()])

    def infer_shape(self, x: Any, *args: Any) -> None:
        """Deferred init from the first input (Gluon calls this before initialising)."""
        self._check_input(x.shape)
        self._complete(x.shape[self._channel_axis()])

    # -- forward -----------------------------------------------------------------
    def _compose(self, F: Any, W: Any, D: Any, ctx: Any = None, *, owned: bool = False
                 ) -> Any:
        """The OIHW kernel as one batched product, with Gluon ops.

        ``owned``: imperatively, return an array that owns its storage rather than a reshaped
        view; MKL-DNN lays a conv's weights out once only for such arrays (a view costs that
        re-layout on every call: 512->512 3x3, 7x7, b8: ~10.5 ms a call instead of ~7.5).
        """
        s = self._spec
        (M, N), g, O_g, S, mn = s.kernel_size, s.groups, s.out_per_group, s.D_mul, s.mn
        if D is None:
            return F.expand_dims(W, axis=3)  # (C_out, C_in/g, 1) -> 1x1 OIHW
        D_total = F.broadcast_add(D, self._identity(F, ctx))
        # Batch b = group*(C_in/g) + i, which is c(o, i): (g*I_g, O_g, S) x (g*I_g, MN, S).
        # Each layout change below is a full copy of W or K, so the common cases take fewer.
        if g == 1:  # b = i: swap W's first two axes directly; the last swap writes OIHW
            K = F.batch_dot(F.transpose(W, axes=(1, 0, 2)), D_total, transpose_b=True)
            return F.transpose(_reshape(F, K, (0, 0, M, N)), axes=(1, 0, 2, 3))
        if s.in_channels == g:  # C_in/g == 1 (depthwise): W is already (g, O_g, S)
            K = F.batch_dot(_reshape(F, W, (g, O_g, S)), D_total, transpose_b=True)
        else:
            W_batched = _reshape(F, F.transpose(_reshape(F, W, (g, O_g, -1, S)),
                                                axes=(0, 2, 1, 3)), (-3, -2))
            K = F.batch_dot(W_batched, D_total, transpose_b=True)  # (g*I_g, O_g, MN)
            K = F.transpose(_reshape(F, K, (g, -1, O_g, mn)), axes=(0, 2, 1, 3))
        shape = (s.out_channels, -1, M, N)
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

        batch_dot infers no input shapes from its output, so while C_in is unknown the
        graph adds zeros shaped from x's channel count (no gradient, values never read).
        """
        s = self._spec
        axis = self._channel_axis()
        first = F.slice_axis(x, axis=0, begin=0, end=1)
        for a in range(1, 4):
            if a != axis:
                first = F.slice_axis(first, axis=a, begin=0, end=1)
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
        return DOConvParams(
            self._spec, self.W.data().asnumpy(),
            None if self.D is None else self.D.data().asnumpy(),
            None if self.bias is None else self.bias.data().asnumpy())

    def _initialize_called(self) -> bool:
        """Whether initialize() reached W (it holds data or waits for a deferred shape)."""
        return self.W._data is not None or self.W._deferred_init != ()

    def set_params(self, params: DOConvParams) -> None:
        """Load DOConvParams whose spec matches this layer (completes a deferred C_in)."""
        if not isinstance(params, DOConvParams):
            raise ValueError(f"params must be DOConvParams, got {type(params).__name__}")
        _check_same_layer(params.spec, self.spec, "params' spec")
        if not self._initialize_called():
            raise ValueError("set_params needs initialize() to have been called on the layer")
        self._complete(params.spec.in_channels)
        for param, array in ((self.W, params.W), (self.D, params.D), (self.bias, params.bias)):
            if param is not None:
                param.set_data(mx.nd.array(array, dtype=param.dtype))
                if param._data is None:
                    param._finish_deferred_init()
        self._cache = {}

    @classmethod
    def from_params(cls, params: DOConvParams, **kwargs: Any) -> "DOConv2D":
        """A new initialized layer holding ``params``; kwargs: layout, activation, ctx, prefix."""
        if not isinstance(params, DOConvParams):
            raise ValueError(f"params must be DOConvParams, got {type(params).__name__}")
        ctx = kwargs.pop("ctx", None)
        s = params.spec
        layer = cls(s.out_channels, s.kernel_size, s.stride, _gluon_padding(s), s.dilation,
                    s.groups, use_bias=s.bias, in_channels=s.in_channels, D_mul=s.D_mul,
                    **kwargs)
        layer.initialize(ctx=ctx)
        layer.cast(params.W.dtype)
        layer.set_params(DOConvParams(layer.spec, params.W, params.D, params.bias))
        return layer

    def fuse(self) -> nn.Conv2D:
        """An nn.Conv2D computing the same function (kernel composed once, same bias)."""
        self._require_initialized("fuse")
        kernel, bias = doconv_core.fuse(*_arrays(self), self._spec)
        s = self._spec
        conv = nn.Conv2D(s.out_channels, s.kernel_size, s.stride, s.padding, s.dilation,
                         s.groups, self._layout, in_channels=s.in_channels,
                         activation=self._activation, use_bias=s.bias,
                         weight_initializer=self._weight_initializer,
                         bias_initializer=self._bias_initializer, prefix=self.prefix)
        conv.initialize(ctx=self.W.list_ctx())
        conv.cast(self.W.dtype)
        conv.weight.set_data(mx.nd.array(kernel, dtype=self.W.dtype))
        if bias is not None:
            conv.bias.set_data(mx.nd.array(bias, dtype=self.W.dtype))
        conv.weight.grad_req = self.W.grad_req
        return conv


def _arrays(layer: DOConv2D) -> tuple:
    return (None if layer.D is None else layer.D.data().asnumpy(), layer.W.data().asnumpy(),
            None if layer.bias is None else layer.bias.data().asnumpy())


def _check_same_layer(given: ConvSpec, mine: ConvSpec, what: str) -> None:
    """ValueError unless ``given`` describes the same layer function as ``mine``."""
    if not given.same_function(mine):
        raise ValueError(f"{what} {given.to_dict()} does not match this layer's "
                         f"{mine.to_dict()}")


def _gluon_padding(spec: ConvSpec) -> tuple[int, int]:
    """Explicit symmetric padding for a spec; 'same' only where it is input-size independent."""
    if spec.padding == "valid" or spec.padding == (0, 0):
        return (0, 0)
    if spec.padding_mode != "zeros":
        raise ValueError(f"padding_mode must be 'zeros' for Gluon (its Convolution pads with "
                         f"zeros only), got {spec.padding_mode!r}")
    if spec.padding == "same":
        pads = []
        for k, s, d in zip(spec.kernel_size, spec.stride, spec.dilation):
            total = (k - 1) * d
            if s != 1 or total % 2:
                raise ValueError(
                    "padding 'same' has no Gluon equivalent here: it needs stride 1 and an even "
                    f"(kernel-1)*dilation on both axes, got kernel_size={spec.kernel_size}, "
                    f"stride={spec.stride}, dilation={spec.dilation}")
            pads.append(total // 2)
        return (pads[0], pads[1])
    return tuple(spec.padding)


def load_legacy_params(layer: DOConv2D, *, weight: Any, D: Any = None,
                       bias: Any = None) -> LegacyImport:
    """Load the original reference Gluon layer's arrays (weight OIHW, D (MN, MN, C_in))."""
    if not isinstance(layer, DOConv2D):
        raise ValueError(f"layer must be a DOConv2D, got {type(layer).__name__}")
    spec = layer.spec
    if spec.in_channels is None:
        shape = np.shape(weight)
        if len(shape) != 4:
            raise CheckpointError(f"weight must be (C_out, C_in/g, M, N), got shape {shape}")
        spec = spec.with_in_channels(shape[1] * spec.groups)
    name = layer.name
    _check_ready({name: layer}, "the original Gluon arrays")
    result = doconv_core.prepare_import(
        "the original Gluon arrays", {name: spec},
        {name: {"weight": weight, "D": D, "bias": bias}}, layout="gluon-legacy")[name]
    layer.set_params(result.params)
    return result


# -- whole nets ------------------------------------------------------------------------
Include = Union[None, Callable[[str, Any], bool], Iterable[str]]


def _walk(block: gluon.Block, prefix: str = ""):
    """(parent, key, qualified name, child) for every descendant, depth first."""
    for key, child in list(block._children.items()):
        name = f"{prefix}{key}"
        yield block, key, name, child
        yield from _walk(child, name + ".")


def _replace(parent: gluon.Block, key: str, old: gluon.Block, new: gluon.Block) -> None:
    """Swap a child in place: the _children entry and any attribute naming it."""
    parent._children[key] = new
    for attr, value in list(vars(parent).items()):
        if value is old:
            # Block.__setattr__ refuses a change of type; the registry is updated above.
            object.__setattr__(parent, attr, new)
    if getattr(old, "_active", False):
        new.hybridize(True, **dict(getattr(old, "_flags", [])))


def _clear_caches(net: gluon.Block) -> None:
    for block in [net] + [child for _, _, _, child in _walk(net)]:
        if isinstance(block, gluon.HybridBlock) and not isinstance(block, gluon.SymbolBlock):
            block._clear_cached_op()


def _selector(include: Include) -> Callable[[str, Any], bool]:
    if include is None:
        return lambda name, block: True
    if callable(include):
        return include
    if isinstance(include, (str, bytes)):
        raise ValueError(f"include must be None, a callable (name, block) -> bool or an iterable "
                         f"of layer names, got {include!r}")
    names = set(include)
    return lambda name, block: name in names


def _conv_spec(conv: nn.Conv2D, D_mul: int | None) -> ConvSpec:
    """The spec of an nn.Conv2D (in_channels None until known); D_mul applies to kernels
    larger than 1x1."""
    kw = conv._kwargs
    shape = conv.weight.shape
    if kw["layout"] not in LAYOUTS:
        raise ValueError(f"layout must be 'NCHW' (MXNet 1.9's CPU Convolution supports no "
                         f"other 2-D layout), got {kw['layout']!r}")
    known = shape is not None and len(shape) == 4 and shape[1] > 0
    in_channels = shape[1] * kw["num_group"] if known else None
    mn = kw["kernel"][0] * kw["kernel"][1]
    return ConvSpec(in_channels, kw["num_filter"], kw["kernel"], kw["stride"], kw["pad"],
                    kw["dilate"], kw["num_group"], bias=not kw["no_bias"],
                    D_mul=D_mul if mn > 1 else None)


def _weight_state(conv: nn.Conv2D) -> str:
    """'initialized' (has values), 'deferred' (initialize() ran, the shape waits for the first
    input) or 'fresh' (initialize() not called)."""
    weight = conv.weight
    if weight._data is not None:
        return "initialized"
    return "deferred" if weight._deferred_init else "fresh"


def convert(net: gluon.Block, *, D_mul: int | None = None, include: Include = None
            ) -> gluon.Block:
    """Replace every nn.Conv2D in ``net`` (in place) by a DOConv2D with the same function.

    Initialized convs are embedded exactly (D = 0, W holds the kernel); uninitialized ones
    become fresh DOConv2D layers. Convs that ``initialize()`` reached but whose shape waits for
    the first input (``in_channels=0``, e.g. a model-zoo stem) become DOConv2D layers waiting
    the same way: same contexts, W drawn at the first forward with the conv's weight
    initializer (else the one given to ``initialize()``), the conv's bias kept. ``D_mul``
    (None: M*N per layer) applies to every kernel larger than 1x1. ``include``: a callable
    (qualified name, conv) -> bool, or names. Every layer is checked before anything changes.
    Returns ``net`` (a bare conv: the new layer).
    """
    select = _selector(include)
    if D_mul is not None:
        D_mul = doconv_core.check_int("D_mul", D_mul)
    if isinstance(net, nn.Conv2D):
        return _to_doconv(net, "", D_mul)
    planned = []
    for parent, key, name, child in _walk(net):
        if isinstance(child, nn.Conv2D) and select(name, child):
            try:
                _conv_spec(child, D_mul)
            except ValueError as error:
                raise ValueError(f"layer {name!r}: {error}") from None
            planned.append((parent, key, name, child))
    for parent, key, name, child in planned:
        _replace(parent, key, child, _to_doconv(child, name, D_mul))
    _clear_caches(net)
    return net


def _to_doconv(conv: nn.Conv2D, name: str, D_mul: int | None) -> DOConv2D:
    spec, state = _conv_spec(conv, D_mul), _weight_state(conv)
    if state == "deferred" and spec.in_channels is not None:
        # Shape known but values not materialised yet (set_data before any forward, say):
        # materialise exactly what the conv would hold, then embed it.
        conv.weight._finish_deferred_init()
        state = "initialized"
    act = conv.act._act_type if conv.act is not None else None
    layer = DOConv2D(spec.out_channels, spec.kernel_size, spec.stride, spec.padding,
                     spec.dilation, spec.groups, conv._kwargs["layout"], act, spec.bias,
                     conv.weight.init, conv.bias.init if conv.bias is not None else "zeros",
                     spec.in_channels or 0, D_mul=spec.D_mul, prefix=conv.prefix)
    if state == "initialized":
        kernel = conv.weight.data().asnumpy()
        D, W = doconv_core.embed_kernel(kernel, groups=spec.groups, D_mul=spec.D_mul)
        bias = conv.bias.data().asnumpy() if conv.bias is not None else None
        layer.initialize(ctx=conv.weight.list_ctx())
        layer.cast(conv.weight.dtype)
        layer.set_params(DOConvParams(layer.spec, W, D, bias))
    elif state == "deferred":
        _, ctx, default_init, _ = conv.weight._deferred_init
        # Without this the converted net's first forward fails: its new parameters were never
        # initialized. W's initializer wraps conv.weight.init, else falls back to default_init.
        layer.initialize(init=default_init, ctx=ctx)
        layer.cast(conv.weight.dtype)
        if conv.bias is not None and conv.bias._data is not None:
            layer.bias.set_data(conv.bias.data())  # already drawn (its shape was known)
    if state != "fresh":
        for param in (layer.W, layer.D):
            if param is not None:
                param.grad_req = conv.weight.grad_req
    return layer


def fuse(net: gluon.Block) -> gluon.Block:
    """Replace every DOConv2D in ``net`` (in place) by its fused nn.Conv2D; returns ``net``."""
    if isinstance(net, DOConv2D):
        return net.fuse()
    planned = [(parent, key, name, child) for parent, key, name, child in _walk(net)
               if isinstance(child, DOConv2D)]
    for _, _, name, child in planned:
        try:
            child._require_initialized("fuse")
        except ValueError as error:
            raise ValueError(f"layer {name!r}: {error}") from None
    for parent, key, _, child in planned:
        _replace(parent, key, child, child.fuse())
    _clear_caches(net)
    return net


def _doconv_layers(net: gluon.Block) -> dict[str, DOConv2D]:
    if isinstance(net, DOConv2D):
        return {"layer": net}
    return {name: child for _, _, name, child in _walk(net) if isinstance(child, DOConv2D)}


def export_params(net: gluon.Block, path: Union[str, os.PathLike]) -> None:
    """Save every DOConv2D of ``net`` to the core's .npz container, keyed by qualified name."""
    layers = _doconv_layers(net)
    if not layers:
        raise ValueError("net holds no DOConv2D layer to export")
    doconv_core.save_params(path, {name: layer.to_params() for name, layer in layers.items()})


def import_params(net: gluon.Block, path: Union[str, os.PathLike]) -> None:
    """Load a file written by ``export_params`` (any framework) into ``net``'s DOConv2D layers."""
    layers = _doconv_layers(net)
    _check_ready(layers, repr(os.fspath(path)))
    prepared = doconv_core.prepare_import(path, {name: layer.spec
                                                 for name, layer in layers.items()})
    for name, layer in layers.items():
        layer.set_params(prepared[name].params)


def _check_ready(layers: dict[str, DOConv2D], source: str) -> None:
    """CheckpointError unless every layer can take values (initialize() was called)."""
    waiting = sorted(name for name, layer in layers.items() if not layer._initialize_called())
    if waiting:
        raise CheckpointError(f"cannot load {source}: layers {waiting} are not initialized; "
                              "call initialize() first")
