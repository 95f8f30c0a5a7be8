"""Ternary weights (BitNet b1.58): every linear weight is -1, 0 or +1 times one scale.

    absmean ternarisation (Ma et al. 2024, "The Era of 1-bit LLMs", eq. 1-3):
        scale = mean(|W|)                       # one number per tensor (or per output row)
        T     = clamp(round(W / scale), -1, 1)  # -1 / 0 / +1
        W    ~= scale * T                       # log2(3) = 1.58 bits of information a weight

Stored two bits a weight, four to a byte (the layout is defined next to the kernel that reads it,
:mod:`kernels.ternary`), a 16-bit linear shrinks 8x. Rounding a *trained* model this way destroys
it; training with the rounding in the loop (quantisation-aware training, :mod:`labkit.qat`) lets the
weights settle where rounding hurts little.

Here: :func:`absmean_ternarise`, :class:`TernaryLinear` (packed weights + scales, runs the Triton
kernel on the GPU and the plain-torch reference on the CPU), :func:`ternarise_model` (swap every
decoder linear), and :func:`save_ternary` / :func:`load_ternary` for a packed model directory.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import torch
import torch.nn as nn

from kernels.ternary import (pack_ternary, pack_ternary_words, ternary_matmul, ternary_matmul_ref,
                             ternary_matmul_words, ternary_matmul_words_ref, unpack_ternary, unpack_ternary_words)
from labkit.device import MODE

__all__ = [
    "absmean_ternarise",
    "fake_ternarise",
    "pack_ternary",
    "unpack_ternary",
    "TernaryLinear",
    "ternarise_model",
    "LINEAR_NAMES",
    "save_ternary",
    "load_ternary",
    "linear_weight_bytes",
]

# The decoder's linears; embeddings, norms and lm_head stay in high precision (as in BitNet).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EPS = 1e-5  # keeps W / scale finite for an all-zero tensor


def absmean_ternarise(w: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(T, scale): T int8 (N, K) in {-1, 0, +1} and scale fp32 with W ~= scale * T.

    granularity "tensor": one scale for the whole matrix (BitNet b1.58), returned with shape (1,);
    "row": one scale per output row, shape (N,).
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    w32 = w.detach().float()
    if granularity == "tensor":
        scale = w32.abs().mean().reshape(1)
        t = (w32 / (scale + EPS)).round().clamp(-1, 1)
    elif granularity == "row":
        scale = w32.abs().mean(dim=1)  # (N,)
        t = (w32 / (scale[:, None] + EPS)).round().clamp(-1, 1)
    else:
        raise ValueError(f"granularity must be 'tensor' or 'row', got {granularity!r}")
    return t.to(torch.int8), scale


def fake_ternarise(w: torch.Tensor, granularity: str = "tensor") -> torch.Tensor:
    """scale * T in w's dtype, with a straight-through gradient: forward sees the ternary weight,
    backward passes the gradient to ``w`` unchanged (d round / d w taken as 1). Used by QAT."""
    t, scale = absmean_ternarise(w, granularity)
    scale = scale if granularity == "tensor" else scale[:, None]
    wq = (t.float() * scale).to(w.dtype)
    return w + (wq - w).detach()


class TernaryLinear(nn.Module):
    """A linear layer whose weight is packed ternary codes (out, in // 4) uint8 plus fp32 scale(s).

    forward: x (..., in) -> (..., out). ``backend`` "auto" runs the Triton kernel on the GPU and the
    plain-torch reference on the CPU (the interpreter would take minutes over a whole model); "triton"
    or "torch" force one. ``layout`` "bytes" (:func:`pack_ternary`) or "words" (:func:`pack_ternary_words`, the
    word-at-a-time decode GEMV of kernels/ternary.py v2; in_features a multiple of 256; m > 4 uses the reference).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, granularity: str = "tensor",
                 backend: str = "auto", layout: str = "bytes"):
        super().__init__()
        if in_features % 4:
            raise ValueError(f"in_features = {in_features} must be a multiple of 4 to pack four weights a byte")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        if layout not in ("bytes", "words") or (layout == "words" and in_features % 256):
            raise ValueError(f"layout must be 'bytes' or 'words' (in_features a multiple of 256), got {layout!r} "
                             f"with in_features = {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.granularity, self.backend, self.layout = granularity, backend, layout
        n_scales = 1 if granularity == "tensor" else out_features
        self.register_buffer("packed", torch.zeros(out_features, in_features // 4, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(n_scales, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "tensor", backend: str = "auto",
                    layout: str = "bytes") -> "TernaryLinear":
        """Ternarise a trained nn.Linear's weight (absmean) and pack it in ``layout``."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, granularity, backend, layout)
        t, scale = absmean_ternarise(linear.weight, granularity)
        layer.packed = (pack_ternary_words if layout == "words" else pack_ternary)(t).to(linear.weight.device)
        layer.scale = scale.to(linear.weight.device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer

    def dequantised_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale * T as a dense (out, in) matrix (for inspection and tests)."""
        t = (unpack_ternary_words if self.layout == "words" else unpack_ternary)(self.packed, torch.float32)
        scale = self.scale if self.scale.numel() == 1 else self.scale[:, None]
        return (t * scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (m, in)
        use_triton = self.backend == "triton" or (self.backend == "auto" and MODE == "gpu" and x.is_cuda)
        if self.layout == "words":
            use_triton = use_triton and x2.shape[0] <= 4  # a decode GEMV: it would re-read W for every row of x
            out = (ternary_matmul_words if use_triton else ternary_matmul_words_ref)(x2, self.packed, self.scale)
        else:
            out = (ternary_matmul if use_triton else ternary_matmul_ref)(x2, self.packed, self.scale)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"granularity={self.granularity}, bias={self.bias is not None}, layout={self.layout}")


def _decoder_linears(model: nn.Module):
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in LINEAR_NAMES and isinstance(child, (nn.Linear, TernaryLinear)):
                yield f"{name}.{child_name}" if name else child_name, module, child_name, child


def ternarise_model(model: nn.Module, granularity: str = "tensor", backend: str = "auto") -> nn.Module:
    """Replace every decoder linear (q/k/v/o, gate/up/down) by a TernaryLinear, in place; returns the model.

    This is *post-hoc* ternarisation of whatever weights the model has. Applied to a model that was
    trained in full precision it ruins it; applied to a QAT-trained model it is (nearly) lossless.
    """
    for _, parent, child_name, child in list(_decoder_linears(model)):
        if isinstance(child, nn.Linear):
            setattr(parent, child_name, TernaryLinear.from_linear(child, granularity, backend))
    return model


def linear_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the decoder linears' weights take as stored now, and everything else (embeddings, norms)."""
    linear, params = 0, {id(p): p for p in model.parameters()}
    for _, _, _, child in _decoder_linears(model):
        if isinstance(child, TernaryLinear):
            linear += child.packed.numel() + child.scale.numel() * 4
        else:
            linear += child.weight.numel() * child.weight.element_size()
            params.pop(id(child.weight), None)
    other = sum(p.numel() * p.element_size() for p in params.values())
    return {"decoder_linears": linear, "other": other}


# --- a packed model directory: config.json + tokenizer.json + model.safetensors with packed linears ---

def save_ternary(model: nn.Module, path: str | pathlib.Path, tokenizer_dir: str | pathlib.Path | None = None,
                 other_dtype: torch.dtype = torch.float16, metadata: dict | None = None) -> pathlib.Path:
    """Write a ternarised model: packed uint8 codes + fp32 scales for the decoder linears, the rest
    (embeddings, norms) in ``other_dtype``. ``config.json`` gets a ``quantization`` entry saying so."""
    from safetensors.torch import save_file

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith((".packed", ".scale")):
            state[name] = t.contiguous()
        elif t.is_floating_point():
            state[name] = t.to(other_dtype).contiguous()
        else:
            state[name] = t.contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as model.embed_tokens.weight
    granularity = next(c.granularity for _, _, _, c in _decoder_linears(model) if isinstance(c, TernaryLinear))
    save_file(state, str(path / "model.safetensors"))
    config = model.config.to_hf_dict()
    config["quantization"] = {"method": "ternary_absmean", "bits": 2, "granularity": granularity,
                              "layout": "kernels/ternary.py: four 2-bit codes (w + 1) a byte, lowest bits first",
                              "linears": list(LINEAR_NAMES), **(metadata or {})}
    (path / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    if tokenizer_dir is not None:
        shutil.copy(pathlib.Path(tokenizer_dir) / "tokenizer.json", path / "tokenizer.json")
    return path


def load_ternary(path: str | pathlib.Path, dtype: torch.dtype = torch.float32, backend: str = "auto",
                 device: torch.device | str = "cpu"):
    """Load a directory written by :func:`save_ternary`: (model with TernaryLinear layers, tokenizer)."""
    from labkit.checkpoint import Tokenizer, load_state_dict
    from labkit.config import LlamaConfig
    from labkit.model import LlamaForCausalLM

    path = pathlib.Path(path)
    raw = json.loads((path / "config.json").read_text())
    q = raw.get("quantization") or {}
    if q.get("method") != "ternary_absmean":
        raise ValueError(f"{path}/config.json has no ternary 'quantization' entry: load it with load_pretrained")
    config = LlamaConfig.from_hf_dict(raw, str(path / "config.json"))
    model = LlamaForCausalLM(config)
    ternarise_model(model, q["granularity"], backend)  # right shapes; the values come from the file
    state = load_state_dict(path)
    state.pop("__origin__", None)
    own = model.state_dict()
    for name, t in state.items():
        if name not in own:
            raise ValueError(f"{path}: unexpected tensor {name!r}")
        state[name] = t if name.endswith((".packed", ".scale")) else t.to(dtype)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing = [n for n in own if n not in state]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}")
    model.load_state_dict(state)
    model.to(device=device)
    for m in model.modules():  # non-ternary parameters in the requested dtype
        if not isinstance(m, TernaryLinear):
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dtype)
    tok_path = path / "tokenizer.json"
    tokenizer = Tokenizer(tok_path, config.eos_token_id, config.bos_token_id) if tok_path.exists() else None
    return model.eval(), tokenizer
