"""labkit's BERT sentence embedder against transformers' BertModel + mean pooling + normalise (what
sentence-transformers runs for all-MiniLM-L6-v2), on the real checkpoint that `make embedder` unpacks."""
import pytest
import torch
import torch.nn.functional as F

from labkit.bert import DEFAULT_EMBEDDER_DIR, load_embedder

pytestmark = pytest.mark.skipif(not (DEFAULT_EMBEDDER_DIR / "model.safetensors").exists(),
                                reason="run `make embedder` (make test does) to fetch all-MiniLM-L6-v2")

TEXTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
         "must be in want of a wife.",
         "Emma Woodhouse, handsome, clever, and rich.",
         "How do I get to Bath?",
         "x" * 3 + " word " * 300]  # longer than max_seq_length: truncated to 256 tokens


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_EMBEDDER_DIR))
    model = transformers.BertModel.from_pretrained(str(DEFAULT_EMBEDDER_DIR), attn_implementation="eager").eval()
    return tok, model


@pytest.mark.timeout(120)
def test_embeddings_match_transformers(embedder, reference):
    tok, model = reference
    enc = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    want = F.normalize((hidden * m).sum(1) / m.sum(1), p=2, dim=1)
    ids, mask = embedder.tokenize(TEXTS)
    assert torch.equal(ids, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"])
    got = embedder.embed(TEXTS, batch_size=2)  # batches of 2: padding differs from the reference's, vectors must not
    assert got.shape == (len(TEXTS), 384)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.timeout(60)
def test_similar_sentences_are_closer(embedder):
    v = embedder.embed(["Mr. Darcy danced with Elizabeth.", "Elizabeth and Darcy at the ball.", "The tax rate rose."])
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_bad_inputs_are_refused(embedder, tmp_path):
    with pytest.raises(ValueError, match="list of strings"):
        embedder.embed("one string")
    with pytest.raises(FileNotFoundError, match="make embedder"):
        load_embedder(tmp_path)
