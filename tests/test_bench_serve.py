"""The serving benchmark's pieces on the CPU: the random-weight model directory the GPU run serves, and a
tiny run whose rows have the recorded file's schema."""
from __future__ import annotations

import argparse

import httpx
import pytest

import labkit  # noqa: F401
from labkit.bench import serve as bench
from labkit.server.process import ServerProcess

pytestmark = pytest.mark.timeout(300)


def test_random_model_directory_serves_token_id_prompts(tmp_path):
    shape = {**bench.LLAMA_32_1B, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    bench.random_model_dir(tmp_path, "cpu", shape)
    with ServerProcess("--dtype", "bfloat16", "--num-blocks", "64", model=tmp_path) as s:
        body = {"model": str(tmp_path), "prompt": list(range(900, 940)), "max_tokens": 12, "ignore_eos": True,
                "temperature": 0}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()
    assert r["usage"] == {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}
    words = r["choices"][0]["text"].split()
    assert len(words) == 12 and all(w.startswith("w") and 0 <= int(w[1:]) < 1000 for w in words)


@pytest.mark.slow
def test_tiny_run_has_the_recorded_schema():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = bench.run(p.parse_args(["--tiny", "--users", "1,2", "--requests-per-user", "2", "--output-len", "4"]))
    servers = {(r["server"], r["users"]) for r in out["rows"]}
    assert servers == {(s, u) for s in ("naive", "engine", "engine_offline") for u in (1, 2)}
    for r in out["rows"]:
        assert {"server", "users", "output_tok_s", "ttft_p99_s", "tpot_p50_s", "errors"} <= set(r)
        assert r["output_tok_s"] > 0 and r["errors"] == {}
    assert out["served_over_offline_at_max_users"] > 0
