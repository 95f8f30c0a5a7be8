"""Weight-only quantisation: int8 per output channel, int4 per group of G weights along the input.

Decoding one token reads every weight once, so the bytes a weight takes set the speed of a decode
step. Weight-only quantisation stores the weights of every ``nn.Linear`` in 8 or 4 bits; activations
stay in 16/32-bit and the kernel (:mod:`kernels.quant_matmul`) dequantises in registers.

    int8, symmetric, one scale per output row n (per channel):
        scale[n] = max_k |w[n, k]| / 127          q = round(w / scale) in -127..127
        w ~= q * scale[n]

    int4, asymmetric, one (scale, integer zero point) per group of G consecutive weights of a row
    (schemes int4_gG):
        lo = min(group, 0), hi = max(group, 0)    scale = (hi - lo) / 15
        zero = round(-lo / scale) in 0..15        q = clamp(round(w / scale) + zero, 0, 15)
        w ~= (q - zero) * scale                   (0.0 is exactly representable: q = zero)

    int4, asymmetric, one (scale, float minimum) per group (schemes int4_fmin_gG; GGUF's Q4_1 at G = 32):
        lo = min(group), hi = max(group)          scale = (hi - lo) / 15,  min = lo   (any float)
        q = clamp(round((w - min) / scale), 0, 15)
        w ~= q * scale + min                      (0.0 is usually *not* on the grid; the group's own
                                                   minimum and maximum are, to the rounding of scale)

The two int4 grids are not the same: a zero point is an integer, so the zero-point grid is shifted by
whole steps and stretched to include 0, while the float minimum puts the 16 levels exactly over the
group's range. A Q4_1 file (w = q * d + m) therefore does *not* fit the zero-point grid without
re-rounding (m = -zero * d holds only when m happens to be a multiple of d); it fits int4_fmin_g32
exactly, which is how :mod:`labkit.gguf_loader` loads it. Q4_0 (w = (q - 8) * d) is int4_g32 with
zero point 8.

Storage of one (N, K) int4 weight with G = 32::

    row n:    | group 0: w0 .. w31       | group 1: w32 .. w63      | ...       K weights
                  |                            |
    qweight   | 16 bytes                 | 16 bytes                 | ...       uint8 [N, K / 2]
              byte j = (q[j + 16] << 4) | q[j]      high nibble | low nibble   (j = 0 .. 15)
    scales    | s0                       | s1                       | ...       float [N, K / G]
    zeros     | z0                       | z1                       | ...       uint8 [N, K / G]  (int4_gG)
    mins      | m0                       | m1                       | ...       float [N, K / G]  (int4_fmin_gG)

    bytes per weight (fp16 scales):  fp16 2   int8 1 (+ 2/K)
        int4 zero point 0.5 + 3/G (g32 0.59, g64 0.55, g128 0.52)     float min 0.5 + 4/G (g32 0.625 = Q4_1)

K must be a multiple of G; ``pad=True`` zero-pads each row to the next multiple instead (the padding
is stored, but multiplies inputs the kernel reads as zero). Scales (and minima) are stored in
``scale_dtype`` (default: the weight's dtype); a scale that fp16 cannot hold (it would round to 0 or
overflow to inf) is refused, naming the layer. Here: :func:`quantize_tensor`,
:func:`dequantize`, :class:`QuantLinear`, :func:`quantize_model` (swap linears in place) and
:func:`quantize_state_dict` / :func:`load_quantized_state_dict` for quantised checkpoints.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from kernels.quant_matmul import (dequantize_int4, dequantize_int4_fmin, dequantize_int8, int4_fmin_matmul,
                                  int4_fmin_matmul_ref, int4_matmul, int4_matmul_ref, int8_matmul, int8_matmul_ref,
                                  pack_int4, unpack_int4)
from labkit.device import MODE

__all__ = ["QuantScheme", "SCHEMES", "get_scheme", "QuantizedTensor", "quantize_tensor", "dequantize",
           "group_scale_zero", "group_scale_min", "pack_int4", "unpack_int4", "QuantLinear", "quantize_model",
           "quantize_state_dict", "load_quantized_state_dict", "linear_bytes", "weight_bytes"]


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    name: str
    bits: int  # 8 (symmetric, per output channel) or 4 (asymmetric, per group)
    group_size: int | None = None  # int4: weights per (scale, zero) along the input dimension
    float_min: bool = False  # int4: w = q * scale + min (a float minimum, Q4_1) instead of (q - zero) * scale

    def __post_init__(self):
        if self.bits == 8 and (self.group_size is not None or self.float_min):
            raise ValueError("int8 here is symmetric per output channel: no group_size, no float_min")
        if self.bits == 4 and self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"int4 group_size must be 32, 64, 128 or 256, got {self.group_size}")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")


SCHEMES = {s.name: s for s in (QuantScheme("int8", 8), QuantScheme("int4_g32", 4, 32),
                               QuantScheme("int4_g64", 4, 64), QuantScheme("int4_g128", 4, 128),
                               QuantScheme("int4_fmin_g32", 4, 32, float_min=True),
                               QuantScheme("int4_fmin_g64", 4, 64, float_min=True),
                               QuantScheme("int4_fmin_g128", 4, 128, float_min=True))}


def get_scheme(scheme: str | QuantScheme) -> QuantScheme:
    if isinstance(scheme, QuantScheme):
        return scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    return SCHEMES[scheme]


@dataclasses.dataclass
class QuantizedTensor:
    """A quantised (out_features, in_features) weight: codes plus what it takes to dequantise them."""

    scheme: QuantScheme
    qweight: torch.Tensor  # int8 [N, K] or uint8 [N, KP / 2]
    scales: torch.Tensor  # [N] or [N, KP / G]
    zeros: torch.Tensor | None  # int4 zero point: uint8 [N, KP / G]
    in_features: int  # K, before any padding
    mins: torch.Tensor | None = None  # int4 float minimum: [N, KP / G], scales' dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.mins)
                   if t is not None)


def group_scale_zero(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit parameters of each group along the last axis: (scale fp32, zero uint8 0..15)."""
    g = groups.float()
    lo = g.amin(dim=-1).clamp(max=0.0)  # the range always holds 0, so zero lands in 0..15
    hi = g.amax(dim=-1).clamp(min=0.0)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale works
    zero = torch.round(-lo / scale).clamp(0, 15).to(torch.uint8)
    return scale, zero


def group_scale_min(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float-minimum 4-bit parameters of each group along the last axis: (scale, min), both fp32 (Q4_1's d, m)."""
    g = groups.float()
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = (hi - lo) / 15
    return torch.where(scale > 0, scale, torch.ones_like(scale)), lo  # a constant group: q = 0, w = min


def _stored(values: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``values`` (fp32) in the storage dtype, refusing what it cannot hold instead of rounding it to 0 / inf."""
    out = values.to(dtype)
    if not torch.isfinite(out).all():
        big = float(values.abs().max())
        raise ValueError(f"{what} up to {big:.3g} overflow {dtype} (max {torch.finfo(dtype).max:.3g}): store scales "
                         "in float32 (scale_dtype=torch.float32) or check the weights for outliers")
    lost = (values != 0) & (out.float().abs() < torch.finfo(dtype).tiny)
    if lost.any():
        small = float(values[lost].abs().min())
        raise ValueError(f"{what} as small as {small:.3g} underflow {dtype} (smallest normal "
                         f"{torch.finfo(dtype).tiny:.3g}): store scales in float32 (scale_dtype=torch.float32)")
    return out


def _check_weight(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got {getattr(w, 'shape', type(w))}")
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"expected a floating-point weight, got {w.dtype}: quantise the original float weights")
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or inf: there is no finite scale for it")


def quantize_tensor(w: torch.Tensor, scheme: str | QuantScheme, *, pad: bool = False,
                    scale_dtype: torch.dtype | None = None) -> QuantizedTensor:
    """Quantise an (N, K) float weight (round to nearest). Scales (and minima) are stored in ``scale_dtype``,
    by default w's dtype (fp32 for fp64); values that dtype cannot hold are an error, not a silent 0 or inf.

    int4 needs K to be a multiple of the group size; ``pad=True`` zero-pads the rows instead.
    """
    scheme = get_scheme(scheme)
    _check_weight(w)
    w = w.detach()
    if scale_dtype is None:
        scale_dtype = torch.float32 if w.dtype == torch.float64 else w.dtype
    if scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"scale_dtype must be torch.float16, torch.bfloat16 or torch.float32, got {scale_dtype}")
    n, k = w.shape
    if scheme.bits == 8:
        amax = w.float().abs().amax(dim=1)
        scale = _stored(amax / 127, scale_dtype, "int8 scales")
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedTensor(scheme, q.contiguous(), scale.contiguous(), None, k)
    g = scheme.group_size
    if k % g:
        if not pad:
            raise ValueError(f"in_features = {k} is not a multiple of the group size {g} ({scheme.name}): "
                             f"pass pad=True to zero-pad rows to {-(-k // g) * g}, or choose a group size that divides {k}")
        w = torch.nn.functional.pad(w, (0, -(-k // g) * g - k))
    groups = w.float().reshape(n, -1, g)  # (N, KP / G, G)
    if scheme.float_min:
        scale, lo = group_scale_min(groups)
        scale = _stored(scale, scale_dtype, f"{scheme.name} scales")  # quantise against what will be stored
        lo = _stored(lo, scale_dtype, f"{scheme.name} minima")
        q = torch.round((groups - lo.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
        return QuantizedTensor(scheme, pack_int4(q.reshape(n, -1), g), scale.contiguous(), None, k, lo.contiguous())
    scale, zero = group_scale_zero(groups)
    scale = _stored(scale, scale_dtype, f"{scheme.name} scales")  # quantise against the scale that will be stored
    q = (torch.round(groups / scale.float()[..., None]) + zero[..., None].float()).clamp(0, 15).to(torch.uint8)
    return QuantizedTensor(scheme, pack_int4(q.reshape(n, -1), g), scale.contiguous(), zero.contiguous(), k)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The (out_features, in_features) float weight a QuantizedTensor stands for (padding dropped)."""
    dtype = dtype or qt.scales.dtype
    if qt.scheme.bits == 8:
        return dequantize_int8(qt.qweight, qt.scales, dtype)
    if qt.scheme.float_min:
        return dequantize_int4_fmin(qt.qweight, qt.scales, qt.mins, qt.scheme.group_size, qt.in_features, dtype)
    return dequantize_int4(qt.qweight, qt.scales, qt.zeros, qt.scheme.group_size, qt.in_features, dtype)


def _spec(t: torch.Tensor | None):
    return None if t is None else (t.dtype, tuple(t.shape))


def _padded(k: int, scheme: QuantScheme) -> int:
    return k if scheme.bits == 8 else -(-k // scheme.group_size) * scheme.group_size


class QuantLinear(nn.Module):
    """An nn.Linear whose weight is stored quantised: buffers ``qweight``, ``scales``, and for int4 ``zeros``
    (zero-point schemes) or ``mins`` (float-minimum schemes).

    forward: x (..., in) -> (..., out) in x's dtype. ``backend`` "auto" runs the Triton kernel on the GPU
    and the plain-torch reference (dequantise, then matmul) on the CPU, where the interpreter would take
    minutes over a model; "triton" or "torch" force one.
    """

    def __init__(self, in_features: int, out_features: int, scheme: str | QuantScheme, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float32, backend: str = "auto", pad: bool = False, device=None):
        super().__init__()
        scheme = get_scheme(scheme)
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        if scheme.bits == 4 and in_features % scheme.group_size and not pad:
            raise ValueError(f"in_features = {in_features} is not a multiple of the group size {scheme.group_size}; "
                             "pass pad=True to zero-pad it")
        self.in_features, self.out_features, self.scheme, self.backend = in_features, out_features, scheme, backend
        kp = _padded(in_features, scheme)
        if scheme.bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, dtype=scale_dtype, device=device))
            self.zeros = self.mins = None
        else:
            ng = kp // scheme.group_size
            self.register_buffer("qweight", torch.zeros(out_features, kp // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(out_features, ng, dtype=scale_dtype, device=device))
            if scheme.float_min:
                self.zeros = None
                self.register_buffer("mins", torch.zeros(out_features, ng, dtype=scale_dtype, device=device))
            else:
                self.mins = None
                self.register_buffer("zeros", torch.zeros(out_features, ng, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=scale_dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str | QuantScheme, backend: str = "auto",
                    pad: bool = False, scale_dtype: torch.dtype | None = None) -> "QuantLinear":
        qt = quantize_tensor(linear.weight, scheme, pad=pad, scale_dtype=scale_dtype)
        return cls.from_quantized(qt, linear.out_features, linear.bias, backend, pad)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, out_features: int, bias: torch.Tensor | None = None,
                       backend: str = "auto", pad: bool = False) -> "QuantLinear":
        layer = cls(qt.in_features, out_features, qt.scheme, bias is not None, qt.scales.dtype, backend,
                    pad or qt.in_features != _padded(qt.in_features, qt.scheme), device=qt.qweight.device)
        for name in ("qweight", "scales", "zeros", "mins"):
            want, got = getattr(layer, name), getattr(qt, name)
            if _spec(want) != _spec(got):
                raise ValueError(f"{qt.scheme.name}: {name} is {_spec(got)}, expected {_spec(want)}")
            if got is not None:
                setattr(layer, name, got)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    @classmethod
    def from_codes(cls, scheme: str | QuantScheme, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros_or_mins: torch.Tensor, in_features: int, bias: torch.Tensor | None = None,
                   backend: str = "auto") -> "QuantLinear":
        """A layer over codes written elsewhere (a GGUF file's Q4_0 / Q4_1 blocks), taken as they are."""
        scheme = get_scheme(scheme)
        zeros, mins = (None, zeros_or_mins) if scheme.float_min else (zeros_or_mins, None)
        qt = QuantizedTensor(scheme, qweight.contiguous(), scales.contiguous(), zeros, in_features, mins)
        return cls.from_quantized(qt, qweight.shape[0], bias, backend)

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.scheme, self.qweight, self.scales, self.zeros, self.in_features, self.mins)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.quantized(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (m, in)
        use_triton = self.backend == "triton" or (self.backend == "auto" and MODE == "gpu" and x.is_cuda)
        if self.scheme.bits == 8:
            out = (int8_matmul if use_triton else int8_matmul_ref)(x2, self.qweight, self.scales)
        elif self.scheme.float_min:
            out = (int4_fmin_matmul if use_triton else int4_fmin_matmul_ref)(x2, self.qweight, self.scales,
                                                                              self.mins, self.scheme.group_size)
        else:
            out = (int4_matmul if use_triton else int4_matmul_ref)(x2, self.qweight, self.scales, self.zeros,
                                                                    self.scheme.group_size)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
                f"bias={self.bias is not None}, backend={self.backend}")


def _skipped(name: str, skip) -> bool:
    """``skip`` entries match a module's full dotted name or its last part ("lm_head", "down_proj")."""
    return name in skip or name.rsplit(".", 1)[-1] in skip


def _targets(model: nn.Module, skip):
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and not _skipped(name, skip):
                yield name, parent, child_name, child


def _check_divisible(targets, scheme: QuantScheme, pad: bool) -> None:
    if scheme.bits == 4 and not pad:
        bad = [f"{name} (in_features {c.in_features})" for name, _, _, c in targets
               if c.in_features % scheme.group_size]
        if bad:
            raise ValueError(f"{scheme.name}: in_features not a multiple of {scheme.group_size} in {bad[:4]}"
                             f"{' ...' if len(bad) > 4 else ''}; pass pad=True to zero-pad them, or name them in skip=")


def quantize_model(model: nn.Module, scheme: str | QuantScheme, skip=("lm_head",), *, pad: bool = False,
                   backend: str = "auto", scale_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every nn.Linear (except those named in ``skip``) by a QuantLinear, in place; returns the model.

    ``lm_head`` is skipped by default: it is often tied to the embedding, and it is the most sensitive layer.
    All or nothing: every layer is quantised before any is swapped, so an error (naming the layer) leaves
    the model exactly as it was.
    """
    scheme = get_scheme(scheme)
    targets = list(_targets(model, skip))
    _check_divisible(targets, scheme, pad)
    new = []
    for name, _, _, child in targets:
        try:
            new.append(QuantLinear.from_linear(child, scheme, backend, pad, scale_dtype))
        except ValueError as e:
            raise ValueError(f"{name}: {e} (nothing was quantised)") from None
    for (_, parent, child_name, _), layer in zip(targets, new):
        setattr(parent, child_name, layer)
    return model


def quantize_state_dict(model: nn.Module, scheme: str | QuantScheme, skip=("lm_head",), *,
                        pad: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of ``quantize_model(model, ...)``, computed without changing ``model``: each quantised
    linear's ``NAME.weight`` becomes ``NAME.qweight``, ``NAME.scales`` (and ``NAME.zeros`` for int4)."""
    scheme = get_scheme(scheme)
    targets = list(_targets(model, skip))
    _check_divisible(targets, scheme, pad)
    state = dict(model.state_dict())
    for name, _, _, child in targets:
        qt = quantize_tensor(child.weight, scheme, pad=pad)
        del state[f"{name}.weight"]
        state[f"{name}.qweight"], state[f"{name}.scales"] = qt.qweight, qt.scales
        if qt.zeros is not None:
            state[f"{name}.zeros"] = qt.zeros
        if qt.mins is not None:
            state[f"{name}.mins"] = qt.mins
    return state


def load_quantized_state_dict(model: nn.Module, state: dict[str, torch.Tensor], scheme: str | QuantScheme,
                              skip=("lm_head",), *, pad: bool = False, backend: str = "auto") -> nn.Module:
    """Load a quantised checkpoint into an unquantised ``model`` of the right architecture (in place).

    The linears are swapped for empty QuantLinears first; every one must find its tensors in ``state``
    (a missing ``...scales`` is an error naming the tensor, not a silent fallback to ones).
    """
    scheme = get_scheme(scheme)
    targets = list(_targets(model, skip))
    _check_divisible(targets, scheme, pad)
    for name, parent, child_name, child in targets:
        layer = QuantLinear(child.in_features, child.out_features, scheme, child.bias is not None,
                            child.weight.dtype if child.weight.is_floating_point() else torch.float32,
                            backend, pad, device=child.weight.device)
        for part, want in layer.state_dict().items():
            key = f"{name}.{part}"
            if key not in state:
                hint = " (the checkpoint holds an unquantised weight here)" if f"{name}.weight" in state else ""
                raise ValueError(f"quantised checkpoint is missing tensor {key!r}{hint}: scheme {scheme.name} needs "
                                 f"{sorted(layer.state_dict())} for every quantised linear")
            got = state[key]
            dtype_ok = got.is_floating_point() if want.is_floating_point() else got.dtype == want.dtype
            if got.shape != want.shape or not dtype_ok:
                raise ValueError(f"tensor {key!r} is {got.dtype} {tuple(got.shape)}, scheme {scheme.name} expects "
                                 f"{want.dtype} {tuple(want.shape)}")
        setattr(parent, child_name, layer)
    model.load_state_dict(state, strict=True)
    return model


def linear_bytes(out_features: int, in_features: int, scheme: str | QuantScheme | None,
                 scale_bytes: int = 2, weight_bytes: int = 2) -> int:
    """Bytes one linear's weight takes under ``scheme`` (None: unquantised, ``weight_bytes`` a weight)."""
    if scheme is None:
        return out_features * in_features * weight_bytes
    scheme = get_scheme(scheme)
    if scheme.bits == 8:
        return out_features * (in_features + scale_bytes)
    kp = _padded(in_features, scheme)
    offset_bytes = scale_bytes if scheme.float_min else 1  # a float minimum or a uint8 zero point
    return out_features * (kp // 2 + (kp // scheme.group_size) * (scale_bytes + offset_bytes))


def weight_bytes(model: nn.Module, skip=()) -> dict[str, int]:
    """Bytes of the linears' weights as stored now (quantised or not; those named in ``skip`` left out)
    and of every other parameter (a tied lm_head counts once, with the embedding it shares)."""
    linear, seen = 0, set()
    for name, module in model.named_modules():
        tensors = []
        if _skipped(name, skip):
            continue
        if isinstance(module, QuantLinear):
            tensors = [module.qweight, module.scales, module.zeros, module.mins]
        elif isinstance(module, nn.Linear):
            tensors = [module.weight]
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                linear += t.numel() * t.element_size()
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in seen)
    return {"linears": linear, "other": other}
