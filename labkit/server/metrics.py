"""``GET /metrics``: what the server is doing, in Prometheus' text format (vLLM's metric names, with
``labkit:`` where vLLM writes ``vllm:``), so a vLLM Grafana dashboard reads it with one rename.

    gauges     labkit:num_requests_running / _waiting / _swapped      from the engine, after each step
               labkit:kv_cache_usage_perc, labkit:kv_blocks_used / _free / _total
               labkit:prefix_cache_hit_rate                             hit tokens / queried tokens, so far
    counters   labkit:prefix_cache_queries / _hits (tokens), labkit:num_preemptions, labkit:prompt_tokens,
               labkit:generation_tokens, labkit:request_success{finished_reason}, labkit:request_errors{status}
    histograms labkit:time_to_first_token_seconds     first token - request received
               labkit:time_per_output_token_seconds  (last token - first token) / (n - 1), n > 1
               labkit:e2e_request_latency_seconds     last token - request received

Times are measured by the server (from when the HTTP request arrived), not by the engine's clock, so the
naive server and the engine are measured the same way. The engine's gauges are read from the counters
its loop thread last published: a scrape never waits for a step.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0)


class _BackendCollector:
    def __init__(self, backend, model_name: str):
        self.backend, self.model_name = backend, model_name

    def collect(self):
        s = self.backend.stats()
        label = ["model_name"]
        v = [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(f"labkit:{name}", doc, labels=label)
            g.add_metric(v, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(f"labkit:{name}", doc, labels=label)
            c.add_metric(v, value)
            return c

        total = s["kv_blocks_total"]
        queried = s["prefix_cache_queries_tokens"]
        yield gauge("num_requests_running", "Requests in the running batch.", s["num_requests_running"])
        yield gauge("num_requests_waiting", "Requests waiting to be admitted.", s["num_requests_waiting"])
        yield gauge("num_requests_swapped", "Requests preempted to CPU swap space.", s["num_requests_swapped"])
        yield gauge("kv_blocks_used", "KV-cache blocks held by requests.", s["kv_blocks_used"])
        yield gauge("kv_blocks_free", "KV-cache blocks free (cached prefix blocks included).", s["kv_blocks_free"])
        yield gauge("kv_blocks_total", "KV-cache blocks in the pool.", total)
        yield gauge("kv_cache_usage_perc", "Share of KV-cache blocks in use (0-1).", s["kv_blocks_used"] / total
                    if total else 0.0)
        yield gauge("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked up.",
                    s["prefix_cache_hits_tokens"] / queried if queried else 0.0)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", queried)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["prefix_cache_hits_tokens"])
        yield counter("num_preemptions", "Requests preempted (recompute or swap).", s["num_preemptions"])
        yield counter("engine_steps", "Engine steps (batched forwards) run.", s["num_steps"])


class ServerMetrics:
    """One registry per server (not prometheus_client's global one), so several servers live in one process."""

    def __init__(self, backend, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.registry.register(_BackendCollector(backend, model_name))
        labels = ["model_name"]
        kw = dict(registry=self.registry)
        self.ttft = Histogram("labkit:time_to_first_token_seconds", "Request received to first output token.",
                              labels, buckets=LATENCY_BUCKETS, **kw)
        self.tpot = Histogram("labkit:time_per_output_token_seconds", "(last - first token) / (n - 1), n > 1.",
                              labels, buckets=LATENCY_BUCKETS, **kw)
        self.e2e = Histogram("labkit:e2e_request_latency_seconds", "Request received to last output token.",
                             labels, buckets=LATENCY_BUCKETS, **kw)
        self.prompt_tokens = Counter("labkit:prompt_tokens", "Prompt tokens received.", labels, **kw)
        self.generation_tokens = Counter("labkit:generation_tokens", "Output tokens generated.", labels, **kw)
        self.success = Counter("labkit:request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], **kw)
        self.errors = Counter("labkit:request_errors", "Requests answered with an error, by HTTP status.",
                              labels + ["status"], **kw)

    def observe(self, stream) -> None:
        """A finished (or aborted) request's timings; ``stream`` is its RequestStream."""
        m = self.model_name
        n = stream.num_output_tokens
        self.prompt_tokens.labels(m).inc(stream.num_prompt_tokens)
        self.generation_tokens.labels(m).inc(n)
        self.success.labels(m, stream.finish_reason or "abort").inc()
        if n:
            first, last = stream.token_times[0], stream.token_times[-1]
            self.ttft.labels(m).observe(first - stream.received_s)
            self.e2e.labels(m).observe(last - stream.received_s)
            if n > 1:
                self.tpot.labels(m).observe((last - first) / (n - 1))

    def error(self, status: int) -> None:
        self.errors.labels(self.model_name, str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
