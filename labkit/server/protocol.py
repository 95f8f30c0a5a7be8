"""The OpenAI HTTP protocol: parse and check a request body, shape the responses and the errors.

    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed",
                                 "stop", "n", "stream", "stream_options", "ignore_eos", "stop_token_ids"}
    POST /v1/chat/completions   the same with "messages" instead of "prompt" (and "max_completion_tokens")

Every check names the field it refuses (OpenAI's error body: ``{"error": {"message", "type", "param",
"code"}}``), so a client sees at once what to change. Fields OpenAI defines but this server does not
implement (logprobs, echo, penalties, ...) are refused by name rather than ignored, and so is any field
nobody defines: a typo such as ``max_token`` would otherwise give a 16-token answer with no word of why.
``top_k``, ``ignore_eos`` and ``stop_token_ids`` are vLLM's extensions, spelled as vLLM spells them.

``cache_salt`` (vLLM's per-request prefix-cache salt) is refused too: this server derives the salt from
the caller's API key (:mod:`labkit.server.tenancy`); a salt the client chooses is a salt an attacker can
set to the victim's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid

from labkit.sampling import SamplingParams

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI allows

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                 "stream_options", "ignore_eos", "stop_token_ids", "user"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
# defined by OpenAI, not implemented here: refused unless sent with its "off" value
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None,)}


class APIError(Exception):
    """An error the client gets as an OpenAI-style JSON body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class GenerationRequest:
    """A checked request: what the backend needs, whichever route it came from."""

    model: str
    prompts: list  # one entry per prompt: a str, a list of token ids, or (chat) a list of messages
    max_tokens: int | None  # None (chat without a limit): whatever the context leaves after the prompt
    temperature: float
    top_p: float
    top_k: int | None
    seed: int | None
    stop: list[str]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    n: int
    stream: bool
    include_usage: bool
    chat: bool

    def sampling_params(self, max_tokens: int, index: int) -> SamplingParams:
        """Choice ``index``'s settings: with a seed, choice i samples from seed + i (n different answers that
        are each reproducible)."""
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              seed=seed, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos)


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object with "
                            "Content-Type: application/json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    return body


def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise APIError(400, f"'{name}' must be an integer, got {v!r}", name)
    if lo is not None and v < lo:
        raise APIError(400, f"'{name}' must be >= {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise APIError(400, f"'{name}' must be <= {hi}, got {v}", name)
    return v


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a number, got {v!r}", name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise APIError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(400, f"'{name}' must be true or false, got {v!r}", name)
    return v


def _check_fields(body: dict, allowed: set[str]) -> None:
    if "cache_salt" in body:
        raise APIError(400, "'cache_salt' is set by this server from your API key (one salt per tenant); a salt "
                            "chosen by the client would let anyone share another tenant's prefix cache. "
                            "Remove the field.", "cache_salt")
    for name, off in UNSUPPORTED.items():
        if name in body and body[name] not in off:
            raise APIError(400, f"'{name}' is not supported by this server; remove it", name)
    unknown = sorted(set(body) - allowed - set(UNSUPPORTED))
    if unknown:
        raise APIError(400, f"unrecognized request argument(s) {unknown}; this route accepts {sorted(allowed)}",
                       unknown[0])


def _prompts(body: dict) -> list:
    """OpenAI's four shapes of ``prompt``: a string, a list of strings, a list of token ids, a list of those."""
    if "prompt" not in body or body["prompt"] is None:
        raise APIError(400, "'prompt' is required: a string, a list of strings, a list of token ids, or a list of "
                            "token-id lists", "prompt")
    p = body["prompt"]
    if isinstance(p, str):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif isinstance(p, list) and p and all(isinstance(x, list) and x and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x) for x in p):
        prompts = list(p)
    else:
        raise APIError(400, f"'prompt' must be a non-empty string, list of strings, list of token ids or list of "
                            f"token-id lists; got {json.dumps(p)[:80]}", "prompt")
    for x in prompts:
        if isinstance(x, str) and not x:
            raise APIError(400, "'prompt' is an empty string; a request needs at least one token", "prompt")
    return prompts


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' is required: a non-empty list of {\"role\": ..., \"content\": ...}",
                       "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood by a text model
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": ...}}; "
                                        "this is a text-only model", f"messages[{i}].content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts, got {content!r}",
                           f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    return out


def parse_request(body: dict, chat: bool) -> GenerationRequest:
    """Check every field of a completions (``chat=False``) or chat completions body."""
    _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required: the name GET /v1/models lists", "model")
    prompts = [_messages(body)] if chat else _prompts(body)
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _int(body, "max_completion_tokens", None, lo=1)
    else:
        max_tokens = _int(body, "max_tokens", None if chat else 16, lo=1)  # chat: None = what the context leaves
    n = _int(body, "n", 1, lo=1, hi=MAX_N)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", None, lo=-1)
    seed = _int(body, "seed", None)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} non-empty strings, "
                            f"got {body.get('stop')!r}", "stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in stop_ids):
        raise APIError(400, f"'stop_token_ids' must be a list of token ids, got {stop_ids!r}", "stop_token_ids")
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise APIError(400, "'stream_options' is only allowed with \"stream\": true", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
            raise APIError(400, f"'stream_options' must be {{\"include_usage\": bool}}, got {opts!r}",
                           "stream_options")
        include_usage = _bool(opts, "include_usage", False)
    return GenerationRequest(model, prompts, max_tokens, temperature, top_p, top_k, seed, stop, tuple(stop_ids),
                             _bool(body, "ignore_eos", False), n, stream, include_usage, chat)


# ---- responses ------------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(index: int, text: str, finish_reason: str | None, chat: bool, delta: bool, first: bool = False) -> dict:
    """One entry of ``choices``: ``text`` for completions, ``message`` / ``delta`` for chat."""
    if not chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if delta:
        d = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def response(rid: str, model: str, created: int, choices: list[dict], chat: bool, chunk: bool,
             usage_: dict | None = None) -> dict:
    obj = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        out["usage"] = usage_
    return out


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def now_s() -> int:
    return int(time.time())
