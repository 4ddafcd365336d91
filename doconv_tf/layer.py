"""DOConv1D, DOConv2D, DOConv3D: Keras 3 DO-Conv layers written with ``keras.ops`` only (any
backend), one shared implementation (``_DOConv``) whose subclasses fix the number of spatial
axes (``rank``).

Storage (Keras side of the edge; ``to_params``/``from_params`` convert to the core's
canonical layout), with MN the kernel's volume (M*N in 2-D, its length in 1-D, M*N*P in 3-D):

* ``W``: (D_mul, C_in/groups, filters), a conv kernel's Keras layout (*kernel_size, C_in/g,
  filters) with the spatial axes flattened to MN slots and extended to D_mul. With D_mul = MN,
  ``W`` reshaped (*kernel_size, C_in/g, filters) is exactly a Conv1D/2D/3D kernel. Canonical
  W is its transpose (2, 1, 0).
* ``D``: (C_in, MN, D_mul), the canonical layout; absent for a kernel of one element.
* ``bias``: (filters,).

Initialisation: D = 0. W is filled block by block (MN slots each) with ``kernel_initializer``
called for the kernel's shape (*kernel_size, C_in/g, filters), i.e. each block is drawn
exactly as Keras draws the kernel of the matching Conv layer (same fan-in and fan-out); the
last block is cut to D_mul. With D_mul = MN the layer therefore starts as the very function
a Conv layer with the same initializer (and seed) starts as. A seeded initializer returns the
same values on every call, so its blocks repeat.

Regularizers and constraints: ``kernel_regularizer`` and ``kernel_constraint`` apply to W
(as in the original reference layer; with D = 0 and D_mul = MN, W *is* the kernel), the
bias ones to the bias; D has none.

Mixed precision: W, D and bias are not autocast (``add_weight(autocast=False)``); the layer
composes the kernel in the variable dtype (float32) and casts kernel and bias to the compute
dtype (inputs are cast by Keras as usual), so it computes exactly what its fused layer
(whose float32 kernel Keras casts) computes.

Composed-kernel cache: on the JAX backend, an eager (untraced) call reuses the kernel
composed from the very same W and D arrays. JAX arrays are immutable and every Keras
assignment (optimizer step, ``assign``, ``set_weights``, loading) installs a new array, so
the cache, keyed on array identity, is never stale. Traced calls (``fit``/``predict``/
``evaluate`` under ``jax.jit``, ``jax.grad``) recompute it: the variables are inputs of
the traced function. On TensorFlow the kernel is recomputed on every call, eager included:
TF variables change in place with no version counter, and an eager call with
``training=False`` may be recorded by a GradientTape (the fine-tuning idiom), so a cache
could be stale or cut gradients. For inference without the composition use ``fuse``.

Depthwise layers (groups == C_in > 1, filters = C_in * k) run through ``ops.depthwise_conv``
with the composed kernel reshaped to the depthwise layout (*kernel_size, C_in, k), and
``fuse`` returns a DepthwiseConv1D/DepthwiseConv2D for them, where Keras has one that
computes the layer: in 1-D unless the padding is 'causal' (DepthwiseConv1D has none), in
2-D for equal strides along height and width (TensorFlow's depthwise kernel refuses unequal
ones). The others stay grouped convs, and so do all 3-D ones (Keras has no
DepthwiseConv3D). ``kernel`` stays the grouped kernel (*kernel_size, 1, C_in * k).

Grouped convs: ``ops.conv`` with the grouped kernel, as Keras' Conv layers run them, except
for 3-D on TensorFlow without a GPU, where the layer runs one conv per group and
concatenates the outputs (``_splits_groups``; decided once, when the layer is built).

channels_first on TensorFlow's CPU runs the conv channels-last between two transposes (see
``_channels_last_at_edge``), decided once when the layer is built.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

import keras
from keras import activations, constraints, initializers, ops, regularizers

import doconv_core
from doconv_core import ConvSpec, DOConvParams
from doconv_core.spec import native_spec, padding_strings

__all__ = ["DOConv1D", "DOConv2D", "DOConv3D"]

_BACKEND = keras.backend.backend()  # fixed when keras is imported; read on every call
INFERENCE_TENSORS = ("are torch inference tensors (built under torch.inference_mode()), which "
                     "only inference mode can write; build the layers outside it")

# The Depthwise layers' names for the kernel settings DOConv layers (and Conv layers) call
# kernel_*.
_DEPTHWISE_KEYS = {"depthwise_initializer": "kernel_initializer",
                   "depthwise_regularizer": "kernel_regularizer",
                   "depthwise_constraint": "kernel_constraint"}

# ConvSpec speaks the canonical names; a Keras user should read Keras' names.
_NATIVE_NAMES = {"out_channels": "filters", "stride": "strides", "dilation": "dilation_rate",
                 "bias": "use_bias"}


def _or_words(words: tuple[str, ...]) -> str:
    """'a' or 'b'; 'a', 'b' or 'c'."""
    quoted = [repr(word) for word in words]
    return " or ".join([", ".join(quoted[:-1]), quoted[-1]]) if len(quoted) > 1 else quoted[0]


def _keras_spec(rank: int, filters: Any, kernel_size: Any, strides: Any, padding: Any,
                data_format: Any, dilation_rate: Any, groups: Any, use_bias: Any, D_mul: Any
                ) -> tuple[ConvSpec, str]:
    """Validate Keras' Conv{rank}D arguments through the core's ConvSpec (in_channels
    deferred)."""
    strings = padding_strings(rank)
    if not isinstance(padding, str) or padding.lower() not in strings:
        raise ValueError(
            f"padding must be {_or_words(strings)} (Keras' Conv{rank}D has no explicit "
            f"padding), got {padding!r}")
    if data_format is None:
        data_format = keras.backend.image_data_format()
    if data_format not in ("channels_last", "channels_first"):
        raise ValueError("data_format must be 'channels_last', 'channels_first' or None, "
                         f"got {data_format!r}")
    spec = native_spec(_NATIVE_NAMES, None, filters, kernel_size, strides, padding.lower(),
                       dilation_rate, groups, bias=use_bias, D_mul=D_mul, rank=rank)
    if max(spec.stride) > 1 and max(spec.dilation) > 1:
        # Keras' Conv layers refuse this too (TensorFlow's convolution cannot do it).
        raise ValueError(f"strides > 1 together with dilation_rate > 1 is not supported by "
                         f"Keras' Conv{rank}D, got strides={spec.stride} and "
                         f"dilation_rate={spec.dilation}")
    return spec, data_format


def _to_numpy(value: Any) -> np.ndarray:
    """A writable NumPy copy of a tensor or a Keras variable."""
    if _BACKEND == "torch":
        # Keras' torch convert_to_numpy calls np.array(tensor), and torch's __array__ takes
        # no `copy` keyword: NumPy 2 warns. Tensor.numpy() reads the same values without it.
        tensor = ops.convert_to_tensor(value).detach().cpu()
        if keras.backend.standardize_dtype(tensor.dtype) != "bfloat16":  # no NumPy bfloat16
            return tensor.numpy().copy()
    if isinstance(value, keras.Variable):
        # ops.convert_to_numpy(variable) calls np.array(variable), and Keras' (and TF's)
        # variable __array__ takes no `copy` keyword: NumPy 2 warns. np.asarray passes none.
        return np.array(np.asarray(value))
    return np.array(keras.ops.convert_to_numpy(value))


@functools.cache
def _has_gpu() -> bool:
    """Whether the backend has a GPU to place convolutions on (asked once per process)."""
    return bool(keras.distribution.list_devices("gpu"))


def _channels_last_at_edge(data_format: str) -> bool:
    """Whether a channels_first layer runs its conv channels-last between two transposes.

    TensorFlow's CPU conv and depthwise kernels refuse channels-first data (NCW, NCHW)
    unless oneDNN is on, and with it on they still refuse float64; Keras runs a
    channels-first Conv3D through XLA. Channels-last between transposes runs everywhere, on
    the native kernels. GPUs and the other backends take channels-first data natively.
    """
    return (data_format == "channels_first" and _BACKEND == "tensorflow"
            and not _has_gpu())


class _KernelCache:
    """The last composed kernel and the W and D it was composed from (JAX eager only)."""

    __slots__ = ("W", "D", "kernel")

    def __init__(self) -> None:
        self.W = self.D = self.kernel = None


if _BACKEND == "jax":
    from jax.core import Tracer as _JaxTracer  # the kernel cache's one JAX use (_concrete)


def _concrete(W: Any, D: Any) -> bool:
    """True for eager JAX arrays (not tracers): only then is identity a sound cache key."""
    if _BACKEND != "jax":
        return False
    return not isinstance(W, _JaxTracer) and not isinstance(D, _JaxTracer)  # D may be None


def _splits_groups(rank: int, groups: int) -> bool:
    """Whether a grouped layer runs one conv per group (concatenating their outputs): a 3-D
    one on TensorFlow without a GPU, where Keras runs grouped convs through XLA and the
    native 3-D kernel run per group is much faster (docs/design.md). 1-D and 2-D grouped
    layers run as Keras' own do (their depthwise ones on the native depthwise kernel)."""
    return (rank == 3 and groups > 1 and _BACKEND == "tensorflow"
            and not _has_gpu())


class _DOConv(keras.layers.Layer):
    """A DO-Conv layer with ``rank`` spatial axes: Keras' Conv{rank}D arguments plus keyword
    ``D_mul``. Subclasses set ``rank``; see the module notes."""

    rank = 0  # spatial axes: 1, 2 or 3 in the subclasses

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, ...],
        strides: int | tuple[int, ...] = 1,
        padding: str = "valid",
        data_format: str | None = None,
        dilation_rate: int | tuple[int, ...] = 1,
        groups: int = 1,
        activation: Any = None,
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        bias_initializer: Any = "zeros",
        kernel_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        kernel_constraint: Any = None,
        bias_constraint: Any = None,
        *,
        D_mul: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Validate everything before any state exists.
        spec, data_format = _keras_spec(self.rank, filters, kernel_size, strides, padding,
                                        data_format, dilation_rate, groups, use_bias, D_mul)
        resolved = {
            "activation": activations.get(activation),
            "kernel_initializer": initializers.get(kernel_initializer),
            "bias_initializer": initializers.get(bias_initializer),
            "kernel_regularizer": regularizers.get(kernel_regularizer),
            "bias_regularizer": regularizers.get(bias_regularizer),
            "kernel_constraint": constraints.get(kernel_constraint),
            "bias_constraint": constraints.get(bias_constraint),
        }
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self._spec = spec
        self.filters = spec.out_channels
        self.kernel_size = spec.kernel_size
        self.strides = spec.stride
        self.padding = spec.padding
        self.data_format = data_format
        self.dilation_rate = spec.dilation
        self.groups = spec.groups
        self.use_bias = spec.bias
        self.D_mul = spec.D_mul
        for name, value in resolved.items():
            setattr(self, name, value)
        self.input_spec = keras.layers.InputSpec(ndim=self.rank + 2)
        self._cache = _KernelCache()
        self.W = self.D = self.bias = None
        self._depthwise_k: int | None = None  # _depthwise_multiplier(), set by build

    # -- state ---------------------------------------------------------------
    @property
    def spec(self) -> ConvSpec:
        """The core's ConvSpec (in_channels is None until the layer is built)."""
        return self._spec

    @classmethod
    def _conv_class(cls) -> type[keras.layers.Layer]:
        """Keras' own conv layer of this rank: Conv1D, Conv2D or Conv3D."""
        return getattr(keras.layers, f"Conv{cls.rank}D")

    def _channel_axis(self) -> int:
        return -1 if self.data_format == "channels_last" else 1

    def _input_shape(self, channels: int | None) -> tuple:
        """An input shape of unknown batch and spatial sizes, in this layer's data format."""
        spatial = (None,) * self.rank
        if self.data_format == "channels_last":
            return (None, *spatial, channels)
        return (None, channels, *spatial)

    def build(self, input_shape: tuple) -> None:
        ndim = self.rank + 2
        if len(input_shape) != ndim:
            raise ValueError(f"DOConv{self.rank}D expects {ndim}-D inputs (batch, ...), got "
                             f"shape {input_shape}")
        channels = input_shape[self._channel_axis()]
        if channels is None:
            raise ValueError(f"the input's channel dimension must be known, got shape "
                             f"{input_shape} with data_format={self.data_format!r}")
        spec = self._spec.with_in_channels(int(channels))  # ValueError on bad groups
        self._spec = spec
        # Only ndim: the channels are checked by the core (_check_channels), in its words.
        self.input_spec = keras.layers.InputSpec(ndim=ndim)
        self._conv_format = "channels_last" if _channels_last_at_edge(self.data_format) \
            else self.data_format
        self._depthwise_k = self._depthwise_multiplier()
        self._split_groups = (self._depthwise_k is None
                              and _splits_groups(self.rank, spec.groups))
        self._d_diag = doconv_core.identity_d(spec.in_channels, spec.mn, spec.D_mul,
                                              np.float64) if spec.has_D else None
        self.W = self.add_weight(
            name="W", shape=(spec.D_mul, spec.in_per_group, spec.out_channels),
            initializer=self._initialize_W, regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint, trainable=True, autocast=False)
        if spec.has_D:
            self.D = self.add_weight(name="D", shape=spec.D_shape, initializer="zeros",
                                     trainable=True, autocast=False)
        if spec.bias:
            self.bias = self.add_weight(
                name="bias", shape=(spec.out_channels,), initializer=self.bias_initializer,
                regularizer=self.bias_regularizer, constraint=self.bias_constraint,
                trainable=True, autocast=False)

    def _initialize_W(self, shape: tuple, dtype: Any = None) -> Any:
        mn = math.prod(self.kernel_size)
        kernel_shape = (*self.kernel_size, shape[1], shape[2])
        blocks = [ops.reshape(self.kernel_initializer(kernel_shape, dtype=dtype),
                              (mn, shape[1], shape[2]))
                  for _ in range(math.ceil(shape[0] / mn))]
        stacked = blocks[0] if len(blocks) == 1 else ops.concatenate(blocks, axis=0)
        return stacked[: shape[0]]

    # -- composition -----------------------------------------------------------
    def _compose(self, W: Any, D: Any) -> Any:
        """The kernel (*kernel_size, C_in/g, filters) from Keras-layout W and canonical D:
        one batched matmul.

        In keras.ops, not doconv_core.compose_kernel (NumPy): it runs traced and is
        differentiated."""
        spec = self._spec
        g = spec.groups
        kernel_shape = (*spec.kernel_size, spec.in_per_group, spec.out_channels)
        if D is None:
            return ops.reshape(W, kernel_shape)
        dtype = keras.backend.standardize_dtype(W.dtype)
        D_total = ops.add(D, ops.convert_to_tensor(self._d_diag, dtype=dtype))
        Wg = ops.reshape(W, (spec.D_mul, spec.in_per_group, g, spec.out_per_group))
        Dg = ops.reshape(D_total, (g, spec.in_per_group, spec.mn, spec.D_mul))
        # K[m, i, g, o] = sum_s D'[g*I_g + i, m, s] * W[s, i, g*O_g + o]: the core's formula,
        # as a matmul batched over (g, i), spelled with explicit transposes: TensorFlow's
        # einsum was slower.
        Wt = ops.transpose(Wg, (2, 1, 0, 3))  # (g, I_g, D_mul, O_g)
        if _BACKEND == "torch":
            # Keras' torch ops.matmul computes float64 in float32 (its type promotion
            # follows JAX's 32-bit default); einsum keeps the dtype.
            K = ops.einsum("gims,giso->gimo", Dg, Wt)
        else:
            K = ops.matmul(Dg, Wt)  # (g, I_g, MN, O_g)
        K = ops.transpose(K, (2, 1, 0, 3))  # (MN, I_g, g, O_g)
        return ops.reshape(K, kernel_shape)

    def _composed_kernel(self) -> Any:
        if _BACKEND == "jax":
            # What convert_to_tensor returns for a JAX variable (the stateless scope's value
            # included), without its dispatch: an eager call pays for every Python call.
            W = self.W.value
            D = None if self.D is None else self.D.value
        else:
            W = ops.convert_to_tensor(self.W)
            D = None if self.D is None else ops.convert_to_tensor(self.D)
        cache = self._cache
        if cache.W is W and cache.D is D and cache.kernel is not None:
            # Only concrete arrays are ever stored, so a tracer never matches.
            return cache.kernel
        kernel = self._compose(W, D)
        if _concrete(W, D):
            cache.W, cache.D, cache.kernel = W, D, kernel  # holding W, D keeps identity sound
        return kernel

    def _depthwise_multiplier(self) -> int | None:
        """k when this layer runs (and fuses) as a depthwise conv, else None: groups ==
        C_in > 1, filters == C_in * k, and a Keras depthwise layer that computes it (see
        the module notes)."""
        spec = self._spec
        if spec.in_channels is None or spec.groups == 1 or spec.in_per_group != 1:
            return None  # groups == C_in == 1 is an ordinary conv: it stays a Conv layer
        if self.rank == 3 or spec.padding == "causal":
            return None  # no DepthwiseConv3D; DepthwiseConv1D has no causal padding
        if len(set(spec.stride)) > 1:
            # TensorFlow's depthwise kernel (so DepthwiseConv2D) refuses unequal strides.
            return None
        return spec.out_per_group

    def _depthwise_kernel(self, kernel: Any) -> Any:
        """The grouped kernel (*kernel_size, 1, C_in * k) in the depthwise layout
        (*kernel_size, C_in, k)."""
        # Grouped output o = c * k + q belongs to group (input channel) o // k = c, and a
        # depthwise output c * k + q reads kernel[..., c, q]: a row-major reshape, no transpose.
        return ops.reshape(kernel, (*self.kernel_size, self._spec.in_channels,
                                    self._depthwise_k))

    @property
    def kernel(self) -> Any:
        """The composed kernel in Keras' layout (*kernel_size, C_in/g, filters): HWIO in 2-D."""
        if not self.built:
            raise AttributeError("You must build the layer before accessing `kernel`.")
        return self._composed_kernel()

    def _check_channels(self, shape: Any) -> None:
        """The core's ValueError for an input whose (known) channel count is not the layer's."""
        # The plain comparison first: every eager call comes here.
        channels = shape[-1 if self.data_format == "channels_last" else 1]
        if channels != self._spec.in_channels and channels is not None and self.built:
            self._spec.check_input_channels(int(channels))

    def _conv(self, inputs: Any, kernel: Any) -> Any:
        """The convolution proper, in ``self._conv_format``."""
        padding = self.padding
        if padding == "causal":
            # As Keras' Conv1D: (k - 1) * d zeros before the sequence, then a 'valid' conv.
            (before, after), = self._spec.fixed_padding()
            spatial = 1 if self._conv_format == "channels_last" else 2
            pads = [[0, 0], [0, 0], [0, 0]]
            pads[spatial] = [before, after]
            inputs = ops.pad(inputs, pads)
            padding = "valid"
        settings = dict(strides=self.strides, padding=padding,
                        dilation_rate=self.dilation_rate, data_format=self._conv_format)
        if self._depthwise_k is not None:
            # See the module notes: TensorFlow's grouped conv is much slower on CPU.
            return ops.depthwise_conv(inputs, self._depthwise_kernel(kernel), **settings)
        settings["strides"] = list(self.strides)
        if not self._split_groups:
            return ops.conv(inputs, kernel, **settings)
        # One conv per group (channels_last here: _splits_groups implies the transposes):
        # group j reads input channels [j*I_g, (j+1)*I_g) and writes outputs
        # [j*O_g, (j+1)*O_g), the kernel's output axis in the same order.
        parts = zip(ops.split(inputs, self.groups, axis=-1),
                    ops.split(kernel, self.groups, axis=-1))
        return ops.concatenate([ops.conv(x, k, **settings) for x, k in parts], axis=-1)

    def call(self, inputs: Any, training: Any = None) -> Any:
        self._check_channels(inputs.shape)
        dtype = self.compute_dtype
        # Casts only where needed: an eager call pays for every op it dispatches (and the
        # plain comparison first spares standardize_dtype's calls when the dtypes match).
        if inputs.dtype != dtype:
            input_dtype = keras.backend.standardize_dtype(inputs.dtype)
            if input_dtype != dtype and keras.backend.is_float_dtype(input_dtype):
                inputs = ops.cast(inputs, dtype)
        kernel = self._composed_kernel()
        if kernel.dtype != dtype and keras.backend.standardize_dtype(kernel.dtype) != dtype:
            kernel = ops.cast(kernel, dtype)
        rank = self.rank
        transposed = self._conv_format != self.data_format
        if transposed:
            inputs = ops.transpose(inputs, (0, *range(2, rank + 2), 1))
        outputs = self._conv(inputs, kernel)
        if self.use_bias:
            bias = self.bias if self.bias.dtype == dtype else ops.cast(self.bias, dtype)
            if self._conv_format == "channels_last":
                outputs = ops.add(outputs, ops.reshape(bias, (1,) * (rank + 1) + (self.filters,)))
            else:
                # Bias first: x first trips a TensorFlow ops.add bug (test_api.KERAS_BIAS_BUG).
                outputs = ops.add(ops.reshape(bias, (1, self.filters) + (1,) * rank), outputs)
        if transposed:
            outputs = ops.transpose(outputs, (0, rank + 1, *range(1, rank + 1)))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        self._check_channels(input_shape)  # symbolic calls come here, not to call()
        rank = self.rank
        channels_last = self.data_format == "channels_last"
        spatial = input_shape[1:rank + 1] if channels_last else input_shape[2:rank + 2]
        sizes = self._spec.output_size(spatial)
        batch = input_shape[0]
        if channels_last:
            return (batch, *sizes, self.filters)
        return (batch, self.filters, *sizes)

    # -- serialisation -----------------------------------------------------------
    def get_config(self) -> dict:
        config = super().get_config()
        config.update({
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
            "groups": self.groups,
            "activation": activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "activity_regularizer": regularizers.serialize(self.activity_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
            "D_mul": self.D_mul,
        })
        return config

    # -- the core's container, legacy import, fusion ----------------------------------
    def _require_built(self, what: str) -> ConvSpec:
        if not self.built:
            raise ValueError(f"{what} needs a built layer (its in_channels); call the layer on "
                             "an input or layer.build(input_shape) first")
        return self._spec

    def to_params(self) -> DOConvParams:
        """This layer's parameters in the core's canonical layout."""
        spec = self._require_built("to_params")
        W = np.transpose(_to_numpy(self.W), (2, 1, 0))
        D = None if self.D is None else _to_numpy(self.D)
        bias = None if self.bias is None else _to_numpy(self.bias)
        return DOConvParams(spec, W, D, bias)

    def _holds_inference_tensors(self) -> bool:
        """Whether a variable is a torch inference tensor that cannot be written here."""
        if _BACKEND != "torch":
            return False
        import torch  # the torch backend's own
        return not torch.is_inference_mode_enabled() and any(
            variable.value.is_inference() for variable in self.weights)

    def set_params(self, params: DOConvParams) -> None:
        """Load canonical parameters describing this (built) layer's function: the core's
        shapes and real floating-point arrays, all checked before anything changes; the values
        are cast (by Keras, bfloat16 too) to the variables' dtype."""
        spec = self._require_built("set_params")
        params = doconv_core.assignable_params(params, spec)
        if self._holds_inference_tensors():
            raise ValueError(f"set_params: the layer's variables {INFERENCE_TENSORS}")
        values = [(variable, ops.convert_to_tensor(value, dtype=variable.dtype))  # all first
                  for variable, value in ((self.W, np.transpose(params.W, (2, 1, 0))),
                                          (self.D, params.D), (self.bias, params.bias))
                  if variable is not None]
        for variable, value in values:
            variable.assign(value)

    @classmethod
    def from_params(cls, params: DOConvParams, **kwargs: Any) -> "_DOConv":
        """A built layer holding ``params`` (whose spec must have this class's rank); kwargs
        are the other arguments of Keras' Conv layer (data_format, activation, name, ...)."""
        if not isinstance(params, DOConvParams):
            raise ValueError(f"params must be DOConvParams, got {type(params).__name__}")
        spec = params.spec
        if spec.rank != cls.rank:
            raise ValueError(
                f"params.spec describes a {spec.rank}-D layer (rank {spec.rank}); "
                f"DOConv{cls.rank}D.from_params takes rank {cls.rank}: use "
                f"DOConv{spec.rank}D.from_params")
        fixed = {"filters", "kernel_size", "strides", "padding", "dilation_rate", "groups",
                 "use_bias", "D_mul"}
        clash = sorted(fixed & set(kwargs))
        if clash:
            raise ValueError(f"from_params takes {clash} from params.spec; do not pass them")
        if spec.normalized().padding_mode != "zeros":
            raise ValueError("Keras pads with zeros only; params.spec.padding_mode must be "
                             f"'zeros', got {spec.padding_mode!r}")
        padding = spec.string_padding()
        if padding is None:
            strings = ", ".join(repr(p) for p in padding_strings(cls.rank))
            raise ValueError(
                f"params.spec.padding must be {strings} or explicit padding that equals "
                f"one of them (Keras' Conv{cls.rank}D has no other padding), got "
                f"{spec.padding!r} with kernel_size={spec.kernel_size}, stride={spec.stride} "
                f"and dilation={spec.dilation}")
        layer = cls(spec.out_channels, spec.kernel_size, spec.stride, padding,
                    dilation_rate=spec.dilation, groups=spec.groups, use_bias=spec.bias,
                    D_mul=spec.D_mul, **kwargs)
        layer.build(layer._input_shape(spec.in_channels))
        layer.set_params(params)
        return layer

    def _fused_config(self) -> tuple[type[keras.layers.Layer], dict]:
        """The plain Keras layer class computing this (built) layer's function, and its
        config: DepthwiseConv1D/2D for a depthwise layer (see ``_depthwise_multiplier``),
        Conv1D/2D/3D otherwise."""
        self._require_built("fuse")
        config = self.get_config()
        config.pop("D_mul")
        multiplier = self._depthwise_multiplier()
        if multiplier is None:
            return self._conv_class(), config
        del config["filters"], config["groups"]
        config["depth_multiplier"] = multiplier
        # kernel_* applied to W here; on the fused layer they apply to its (only) kernel.
        config.update({new: config.pop(old) for new, old in _DEPTHWISE_KEYS.items()})
        return getattr(keras.layers, f"DepthwiseConv{self.rank}D"), config

    def _fused_weights(self) -> list[np.ndarray]:
        """The weights of the layer ``_fused_config`` describes: composed kernel, bias.

        The kernel ``call`` uses (not the core's float64 composition), so the fused layer
        computes what this layer computes (bit for bit where both run the same op)."""
        kernel = self._composed_kernel()
        if self._depthwise_multiplier() is not None:
            kernel = self._depthwise_kernel(kernel)
        return [_to_numpy(kernel)] + ([_to_numpy(self.bias)] if self.use_bias else [])

    def fuse(self) -> keras.layers.Layer:
        """A built Keras layer computing this layer's function with the composed kernel:
        Conv1D/Conv2D/Conv3D, or DepthwiseConv1D/DepthwiseConv2D for a depthwise layer
        Keras has a depthwise layer for."""
        cls, config = self._fused_config()
        conv = cls.from_config(config)
        conv.build(self._input_shape(self._spec.in_channels))
        conv.set_weights(self._fused_weights())
        return conv


@keras.saving.register_keras_serializable(package="doconv")
class DOConv1D(_DOConv):
    """Depthwise over-parameterized Conv1D: Keras' Conv1D arguments (padding 'causal'
    included) plus keyword ``D_mul``; ``fuse()`` gives a Conv1D (a DepthwiseConv1D for a
    depthwise layer without causal padding)."""

    rank = 1


@keras.saving.register_keras_serializable(package="doconv")
class DOConv2D(_DOConv):
    """Depthwise over-parameterized Conv2D: Keras' Conv2D arguments plus keyword ``D_mul``;
    ``fuse()`` gives a Conv2D (a DepthwiseConv2D for a depthwise layer with equal
    strides)."""

    rank = 2


@keras.saving.register_keras_serializable(package="doconv")
class DOConv3D(_DOConv):
    """Depthwise over-parameterized Conv3D: Keras' Conv3D arguments plus keyword ``D_mul``;
    ``fuse()`` gives a Conv3D (a grouped one for a depthwise layer: Keras has no
    DepthwiseConv3D)."""

    rank = 3
