"""``python -m labkit.loadtest --url URL``: what users of an OpenAI-compatible server feel under load.

    closed loop  --users 1,2,4,...,64: that many users, each sends a request, reads the whole streamed
                 answer, and sends the next at once (how "concurrent users" is meant in load tests)
    open loop    --rate R: requests arrive as a Poisson process of R per second, whatever the server does

Each request streams (``"stream": true`` with ``stream_options.include_usage``), so the client sees every
token arrive. Metrics, vLLM's definitions (``vllm bench serve``; GuideLLM counts TPOT differently, it
includes the first token):

    TTFT   = time of the first chunk with a choice - time the request was sent
    ITL    = time between consecutive chunks of one answer
    TPOT   = (E2E - TTFT) / (n - 1)              n = completion_tokens from the server's usage; n > 1 only
    E2E    = time the stream ended - time the request was sent
    output throughput = sum of n over successful requests / wall time of the run
    goodput           = successful requests meeting every SLO (--slo ttft=0.5,tpot=0.05,e2e=10) / wall time

Prompts: ``austen`` (fixed-length passages of the lab's held-out Austen text), ``sharegpt`` / ``alpaca``
(prompt and answer lengths drawn from labkit.traces, Austen words as text), ``shared-prefix`` (a few
long system prompts shared by many requests, then a private question: what prefix caching is for),
``random`` (random token ids of exactly --input-len tokens, as ``vllm bench serve --dataset-name random``).
Text lengths count words, not tokens (the server's usage reports the real token counts).

Every run is bounded: --num-requests requests at most and --max-duration seconds at most (then what is
in flight is cancelled and counted as ``cancelled``). It targets loopback addresses only unless
--allow-remote is given: point it only at servers you run.

Against vLLM (``vllm serve MODEL --port 8000`` on the same machine)::

    python -m labkit.loadtest --url http://127.0.0.1:8000 --users 1,4,16,64 --dataset sharegpt --out vllm.json
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import json
import time
import urllib.parse

import numpy as np

from labkit.server.tenancy import is_loopback

DEFINITIONS = {
    "ttft_s": "time of the first streamed chunk with a choice - time the request was sent",
    "itl_s": "time between consecutive streamed chunks of one answer",
    "tpot_s": "(e2e - ttft) / (n - 1), n = completion_tokens (usage), requests with n > 1",
    "e2e_s": "time the stream ended - time the request was sent",
    "output_tok_s": "sum of completion_tokens of successful requests / wall time of the run",
    "requests_s": "successful requests / wall time of the run",
    "goodput_rps": "successful requests meeting every SLO / wall time of the run",
    "wall_s": "first request sent to last request ended",
}
DATASETS = ("austen", "sharegpt", "alpaca", "shared-prefix", "random")


@dataclasses.dataclass
class Prompt:
    prompt: str | list[int]
    max_tokens: int


@dataclasses.dataclass
class RequestResult:
    ok: bool
    error: str | None  # error type: "http_503", "stream_error", "timeout", "connect", "cancelled", ...
    status: int | None
    sent_s: float  # seconds since the run started
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        return tpot(self.e2e_s, self.ttft_s, self.output_tokens) if self.ok else None


def tpot(e2e_s: float, ttft_s: float, num_output_tokens: int) -> float | None:
    """vLLM's time per output token: (E2E - TTFT) / (n - 1), the first token excluded; None for n < 2."""
    if num_output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (num_output_tokens - 1)


def goodput(ttft_s: list[float], tpot_s: list[float | None], wall_s: float, ttft_slo_s: float | None = None,
            tpot_slo_s: float | None = None) -> float:
    """Completed requests per second that meet every SLO given (a TPOT of None, one token, meets any TPOT SLO)."""
    good = sum(1 for a, b in zip(ttft_s, tpot_s)
               if (ttft_slo_s is None or a <= ttft_slo_s) and (tpot_slo_s is None or b is None or b <= tpot_slo_s))
    return good / wall_s


# ---- prompts ---------------------------------------------------------------------------------------
def _words() -> list[str]:
    from labkit.corpus import load_text

    return load_text("heldout").split()


def make_prompts(dataset: str, num: int, input_len: int = 64, output_len: int = 32, seed: int = 0,
                 max_len: int = 512, system_len: int = 96, num_system_prompts: int = 4,
                 vocab_size: int = 4096) -> list[Prompt]:
    """``num`` seeded prompts of one of :data:`DATASETS` (see the module docstring)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if num < 1 or input_len < 1 or output_len < 1:
        raise ValueError(f"num, input_len and output_len must be >= 1, got {num}, {input_len}, {output_len}")
    rng = np.random.default_rng(seed)
    if dataset == "random":
        return [Prompt(rng.integers(0, vocab_size, input_len).tolist(), output_len) for _ in range(num)]
    words = _words()

    def passage(n: int) -> str:
        start = int(rng.integers(0, len(words) - n))
        return " ".join(words[start:start + n])

    if dataset == "austen":
        return [Prompt(passage(input_len), output_len) for _ in range(num)]
    if dataset == "shared-prefix":
        systems = [passage(system_len) for _ in range(num_system_prompts)]
        popularity = 1.0 / np.arange(1, num_system_prompts + 1)
        picks = rng.choice(num_system_prompts, size=num, p=popularity / popularity.sum())
        return [Prompt(systems[k] + "\n\n" + passage(input_len), output_len) for k in picks]
    from labkit.traces import make_trace

    # words are ~1.3 tokens of the Austen tokenizer: keep prompt + answer inside max_len tokens
    trace = make_trace(dataset, num_requests=num, rate=float("inf"), seed=seed, max_len=int(max_len / 1.4))
    return [Prompt(passage(r.prompt_len), r.output_len) for r in trace]


# ---- one request -----------------------------------------------------------------------------------
async def send_request(client, url: str, model: str, p: Prompt, t0: float, api_key: str | None = None,
                       chat: bool = False, ignore_eos: bool = True, temperature: float = 0.0) -> RequestResult:
    """Send one streamed request and time it (times relative to ``t0``, a perf_counter)."""
    body = {"model": model, "max_tokens": p.max_tokens, "temperature": temperature, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension: every answer runs to max_tokens, as vllm bench does
    if chat:
        body["messages"] = [{"role": "user", "content": p.prompt}]
    else:
        body["prompt"] = p.prompt
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.perf_counter()
    res = RequestResult(False, None, None, start - t0)
    last = None
    try:
        async with client.stream("POST", url + path, json=body, headers=headers) as r:
            res.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                res.error = f"http_{r.status_code}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = "stream_error:" + str(obj["error"].get("type"))
                    return res
                if obj.get("choices"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
                if obj.get("usage"):
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                    res.output_tokens = obj["usage"]["completion_tokens"]
        res.e2e_s = time.perf_counter() - start
        if res.ttft_s is None:
            res.error = "no_tokens"
        elif not res.output_tokens:
            res.error = "no_usage"  # the server ignored stream_options.include_usage
        else:
            res.ok = True
    except asyncio.CancelledError:
        res.error = "cancelled"
    except Exception as e:  # noqa: BLE001  each failure is counted by its type, the run goes on
        import httpx

        res.error = {httpx.ConnectError: "connect", httpx.ReadTimeout: "timeout", httpx.RemoteProtocolError:
                     "disconnected"}.get(type(e), type(e).__name__)
    return res


# ---- runs ------------------------------------------------------------------------------------------
async def _run(url: str, model: str, prompts: list[Prompt], users: int | None, rate: float | None,
               max_duration: float, api_key, chat, ignore_eos, timeout: float, seed: int) -> tuple[list, float]:
    import httpx

    limits = httpx.Limits(max_connections=(users or 256) + 4, max_keepalive_connections=(users or 256) + 4)
    results: list[RequestResult] = []
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as client:
        t0 = time.perf_counter()
        send = lambda p: send_request(client, url, model, p, t0, api_key, chat, ignore_eos)  # noqa: E731
        if users is not None:
            queue = list(reversed(prompts))

            async def user():
                while queue and time.perf_counter() - t0 < max_duration:
                    results.append(await send(queue.pop()))

            tasks = [asyncio.create_task(user()) for _ in range(users)]
        else:
            rng = np.random.default_rng(seed)
            arrivals = np.cumsum(rng.exponential(1.0 / rate, size=len(prompts)))

            async def arrive(at, p):
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
                results.append(await send(p))

            tasks = [asyncio.create_task(arrive(a, p)) for a, p in zip(arrivals, prompts) if a < max_duration]
        done, pending = await asyncio.wait(tasks, timeout=max_duration)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - t0
    sent = len(results)
    results += [RequestResult(False, "not_sent", None, wall) for _ in range(len(prompts) - sent)] if users else []
    return results, wall


def _pct(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=0.5,tpot=0.05,e2e=10' -> {"ttft_s": 0.5, ...} (seconds)."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in ("ttft", "tpot", "e2e"):
            raise ValueError(f"--slo: unknown metric {name!r}; use ttft=, tpot=, e2e= (seconds)")
        try:
            out[name + "_s"] = float(value)
        except ValueError:
            raise ValueError(f"--slo: {part!r} needs a number of seconds, e.g. ttft=0.5") from None
    return out


def summarize(results: list[RequestResult], wall_s: float, slo: dict[str, float] | None = None) -> dict:
    """Per-run figures; formulas in :data:`DEFINITIONS`."""
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    slo = slo or {}
    wall = max(wall_s, 1e-9)
    rate = None
    if slo:
        good = [r for r in ok if slo.get("e2e_s") is None or r.e2e_s <= slo["e2e_s"]]
        rate = goodput([r.ttft_s for r in good], [r.tpot_s for r in good], wall, slo.get("ttft_s"), slo.get("tpot_s"))
    return {
        "num_requests": len(results), "completed": len(ok), "errors": errors,
        "server_errors": sum(v for k, v in errors.items() if k.startswith("http_5") or k.startswith("stream_error")),
        "wall_s": wall_s, "output_tokens": sum(r.output_tokens for r in ok),
        "output_tok_s": sum(r.output_tokens for r in ok) / wall, "requests_s": len(ok) / wall,
        "goodput_rps": rate, "slo": slo,
        "ttft_s": _pct([r.ttft_s for r in ok]), "tpot_s": _pct([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": _pct([x for r in ok for x in r.itl_s]), "e2e_s": _pct([r.e2e_s for r in ok]),
    }


def check_url(url: str, allow_remote: bool = False) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url must look like http://127.0.0.1:8000, got {url!r}")
    if not allow_remote and not is_loopback(parts.hostname):
        raise ValueError(f"{url}: the load test targets this machine's loopback address only; pass --allow-remote "
                         "to load a server elsewhere (only one you run)")
    return url.rstrip("/")


def first_model(url: str, api_key: str | None = None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def run_load(url: str, prompts: list[Prompt], users: int | None = None, rate: float | None = None,
             model: str | None = None, api_key: str | None = None, chat: bool = False, ignore_eos: bool = True,
             max_duration: float = 300.0, timeout: float = 600.0, slo: dict | None = None, seed: int = 0,
             allow_remote: bool = False) -> dict:
    """One run (closed loop with ``users``, or open loop at ``rate``/s); returns its summary and requests.

    Runs its own event loop in a worker thread, so it works inside Jupyter (which has one running)."""
    return start_load(url, prompts, users, rate, model, api_key, chat, ignore_eos, max_duration, timeout, slo,
                      seed, allow_remote).result()


def start_load(url: str, prompts: list[Prompt], users: int | None = None, rate: float | None = None,
               model: str | None = None, api_key: str | None = None, chat: bool = False, ignore_eos: bool = True,
               max_duration: float = 300.0, timeout: float = 600.0, slo: dict | None = None, seed: int = 0,
               allow_remote: bool = False) -> concurrent.futures.Future:
    """:func:`run_load` in a background thread: returns at once with a Future of its result (for a live
    dashboard that scrapes the server meanwhile)."""
    if (users is None) == (rate is None):
        raise ValueError("give users= (closed loop) or rate= (open loop), not both")
    if users is not None and users < 1:
        raise ValueError(f"users must be >= 1, got {users}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if not max_duration > 0:
        raise ValueError(f"max_duration must be > 0 s, got {max_duration}")
    url = check_url(url, allow_remote)
    model = model or first_model(url, api_key)

    def work():
        results, wall = asyncio.run(_run(url, model, prompts, users, rate, max_duration, api_key, chat, ignore_eos,
                                         timeout, seed))
        return _result(users, rate, model, results, wall, slo)

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loadtest")
    future = pool.submit(work)
    pool.shutdown(wait=False)
    return future


def _result(users, rate, model, results, wall, slo) -> dict:
    return {"mode": "closed" if users else "open", "users": users, "rate": rate, "model": model,
            "summary": summarize(results, wall, slo), "requests": [dataclasses.asdict(r) for r in results]}


def sweep(url: str, users: list[int], dataset: str = "austen", requests_per_user: int = 4, min_requests: int = 8,
          input_len: int = 64, output_len: int = 32, seed: int = 0, **kw) -> list[dict]:
    """Closed-loop runs at each number of users (the same seeded prompts, as many as each run needs)."""
    runs = []
    for u in users:
        prompts = make_prompts(dataset, max(min_requests, u * requests_per_user), input_len, output_len, seed)
        runs.append(run_load(url, prompts, users=u, seed=seed, **kw))
    return runs


def print_summary(run: dict) -> None:
    s = run["summary"]
    who = f"{run['users']} users" if run["mode"] == "closed" else f"{run['rate']}/s Poisson"

    def ms(d, k):
        return "-" if d[k] is None else f"{d[k] * 1e3:.0f}"

    good = "" if s["goodput_rps"] is None else f", goodput {s['goodput_rps']:.2f} req/s"
    print(f"{who:>14}: {s['completed']}/{s['num_requests']} ok, {s['output_tok_s']:.0f} output tok/s, "
          f"{s['requests_s']:.2f} req/s{good}; TTFT p50/p99 {ms(s['ttft_s'], 'p50')}/{ms(s['ttft_s'], 'p99')} ms, "
          f"TPOT p50 {ms(s['tpot_s'], 'p50')} ms, E2E p99 {ms(s['e2e_s'], 'p99')} ms; errors {s['errors'] or 0}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m labkit.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first model GET /v1/models lists")
    p.add_argument("--api-key", default=None)
    p.add_argument("--users", default=None, help="closed loop: comma-separated user counts, e.g. 1,2,4,8,16,32,64")
    p.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per run (closed loop default: 4 per user, at least 8; open loop: 64)")
    p.add_argument("--dataset", choices=DATASETS, default="austen")
    p.add_argument("--input-len", type=int, default=64, help="prompt length (words; tokens for random)")
    p.add_argument("--output-len", type=int, default=32, help="max_tokens of each request")
    p.add_argument("--max-len", type=int, default=512, help="sharegpt/alpaca: the server's context, in tokens")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (a server that refuses it)")
    p.add_argument("--slo", default=None, help="goodput SLOs in seconds, e.g. ttft=0.5,tpot=0.05,e2e=10")
    p.add_argument("--max-duration", type=float, default=300.0, help="seconds per run, at most")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request, at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the runs as JSON here")
    p.add_argument("--html", default=None, help="write the figure here (closed-loop sweeps)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url (a server you run)")
    args = p.parse_args(argv)
    try:
        url = check_url(args.url, args.allow_remote)
        slo = parse_slo(args.slo)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if (args.users is None) == (args.rate is None):
        raise SystemExit("give --users (closed loop) or --rate (open loop)")
    model = args.model or first_model(url, args.api_key)
    kw = dict(model=model, api_key=args.api_key, chat=args.chat, ignore_eos=not args.no_ignore_eos,
              max_duration=args.max_duration, timeout=args.timeout, slo=slo, seed=args.seed, allow_remote=True)
    print("definitions:")
    for k, v in DEFINITIONS.items():
        print(f"  {k:>13} = {v}")
    runs = []
    if args.users:
        for u in (int(x) for x in args.users.split(",")):
            n = args.num_requests or max(8, 4 * u)
            prompts = make_prompts(args.dataset, n, args.input_len, args.output_len, args.seed, args.max_len)
            runs.append(run_load(url, prompts, users=u, **kw))
            print_summary(runs[-1])
    else:
        prompts = make_prompts(args.dataset, args.num_requests or 64, args.input_len, args.output_len, args.seed,
                               args.max_len)
        runs.append(run_load(url, prompts, rate=args.rate, **kw))
        print_summary(runs[-1])
    result = {"url": url, "model": model, "dataset": args.dataset, "definitions": DEFINITIONS, "runs": runs}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    if args.html and args.users:
        from labkit.loadtest_figures import sweep_figure

        sweep_figure({model: runs}).write_html(args.html, include_plotlyjs=True)
        print(f"wrote {args.html}")
    return result


if __name__ == "__main__":
    main()
