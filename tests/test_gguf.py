"""GGUF files load into labkit's Llama as transformers' own GGUF loader reads them: config, tokenizer, logits.

Two sources: tiny files written here with gguf's writer, the way llama.cpp's converter writes them (q/k rows
permuted, Q4_0 / Q4_1 blocks), which always run; and SmolLM2-135M-Instruct (Q4_1, `make models`), which
CI fetches and which is skipped with a reason where the file is absent.
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import labkit  # noqa: F401
from labkit.checkpoint import SMOLLM2_GGUF, load_pretrained
from labkit.generate import generate
from labkit.gguf_loader import load_gguf, read_gguf
from labkit.quant import QuantLinear

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loading needs it

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOLLM2 = SMOLLM2_GGUF
needs_smollm2 = pytest.mark.skipif(not SMOLLM2.exists(), reason=f"{SMOLLM2.relative_to(ROOT)} is missing: "
                                   "`make models` fetches it (CI does, through `make test`)")
Q = gguf.GGMLQuantizationType

# ---------------------------------------------------------------------------------------------- tiny files
TINY = dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, written out independently of labkit's inverse."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_level_vocab() -> list[str]:
    from labkit.gguf_loader import _bytes_to_unicode

    return list(_bytes_to_unicode().values()) + ["Ġt", "he", "<|bos|>", "<|eos|>"]


def write_tiny_gguf(path: pathlib.Path, linear_type=Q.F32, tied: bool = False, seed: int = 0):
    """A tiny random Llama in HF layout, written as GGUF the converter's way; returns the HF model."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**TINY, tie_word_embeddings=tied, bos_token_id=258, eos_token_id=259)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(TINY["num_hidden_layers"])
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(TINY["num_attention_heads"])
    w.add_head_count_kv(TINY["num_key_value_heads"])
    w.add_rope_dimension_count(TINY["head_dim"])
    w.add_rope_freq_base(TINY["rope_theta"])
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    w.add_vocab_size(TINY["vocab_size"])
    tokens = _byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3, 3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in hf.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name in names:
            gname = names[name]
        else:
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gname = f"blk.{layer}.{parts[rest]}.weight"
        data = t.numpy().astype(np.float32)
        if "q_proj" in name:
            data = llama_cpp_permute(data, TINY["num_attention_heads"])
        if "k_proj" in name:
            data = llama_cpp_permute(data, TINY["num_key_value_heads"])
        if gname.startswith("blk.") and "norm" not in gname and linear_type != Q.F32:
            w.add_tensor(gname, gguf.quants.quantize(data, linear_type), raw_dtype=linear_type)
        else:
            w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def hf_from_gguf(path: pathlib.Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("linear_type", [Q.F32, Q.Q4_0, Q.Q4_1], ids=lambda t: t.name)
def test_tiny_gguf_matches_transformers(tmp_path, linear_type):
    path = tmp_path / "tiny.gguf"
    original = write_tiny_gguf(path, linear_type, tied=linear_type == Q.Q4_1)
    ref = hf_from_gguf(path)
    ours, tok = load_pretrained(path)
    native, _ = load_pretrained(path, keep_quantized=True)
    ids = torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        assert (ours(ids) - want).abs().max().item() < 1e-4
        assert torch.equal(native(ids), ours(ids))  # the file's own codes, no re-rounding
        if linear_type == Q.F32:  # nothing lost on the way: the permutation is undone exactly
            assert (ours(ids) - original(ids).logits).abs().max().item() < 1e-5
    quantised = {type(m.self_attn.q_proj) for m in native.model.layers}
    assert quantised == ({QuantLinear} if linear_type != Q.F32 else {torch.nn.Linear})
    if linear_type == Q.Q4_1:
        assert native.model.layers[0].mlp.up_proj.scheme.name == "int4_fmin_g32"
        assert native.lm_head.weight is native.model.embed_tokens.weight
    prompt = ids[0, :5]
    want_tokens = ref.generate(prompt[None], max_new_tokens=8, min_new_tokens=8, do_sample=False,
                               pad_token_id=0)[0, 5:].tolist()
    assert generate(ours, prompt, 8).token_ids == want_tokens
    # BOS as the file says (add_bos_token true here), as transformers' tokenizer from the same file does
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ("the cat", " the then", "<|eos|> x"):
        assert tok.encode(text) == hf_tok(text).input_ids, text
    assert tok.encode("the")[0] == 258


def test_gguf_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 12)
    with pytest.raises(ValueError, match="bad.gguf: not a readable GGUF file"):
        load_pretrained(bad)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_pretrained(tmp_path / "missing.gguf")


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    reader = read_gguf(SMOLLM2)
    model, tok = load_gguf(SMOLLM2, reader=reader)
    native, _ = load_gguf(SMOLLM2, keep_quantized=True, reader=reader)
    return model, native, tok


@pytest.fixture(scope="module")
def smollm2_hf():
    model = hf_from_gguf(SMOLLM2)
    tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    return model, tok


CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@needs_smollm2
def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2, smollm2_hf):
    model, _, tok = smollm2
    ref, hf_tok = smollm2_hf
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.rope_theta == ref.config.rope_parameters["rope_theta"]
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (model(x) - ref(x).logits).abs().max().item()
    assert diff < 1e-4, diff
    want = ref.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    got = generate(model, ids, 12, eos_token_id=tok.eos_token_ids).token_ids
    assert got == want, (tok.decode(got), hf_tok.decode(want))


@needs_smollm2
def test_smollm2_q4_1_loads_natively_without_loss(smollm2):
    model, native, _ = smollm2
    layers = [m for m in native.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 * 30 and {m.scheme.name for m in layers} == {"int4_fmin_g32"}
    assert layers[0].scales.dtype == torch.float16  # Q4_1's own fp16 d and m, not re-rounded
    q = native.model.layers[3].self_attn.k_proj
    assert torch.equal(q.dequantized_weight(), model.model.layers[3].self_attn.k_proj.weight)
    x = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(native(x), model(x))


@needs_smollm2
def test_smollm2_tokenizer_and_chat_template_match_transformers(smollm2, smollm2_hf):
    from labkit.corpus import load_text

    _, _, tok = smollm2
    _, hf_tok = smollm2_hf
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    text = load_text("heldout")[:6000] + " 2024-01-31: 12.5% ünïcödé 東京 😀\n\n\tx <|im_start|>"
    ids = tok.encode(text)
    assert ids == hf_tok(text).input_ids
    assert ids[0] != tok.bos_token_id, "SmolLM2's tokenizer adds no BOS (tokenizer.ggml.add_bos_token false)"
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    for messages in (CHAT, convo):
        for gen_prompt in (True, False):
            want = hf_tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=False) == want
            assert tok.apply_chat_template(messages, add_generation_prompt=gen_prompt) == hf_tok(want).input_ids
