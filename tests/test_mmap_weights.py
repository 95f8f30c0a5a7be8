"""labkit.mmap_weights: the mapped model computes what the loaded one does, without copying; the LRU replay."""
import os

import pytest
import torch

import labkit  # noqa: F401
from labkit.checkpoint import load_pretrained, save_pretrained
from labkit.config import LlamaConfig
from labkit.mmap_weights import expert_cache_replay, load_mmap, measure_generation
from labkit.model import LlamaForCausalLM, rope_inv_freq


@pytest.fixture()
def moe_dir(tmp_path):
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, model_type="mixtral", num_local_experts=4,
                      eos_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    with open(tmp_path / "model.safetensors", "rb+") as f:  # dirty pages cannot be evicted: write them back now
        os.fsync(f.fileno())
    (tmp_path / "tokenizer.json").write_bytes(
        (labkit.checkpoint.DEFAULT_MODEL_DIR / "tokenizer.json").read_bytes())
    return tmp_path


def test_mapped_model_equals_loaded_and_copies_nothing(moe_dir):
    model, _, mapping = load_mmap(moe_dir)
    ref, _ = load_pretrained(moe_dir, dtype=torch.bfloat16)
    ref.model.rotary_emb.inv_freq = rope_inv_freq(ref.config)  # load_pretrained rounds it to bf16 too; mmap keeps fp32
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    base = torch.frombuffer(mapping.mm, dtype=torch.uint8).data_ptr()
    for name, p in model.named_parameters():  # every weight is a view into the mapped file
        assert base <= p.data_ptr() < base + mapping.size, name


def test_eviction_makes_the_next_run_read_the_file(moe_dir):
    model, _, mapping = load_mmap(moe_dir)
    measure_generation(model, mapping, [1, 2, 3], 4)
    mapping.evict()
    if mapping.resident_bytes() > mapping.size // 2:
        pytest.skip("this filesystem keeps the file's pages after POSIX_FADV_DONTNEED (tmpfs?)")
    cold = measure_generation(model, mapping, [1, 2, 3], 4, cold=True)
    assert cold["resident_file_bytes"] > 0 and cold["major_faults"] + cold["minor_faults"] > 0


def test_lru_replay_counts_hits_and_misses():
    trace = torch.zeros(4, 1, 3, dtype=torch.bool)  # steps use experts {0,1}, {0,2}, {0,1}, {0,1}
    for s, used in enumerate([(0, 1), (0, 2), (0, 1), (0, 1)]):
        trace[s, 0, list(used)] = True
    r = expert_cache_replay(trace, capacity=2, bytes_per_expert=10)
    # LRU of 2: miss 0, miss 1 | hit 0, miss 2 (evicts 1) | hit 0, miss 1 (evicts 2) | hit 0, hit 1
    assert (r["misses"], r["hit_rate"], r["bytes_moved_per_token"]) == (4, 0.5, 10.0)
    assert expert_cache_replay(trace, capacity=3, bytes_per_expert=10)["misses"] == 3  # compulsory misses only
