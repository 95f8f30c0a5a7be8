"""Bad model directories fail with an error that names the file and the problem."""
import json

import pytest
import torch
from safetensors.torch import save_file

from labkit.config import LlamaConfig
from labkit.checkpoint import load_pretrained, save_pretrained
from labkit.model import LlamaForCausalLM

TINY = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    save_pretrained(LlamaForCausalLM(TINY), tmp_path)
    return tmp_path


def test_round_trip(model_dir):
    model, tok = load_pretrained(model_dir)
    assert tok is None and model.config == LlamaConfig.from_file(model_dir / "config.json")


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(model_dir)


def test_malformed_config(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json.*not valid JSON"):
        load_pretrained(model_dir)


def test_unknown_architecture(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text()) | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gpt2.*not a Llama-family"):
        load_pretrained(model_dir)


def test_missing_weights_file(model_dir):
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_pretrained(model_dir)


def test_missing_tensor(model_dir):
    from safetensors.torch import load_file
    state = load_file(model_dir / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, model_dir / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.up_proj"):
        load_pretrained(model_dir)


def test_shape_mismatch_names_the_file_and_tensor(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text()) | {"intermediate_size": 64}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.safetensors.*gate_proj.weight.*\(48, 32\).*\(64, 32\)"):
        load_pretrained(model_dir)


def test_corrupt_safetensors(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="model.safetensors.*cannot read"):
        load_pretrained(model_dir)


def test_bad_config_values():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        LlamaConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="not supported"):
        LlamaConfig.from_hf_dict({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                                  "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
