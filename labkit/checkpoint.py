"""Reading and writing Hugging Face-format model directories with ``safetensors`` directly.

A model directory holds ``config.json``, the weights as one ``model.safetensors`` or several shards
(listed by ``model.safetensors.index.json``, or simply every ``*.safetensors``), and ``tokenizer.json``.
Every error names the file and what is wrong with it.
"""
from __future__ import annotations

import json
import pathlib

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from labkit.config import LlamaConfig

DEFAULT_MODEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "data" / "model"


class Tokenizer:
    """A thin wrapper over a ``tokenizers`` tokenizer.json: encode / decode / eos."""

    def __init__(self, path: str | pathlib.Path, eos_token_id: int | None = None, bos_token_id: int | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        path = pathlib.Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json in the model directory")
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        self.eos_token_id, self.bos_token_id = eos_token_id, bos_token_id
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_strings(self, ids) -> list[str]:
        return [self._tok.decode([i]) for i in ids]


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


def load_pretrained(path: str | pathlib.Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu"):
    """(model, tokenizer) from a Hugging Face-format directory. ``tokenizer`` is None if there is no tokenizer.json."""
    from labkit.model import LlamaForCausalLM, rope_inv_freq

    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory (expected config.json + *.safetensors)")
    config = LlamaConfig.from_file(path / "config.json")
    state = load_state_dict(path)
    origin = state.pop("__origin__")
    if config.num_local_experts:  # transformers 5 may store Mixtral's experts fused: back to per-expert names
        from labkit.moe import unfuse_experts

        state = unfuse_experts(state)
        origin = {k: origin.get(k, path) for k in state}
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        state.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
    if missing:
        raise ValueError(f"{path}: weights missing from the safetensors files: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors (not a {config.model_type} layout?): {unexpected[:8]}")
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise ValueError(f"{origin[name]}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                             f"config.json implies {tuple(want.shape)}")
    model = model.to_empty(device=device)
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=False)
    model.model.rotary_emb.inv_freq = rope_inv_freq(config).to(device)  # buffers are not in checkpoints
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.to(dtype).eval()
    tok_path = path / "tokenizer.json"
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    tokenizer = Tokenizer(tok_path, eos, config.bos_token_id) if tok_path.exists() else None
    return model, tokenizer


def save_pretrained(model, path: str | pathlib.Path, dtype: torch.dtype | None = None) -> None:
    """config.json + model.safetensors (tied lm_head written once, as HF does)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2) + "\n")
    state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The lab's shipped model (data/model/): a small Llama trained on Jane Austen's novels."""
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(f"{DEFAULT_MODEL_DIR}: the shipped model is missing; `python -m labkit.train` makes it")
    return load_pretrained(DEFAULT_MODEL_DIR, dtype=dtype, device=device)
