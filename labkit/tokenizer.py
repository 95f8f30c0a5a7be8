"""Text <-> token ids, exactly as the model's own tokenizer files say (a ``tokenizers`` tokenizer underneath).

What a prompt turns into is set by three things the model ships, and each is read, never guessed:

    tokenizer.json            vocabulary, merges, pre-tokenizer, and the post-processor: the one place that
                              says whether encode adds BOS / EOS
    tokenizer_config.json     the special tokens' text, the chat template
    config.json               eos_token_id: one id, or a list (Llama 3 instruct models stop on several);
    generation_config.json    more stop ids

tokenizer_config.json's ``add_bos_token`` / ``add_eos_token`` are *not* applied over a tokenizer.json:
transformers 5 drops them whenever tokenizer.json exists (its post-processor already encodes the choice;
on real Llama 2 / Llama 3 repositories the two agree). A GGUF file has no tokenizer.json, so there the
flags ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` build the post-processor
(:mod:`labkit.gguf_loader`). So ``encode`` adds BOS only where the model's authors said so: the shipped
Austen model and SmolLM2 add none, Llama 2 and Llama 3 add one.
"""
from __future__ import annotations

import json
import numbers
import pathlib

import torch

from labkit.chat_template import render_chat_template

__all__ = ["Tokenizer"]

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


class Tokenizer:
    """encode / decode / chat template over a ``tokenizers`` tokenizer.

    ``Tokenizer(path_to_tokenizer_json, eos_token_id, bos_token_id)`` reads one tokenizer.json (its
    post-processor decides what encode adds); :meth:`from_dir` also reads tokenizer_config.json,
    config.json and generation_config.json; :meth:`from_backend` wraps a tokenizer built in memory (GGUF).
    """

    def __init__(self, path: str | pathlib.Path | None = None, eos_token_id: int | list[int] | None = None,
                 bos_token_id: int | None = None, *, backend=None, add_bos_token: bool | None = None,
                 add_eos_token: bool | None = None, chat_template: str | None = None,
                 special_tokens: dict[str, str | None] | None = None):
        from tokenizers import Tokenizer as _Tokenizer

        if backend is None:
            if path is None:
                raise ValueError("Tokenizer needs the path of a tokenizer.json (or backend=)")
            path = pathlib.Path(path)
            if not path.exists():
                raise FileNotFoundError(f"{path}: no tokenizer.json in the model directory")
            try:
                backend = _Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        self._tok = backend
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = _as_ids(eos_token_id)
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self.special_tokens = {name: None for name in SPECIAL_NAMES}
        self.special_tokens.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
        if self.special_tokens["bos_token"] is None and bos_token_id is not None:
            self.special_tokens["bos_token"] = self._tok.id_to_token(bos_token_id)
        if self.special_tokens["eos_token"] is None and self.eos_token_ids:
            self.special_tokens["eos_token"] = self._tok.id_to_token(self.eos_token_ids[0])
        for name, tid in (("bos_token_id", bos_token_id), *(("eos_token_id", t) for t in self.eos_token_ids)):
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ValueError(f"{name} {tid} is outside the tokenizer's vocabulary of {self.vocab_size} tokens")
        # Flags given here (from GGUF metadata) build the post-processor; an absent one counts as False then.
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | pathlib.Path, config=None) -> "Tokenizer":
        """tokenizer.json + tokenizer_config.json (if any) of a model directory; EOS ids from ``config``
        (a LlamaConfig) and generation_config.json, whichever name them. BOS/EOS insertion is
        tokenizer.json's post-processor's (see the module docstring)."""
        path = pathlib.Path(path)
        tok_config = {}
        if (path / "tokenizer_config.json").exists():
            try:
                tok_config = json.loads((path / "tokenizer_config.json").read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path / 'tokenizer_config.json'}: not valid JSON ({e})") from None
        eos = list(_as_ids(getattr(config, "eos_token_id", None)))
        if (path / "generation_config.json").exists():  # Llama 3 instruct lists its extra stop ids here
            try:
                gen = json.loads((path / "generation_config.json").read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path / 'generation_config.json'}: not valid JSON ({e})") from None
            eos += [t for t in _as_ids(gen.get("eos_token_id")) if t not in eos]
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (path / "chat_template.jinja").exists():  # transformers >= 4.50 saves it apart
            template = (path / "chat_template.jinja").read_text()
        return cls(path / "tokenizer.json", eos or None, getattr(config, "bos_token_id", None), chat_template=template,
                   special_tokens={name: _token_text(tok_config.get(name)) for name in SPECIAL_NAMES})

    @classmethod
    def from_backend(cls, backend, **kwargs) -> "Tokenizer":
        return cls(backend=backend, **kwargs)

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        from tokenizers import processors

        bos, eos = self.special_tokens["bos_token"], self.special_tokens["eos_token"]
        if add_bos and self.bos_token_id is None:
            raise ValueError("add_bos_token is true but the model names no bos_token_id")
        if add_eos and not self.eos_token_ids:
            raise ValueError("add_eos_token is true but the model names no eos_token_id")
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = single + " " + " ".join([f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        specials = [(bos, self.bos_token_id)] * add_bos + [(eos, self.eos_token_ids[0])] * add_eos
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    # --- the interface --------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int | None:
        """The first EOS id (what a single-stop caller wants); all of them are ``eos_token_ids``."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with BOS/EOS exactly where the tokenizer files put them."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}; decode() turns ids back into text")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def check_ids(self, ids) -> list[int]:
        """``ids`` as a list of ints, each a token of this vocabulary (an error names the first that is not)."""
        if isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(f"token ids must be integers, got a {ids.dtype} tensor")
            ids = ids.flatten().tolist()
        out = []
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise ValueError(f"token id at position {i} is {t!r}, not an integer")
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} at position {i} is outside the vocabulary "
                                 f"(ids 0..{self.vocab_size - 1}, vocab_size {self.vocab_size})")
            out.append(t)
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(self.check_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids) -> list[str]:
        return [self._tok.decode([i]) for i in self.check_ids(ids)]

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True,
                            chat_template: str | None = None, **kwargs):
        """The conversation rendered with the model's chat template (:mod:`labkit.chat_template`): token
        ids (the template writes any BOS itself, so none is added), or the text with ``tokenize=False``."""
        text = render_chat_template(chat_template or self.chat_template, messages, add_generation_prompt,
                                    self.special_tokens, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save(self, path: str | pathlib.Path) -> None:
        """tokenizer.json + tokenizer_config.json into a model directory; :meth:`from_dir` reads them back
        (and so does transformers' ``AutoTokenizer``)."""
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        if self.add_bos_token is not None or self.add_eos_token is not None:
            cfg.update(add_bos_token=bool(self.add_bos_token), add_eos_token=bool(self.add_eos_token))
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None},
                                                               indent=2, ensure_ascii=False) + "\n")
