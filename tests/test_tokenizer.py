"""labkit's Tokenizer adds BOS/EOS exactly where transformers' AutoTokenizer does, from the same files.

The rules under test: tokenizer.json's post-processor decides (transformers 5 ignores tokenizer_config.json's
add_bos_token / add_eos_token next to a tokenizer.json); EOS ids come from config.json and generation_config.json;
what save_pretrained writes loads back in both libraries. SmolLM2's own cases are in test_gguf.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as HFBackend, models, pre_tokenizers, processors, decoders

from labkit.checkpoint import DEFAULT_MODEL_DIR, load_pretrained, save_pretrained
from labkit.config import LlamaConfig
from labkit.corpus import load_text
from labkit.model import LlamaForCausalLM
from labkit.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXT = "It is a truth universally acknowledged, that Mr. Darcy\u2014na\u00efve!\n\nCHAPTER 1 <|endoftext|> 2024"


def test_shipped_model_encodes_as_transformers_does():
    _, tok = load_pretrained(DEFAULT_MODEL_DIR)
    hf = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    text = load_text("heldout")[:5000] + TEXT
    assert tok.encode(text) == hf(text).input_ids
    assert tok.bos_token_id is None and tok.encode("It")[0] != 0, "the Austen tokenizer adds no BOS"


def _llama3_style_dir(path, post_processor: bool, config_flags: dict | None, eos=(5, 6), gen_eos=None):
    """A byte-level tokenizer whose tokenizer.json adds BOS through its post-processor (as Llama 3's does)."""
    from labkit.gguf_loader import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}  # ids 0..255; the special tokens get 256..263
    backend = HFBackend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<unk>", "<pad>", "<x>", "<y>", "<|end_of_text|>", "<|eot_id|>", "<z>"]
    from tokenizers import AddedToken
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert backend.token_to_id("<|begin_of_text|>") == len(vocab)  # added after the 256 byte tokens
    bos = backend.token_to_id("<|begin_of_text|>")
    if post_processor:
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)])
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    eos_ids = [backend.token_to_id(specials[i]) for i in eos]
    cfg = LlamaConfig(vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=bos, eos_token_id=eos_ids)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    if config_flags is not None:
        (path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>", **config_flags}))
    if gen_eos is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": gen_eos}))
    return cfg


@pytest.mark.parametrize("post_processor, flags", [
    (True, None),                                          # Llama 3: tokenizer.json adds BOS
    (True, {}),                                            # a config without flags keeps it
    (True, {"add_bos_token": False}),                      # the config's flag does not override tokenizer.json
    (False, {"add_bos_token": True}),                      # nor add what tokenizer.json does not
    (False, {"add_bos_token": True, "add_eos_token": True}),
    (False, None),                                         # neither: no special tokens
])
def test_bos_and_eos_follow_the_files_as_transformers_does(tmp_path, post_processor, flags):
    cfg = _llama3_style_dir(tmp_path / "tok", post_processor, flags)
    ours = Tokenizer.from_dir(tmp_path / "tok", cfg)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in ("hello world", "", " <|eot_id|> x"):
        assert ours.encode(text) == hf(text).input_ids, (text, ours.encode(text), hf(text).input_ids)


def test_eos_ids_are_a_list_from_config_and_generation_config(tmp_path):
    cfg = _llama3_style_dir(tmp_path / "tok", True, None, eos=(5,), gen_eos=[256 + 5, 256 + 6])
    assert cfg.eos_token_id == [256 + 5]
    tok = Tokenizer.from_dir(tmp_path / "tok", cfg)
    assert tok.eos_token_ids == (256 + 5, 256 + 6) and tok.eos_token_id == 256 + 5


def test_save_pretrained_writes_a_tokenizer_that_loads_back(tmp_path):
    _, tok = load_pretrained(DEFAULT_MODEL_DIR)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         eos_token_id=0))
    save_pretrained(model, tmp_path, tokenizer=tok)
    again = load_pretrained(tmp_path)[1]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(TEXT) == tok.encode(TEXT) == hf(TEXT).input_ids
    chat = [{"role": "user", "content": "Hello"}]
    assert again.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=True, return_dict=False)
