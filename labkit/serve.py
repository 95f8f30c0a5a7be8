"""``python -m labkit.serve --model DIR``: an OpenAI-compatible server on the lab's engine.

    python -m labkit.serve --model data/model                          # the engine, 127.0.0.1:8000
    python -m labkit.serve --model data/model --engine naive           # one request at a time: the demo that fell over
    python -m labkit.serve --model data/model --enable-prefix-caching --api-key KEY1 --api-key KEY2

Then ``curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"model": "data/model",
"prompt": "It is a truth", "max_tokens": 32}'``, the ``openai`` package with ``base_url=
"http://127.0.0.1:8000/v1"``, or ``python -m labkit.loadtest --url http://127.0.0.1:8000``.

It listens on 127.0.0.1 unless told otherwise, and anywhere else only with ``--api-key`` (one key per
tenant; each tenant's prefix-cache salt is derived from its key). SIGTERM (or Ctrl-C) drains: the
listening socket closes, requests still arriving on open connections get 503, and the ones in flight
run to the end (at most ``--drain-timeout`` seconds); then the process ends by the signal, as uvicorn does
(exit status 143, or -15 from ``subprocess``).
"""
from __future__ import annotations

import argparse
import pathlib

import labkit  # noqa: F401  (CPU/GPU mode first)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="data/model", help="a Hugging Face-format model directory (default: the shipped "
                                                         "Austen model)")
    p.add_argument("--served-model-name", default=None, help="the name clients send as 'model' (default: --model)")
    p.add_argument("--engine", choices=("engine", "naive"), default="engine",
                   help="engine: continuous batching on labkit.engine; naive: generate() one request at a time")
    p.add_argument("--host", default="127.0.0.1", help="listen address (anything but loopback needs --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=[], help="accept this Bearer key (repeat: one per tenant)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--num-blocks", type=int, default=1024, help="KV pool size in blocks")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens fed to the model in one step")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's context")
    p.add_argument("--enable-prefix-caching", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests allowed to wait beyond the running batch; past it: 503 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is stopped (504)")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds SIGTERM waits for requests in flight")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="drain and exit when this process ends (notebooks and tests pass their own pid)")


def build_backend(args):
    """(backend, tokenizer) from the parsed arguments."""
    import torch

    from labkit.checkpoint import load_pretrained
    from labkit.engine import EngineConfig, LLMEngine
    from labkit.server import EngineBackend, NaiveBackend

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.model, dtype=getattr(torch, DTYPES[args.dtype]), device=args.device)
    if tokenizer is None:
        raise SystemExit(f"{args.model}: no tokenizer.json; the server needs one to read and write text")
    eos = model.config.eos_token_id
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    if args.engine == "naive":
        return NaiveBackend(model, eos_ids, max_waiting=args.max_waiting), tokenizer
    config = EngineConfig(num_blocks=args.num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                          enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager)
    engine = LLMEngine(model, config, eos_token_ids=eos_ids, clock="wall")
    if hasattr(engine.runner, "capture_all"):
        engine.runner.capture_all(config.max_num_seqs)  # CUDA graphs now, not during the first requests
    return EngineBackend(engine, max_waiting=args.max_waiting), tokenizer


def make_server(args):
    """A uvicorn.Server for the parsed arguments whose SIGTERM first marks the app as draining."""
    import uvicorn

    from labkit.server import Tenants, create_app
    from labkit.server.tenancy import check_bind

    tenants = Tenants(args.api_key)
    check_bind(args.host, tenants)
    backend, tokenizer = build_backend(args)
    name = args.served_model_name or args.model
    app = create_app(backend, tokenizer, name, tenants, request_timeout=args.request_timeout)

    class DrainingServer(uvicorn.Server):
        def drain(self) -> None:
            app.state.draining = True  # requests on open connections get 503 from now on
            self.should_exit = True  # uvicorn closes the listening socket, waits for requests in flight

        def handle_exit(self, sig, frame):
            app.state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.drain_timeout, lifespan="on")
    return DrainingServer(config), app


def _exit_with_parent(server, pid: int) -> None:
    """A server started by a notebook must not outlive a kernel that was killed before it could stop it."""
    import os
    import threading
    import time

    def watch():
        while not server.should_exit:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print(f"labkit.serve: parent process {pid} is gone; draining and exiting", flush=True)
                server.drain()
                return
            except PermissionError:  # alive, owned by someone else
                pass
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m labkit.serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not pathlib.Path(args.model).is_dir():
        raise SystemExit(f"--model {args.model}: not a model directory")
    try:
        server, _ = make_server(args)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.parent_pid:
        _exit_with_parent(server, args.parent_pid)
    print(f"labkit.serve: {args.engine} serving {args.served_model_name or args.model} on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    server.run()


if __name__ == "__main__":
    main()
