"""DOConv1d, DOConv2d, DOConv3d: drop-in replacements for torch.nn.Conv1d/Conv2d/Conv3d (math:
doconv_core, doconv-math.md), one implementation for every number of spatial axes."""

# No `from __future__ import annotations` here: TorchScript reads this module's annotations.
import dataclasses
import importlib.util
import math
from typing import Any, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

import doconv_core
from doconv_core import ConvSpec, DOConvParams
from doconv_core.spec import EXTRA_STATE_VERSION, extra_state_record, read_extra_state

from . import _assign, _ckernel, _ops

__all__ = ["DOConv1d", "DOConv2d", "DOConv3d"]

_Size = Union[int, Tuple[int, ...]]
_Device = Optional[Union[str, torch.device]]


def _numpy(tensor: Optional[Tensor], *, portable: bool = False) -> Optional[np.ndarray]:
    """A detached CPU NumPy copy. bfloat16, which NumPy lacks, widens exactly to float32, or
    with ``portable`` stays bfloat16 as an ml_dtypes array where ml_dtypes is installed (the
    portable format stores it as BF16)."""
    if tensor is None:
        return None
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        if portable and importlib.util.find_spec("ml_dtypes") is not None:
            import ml_dtypes
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        tensor = tensor.float()
    return tensor.numpy().copy()


@torch.jit.unused
def _is_fx_tracing() -> bool:
    """Inside torch.fx.symbolic_trace (inputs and parameters are Proxies)."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()


# The state dict key of each layer's extra state (torch.nn.Module's own suffix), and the
# version of its encoding: [version, rank, groups, *kernel_size], int64.
_EXTRA_STATE_KEY = "_extra_state"
# The record's layout and its checks are the core's (doconv_core.spec), which the doconv
# command reads too.
_EXTRA_STATE_VERSION = EXTRA_STATE_VERSION

# Each rank's native conv: what ``fuse`` returns and ``from_conv`` takes.
_NATIVE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
# How input errors name the layout of each rank: (batched, unbatched).
_INPUT_LAYOUTS = {1: ("3-D (N, C, L)", "2-D (C, L)"), 2: ("4-D (N, C, H, W)", "3-D (C, H, W)"),
                  3: ("5-D (N, C, D, H, W)", "4-D (C, D, H, W)")}


class _DOConvNd(nn.Module):
    """The DO-Conv layer for any number of spatial axes; DOConv1d, DOConv2d and DOConv3d fix
    ``_rank`` (the number of spatial axes) and are what users build.

    Trainable ``W`` (C_out, C_in/groups, D_mul), ``D`` (C_in, MN, D_mul, with MN the kernel's
    volume; absent for a kernel of one element) and ``bias``, and no buffers: the fixed
    identity ``D_diag`` is part of the composition (``torch.ops.doconv.compose``), so
    meta-device builds, ``to_empty`` and sharded loading need nothing besides the state dict.
    The state dict also holds ``_extra_state`` (see ``get_extra_state``): the rank, groups
    and kernel shape, which ``doconv fuse`` reads; state dicts without it still load.
    ``weight`` is the composed kernel (C_out, C_in/groups, *kernel_size), so code that reads
    ``conv.weight`` keeps working. Subclasses nn.Module, not the native conv: tools that see
    an nn.Conv2d expect ``weight`` to be a Parameter (weight_norm, pruning, quantization,
    fusers) and would misfire.
    """

    __constants__ = ["stride", "padding", "dilation", "groups", "padding_mode", "in_channels",
                     "out_channels", "kernel_size", "D_mul", "_rank", "_compose_M",
                     "_compose_N", "_conv_padding"]
    __annotations__ = {"bias": Optional[Tensor], "D": Optional[Tensor]}
    # Python-only properties: TorchScript compiles forward without them.
    __jit_unused_properties__ = ["weight", "spec"]

    _rank: int  # the number of spatial axes: a class attribute of each public class
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Union[str, Tuple[int, ...]]
    dilation: Tuple[int, ...]
    groups: int
    padding_mode: str
    D_mul: int
    # The composition's (M, N): the kernel's volume as M x N (see _compose).
    _compose_M: int
    _compose_N: int
    _kernel_shape: List[int]
    _reversed_padding_repeated_twice: List[int]
    _conv_padding: Union[str, Tuple[int, ...]]  # the conv's own: none where F.pad pads

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Size,
                 stride: _Size = 1, padding: Union[str, _Size] = 0, dilation: _Size = 1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: _Device = None, dtype: Optional[torch.dtype] = None, *,
                 D_mul: Optional[int] = None) -> None:
        rank = getattr(type(self), "_rank", None)
        if rank not in _NATIVE:
            raise TypeError(f"{type(self).__name__} must set _rank to 1, 2 or 3; build "
                            "DOConv1d, DOConv2d or DOConv3d")
        spec = ConvSpec(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                        bias, padding_mode, D_mul=D_mul, rank=rank)
        if spec.padding == "causal":
            raise ValueError("padding='causal' is not supported in PyTorch (nn.Conv1d has no "
                             "causal padding); pad the input on the left instead")
        if spec.padding == "same" and any(s != 1 for s in spec.stride):
            # PyTorch's own rule (nn.Conv1d/2d/3d raise the same); Keras allows it.
            raise ValueError(
                "padding='same' is not supported for strided convolutions in PyTorch, "
                f"got stride={spec.stride}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating point torch.dtype, got {dtype!r}")
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._spec = spec
        self.in_channels = spec.in_channels
        self.out_channels = spec.out_channels
        self.kernel_size = spec.kernel_size
        self.stride = spec.stride
        self.padding = spec.padding
        self.dilation = spec.dilation
        self.groups = spec.groups
        self.padding_mode = spec.padding_mode
        self.D_mul = spec.D_mul
        # Read by code that inspects conv attributes generically.
        self.transposed = False
        self.output_padding = (0,) * rank
        self._set_layout()

        self.W = nn.Parameter(torch.empty(spec.W_shape, **factory))
        if spec.has_D:
            self.D = nn.Parameter(torch.empty(spec.D_shape, **factory))
        else:
            self.register_parameter("D", None)
        if spec.bias:
            self.bias = nn.Parameter(torch.empty(spec.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self._cache = None  # (key, kernel, kernel's version): see _kernel
        self.reset_parameters()

    @torch.jit.unused
    def _set_layout(self) -> None:
        """The attributes the forward reads besides the spec's own."""
        spec = self._spec
        # The composition depends on the kernel's volume only: it runs on an (M, N) kernel
        # (2-D: the kernel itself; 1-D: (k, 1); 3-D: (k0, k1*k2)) reshaped to kernel_size.
        self._compose_M = spec.kernel_size[0]
        self._compose_N = math.prod(spec.kernel_size[1:])
        self._kernel_shape = list(spec.kernel_shape)
        # The native conv's F.pad argument for the non-zero padding modes (and 'same'):
        # (before, after) per axis, last axis first, from the core's fixed padding.
        self._reversed_padding_repeated_twice = [
            pad for pair in reversed(spec.fixed_padding()) for pad in pair]
        self._conv_padding = (spec.padding if spec.padding_mode == "zeros"
                              else (0,) * spec.rank)

    # -- initialisation ----------------------------------------------------------------
    def reset_parameters(self) -> None:
        """W and bias as the native conv initialises weight and bias (same fan-in), D = 0."""
        # The fan-in of the equivalent (C_out, C_in/g, *kernel_size) kernel, not of W's own
        # shape.
        fan_in = self._spec.fan_in
        # kaiming_uniform_(a=sqrt(5))'s own arithmetic, so D_mul = MN draws the native weight.
        std = init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in)
        bound = math.sqrt(3.0) * std
        if _assign.parametrized(self):  # in-place draws would miss the parametrized values
            _assign.reset_through_parametrizations(self, bound)
            return
        with torch.no_grad():
            init.uniform_(self.W, -bound, bound)
            if self.D is not None:
                self.D.zero_()
            if self.bias is not None:
                bias_bound = 1 / math.sqrt(fan_in)
                init.uniform_(self.bias, -bias_bound, bias_bound)

    # -- the composed kernel -----------------------------------------------------------
    def _compose(self) -> Tensor:
        """K = einsum('gois,gims->goim', W, D + D_diag), contiguous: ``doconv::compose``
        (on CPU float32/float64 the compiled kernel of ``_ckernel``, elsewhere einsum).

        The composition sees the kernel's volume only; it composes the kernel laid out as
        (M, N) = (_compose_M, _compose_N), which other ranks than 2 view as kernel_size."""
        D = self.D
        if D is None:
            return self.W.reshape(self._kernel_shape)
        if torch.jit.is_scripting():
            kernel = _ops.einsum_compose(self.W, D, self.groups, self._compose_M,
                                         self._compose_N)
        else:
            kernel = self._compose_op(D)
        if self._rank != 2:
            kernel = kernel.reshape(self._kernel_shape)  # a view: still contiguous
        return kernel

    @torch.jit.unused
    def _compose_op(self, D: Tensor) -> Tensor:
        if torch.jit.is_tracing() or _ckernel._functorch_active():
            # A TorchScript trace must load without this package, and vmap has no rule for
            # the operator: both record the plain ops.
            return _ops.einsum_compose(self.W, D, self.groups, self._compose_M,
                                       self._compose_N)
        return _ops.compose(self.W, D, self.groups, self._compose_M, self._compose_N)

    @torch.jit.unused
    def _compose_eager(self) -> Tensor:
        # Compose in the parameters' dtype even under autocast: the conv then casts the
        # kernel exactly as it casts a fused native conv's weight.
        device_type = self.W.device.type
        try:
            autocast = torch.is_autocast_enabled(device_type)
        except RuntimeError:  # a device type without autocast (meta, ...)
            autocast = False
        if autocast:
            with torch.autocast(device_type, enabled=False):
                return self._compose()
        return self._compose()

    @staticmethod
    def _cache_entry(tensor: Optional[Tensor]) -> Optional[tuple]:
        # A parameter replaced, moved, cast, swapped (swap_tensors) or changed in place
        # (optimizer steps, load_state_dict, nn.init, no_grad ops) changes its identity,
        # version or address. The entry holds the tensor by strong reference (swap_tensors
        # refuses tensors with weakrefs) and its storage, whose address therefore cannot be
        # reused by another tensor while the entry lives.
        if tensor is None:
            return None
        return (tensor, tensor._version, tensor.data_ptr(), tensor.untyped_storage(),
                tensor.shape)

    @staticmethod
    def _entry_holds(entry: Optional[tuple], tensor: Optional[Tensor]) -> bool:
        if entry is None or tensor is None:
            return entry is None and tensor is None
        return (tensor is entry[0] and tensor._version == entry[1]
                and tensor.data_ptr() == entry[2] and tensor.shape == entry[4])

    @torch.jit.unused
    def _kernel(self) -> Tensor:
        """The composed kernel; reused while it is not part of an autograd graph."""
        if _is_fx_tracing():
            return self._compose()  # parameters are Proxies: record the operator only
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return self._compose_eager()  # the graph must record the composition
        W, D = self.W, self.D
        if D is None:
            # The kernel is a view of W: free to make, and a cached one would hold W's
            # tensor (load_state_dict under swap_module_params_on_conversion refuses that).
            return self._compose_eager()
        if torch.is_grad_enabled() and (W.requires_grad or D.requires_grad):
            if self._cache is not None:
                self._cache = None  # the kernel joins the autograd graph: compose afresh
            return self._compose_eager()
        cached = self._cache
        try:
            if cached is not None and self._entry_holds(cached[0], W) and \
                    self._entry_holds(cached[1], D) and cached[2]._version == cached[3]:
                return cached[2]
            entries = (self._cache_entry(W), self._cache_entry(D))
        except RuntimeError:  # tensors without storage (functorch wrappers, ...): no cache
            return self._compose_eager()
        # A normal tensor even under inference_mode: inference tensors have no version
        # counter (the cache could not see them mutated) and cannot join autograd later.
        with torch.inference_mode(False), torch.no_grad():
            kernel = self._compose_eager()
        self._cache = (entries[0], entries[1], kernel, kernel._version)
        return kernel

    def clear_cache(self) -> None:
        """Drop the cached kernel (needed only after changing parameters through ``.data``,
        which bypasses the version counters autograd and the cache rely on)."""
        self._cache = None

    @property
    def weight(self) -> Tensor:
        """The effective (composed) kernel, shape (C_out, C_in/groups, *kernel_size)."""
        return self._kernel()

    @weight.setter
    def weight(self, value: Any) -> None:
        name = type(self).__name__
        raise AttributeError(f"{name}.weight is the kernel composed from W and D and cannot be "
                             f"assigned; set W and D, or build the layer with "
                             f"{name}.from_conv(conv)")

    @property
    def spec(self) -> ConvSpec:
        return self._spec

    # -- forward -----------------------------------------------------------------------
    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        # _rank is a constant: Python and TorchScript alike run one of these calls.
        if self._rank == 1:
            return F.conv1d(input, weight, bias, self.stride, self._conv_padding,
                            self.dilation, self.groups)
        if self._rank == 2:
            return F.conv2d(input, weight, bias, self.stride, self._conv_padding,
                            self.dilation, self.groups)
        return F.conv3d(input, weight, bias, self.stride, self._conv_padding, self.dilation,
                        self.groups)

    @torch.jit.unused
    def _check_input(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise ValueError(f"input must be a torch.Tensor, got {type(input).__name__}")
        rank = self._rank
        ndim = input.dim()
        if ndim != rank + 2 and ndim != rank + 1:
            batched, unbatched = _INPUT_LAYOUTS[rank]
            raise ValueError(f"input must be {batched} or {unbatched}, got shape "
                             f"{tuple(input.shape)}")
        if input.shape[-rank - 1] != self.in_channels:
            self._spec.check_input_channels(input.shape[-rank - 1])

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            if input.dim() < self._rank + 1 or input.shape[-self._rank - 1] != self.in_channels:
                raise ValueError("input must have " + str(self.in_channels)
                                 + " channels (the layer's in_channels)")
            weight = self._compose()
        else:
            # A trace records shapes as constants anyway; FX passes a Proxy.
            if not torch.jit.is_tracing() and not _is_fx_tracing():
                self._check_input(input)
            weight = self._kernel()
        return self._conv_forward(input, weight, self.bias)

    # -- conversions -------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        # Assigning a parameter drops the cached kernel. FSDP2 (fully_shard) swaps each
        # parameter between its shard and one reused unsharded tensor whose storage it frees
        # and refills in place, keeping its version counter: the cache key (identity,
        # version, address) could then match a kernel composed from the previous values.
        # Defining __setattr__ also makes FSDP2 assign through it (not _parameters).
        if name in ("W", "D", "bias"):
            self.__dict__["_cache"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        self._cache = None  # .to(), .cuda(), .double(), ...: the cache would hold old memory
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None  # deepcopy / pickle never carry the cached kernel
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_conv_padding" not in self.__dict__:  # pickled by a version without them
            self._set_layout()

    # -- extra state: what W, D and bias cannot tell ----------------------------------
    @torch.jit.unused
    def get_extra_state(self) -> Tensor:
        """The hyper-parameters fusion needs and the parameters' shapes do not tell (the
        rank, the kernel's shape, groups when the kernel has one element), as the int64
        tensor ``[version, rank, groups, *kernel_size]``: the state dict stays tensors-only
        (``safetensors.torch.save_file`` takes it), and ``doconv fuse`` reads a checkpoint
        without the model's code."""
        return torch.tensor(extra_state_record(self._rank, self.groups, self.kernel_size),
                            dtype=torch.int64)

    @torch.jit.unused
    def set_extra_state(self, state: Any) -> None:
        """Check a saved extra state against this layer (it configures nothing: the
        constructor did); a ValueError naming what differs."""
        problem = self._extra_state_problem(state)
        if problem:
            raise ValueError(problem)

    @torch.jit.unused
    def _extra_state_problem(self, state: Any) -> Optional[str]:
        if not isinstance(state, Tensor) or state.is_meta:
            # Not ours to read (a meta tensor has no values): a foreign value is reported,
            # a meta one (sharded loading plans) is taken as it is.
            return None if isinstance(state, Tensor) else (
                f"the extra state must be an int64 tensor [version, rank, groups, "
                f"*kernel_size], got {type(state).__name__}")
        values = state.detach().cpu().reshape(-1).tolist()
        try:
            if state.dtype != torch.int64 or state.dim() != 1:
                raise ValueError(state.dtype)
            rank, groups, kernel_size = read_extra_state(values)
        except ValueError:
            return (f"the extra state must be an int64 tensor [{_EXTRA_STATE_VERSION}, rank, "
                    f"groups, *kernel_size], got {state.dtype} {values[:8]}")
        saved = {"rank": rank, "groups": groups, "kernel_size": kernel_size}
        own = {"rank": self._rank, "groups": self.groups, "kernel_size": self.kernel_size}
        differs = [f"{key} {saved[key]} (this layer's is {own[key]})" for key in own
                   if saved[key] != own[key]]
        if differs:
            return f"the checkpoint was saved from a layer with {', '.join(differs)}"
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Nothing may hold the parameters while they load (swap_tensors counts references).
        self._cache = None
        # The extra state: checked against this layer where the checkpoint has it; one saved
        # before layers had it (or a native conv's) loads as before, strict included.
        extra_key = prefix + _EXTRA_STATE_KEY
        if extra_key in state_dict:
            problem = self._extra_state_problem(state_dict[extra_key])
            if problem:
                error_msgs.append(f"{extra_key}: {problem}")
                state_dict[extra_key] = self.get_extra_state()
        else:
            state_dict[extra_key] = self.get_extra_state()
        # A plain native conv's state (``weight``) loads by embedding: a model built with
        # DO-Conv layers takes pretrained nn.ConvNd checkpoints (D = 0, the same function).
        key = prefix + "weight"
        if key in state_dict and prefix + "W" not in state_dict and prefix + "D" not in \
                state_dict:
            kernel = state_dict.pop(key)
            shape = tuple(getattr(kernel, "shape", ()))
            if shape != self._spec.kernel_shape:
                error_msgs.append(
                    f"size mismatch for {key}: copying an {_native_name(self._rank)} weight "
                    f"of shape {shape} into a {type(self).__name__} whose kernel has shape "
                    f"{self._spec.kernel_shape}")
                return
            D, W = doconv_core.embed_kernel(_numpy(kernel), groups=self.groups,
                                            D_mul=self.D_mul)
            parts = {"W": torch.from_numpy(W)}
            if D is not None:
                parts["D"] = torch.from_numpy(D)
            if prefix + "bias" in state_dict and _assign.parametrized(self, "bias"):
                parts["bias"] = state_dict.pop(prefix + "bias")
            try:  # a parametrized part takes its values through its right_inverse
                entries = {prefix + key: value for name, part in parts.items()
                           for key, value in _assign.state_entries(self, name, part).items()}
            except ValueError as error:
                error_msgs.append(f"cannot embed {key}: {error}")
                return
            state_dict.update(entries)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"
        if self.padding != (0,) * len(self.padding):
            s += ", padding={padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += ", dilation={dilation}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        s += ", D_mul={D_mul}"
        return s.format(**self.__dict__)

    @classmethod
    def _uninitialized(cls, spec: ConvSpec, device: _Device = None,
                       dtype: Optional[torch.dtype] = None) -> "_DOConvNd":
        """A layer for ``spec`` whose D, W, bias the caller fills (no RNG draws)."""
        layer = cls(spec.in_channels, spec.out_channels, spec.kernel_size, spec.stride,
                    spec.padding, spec.dilation, spec.groups, spec.bias, spec.padding_mode,
                    device="meta", dtype=dtype, D_mul=spec.D_mul)
        layer.to_empty(device=torch.get_default_device() if device is None else device)
        return layer

    @torch.jit.unused
    def _on_meta(self) -> bool:
        """Whether a parameter (or a parametrization's original) is on the meta device
        (values copied there are dropped)."""
        return any(param.is_meta for param in self.parameters())

    @classmethod
    def from_conv(cls, conv: nn.Module, *, D_mul: Optional[int] = None) -> "_DOConvNd":
        """The DO-Conv layer computing exactly what ``conv`` (an nn.Conv1d for DOConv1d,
        nn.Conv2d for DOConv2d, nn.Conv3d for DOConv3d) computes (D = 0, W embeds it)."""
        native = _NATIVE[cls._rank]
        if not isinstance(conv, native):
            raise ValueError(f"conv must be an {_native_name(cls._rank)}, got "
                             f"{type(conv).__name__}")
        spec = ConvSpec(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                        conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                        conv.padding_mode, rank=cls._rank)
        if spec.has_D:  # D_mul applies to kernels with a D; a kernel of one element has none
            spec = dataclasses.replace(spec, D_mul=D_mul)
        D, W = doconv_core.embed_kernel(_numpy(conv.weight), groups=spec.groups,
                                        D_mul=spec.D_mul)
        layer = cls._uninitialized(spec, conv.weight.device, conv.weight.dtype)
        layer.set_params(DOConvParams(spec, W, D, _numpy(conv.bias)))
        layer.W.requires_grad_(conv.weight.requires_grad)
        if layer.D is not None:
            layer.D.requires_grad_(conv.weight.requires_grad)
        if layer.bias is not None and conv.bias is not None:
            layer.bias.requires_grad_(conv.bias.requires_grad)
        layer.train(conv.training)
        return layer

    def fuse(self) -> nn.Module:
        """The plain native conv (nn.Conv1d, nn.Conv2d or nn.Conv3d) with the composed kernel:
        same outputs, a plain conv's cost. Its weight takes W's requires_grad, its bias the
        bias'; device, dtype and training mode are the layer's."""
        with torch.no_grad():
            kernel = self._compose_eager()  # the forward's own computation, bit for bit
            conv = nn.utils.skip_init(
                _NATIVE[self._rank], self.in_channels, self.out_channels, self.kernel_size,
                self.stride, self.padding, self.dilation, self.groups, self.bias is not None,
                self.padding_mode, device=self.W.device, dtype=self.W.dtype)
            conv.weight.copy_(kernel)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.weight.requires_grad_(self.W.requires_grad)
        if self.bias is not None:
            conv.bias.requires_grad_(self.bias.requires_grad)
        conv.train(self.training)
        return conv

    def to_params(self) -> DOConvParams:
        """The core's portable container (canonical layout, NumPy arrays)."""
        return DOConvParams(self._spec, *(_numpy(part, portable=True)
                                          for part in (self.W, self.D, self.bias)))

    @classmethod
    def from_params(cls, params: DOConvParams, *, device: _Device = None,
                    dtype: Optional[torch.dtype] = None) -> "_DOConvNd":
        """A layer holding ``params`` (from any adapter's ``to_params`` or a .npz file).

        ``params.spec`` must have this class's rank. 'causal' padding (1-D) is taken only
        where it pads nothing (a kernel of one element): PyTorch has no causal padding."""
        if not isinstance(params, DOConvParams):
            raise ValueError(f"params must be DOConvParams, got {type(params).__name__}")
        spec = params.spec
        if spec.rank != cls._rank:
            raise ValueError(f"params.spec describes a {spec.rank}-D layer (rank={spec.rank}); "
                             f"{cls.__name__} is {cls._rank}-D, use DOConv{spec.rank}d")
        if spec.padding == "causal":
            spec = spec.normalized()  # 'valid' where causal pads nothing, else still causal
        layer = cls._uninitialized(spec, device, dtype)
        layer.set_params(params)
        return layer

    def set_params(self, params: DOConvParams) -> None:
        """Load ``params`` (from any adapter's ``to_params`` or a .npz file) into this layer.

        ``params.spec`` must describe this layer's function and the arrays must have its
        shapes and a floating-point dtype; everything is checked before any parameter
        changes. The values are cast to the layer's dtype and device and copied in place
        (requires_grad stays); a parametrized parameter takes them through its
        parametrization's right_inverse (refused where it has none), as assigning it would.
        """
        _assign.staged(self, params, "set_params")()


def _native_name(rank: int) -> str:
    return f"nn.Conv{rank}d"


class DOConv1d(_DOConvNd):
    """Depthwise over-parameterized 1-D convolution with nn.Conv1d's signature plus ``D_mul``.

    ``W`` (C_out, C_in/groups, D_mul), ``D`` (C_in, K, D_mul; absent for kernel_size 1) and
    ``bias``; ``weight`` is the composed (C_out, C_in/groups, K) kernel. Inputs (N, C, L) or
    (C, L). ``fuse()`` returns an nn.Conv1d; padding='causal' (Keras' Conv1D) is refused, as
    nn.Conv1d has none. Everything else as DOConv2d.
    """

    _rank = 1


class DOConv2d(_DOConvNd):
    """Depthwise over-parameterized 2-D convolution with nn.Conv2d's signature plus ``D_mul``.

    Trainable ``W`` (C_out, C_in/groups, D_mul), ``D`` (C_in, M*N, D_mul; absent for a
    1x1 kernel) and ``bias``, and no buffers: the fixed identity ``D_diag`` is part of
    the composition (``torch.ops.doconv.compose``), so meta-device builds, ``to_empty`` and
    sharded loading need nothing besides the state dict (whose ``_extra_state``, the int64
    ``[1, rank, groups, *kernel_size]``, lets ``doconv fuse`` work without the model's code).
    ``weight`` is the composed kernel, so code that reads ``conv.weight`` keeps working.
    Subclasses nn.Module, not nn.Conv2d: tools that see an nn.Conv2d expect ``weight``
    to be a Parameter (weight_norm, pruning, quantization, fusers) and would misfire.
    ``fuse()`` returns an nn.Conv2d.
    """

    _rank = 2


class DOConv3d(_DOConvNd):
    """Depthwise over-parameterized 3-D convolution with nn.Conv3d's signature plus ``D_mul``.

    ``W`` (C_out, C_in/groups, D_mul), ``D`` (C_in, K_d*K_h*K_w, D_mul; absent for a 1x1x1
    kernel) and ``bias``; ``weight`` is the composed (C_out, C_in/groups, K_d, K_h, K_w)
    kernel. Inputs (N, C, D, H, W) or (C, D, H, W). ``fuse()`` returns an nn.Conv3d.
    Everything else as DOConv2d.
    """

    _rank = 3
