"""The OpenAI-compatible server: a real client, every refusal, disconnects, overload, timeouts, tenants, SIGTERM.

Servers run in-process (uvicorn in a thread, real sockets on 127.0.0.1) except where the test is about the
process itself (SIGTERM, the bind rule). Answers are checked against ``labkit.generate.generate()`` run
alone, the independent reference the engine is tested against.
"""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

import labkit  # noqa: F401
from labkit.checkpoint import DEFAULT_MODEL_DIR, load_pretrained
from labkit.engine import EngineConfig, LLMEngine
from labkit.generate import generate
from labkit.kv_cache import ContiguousCache
from labkit.server import EngineBackend, NaiveBackend, Tenants, create_app
from labkit.server.detokenizer import IncrementalDetokenizer
from labkit.server.process import REPO_ROOT, ServerProcess, ThreadedServer, free_port
from labkit.server.tenancy import check_bind

pytestmark = pytest.mark.timeout(240)
MODEL = "austen"
PROMPT = "It is a truth universally acknowledged, that a single man"


class ChatTokenizer:
    """The shipped tokenizer plus a chat template (the shipped model has none): what an instruct model's has."""

    chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"

    def __init__(self, tok):
        self._tok = tok

    def encode(self, text):
        return self._tok.encode(text)

    def decode(self, ids):
        return self._tok.decode(ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        import jinja2

        return self.encode(jinja2.Template(self.chat_template).render(messages=messages))


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return load_pretrained(DEFAULT_MODEL_DIR)


def engine_backend(model, max_waiting=64, **cfg):
    cfg = {"num_blocks": 512, "max_num_seqs": 16, **cfg}
    return EngineBackend(LLMEngine(model, EngineConfig(**cfg), clock="wall"), max_waiting=max_waiting)


def serve(model, tok, backend=None, **kw):
    return ThreadedServer(create_app(backend or engine_backend(model), tok, MODEL, **kw))


def reference_text(model, tok, prompt: str, max_tokens: int) -> tuple[str, list[int]]:
    ids = tok.encode(prompt)
    out = generate(model, ids, max_tokens, cache=ContiguousCache(model.config, 1, len(ids) + max_tokens)).token_ids
    return tok.decode(out), out


@pytest.fixture(scope="module")
def server(shipped):
    model, tok = shipped
    with serve(model, ChatTokenizer(tok)) as s:
        yield s


def post(url, path, body, **kw):
    return httpx.post(url + path, content=body if isinstance(body, (bytes, str)) else json.dumps(body), timeout=60,
                      **kw)


# ---- a real client -----------------------------------------------------------------------------------
def test_openai_client_completions_chat_streaming(server, shipped):
    openai = pytest.importorskip("openai")
    model, tok = shipped
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    want, want_ids = reference_text(model, tok, PROMPT, 24)

    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(tok.encode(PROMPT))

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "Who is Mr Darcy?"}]
    chat_prompt = ChatTokenizer.chat_template.replace("{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
                                                      "{% endfor %}", "user: Who is Mr Darcy?\n")
    want_chat, _ = reference_text(model, tok, chat_prompt, 16)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want_chat
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == want_chat


def test_naive_backend_gives_the_engines_answers(shipped):
    model, tok = shipped
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    sampled = {**body, "temperature": 0.8, "top_k": 50, "seed": 7}
    answers = {}
    for name, backend in (("naive", NaiveBackend(model, (0,))), ("engine", engine_backend(model))):
        with serve(model, tok, backend) as s:
            answers[name] = [post(s.url, "/v1/completions", b).json()["choices"][0]["text"] for b in (body, sampled)]
    assert answers["naive"] == answers["engine"]
    assert answers["naive"][0] == reference_text(model, tok, PROMPT, 20)[0]


def test_stop_strings_n_and_seed(server, shipped):
    model, tok = shipped
    full, _ = reference_text(model, tok, PROMPT, 40)
    stop = full.split()[5]  # a word the answer is known to contain
    r = post(server.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 40, "temperature": 0,
                                             "stop": [stop], "ignore_eos": True}).json()
    assert r["choices"][0]["text"] == full[:full.find(stop)] and r["choices"][0]["finish_reason"] == "stop"
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 3, "n": 3}
    a, b = (post(server.url, "/v1/completions", body).json() for _ in range(2))
    texts = [c["text"] for c in a["choices"]]
    assert texts == [c["text"] for c in b["choices"]], "a seed must make the answers reproducible"
    assert len(set(texts)) > 1, "n samples of one seeded request must not all be the same"
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]


def test_detokenizer_streams_the_decoded_text_and_holds_back_stop_strings(shipped):
    _, tok = shipped
    ids = tok.encode("Emma Woodhouse, handsome, clever, and rich — with a comfortable home… “Quite so!”")
    d = IncrementalDetokenizer(tok)
    assert "".join(d.add([t]) for t in ids) + d.flush() == tok.decode(ids)
    text = tok.decode(ids)
    for stop in ("clever", "home… “Q", "rich —", "nowhere"):
        d = IncrementalDetokenizer(tok, [stop])
        sent = ""
        for t in ids:
            sent += d.add([t])
            assert stop not in sent
        sent += d.flush()
        assert sent == (text[:text.find(stop)] if stop in text else text)
        assert d.stopped == (stop in text)


# ---- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": MODEL}, 400, "prompt"),
    ({"prompt": PROMPT}, 400, "model"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": "16"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": -3}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": PROMPT, "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": PROMPT, "stop": 5}, 400, "stop"),
    ({"model": MODEL, "prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": PROMPT, "max_token": 5}, 400, "max_token"),
    ({"model": MODEL, "prompt": PROMPT, "logprobs": 3}, 400, "logprobs"),
    ({"model": MODEL, "prompt": PROMPT, "cache_salt": "victim"}, 400, "cache_salt"),  # message: see below
    ({"model": MODEL, "prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "word " * 600}, 400, "prompt"),
    ({"model": MODEL, "prompt": PROMPT, "max_tokens": 510}, 400, "max_tokens"),
    ({"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
])
def test_bad_requests_get_openai_errors_naming_the_field(server, body, status, param):
    r = post(server.url, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]
    if param == "cache_salt":  # refused because the server owns the salt, not merely as an unknown field
        assert "from your API key" in err["message"]
    ok = post(server.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200, "the server must keep serving after a bad request"


def test_unknown_route_and_method_and_chat_without_template(server, shipped):
    model, tok = shipped
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "no route" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    r = post(server.url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    with serve(model, tok) as plain:  # the shipped tokenizer: no chat template
        r = post(plain.url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "this model has no chat template" in r.json()["error"]["message"]


# ---- disconnects, overload, timeouts ---------------------------------------------------------------------
def _pool(url) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_200_disconnects_mid_stream_give_every_block_back(shipped):
    model, tok = shipped
    backend = engine_backend(model, num_blocks=256, max_num_seqs=32)

    async def hang_up(client, url):
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    return  # one token in, then the client goes away

    async def main(url):
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(10):  # 10 waves of 20 concurrent clients
                await asyncio.gather(*(hang_up(client, url) for _ in range(20)))

    with serve(model, tok, backend) as s:
        asyncio.run(main(s.url))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = _pool(s.url)
            if m["labkit:kv_blocks_free"] == m["labkit:kv_blocks_total"] and m["labkit:num_requests_running"] == 0:
                break
            time.sleep(0.1)
        m = _pool(s.url)
        assert m["labkit:kv_blocks_free"] == m["labkit:kv_blocks_total"] == 256, m
        assert m["labkit:request_success_total"] == 200  # every one observed (finished_reason="abort")
        assert not backend.engine.requests and not backend.streams
        assert post(s.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}).status_code == 200


def test_overload_answers_503_with_retry_after_and_keeps_serving(shipped):
    model, tok = shipped
    backend = engine_backend(model, max_waiting=2, max_num_seqs=2)

    async def one(client, url):
        return await client.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 60,
                                                                 "ignore_eos": True})

    async def burst(url):
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, url) for _ in range(12)))

    with serve(model, tok, backend) as s:
        rs = asyncio.run(burst(s.url))
        codes = sorted(r.status_code for r in rs)
        assert set(codes) == {200, 503} and codes.count(200) >= 4, codes
        busy = [r for r in rs if r.status_code == 503]
        assert all(r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "server_overloaded" for r in busy)
        assert all(r.json()["usage"]["completion_tokens"] == 60 for r in rs if r.status_code == 200)
        assert httpx.get(s.url + "/health").status_code == 200
        assert post(s.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}).status_code == 200


def test_request_timeout_stops_the_request_and_frees_its_blocks(shipped):
    model, tok = shipped
    with serve(model, tok, engine_backend(model), request_timeout=0.5) as s:
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 450, "ignore_eos": True})
        assert r.status_code == 504 and "request timeout of 0.5 s" in r.json()["error"]["message"]
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 450, "ignore_eos": True, "stream": True}
        lines = [x for x in httpx.post(s.url + "/v1/completions", json=body, timeout=60).text.splitlines() if x]
        assert json.loads(lines[-2][len("data: "):])["error"]["type"] == "timeout" and lines[-1] == "data: [DONE]"
        time.sleep(0.5)
        m = _pool(s.url)
        assert m["labkit:kv_blocks_free"] == m["labkit:kv_blocks_total"]


# ---- tenants -------------------------------------------------------------------------------------------------
def test_api_keys_and_per_tenant_salt(shipped):
    model, tok = shipped
    keys = ["alice-key-0001", "mallory-key-02"]
    backend = engine_backend(model, enable_prefix_caching=True)
    prompt = "word " * 60  # four full blocks of 16 tokens, then the rest

    def ask(key):
        return post(s.url, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2},
                    headers={"Authorization": f"Bearer {key}"})

    with serve(model, tok, backend, tenants=Tenants(keys)) as s:
        assert post(s.url, "/v1/completions", {"model": MODEL, "prompt": PROMPT}).status_code == 401
        assert ask("not-a-key-123").status_code == 401
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert ask(keys[0]).status_code == 200
        hits = _pool(s.url)["labkit:prefix_cache_hits_total"]
        assert ask(keys[1]).status_code == 200
        assert _pool(s.url)["labkit:prefix_cache_hits_total"] == hits, "another tenant hit alice's cached prefix"
        assert ask(keys[0]).status_code == 200
        assert _pool(s.url)["labkit:prefix_cache_hits_total"] > hits, "alice must hit her own cached prefix"
    t = Tenants(keys, secret=b"s" * 32)
    salts = {t.authenticate(f"Bearer {k}").cache_salt for k in keys}
    assert len(salts) == 2 and not salts & set(keys)  # one salt per key, and not the key itself
    assert Tenants(keys, secret=b"t" * 32).authenticate(f"Bearer {keys[0]}").cache_salt not in salts


def test_binding_beyond_loopback_needs_an_api_key():
    with pytest.raises(ValueError, match="without an API key"):
        check_bind("0.0.0.0", Tenants())
    check_bind("0.0.0.0", Tenants(["tenant-key-1"]))
    check_bind("127.0.0.1", Tenants())
    check_bind("::1", Tenants())
    r = subprocess.run([sys.executable, "-m", "labkit.serve", "--host", "0.0.0.0", "--port", str(free_port())],
                       capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert r.returncode != 0 and "--api-key" in r.stderr


# ---- SIGTERM -----------------------------------------------------------------------------------------------
def test_sigterm_drains_requests_in_flight_and_refuses_new_ones():
    server = ServerProcess("--max-num-seqs", "8").start()
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 80, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    results, started = [], threading.Barrier(4)

    def client():
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(x for x in lines if x.startswith("data: "))
            started.wait()
            results.append([first] + [x for x in lines if x.startswith("data: ")])

    threads = [threading.Thread(target=client) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        started.wait(timeout=60)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # the listening socket is closed
            httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=5)
        for t in threads:
            t.join(120)
        assert server.proc.wait(60) == -signal.SIGTERM  # uvicorn re-raises the signal once drained
    finally:
        server.stop()
    assert len(results) == 3
    for lines in results:
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: "):])["usage"]["completion_tokens"] == 80, "a drained request was cut"
