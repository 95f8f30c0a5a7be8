"""Serving benchmark: the same closed-loop load through the naive server, the engine server, and the engine
with no server at all (offline), so the figure shows both what batching buys and what HTTP costs.

    engine_offline  LLMEngine driven in this process, ``users`` requests in flight (a new one enters as one ends)
    engine          python -m labkit.serve (FastAPI, SSE streaming) in its own process, labkit.loadtest at it
    naive           python -m labkit.serve --engine naive: generate() one request at a time

Every request has a random token-id prompt of --input-len tokens and runs to --output-len tokens
(``ignore_eos``), as ``vllm bench serve --dataset-name random`` does. The GPU model is a 1B-class Llama
with random weights in Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 KV heads, vocab
128256, tied embeddings, bf16), written once to a temporary directory with a word-level tokenizer of the
same vocabulary so the server can stream text. The naive server stops at --naive-max-users: past it, one
request at a time would take many minutes per point and teach nothing new.

    rows: server, users, num_requests, output_tok_s, ttft_p99_s, tpot_p50_s, errors (+ p50s, requests_s)

GPU: ``python -m labkit.bench serve`` -> data/bench/serve.json.
CPU (tiny, to test it): ``python -m labkit.bench serve --tiny --out /tmp/serve.json`` (the shipped model).
"""
from __future__ import annotations

import json
import pathlib
import tempfile
import time

import numpy as np
import torch

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, eos_token_id=None,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def add_arguments(p) -> None:
    p.add_argument("--tiny", action="store_true", help="CPU: the shipped model, short prompts, few users")
    p.add_argument("--users", default=None, help="comma-separated (default 1,4,16,64; tiny: 1,4)")
    p.add_argument("--requests-per-user", type=int, default=None, help="closed-loop requests per user (default 4)")
    p.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 128; tiny: 16)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens (default 128; tiny: 8)")
    p.add_argument("--naive-max-users", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="KV pool (default 4096 on the GPU, 512 tiny)")


def random_model_dir(path: pathlib.Path, device: str, shape: dict | None = None) -> pathlib.Path:
    """A model directory of random weights (std 0.02, norms 1; Llama-3.2-1B's shape unless ``shape`` says
    otherwise), bf16, with a word-level tokenizer ("w0" ... "w<vocab-1>") of the same vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from labkit.checkpoint import save_pretrained
    from labkit.config import LlamaConfig
    from labkit.model import LlamaForCausalLM

    cfg = LlamaConfig(**(shape or LLAMA_32_1B))
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=gen)
    save_pretrained(model.cpu(), path, dtype=torch.bfloat16)
    del model
    vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return path


def _summary_row(server: str, users: int, n: int, out_tokens: int, wall: float, ttft: list, tpot: list,
                 errors: dict) -> dict:
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
    return {"server": server, "users": users, "num_requests": n, "output_tok_s": out_tokens / wall,
            "requests_s": (n - sum(errors.values())) / wall, "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "tpot_p50_s": pct(tpot, 50), "errors": errors, "wall_s": wall}


def offline(model_dir, users_list, prompts_for, output_len, engine_kw, device, dtype) -> list[dict]:
    """The engine alone: a closed loop in this process (``users`` requests in flight, refilled each step)."""
    from labkit.checkpoint import load_pretrained
    from labkit.engine import EngineConfig, LLMEngine, SamplingParams

    model, _ = load_pretrained(model_dir, dtype=dtype, device=device)
    rows = []
    for users in users_list:
        engine = LLMEngine(model, EngineConfig(**engine_kw), eos_token_ids=(), clock="wall", history_limit=100)
        if hasattr(engine.runner, "capture_all"):
            engine.runner.capture_all(engine.config.max_num_seqs)
        queue = list(prompts_for(users))
        n = len(queue)
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        inflight, done = [], []
        start = time.perf_counter()
        while queue or inflight:
            while queue and len(inflight) < users:
                inflight.append(engine.add_request(queue.pop(0).prompt, params))
            engine.step()
            for s in [s for s in inflight if s.is_finished]:
                inflight.remove(s)
                done.append(s)
                engine.forget(s.seq_id)
        wall = time.perf_counter() - start
        rows.append(_summary_row("engine_offline", users, n, sum(s.num_output_tokens for s in done), wall,
                                 [s.ttft for s in done], [s.tpot for s in done if s.num_output_tokens > 1], {}))
        print(rows[-1], flush=True)
        del engine
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def served(kind, model_dir, users_list, prompts_for, serve_args, threads) -> list[dict]:
    from labkit.loadtest import run_load
    from labkit.server.process import ServerProcess

    rows = []
    with ServerProcess("--engine", kind, *serve_args, model=model_dir, threads=threads, startup_timeout=600) as s:
        for users in users_list:
            run = run_load(s.url, prompts_for(users), users=users, max_duration=300)
            r = run["summary"]
            rows.append({"server": kind, "users": users, "num_requests": r["num_requests"],
                         "output_tok_s": r["output_tok_s"], "requests_s": r["requests_s"],
                         "ttft_p50_s": r["ttft_s"]["p50"], "ttft_p99_s": r["ttft_s"]["p99"],
                         "tpot_p50_s": r["tpot_s"]["p50"], "errors": r["errors"], "wall_s": r["wall_s"]})
            print(rows[-1], flush=True)
    return rows


def run(args) -> dict:
    from labkit.checkpoint import DEFAULT_MODEL_DIR
    from labkit.loadtest import make_prompts

    on_gpu = torch.cuda.is_available() and not args.tiny
    if not on_gpu and not args.tiny:
        raise SystemExit("the serve benchmark records GPU figures; on the CPU run it with --tiny (a smoke test)")
    users = [int(u) for u in (args.users or ("1,4" if args.tiny else "1,4,16,64")).split(",")]
    per_user = args.requests_per_user or 4
    input_len = args.input_len or (16 if args.tiny else 128)
    output_len = args.output_len or (8 if args.tiny else 128)
    num_blocks = args.num_blocks or (512 if args.tiny else 4096)
    max_seqs = max(users)
    device, dtype = ("cuda", torch.bfloat16) if on_gpu else ("cpu", torch.float32)
    tmp = tempfile.TemporaryDirectory(prefix="labkit-serve-bench-")
    model_dir = random_model_dir(pathlib.Path(tmp.name), device) if on_gpu else pathlib.Path(DEFAULT_MODEL_DIR)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]

    def prompts_for(u, cap=None):
        n = max(8, per_user * u) if cap is None else cap
        return make_prompts("random", n, input_len=input_len, output_len=output_len, seed=u, vocab_size=vocab)

    engine_kw = dict(num_blocks=num_blocks, max_num_seqs=max_seqs, max_model_len=2048 if on_gpu else None)
    serve_args = ["--num-blocks", str(num_blocks), "--max-num-seqs", str(max_seqs), "--max-waiting", str(max_seqs)]
    serve_args += ["--device", "cuda", "--dtype", "bfloat16", "--max-model-len", "2048"] if on_gpu else []
    threads = None if on_gpu else 1
    if not on_gpu:
        torch.set_num_threads(1)
    naive_users = [u for u in users if u <= args.naive_max_users]
    rows = offline(model_dir, users, prompts_for, output_len, {k: v for k, v in engine_kw.items() if v is not None},
                   device, dtype)
    rows += served("engine", model_dir, users, prompts_for, serve_args, threads)
    # naive: as many requests as users (at least 4): one at a time, more would only lengthen the queue
    rows += served("naive", model_dir, naive_users, lambda u: prompts_for(u, cap=max(4, u)), serve_args, threads)
    tmp.cleanup()
    by = {(r["server"], r["users"]): r for r in rows}
    top = max(users)
    keep = by[("engine", top)]["output_tok_s"] / by[("engine_offline", top)]["output_tok_s"]
    return {"model": "random Llama-3.2-1B shape, bf16" if on_gpu else "shipped Austen model (data/model), fp32",
            "shapes": {"input_len": input_len, "output_len": output_len, "requests_per_user": per_user,
                       "num_blocks": num_blocks, "max_num_seqs": max_seqs, "naive_max_users": args.naive_max_users,
                       "model_config": LLAMA_32_1B if on_gpu else json.loads((model_dir / "config.json").read_text())},
            "served_over_offline_at_max_users": keep, "rows": rows}
