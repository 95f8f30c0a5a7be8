"""labkit's Llama must compute what transformers' Llama / Qwen2 compute, from the same checkpoint files."""
import json

import pytest
import torch

import labkit  # noqa: F401
from labkit.generate import generate
from labkit.kv_cache import ContiguousCache
from labkit.checkpoint import load_pretrained

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama-tied-bias": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                high_freq_factor=4.0, original_max_position_embeddings=32))),
    "linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


def _hf_model(case, seed):
    cfg_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**BASE, **extra)
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():  # HF inits biases and norms to constants; randomise so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match(case, tmp_path):
    hf = _hf_model(case, seed=len(case))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours, _ = load_pretrained(tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (got - ref).abs().max().item() < 1e-4

    prompt = ids[0, :7]
    with torch.no_grad():
        hf_out = hf.generate(prompt[None], max_new_tokens=20, do_sample=False, min_new_tokens=20,
                             pad_token_id=0)[0, 7:].tolist()
    assert generate(ours, prompt, 20).token_ids == hf_out
    assert generate(ours, prompt, 20, cache=ContiguousCache(ours.config, 1, 64)).token_ids == hf_out


def test_reads_old_and_new_rope_layouts(tmp_path):
    hf = _hf_model("llama3-rope", seed=3)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    ref, _ = load_pretrained(tmp_path)
    scaling = dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"} | {"rope_theta": 500000.0, "rope_scaling": scaling}
    new = {k: v for k, v in cfg.items() if k not in ("rope_scaling", "rope_theta")} | {
        "rope_parameters": {"rope_theta": 500000.0, **{("rope_type" if k == "type" else k): v for k, v in scaling.items()}}}
    for layout in (old, new):
        (tmp_path / "config.json").write_text(json.dumps(layout))
        model, _ = load_pretrained(tmp_path)
        assert model.config.rope_theta == 500000.0 and model.config.rope_scaling["rope_type"] == "llama3"
        assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)


def test_sharded_checkpoint(tmp_path):
    hf = _hf_model("llama", seed=5)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, _ = load_pretrained(tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (1, 16))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
