"""Reading a GGUF file (llama.cpp's format) into labkit's Llama: config, tokenizer and weights.

A GGUF file is one header of typed key-value metadata, then every tensor, each in its own ggml type
(F32, F16, Q8_0, Q4_1, ...). It is read here with ``gguf``, the reader llama.cpp maintains::

    metadata   general.architecture = "llama"          -> LlamaConfig  (llama.block_count, ...)
               tokenizer.ggml.tokens / merges / ...    -> Tokenizer    (byte-level BPE vocabularies)
               tokenizer.chat_template                 -> Tokenizer.chat_template
    tensors    blk.3.attn_q.weight  (Q4_1)            -> model.layers.3.self_attn.q_proj.weight

Two things differ from a Hugging Face checkpoint:

- llama.cpp's converter permutes the rows of q_proj and k_proj (per head it interleaves the two
  halves that rotate_half pairs, for its own RoPE kernel). Loading into a Hugging Face layout undoes it:
  ``unpermute`` below (transformers does the same in its GGUF loader). Qwen2 files are not permuted.
- Quantised tensors are blocks of 32 weights. ``Q4_1`` stores ``w = q * d + m`` with a float scale d
  and a float minimum m per block (fp16 each); ``Q4_0`` stores ``w = (q - 8) * d``. Both keep the
  codes in labkit's int4 nibble order, so with ``keep_quantized=True`` their linears load into
  :class:`labkit.quant.QuantLinear` unchanged: Q4_1 as ``int4_fmin_g32``, Q4_0 as ``int4_g32`` with
  zero point 8 (no rounding: the same numbers). Everything else is dequantised by ``gguf.quants``.
"""
from __future__ import annotations

import pathlib

import numpy as np
import torch

from labkit.config import LlamaConfig
from labkit.tokenizer import Tokenizer

__all__ = ["load_gguf", "read_gguf", "config_from_gguf", "tokenizer_from_gguf", "read_tensors", "unpermute"]

SUPPORTED = ("llama", "qwen2")
PERMUTED = ("llama",)  # architectures whose q/k rows llama.cpp's converter permutes

LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}

# How llama.cpp splits text before BPE, by tokenizer.ggml.pre (llama-vocab.cpp); None: GPT-2's own regex.
GPT2_SPLIT = None
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": GPT2_SPLIT, "gpt-2": GPT2_SPLIT, "gpt2": GPT2_SPLIT, "smollm": "digits",
                  "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
                  "qwen2": QWEN2_SPLIT}
# llama.cpp adds BOS for these vocabularies when the file has no tokenizer.ggml.add_bos_token.
BOS_BY_DEFAULT = ("llama3", "llama-v3", "llama-bpe")


def read_gguf(path: str | pathlib.Path):
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped); errors name the file."""
    from gguf import GGUFReader

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, source: str = "GGUF") -> LlamaConfig:
    arch = _meta(reader, "general.architecture")
    if arch not in SUPPORTED:
        raise ValueError(f"{source}: general.architecture is {arch!r}; labkit reads Llama-family GGUF files "
                         f"{SUPPORTED}")

    def need(key):
        value = _meta(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{source}: metadata {arch}.{key} is missing")
        return value

    if _meta(reader, f"{arch}.expert_count"):
        raise ValueError(f"{source}: a mixture-of-experts model ({arch}.expert_count); labkit's Llama is dense")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(f"{source}: per-frequency RoPE factors (rope_freqs, Llama 3.1 style) are not read from "
                         "GGUF; load the Hugging Face directory of this model instead")
    scaling = _meta(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"{source}: RoPE scaling {scaling!r} is not supported (labkit reads none or linear from GGUF)")
    heads = need("attention.head_count")
    hidden = need("embedding_length")
    head_dim = _meta(reader, f"{arch}.attention.key_length") or hidden // heads
    rot = _meta(reader, f"{arch}.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise ValueError(f"{source}: RoPE rotates {rot} of {head_dim} dimensions per head; labkit rotates all")
    tokens = _meta(reader, "tokenizer.ggml.tokens") or []
    eos = _meta(reader, "tokenizer.ggml.eos_token_id")
    eot = _meta(reader, "tokenizer.ggml.eot_token_id")  # end of turn (Llama 3 instruct): a second stop id
    eos_ids = [t for t in (eos, eot) if t is not None]
    return LlamaConfig(
        vocab_size=_meta(reader, f"{arch}.vocab_size") or len(tokens),
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_meta(reader, f"{arch}.attention.head_count_kv") or heads,
        head_dim=head_dim,
        max_position_embeddings=need("context_length"),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_meta(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=({"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
                      if scaling == "linear" else None),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        qkv_bias=arch == "qwen2",
        model_type=arch,
        bos_token_id=_meta(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else (list(dict.fromkeys(eos_ids)) or None),
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every token with these)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_gguf(reader, config: LlamaConfig, source: str = "GGUF") -> Tokenizer:
    """A byte-level BPE Tokenizer from ``tokenizer.ggml.*`` (SmolLM2, Llama 3, Qwen2 vocabularies)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as _Tokenizer

    kind = _meta(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model is {kind!r}; labkit builds byte-level BPE ('gpt2') "
                         "vocabularies from GGUF. Load the model's Hugging Face directory for its tokenizer.json")
    pre = _meta(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{source}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not known to labkit; "
                         f"known: {sorted(PRE_TOKENIZERS)}. Load the model's Hugging Face directory instead")
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    types = _meta(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = _meta(reader, "tokenizer.ggml.merges")
    if tokens is None or merges is None:
        raise ValueError(f"{source}: tokenizer.ggml.tokens / tokenizer.ggml.merges are missing")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens are stored byte-level spelled; a control token written in other characters is re-spelled.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    tok = _Tokenizer(bpe)
    split = PRE_TOKENIZERS[pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":  # llama.cpp's "smollm": every digit alone, then GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # CONTROL tokens (type 3) are special: matched whole, skipped by decode; USER_DEFINED (4) matched whole.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == 3 and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4])
    add_bos = _meta(reader, "tokenizer.ggml.add_bos_token", pre in BOS_BY_DEFAULT)
    add_eos = _meta(reader, "tokenizer.ggml.add_eos_token", False)
    special_ids = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}  # the template variables transformers passes, as text
    special = {}
    for name, key in special_ids.items():
        token_id = _meta(reader, f"tokenizer.ggml.{key}")
        special[name] = tokens[token_id] if token_id is not None else None
    return Tokenizer.from_backend(tok, eos_token_id=config.eos_token_id, bos_token_id=config.bos_token_id,
                                  add_bos_token=bool(add_bos), add_eos_token=bool(add_eos),
                                  chat_template=_meta(reader, "tokenizer.chat_template"), special_tokens=special)


def unpermute(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation. Per head, the converter reorders the head_dim rows
    ``[x0 .. x(D/2-1) | y0 .. y(D/2-1)]`` (HF: rotate_half pairs i with i + D/2) into ``x0 y0 x1 y1 ...``
    (ggml's RoPE pairs neighbours); this puts them back. Works on any tensor whose first axis is rows
    (weights, biases, packed int4 codes, their scales)."""
    n = rows.shape[0]
    d = n // n_heads
    return rows.reshape(n_heads, d // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _hf_name(name: str) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    return None


def _blocks(t) -> np.ndarray:
    """A quantised tensor's bytes as (rows, blocks, bytes per block)."""
    from gguf import GGML_QUANT_SIZES

    _, type_size = GGML_QUANT_SIZES[t.tensor_type]
    data = np.asarray(t.data)
    return data.reshape(data.shape[0], -1, type_size)


def _native_int4(t):
    """(scheme, qweight, scales, zeros or mins) of a Q4_0 / Q4_1 tensor, bytes copied as they are."""
    from gguf import GGMLQuantizationType as Q

    b = _blocks(t)
    rows = b.shape[0]
    if t.tensor_type == Q.Q4_1:  # block: d fp16 | m fp16 | 16 bytes of codes
        d = torch.from_numpy(b[:, :, 0:2].copy().view(np.float16)[..., 0])
        m = torch.from_numpy(b[:, :, 2:4].copy().view(np.float16)[..., 0])
        q = torch.from_numpy(b[:, :, 4:].reshape(rows, -1).copy())
        return "int4_fmin_g32", q, d, m
    d = torch.from_numpy(b[:, :, 0:2].copy().view(np.float16)[..., 0])  # Q4_0 block: d fp16 | 16 bytes
    q = torch.from_numpy(b[:, :, 2:].reshape(rows, -1).copy())
    return "int4_g32", q, d, torch.full(d.shape, 8, dtype=torch.uint8)


def _dequantized(t) -> torch.Tensor:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    if t.tensor_type == Q.BF16:  # stored as raw uint16 words
        return torch.from_numpy(np.asarray(t.data).copy().view(np.int16)).view(torch.bfloat16).float()
    try:
        w = dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError:
        raise ValueError(f"tensor {t.name!r}: ggml type {t.tensor_type.name} cannot be dequantised by gguf "
                         f"{_gguf_version()}; upgrade gguf or re-convert the model") from None
    shape = tuple(int(s) for s in reversed(t.shape))  # ggml lists dimensions innermost first
    return torch.from_numpy(np.array(w, dtype=np.float32)).reshape(shape)  # a copy: the file is read-only


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def read_tensors(reader, config: LlamaConfig, keep_quantized: bool = False, source: str = "GGUF"):
    """(float state dict in Hugging Face names, {linear name: (scheme, qweight, scales, zeros_or_mins)})."""
    from gguf import GGMLQuantizationType as Q

    state, quantized = {}, {}
    permute = config.model_type in PERMUTED
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise ValueError(f"{source}: tensor {t.name!r} has no place in a {config.model_type} model")
        heads = (config.num_attention_heads if ".q_proj." in name else
                 config.num_key_value_heads if ".k_proj." in name else None)
        fix = (lambda x: unpermute(x, heads)) if permute and heads else (lambda x: x)
        native = keep_quantized and t.tensor_type in (Q.Q4_0, Q.Q4_1) and name.endswith("_proj.weight")
        if native:
            scheme, q, s, z = _native_int4(t)
            quantized[name[: -len(".weight")]] = (scheme, fix(q), fix(s), fix(z))
        else:
            state[name] = fix(_dequantized(t))
    return state, quantized


def load_gguf(path: str | pathlib.Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              keep_quantized: bool = False, reader=None):
    """(model, tokenizer) from a GGUF file; see the module docstring. ``keep_quantized``: Q4_0/Q4_1 linears
    become QuantLinears holding the file's own codes, scales and minima (fp16), all else ``dtype``.
    ``reader``: a :func:`read_gguf` of ``path`` to reuse (parsing the header of a 49k-token vocabulary
    takes gguf's reader several seconds)."""
    from labkit.checkpoint import build_model
    from labkit.quant import QuantLinear

    path = pathlib.Path(path)
    reader = read_gguf(path) if reader is None else reader
    config = config_from_gguf(reader, str(path))
    has_vocab = _meta(reader, "tokenizer.ggml.model") is not None  # None, as for a directory without tokenizer.json
    tokenizer = tokenizer_from_gguf(reader, config, str(path)) if has_vocab else None
    state, quantized = read_tensors(reader, config, keep_quantized, str(path))
    model = build_model(config, state, {k: path for k in state}, dtype, device,
                        skip={f"{name}.weight" for name in quantized})
    for name, (scheme, q, s, z) in quantized.items():
        parent_name, child_name = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        child = getattr(parent, child_name)
        setattr(parent, child_name, QuantLinear.from_codes(scheme, q, s, z, child.in_features, child.bias))
    return model.to(device).eval(), tokenizer
