"""An OpenAI-compatible HTTP server on the lab's engine (``python -m labkit.serve``).

    HTTP clients ──> app (FastAPI routes, SSE)  ──inbox──>  one backend thread ──> the model
       │               tenancy: key -> salt                   engine_loop: LLMEngine.step() (continuous batching)
       │               protocol: fields, errors               naive: generate(), one request at a time
       └── /metrics <── metrics (prometheus_client) <── counters the thread publishes after each step

One file per concept: ``protocol`` (request fields, OpenAI-style errors, response shapes), ``backend``
(per-request queues, the bounded in-flight count), ``engine_loop`` and ``naive`` (the two backends),
``detokenizer`` (streamed text, stop strings), ``metrics``, ``tenancy`` (API keys, per-tenant cache salt,
bind rules), ``app`` (routes), ``process`` (start a server as a background process), ``dashboard``
(a live figure from /metrics).
"""
from labkit.server.app import create_app
from labkit.server.engine_loop import EngineBackend
from labkit.server.naive import NaiveBackend
from labkit.server.tenancy import Tenants

__all__ = ["create_app", "EngineBackend", "NaiveBackend", "Tenants"]
