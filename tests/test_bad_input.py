"""Every bad input a user can hand the lab is refused with a message that names it, and changes nothing.

Each case asserts the message (what was wrong, what to do) and that nothing changed: the files, the
model, the cache. Grouped by where the user meets it: loading, tokenising, generating, caches,
quantising, and the command-line tools (a usage error: exit status 2, one line on stderr, no traceback).
"""
from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import labkit  # noqa: F401
from labkit.checkpoint import DEFAULT_MODEL_DIR, load_pretrained, save_pretrained
from labkit.config import LlamaConfig
from labkit.generate import generate
from labkit.kv_cache import ContiguousCache
from labkit.model import LlamaForCausalLM
from labkit.engine.kv_store import PagedKVStore
from labkit.quant import QuantLinear, quantize_model, quantize_tensor

TINY = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, eos_token_id=1)
ROOT = DEFAULT_MODEL_DIR.parents[1]


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(TINY).eval()


def digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_params(model, before) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


@pytest.fixture
def model_dir(tmp_path):
    save_pretrained(tiny_model(), tmp_path)
    return tmp_path


def rewrite_weights(path, change):
    state = load_file(path / "model.safetensors")
    change(state)
    save_file(state, path / "model.safetensors")


# ----------------------------------------------------------------------------------------------- loading
def test_nan_weights_are_named(model_dir):
    rewrite_weights(model_dir, lambda s: s["model.layers.1.mlp.up_proj.weight"].view(-1)[7:9].fill_(float("nan")))
    before = digest(model_dir)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' holds 2 "
                                         r"NaN/inf value\(s\).*corrupt"):
        load_pretrained(model_dir)
    assert digest(model_dir) == before


def test_integer_weights_are_named(model_dir):
    rewrite_weights(model_dir, lambda s: s.update({"model.norm.weight": s["model.norm.weight"].to(torch.int32)}))
    with pytest.raises(ValueError, match=r"'model.norm.weight' is torch.int32; weights must be floating point"):
        load_pretrained(model_dir)


def test_names_under_another_prefix_say_so(model_dir):
    def wrap(state):
        for k in list(state):
            state["base_model.model." + k] = state.pop(k)
    rewrite_weights(model_dir, wrap)
    before = digest(model_dir)
    with pytest.raises(ValueError, match=r"names start with 'base_model.model.model.' where labkit expects 'model.'"
                                         r".*rename them"):
        load_pretrained(model_dir)
    assert digest(model_dir) == before


def test_saved_quantised_model_loads_back_quantised(tmp_path):
    model = quantize_model(tiny_model(), "int4_g32")
    save_pretrained(model, tmp_path)
    again, _ = load_pretrained(tmp_path)
    assert isinstance(again.model.layers[0].mlp.up_proj, QuantLinear)
    ids = torch.randint(0, TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_quantised_weights_without_their_scheme_say_how_to_load(tmp_path):
    model = quantize_model(tiny_model(), "int8")
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["quantization_config"]  # e.g. written by hand with quantize_state_dict
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weights are quantised .*qweight.*load_quantized_state_dict"):
        load_pretrained(tmp_path)


def test_ternary_directory_points_to_its_loader(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text()) | {"quantization": {"method": "ternary_absmean"}}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="ternary.*load_ternary"):
        load_pretrained(model_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_cuda_without_cuda(model_dir):
    with pytest.raises(ValueError, match=r"device='cuda' but this torch .* sees no CUDA device: use device='cpu'"):
        load_pretrained(model_dir, device="cuda")


def test_integer_dtype_is_refused(model_dir):
    with pytest.raises(ValueError, match=r"dtype must be a floating-point torch dtype.*torch.int8"):
        load_pretrained(model_dir, dtype=torch.int8)


# ----------------------------------------------------------------------------------------------- tokenising
@pytest.fixture(scope="module")
def shipped_tokenizer():
    return load_pretrained(DEFAULT_MODEL_DIR)[1]


@pytest.mark.parametrize("ids, match", [
    ([5, 99999], r"token id 99999 at position 1 is outside the vocabulary \(ids 0..4095, vocab_size 4096\)"),
    ([-1], r"token id -1 at position 0 is outside the vocabulary"),
    ([3, 2.0], r"token id at position 1 is 2.0, not an integer"),
    (torch.tensor([1.0, 2.0]), r"token ids must be integers, got a torch.float32 tensor"),
])
def test_decode_of_invalid_ids(shipped_tokenizer, ids, match):
    with pytest.raises(ValueError, match=match):
        shipped_tokenizer.decode(ids)


def test_encode_and_chat_template_misuse(shipped_tokenizer):
    with pytest.raises(ValueError, match="encode expects a str, got list"):
        shipped_tokenizer.encode([1, 2])
    with pytest.raises(ValueError, match="has no chat template.*write the prompt yourself"):
        shipped_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match=r"messages\[1\] = 'Hi': each message needs a string 'role'"):
        shipped_tokenizer.apply_chat_template([{"role": "user", "content": "a"}, "Hi"], chat_template="{{ 1 }}")
    with pytest.raises(ValueError, match="refused this conversation: only users"):
        shipped_tokenizer.apply_chat_template([{"role": "system", "content": "a"}], chat_template=(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('only users') }}{% endif %}"))


# ----------------------------------------------------------------------------------------------- generating
@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1, got 0"),
    (dict(max_new_tokens=2.5), r"max_new_tokens must be an integer >= 1, got 2.5"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an integer >= 1, got True"),
    (dict(top_k=-2, temperature=1.0), r"top_k must be an integer >= 1, or 0 / -1 / None for off, got -2"),
    (dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\] \(1 = off\), got 0.0"),
    (dict(temperature=-0.5), r"temperature must be a finite number >= 0 \(0 = greedy\), got -0.5"),
    (dict(temperature=float("nan")), r"temperature must be a finite number >= 0"),
    (dict(prompt_ids=[3, 1.5]), r"prompt_ids\[1\] is 1.5, not an integer token id"),
    (dict(prompt_ids=[3, 50]), r"prompt_ids\[1\] = 50 is not a token of this model: ids run 0..49 \(vocab_size 50\)"),
    (dict(prompt_ids=[-4]), r"prompt_ids\[0\] = -4 is not a token of this model"),
    (dict(prompt_ids=torch.tensor([1.0, 2.0])), r"prompt_ids must hold integer token ids, got a torch.float32 tensor"),
    (dict(prompt_ids="Hello"), r"prompt_ids must be token ids, got text: encode it first"),
    (dict(eos_token_id=[1, 77]), r"eos_token_id\[1\] = 77 is not a token of this model"),
    (dict(max_new_tokens=40), r"prompt \(3\) \+ max_new_tokens \(40\) exceeds the model's context \(32\)"),
])
def test_generate_refuses_bad_arguments_before_touching_the_cache(kwargs, match):
    model = tiny_model()
    cache = ContiguousCache(model.config, 1, 32)
    args = dict(prompt_ids=[3, 4, 5], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, args.pop("prompt_ids"), args.pop("max_new_tokens"), cache=cache, **args)
    assert int(cache.seq_lens.sum()) == 0 and not cache.k.any(), "the cache was written before the refusal"


def test_top_k_zero_and_top_p_one_mean_off_as_in_hugging_face():
    model = tiny_model()
    plain = generate(model, [3, 4], 6, temperature=1.0, seed=7).token_ids
    assert generate(model, [3, 4], 6, temperature=1.0, top_k=0, top_p=1.0, seed=7).token_ids == plain
    assert generate(model, [3, 4], 6, temperature=1.0, top_k=-1, seed=7).token_ids == plain


def test_nan_logits_are_reported():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="the model produced NaN logits; check the weights"):
        generate(model, [3, 4], 4)


# ----------------------------------------------------------------------------------------------- caches
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float8_e4m3fn])
def test_caches_refuse_unscaled_low_precision_dtypes(dtype):
    with pytest.raises(ValueError, match=rf"ContiguousCache stores K/V unscaled.*got {dtype}.*kv_cache_dtype='int8'"):
        ContiguousCache(TINY, batch_size=1, max_len=8, dtype=dtype)
    with pytest.raises(ValueError, match=rf"PagedKVStore stores K/V unscaled.*got {dtype}.*kv_cache_dtype='int8'"):
        PagedKVStore(TINY, num_blocks=2, block_size=4, dtype=dtype)


# ----------------------------------------------------------------------------------------------- quantising
def test_quantize_model_is_all_or_nothing():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[2, 3] = float("inf")  # a late layer fails
    before = params_of(model)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.o_proj: the weight holds NaN or inf.*"
                                         r"\(nothing was quantised\)"):
        quantize_model(model, "int4_g32")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert same_params(model, before)


def test_fp16_scales_that_would_underflow_or_overflow_are_refused():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(1e-9)  # scales ~1e-11: below fp16's smallest normal
    before = params_of(model)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj: int4_g32 scales as small as .* underflow "
                                         r"torch.float16.*scale_dtype=torch.float32"):
        quantize_model(model, "int4_g32", scale_dtype=torch.float16)
    assert same_params(model, before) and not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(ValueError, match=r"int8 scales up to 7.87e\+04 overflow torch.float16"):
        quantize_tensor(torch.full((2, 32), 1e7), "int8", scale_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"int4_fmin_g32 minima up to 1e\+05 overflow torch.float16"):
        quantize_tensor(torch.full((2, 32), -1e5), "int4_fmin_g32", scale_dtype=torch.float16)
    assert quantize_tensor(torch.full((2, 32), -1e5), "int4_fmin_g32").mins.dtype == torch.float32  # fp32: fine


# ----------------------------------------------------------------------------------------------- commands
def run_cli(main, argv, capsys) -> str:
    """The one stderr line of a usage error (argparse prints its usage line first)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A tiny model with the shipped tokenizer, written by save_pretrained (tokenizer included)."""
    path = tmp_path_factory.mktemp("saved")
    tok = load_pretrained(DEFAULT_MODEL_DIR)[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, eos_token_id=0)
    save_pretrained(LlamaForCausalLM(cfg), path, tokenizer=tok)
    return path


def test_evaluate_runs_on_a_directory_save_pretrained_wrote(saved_dir, capsys):
    from labkit.evaluate import main

    main(["--model", str(saved_dir), "--max-tokens", "128"])
    out = capsys.readouterr().out
    assert "held-out perplexity" in out and "over 128 of" in out


@pytest.mark.parametrize("argv, match", [
    (["--max-tokens", "-1"], r"--max-tokens must be >= 0 \(0 scores every held-out token\), got -1"),
    (["--max-tokens", "many"], r"argument --max-tokens: invalid int value: 'many'"),
    (["--model", "no/such/dir"], r"--model no/such/dir: no such directory or file"),
    (["--device", "tpu"], r"--device: device='tpu'.*use 'cpu' or 'cuda'"),
    (["--frobnicate"], r"unrecognized arguments: --frobnicate"),
])
def test_evaluate_usage_errors(argv, match, capsys):
    from labkit.evaluate import main

    assert __import__("re").search(match, run_cli(main, argv, capsys))


def test_evaluate_without_a_tokenizer_says_how_to_save_one(saved_dir, tmp_path, capsys):
    from labkit.evaluate import main

    save_pretrained(load_pretrained(saved_dir)[0], tmp_path)  # no tokenizer= this time
    line = run_cli(main, ["--model", str(tmp_path)], capsys)
    assert "has no tokenizer.json" in line and "save_pretrained(model, dir, tokenizer=tokenizer)" in line


@pytest.mark.parametrize("argv, match", [
    (["--max-tokens", "0"], r"--max-tokens must be >= 1, got 0"),
    (["--sample-tokens", "0"], r"--sample-tokens must be >= 1, got 0"),
    (["--variants", "int3"], r"argument --variants: invalid choice: 'int3'"),
    (["--model", "missing.gguf"], r"--model missing.gguf: no such directory or file"),
    (["--out", "no/such/dir/t.json"], r"--out no/such/dir/t.json: the folder no/such/dir does not exist"),
])
def test_quality_usage_errors(argv, match, capsys):
    from labkit.quality import main

    assert __import__("re").search(match, run_cli(main, argv, capsys))


@pytest.mark.parametrize("value", ["0", "-3"])
def test_kv_quant_max_tokens(value, capsys):
    from labkit.kv_quant import main

    assert run_cli(main, ["--max-tokens", value], capsys).endswith(f"--max-tokens must be >= 1, got {value}")


def test_a_usage_error_is_one_line_and_exit_2_from_the_shell():
    r = subprocess.run([sys.executable, "-m", "labkit.evaluate", "--max-tokens", "-5"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.endswith("--max-tokens must be >= 0 (0 scores every held-out token), got -5")
