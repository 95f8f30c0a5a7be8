"""Reading and writing model checkpoints: Hugging Face directories (``safetensors`` directly) and GGUF files.

A model directory holds ``config.json``, the weights as one ``model.safetensors`` or several shards
(listed by ``model.safetensors.index.json``, or simply every ``*.safetensors``), ``tokenizer.json`` and
optionally ``tokenizer_config.json``. A path ending in ``.gguf`` is read by :mod:`labkit.gguf_loader`.
Every error names the file and what is wrong with it, and says what to do:

    wrong names      tensor names under another prefix ("transformer.", "base_model.model.")
    wrong values     integer tensors where weights belong, NaN / inf in a weight
    quantised dirs   written by save_pretrained from a quantised model: reloaded as such (config.json says how);
                     a ternary directory points to labkit.ternary.load_ternary
"""
from __future__ import annotations

import json
import pathlib

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from labkit.config import LlamaConfig
from labkit.tokenizer import Tokenizer

__all__ = ["Tokenizer", "load_pretrained", "save_pretrained", "load_state_dict", "build_model", "check_device",
           "load_default_model", "DEFAULT_MODEL_DIR", "SMOLLM2_GGUF"]

DEFAULT_MODEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "data" / "model"
# A real instruct model nobody here trained, fetched by `make models` (git-ignored): notebooks 00 and 08, tests.
SMOLLM2_GGUF = pathlib.Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANT_METHOD = "labkit"  # config.json "quantization_config": {"quant_method": "labkit", "scheme": ..., ...}


def check_device(device: str | torch.device) -> torch.device:
    """A device this torch can use, or an error saying why not and what to pass instead."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e}); use 'cpu' or 'cuda'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but this torch ({torch.__version__}) sees no CUDA device: "
                             "use device='cpu', or install a CUDA build of torch (README: make lab TORCH=...)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"device={str(device)!r}: labkit runs on 'cpu' or 'cuda'")
    return device


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: malformed index ({e!r}); expected a 'weight_map' object") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pytorch_model.bin is not read; convert to safetensors)")
    return files


def load_state_dict(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, keyed by name; errors name the shard."""
    state, origin = {}, {}
    for f in _weight_files(pathlib.Path(path)):
        try:
            shard = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f}: cannot read safetensors ({e})") from None
        for name, t in shard.items():
            if name in state:
                raise ValueError(f"{f}: tensor {name!r} also appears in {origin[name]}")
            state[name], origin[name] = t, f
    state["__origin__"] = origin  # type: ignore[assignment]
    return state


def _prefix_hint(missing: list[str], state: dict) -> str:
    """If the file's names are ours under another prefix, say which (a wrapper or PEFT checkpoint)."""
    probe = next((k for k in missing if ".layers.0." in k), missing[0])
    tail = probe.split(".", 1)[1] if probe.startswith("model.") else probe  # e.g. layers.0.mlp.up_proj.weight
    found = next((k for k in state if k.endswith(tail) and k != probe), None)
    if found is None:
        return ""
    theirs, ours = found[: -len(tail)], probe[: -len(tail)]
    return (f"; the file's names start with {theirs!r} where labkit expects {ours!r} (e.g. {found!r}): "
            f"rename them, e.g. {{k.replace({theirs!r}, {ours!r}, 1): v for k, v in state.items()}}, "
            "and save the result")


def build_model(config: LlamaConfig, state: dict[str, torch.Tensor], origin: dict, dtype: torch.dtype,
                device: str | torch.device, skip: set[str] = frozenset()):
    """A LlamaForCausalLM holding ``state``, after checking names, shapes, dtypes and values.

    ``skip``: expected tensors the caller fills in afterwards (a GGUF loader's quantised linears)."""
    from labkit.model import LlamaForCausalLM, rope_inv_freq

    if config.num_local_experts:  # transformers 5 may store Mixtral's experts fused: back to per-expert names
        from labkit.moe import unfuse_experts

        state = unfuse_experts(state)
        fallback = next(iter(origin.values()), None)
        origin = {k: origin.get(k, fallback) for k in state}
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {k: v for k, v in model.state_dict().items() if k not in skip}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    source = next(iter(set(origin.values())), "checkpoint") if origin else "checkpoint"
    if missing:
        raise ValueError(f"{source}: weights missing from the checkpoint: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}{_prefix_hint(missing, state)}")
    if unexpected:
        raise ValueError(f"{source}: unexpected tensors (not a {config.model_type} layout?): {unexpected[:8]}")
    for name, want in expected.items():
        t = state[name]
        if not t.is_floating_point():
            raise ValueError(f"{origin[name]}: tensor {name!r} is {t.dtype}; weights must be floating point "
                             "(a quantised checkpoint? labkit.quant.load_quantized_state_dict reads those)")
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"{origin[name]}: tensor {name!r} has shape {tuple(t.shape)}, "
                             f"config.json implies {tuple(want.shape)}")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{origin[name]}: tensor {name!r} holds {bad} NaN/inf value(s) of {t.numel()}: "
                             "the checkpoint is corrupt (or was saved after training diverged); re-export it")
    model = model.to_empty(device=device)
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=False)
    model.model.rotary_emb.inv_freq = rope_inv_freq(config).to(device)  # buffers are not in checkpoints
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(dtype).eval()


def _quantization_of(path: pathlib.Path) -> dict | None:
    raw = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    if raw.get("quantization", {}).get("method") == "ternary_absmean":
        raise ValueError(f"{path}: a ternary checkpoint (config.json 'quantization'): load it with "
                         "labkit.ternary.load_ternary")
    q = raw.get("quantization_config")
    if q is not None and q.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path}: config.json has quantization_config {q.get('quant_method')!r}, which labkit "
                         f"does not read (it reads its own, {QUANT_METHOD!r}); load the unquantised model")
    return q


def load_pretrained(path: str | pathlib.Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", *, keep_quantized: bool = False):
    """(model, tokenizer) from a Hugging Face-format directory or a ``.gguf`` file.

    ``tokenizer`` is None if a directory has no tokenizer.json. A directory that ``save_pretrained``
    wrote from a quantised model loads quantised again. ``keep_quantized`` (GGUF only): Q4_0/Q4_1
    linears load into labkit's int4 layers unchanged instead of being dequantised.
    """
    device = check_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype (torch.float32, torch.bfloat16), got {dtype!r}")
    path = pathlib.Path(path)
    if path.suffix == ".gguf":
        from labkit.gguf_loader import load_gguf

        return load_gguf(path, dtype, device, keep_quantized)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory (config.json + *.safetensors) nor a .gguf file")
    if keep_quantized:
        raise ValueError("keep_quantized applies to GGUF files; a directory loads as it was saved")
    config = LlamaConfig.from_file(path / "config.json")
    quant = _quantization_of(path)
    state = load_state_dict(path)
    origin = state.pop("__origin__")
    packed = sorted(k for k in state if k.endswith(".qweight"))
    if quant is None and packed:
        raise ValueError(f"{path}: the weights are quantised ({packed[0]!r}, ...) but config.json has no "
                         "quantization_config: load them with labkit.quant.load_quantized_state_dict(model, state, "
                         "scheme), or re-save with labkit's save_pretrained, which records the scheme")
    if quant is not None:
        model = _load_quantized(config, state, quant, dtype, device, path)
    else:
        model = build_model(config, state, origin, dtype, device)
    tokenizer = Tokenizer.from_dir(path, config) if (path / "tokenizer.json").exists() else None
    return model, tokenizer


def _load_quantized(config, state, quant, dtype, device, path):
    from labkit.model import LlamaForCausalLM, rope_inv_freq
    from labkit.quant import load_quantized_state_dict

    model = LlamaForCausalLM(config).to(dtype)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    try:
        load_quantized_state_dict(model, state, quant["scheme"], skip=tuple(quant.get("skip", ("lm_head",))),
                                  pad=bool(quant.get("pad", False)))
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path}: quantised checkpoint does not load ({e})") from None
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.inv_freq = rope_inv_freq(config)
    return model.to(device).eval()


def save_pretrained(model, path: str | pathlib.Path, dtype: torch.dtype | None = None, tokenizer=None) -> None:
    """config.json + model.safetensors (tied lm_head written once, as HF does), and the tokenizer's files
    when ``tokenizer`` is given. A quantised model (labkit.quant.QuantLinear layers) is saved with its
    codes and a ``quantization_config`` that load_pretrained reads back; ``dtype`` converts float tensors only."""
    from labkit.quant import QuantLinear

    path = pathlib.Path(path)
    quant_layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    hf = model.config.to_hf_dict()
    if quant_layers:
        schemes = {m.scheme.name for m in quant_layers.values()}
        if len(schemes) > 1:
            raise ValueError(f"the model mixes quantisation schemes {sorted(schemes)}; save_pretrained records one")
        skip = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
        pad = any(m.scheme.group_size and m.in_features % m.scheme.group_size for m in quant_layers.values())
        hf["quantization_config"] = {"quant_method": QUANT_METHOD, "scheme": schemes.pop(), "skip": skip, "pad": pad}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(path)


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The lab's shipped model (data/model/): a small Llama trained on Jane Austen's novels."""
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(f"{DEFAULT_MODEL_DIR}: the shipped model is missing; `python -m labkit.train` makes it")
    return load_pretrained(DEFAULT_MODEL_DIR, dtype=dtype, device=device)
