"""The shipped default model (data/model/): loads, has the documented shape, and has learnt Austen."""
import collections
import json
import math

import pytest
import torch
from safetensors import safe_open

from labkit.checkpoint import DEFAULT_MODEL_DIR
from labkit.corpus import AUSTEN_DIR, DOC_SEPARATOR, load_text
from labkit.evaluate import mean_loss
from labkit.checkpoint import load_pretrained

SLICE_TOKENS = 4096  # the first 8 windows of the held-out chapters: ~2 s on a CPU


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained(DEFAULT_MODEL_DIR)


def test_config_and_files(shipped):
    model, tok = shipped
    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 4, 32)  # GQA for the notebooks
    assert c.tie_word_embeddings and c.vocab_size == tok.vocab_size == 4096 and c.eos_token_id == 0
    assert 4e6 < model.num_parameters < 7e6
    cfg = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    with safe_open(str(DEFAULT_MODEL_DIR / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    shipped_bytes = sum(p.stat().st_size for d in (DEFAULT_MODEL_DIR, AUSTEN_DIR) for p in d.iterdir())
    assert shipped_bytes <= 20 * 2**20


def test_tokenizer_round_trips_and_matches_transformers(shipped):
    _, tok = shipped
    text = "It is a truth universally acknowledged, that Mr. Darcy\u2014na\u00efve!\n\nCHAPTER 1"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(DOC_SEPARATOR) == [0]
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(DEFAULT_MODEL_DIR / "tokenizer.json"))
    assert fast(text)["input_ids"] == tok.encode(text)


def test_heldout_perplexity_far_below_unigram(shipped):
    model, tok = shipped
    held = torch.tensor(tok.encode(load_text("heldout")), dtype=torch.long)[:SLICE_TOKENS + 1]
    loss, scored = mean_loss(model, held)
    assert scored == SLICE_TOKENS
    ppl = math.exp(loss)

    # Unigram baseline, computed here: each token's add-one-smoothed frequency in the train split.
    counts = collections.Counter(tok.encode(load_text("train")))
    total = sum(counts.values()) + tok.vocab_size
    unigram = math.exp(-sum(math.log((counts[t] + 1) / total) for t in held[1:].tolist()) / SLICE_TOKENS)

    assert unigram > 400, f"unigram baseline {unigram:.1f}: the slice or the tokenizer changed"
    # The shipped model scores ~46 here (card: ~40 on 16k tokens); a unigram model ~630.
    assert ppl < 60 and ppl < unigram / 10, f"held-out perplexity {ppl:.2f} vs unigram {unigram:.1f}"
