"""How long one serving step takes on a GPU, from the recorded roofline (data/bench/roofline.json).

A step runs every scheduled sequence through the model once: prefills feed whole prompts, decodes one
token each. Per layer its time is the sum of parts measured on the GPU for one Llama-3-8B layer:

    matmuls(M)            M = tokens in the step (all prompts + one per decode): the weights are read
                          once per step, so this is flat in M until the matmuls turn compute-bound
    decode_attention(B, L) B decodes whose caches hold L tokens on average: each reads its own K/V
    prefill_attention(T)  causal attention of each prompt of T tokens over itself
    other(M)              norms, RoPE, SiLU, residual adds (decode layer minus the parts above)

    step = num_layers × (matmuls + other + attention) + lm_head(sequences in the step)

Between measured points the model interpolates on log-log axes; past the largest it scales with the
size (linearly in tokens, batch and context; quadratically for prefill attention), below the smallest
it keeps the smallest time (launch-bound). That is an extrapolation, and the notebook says so.

The roofline arithmetic the measurements are judged by also lives here (:func:`arithmetic_intensity`,
:func:`roofline_ms`); :func:`recorded_model_config` is the model the recording describes, for an engine
that runs on the cost model (``labkit.engine.SimulatedRunner``).
"""
from __future__ import annotations

import bisect
import dataclasses
import math

import numpy as np


# --------------------------------------------------------------------------- roofline arithmetic
def matmul_flops_bytes(linears: list[tuple[int, int]], tokens: int, dtype_bytes: int = 2) -> tuple[int, int]:
    """FLOPs and the fewest bytes moved by ``tokens`` rows through linears of (in, out) features:
    each weight read once, each input row read once, each output row written once."""
    flops = sum(2 * tokens * i * o for i, o in linears)
    nbytes = sum(dtype_bytes * (i * o + tokens * i + tokens * o) for i, o in linears)
    return flops, nbytes


def arithmetic_intensity(linears: list[tuple[int, int]], tokens: int, dtype_bytes: int = 2) -> float:
    """FLOP per byte of a step's matmuls. About ``2 * tokens / dtype_bytes`` while the weights dominate
    the bytes: a decode step at batch B does B times more arithmetic on the same weight bytes."""
    flops, nbytes = matmul_flops_bytes(linears, tokens, dtype_bytes)
    return flops / nbytes


def roofline_ms(flops: float, nbytes: float, tflops: float, gbps: float) -> float:
    """The floor a kernel cannot beat: the larger of compute time and memory time (ms)."""
    return max(flops / (tflops * 1e12), nbytes / (gbps * 1e9)) * 1e3


def recorded_model_config(data: dict | None = None, max_len: int = 2048, eos_token_id: int = 0):
    """A :class:`labkit.config.LlamaConfig` with the shapes the roofline was recorded for (Llama-3-8B by
    default) and a context of ``max_len``: what ``LLMEngine(runner=SimulatedRunner(...), model_config=...)``
    needs to know about a model it never runs."""
    from labkit.config import LlamaConfig

    if data is None:
        from labkit.bench import load

        data = load("roofline")
    s = data["shapes"]
    return LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                       intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
                       num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
                       head_dim=s["head_dim"], max_position_embeddings=max_len, tie_word_embeddings=False,
                       eos_token_id=eos_token_id)


# --------------------------------------------------------------------------- interpolation
class LogLogCurve:
    """y(x) through measured points, interpolated on log-log axes; ys[0] below the first point;
    beyond the last, y grows as x**power (1: linear, 2: quadratic)."""

    def __init__(self, xs, ys, power: float = 1.0):
        order = np.argsort(xs)
        self.xs, self.ys = np.asarray(xs, dtype=float)[order], np.asarray(ys, dtype=float)[order]
        if len(self.xs) < 2 or self.xs[0] <= 0 or (self.ys <= 0).any():
            raise ValueError("LogLogCurve needs at least two points with positive x and y")
        self.power = power
        self._lx, self._ly = np.log(self.xs).tolist(), np.log(self.ys).tolist()  # plain floats: fast scalar calls

    def __call__(self, x: float) -> float:
        if x <= self.xs[0]:
            return float(self.ys[0])
        if x >= self.xs[-1]:
            return float(self.ys[-1] * (x / self.xs[-1]) ** self.power)
        lx = math.log(x)
        i = bisect.bisect_right(self._lx, lx) - 1
        f = (lx - self._lx[i]) / (self._lx[i + 1] - self._lx[i])
        return math.exp(self._ly[i] + f * (self._ly[i + 1] - self._ly[i]))


def _rows(data: dict, impl: str) -> list[dict]:
    rows = [r for r in data["rows"] if r["impl"] == impl]
    if not rows:
        raise ValueError(f"roofline data has no {impl!r} rows; re-record with `python -m labkit.bench roofline`")
    return rows


def _curve(rows: list[dict], key: str, power: float = 1.0) -> LogLogCurve:
    return LogLogCurve([r[key] for r in rows], [r["median_ms"] for r in rows], power)


@dataclasses.dataclass
class StepCostModel:
    """Seconds per serving step of a ``num_layers``-layer model; build it with :meth:`from_roofline`."""

    num_layers: int
    matmul: LogLogCurve  # ms per layer against tokens in the step
    lm_head: LogLogCurve  # ms against sequences in the step
    prefill_attn: LogLogCurve  # ms per layer against prompt length
    decode_batches: np.ndarray
    decode_contexts: np.ndarray
    decode_attn_ms: np.ndarray  # (len(batches), len(contexts)) ms per layer
    other_ms: tuple[float, float]  # per layer: intercept + slope per token
    source: str = ""

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        self._by_batch: dict[int, LogLogCurve] = {}  # decode attention against context, per batch size

    @classmethod
    def from_roofline(cls, data: dict | None = None, num_layers: int | None = None) -> "StepCostModel":
        """Calibrate from a recorded roofline (default: ``labkit.bench.load('roofline')``)."""
        if data is None:
            from labkit.bench import load

            data = load("roofline")
        num_layers = data["shapes"]["num_hidden_layers"] if num_layers is None else num_layers
        attn = _rows(data, "decode_attention")
        batches = np.array(sorted({r["batch"] for r in attn}), dtype=float)
        contexts = np.array(sorted({r["context"] for r in attn}), dtype=float)
        grid = {(r["batch"], r["context"]): r["median_ms"] for r in attn}
        missing = [(int(b), int(c)) for b in batches for c in contexts if (b, c) not in grid]
        if missing:
            raise ValueError(f"roofline decode_attention rows miss (batch, context) points {missing[:4]}")
        model = cls(
            num_layers=num_layers,
            matmul=_curve(_rows(data, "layer_matmuls"), "tokens"),
            lm_head=_curve(_rows(data, "lm_head"), "batch"),
            prefill_attn=_curve(_rows(data, "prefill_attention"), "tokens", power=2.0),
            decode_batches=batches, decode_contexts=contexts,
            decode_attn_ms=np.array([[grid[(b, c)] for c in contexts] for b in batches]),
            other_ms=(0.0, 0.0),
            source=f"{data['provenance']['device']}, {data['provenance']['date'][:10]}",
        )
        # Whatever a whole decode layer costs beyond matmuls + attention: a straight line in tokens.
        full = _rows(data, "decode_layer")
        b = np.array([r["batch"] for r in full], dtype=float)
        resid = np.array([r["median_ms"] - model.matmul_ms(r["batch"]) - model.decode_attention_ms(r["batch"], r["context"])
                          for r in full])
        slope, intercept = np.polyfit(b, resid, 1)
        model.other_ms = (max(float(intercept), 0.0), max(float(slope), 0.0))
        return model

    # --- per layer, milliseconds -------------------------------------------------------------
    def matmul_ms(self, tokens: int) -> float:
        return self.matmul(tokens) if tokens > 0 else 0.0

    def decode_attention_ms(self, batch: int, context: float) -> float:
        """B decodes over caches of ``context`` tokens on average (each reads its own K/V)."""
        if batch == 0:
            return 0.0
        if batch not in self._by_batch:  # interpolate along batch once per batch size, then along context
            cols = [LogLogCurve(self.decode_batches, col)(batch) for col in self.decode_attn_ms.T]
            self._by_batch[batch] = LogLogCurve(self.decode_contexts, cols)
        return self._by_batch[batch](context)

    def prefill_attention_ms(self, prompt_len: int) -> float:
        return self.prefill_attn(prompt_len)

    def other_layer_ms(self, tokens: int) -> float:
        return self.other_ms[0] + self.other_ms[1] * tokens if tokens > 0 else 0.0

    def lm_head_ms(self, num_seqs: int) -> float:
        return self.lm_head(num_seqs) if num_seqs > 0 else 0.0

    # --- one step of the whole model ---------------------------------------------------------
    def step_seconds(self, prefill_lens: list[int], decode_contexts: list[int]) -> float:
        """Time of one step that prefills prompts of ``prefill_lens`` tokens and decodes one token for
        sequences whose caches hold ``decode_contexts`` tokens (the new one included)."""
        tokens = sum(prefill_lens) + len(decode_contexts)
        if tokens == 0:
            return 0.0
        mean_ctx = sum(decode_contexts) / len(decode_contexts) if decode_contexts else 0.0
        layer = (self.matmul_ms(tokens) + self.other_layer_ms(tokens)
                 + self.decode_attention_ms(len(decode_contexts), mean_ctx)
                 + sum(self.prefill_attention_ms(t) for t in prefill_lens))
        return (self.num_layers * layer + self.lm_head_ms(len(prefill_lens) + len(decode_contexts))) * 1e-3

    def decode_step_seconds(self, batch: int, context: int) -> float:
        """A pure decode step: ``batch`` sequences, each with ``context`` cached tokens."""
        return self.step_seconds([], [context] * batch)
