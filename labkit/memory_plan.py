"""Where each model's memory goes on a shared device, and how big a KV pool each engine gets.

vLLM sizes its KV cache the same way every time it starts (``gpu_memory_utilization``, the "profile run"):

    budget          = the share of the device this engine may use
    weights         = bytes of the parameters, once loaded
    activations     = the peak of one forward at the engine's largest step (max_num_batched_tokens tokens
                      in max_num_seqs sequences), measured by running that step on dummy tokens
    num_kv_blocks   = (budget - weights - activations) // bytes_per_block
    bytes_per_block = 2 (K and V) x layers x block_size x kv_heads x head_dim x dtype bytes (PagedKVStore's)

Several models on one device each get a budget; the budgets must add up to no more than the device.
An encoder (the embedding model) keeps no KV cache: its budget holds weights and activations only.

    | weights | activations | KV pool (num_kv_blocks x bytes_per_block) | free |   <- one model's budget

Two ways to know the numbers:
    estimate_* (from config.json, before anything is loaded: weights exactly, activations by a formula)
    profile_*  (after loading: weights counted, activations measured; on CUDA by
                ``torch.cuda.max_memory_allocated``, on the CPU by tracing every tensor the step allocates
                and frees: live tensor bytes, allocator overhead not included)

``plan_memory`` refuses an impossible plan (budgets over the device, a model that does not fit its budget,
a pool smaller than one sequence) with an error naming the model, so it can run on estimates before any
weights are read; an out-of-memory during a profile run raises :class:`ProfileOOMError` with the budget
that would fit.
"""
from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from labkit.paged import blocks_needed

GiB = 2**30
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class MemoryProfile:
    """One model's memory needs. ``kv_bytes_per_block`` is 0 for a model without a KV cache (an encoder)."""

    name: str
    weight_bytes: int
    activation_bytes: int  # peak extra memory of one step at the largest batch
    kv_bytes_per_block: int
    block_size: int
    max_model_len: int  # tokens one sequence may reach (an encoder: its max_seq_length)
    max_num_seqs: int  # sequences in one step (batch slots)
    max_num_batched_tokens: int
    method: str  # how activation_bytes was obtained

    @property
    def has_kv_cache(self) -> bool:
        return self.kv_bytes_per_block > 0

    @property
    def blocks_per_seq(self) -> int:
        """Blocks one sequence at full length holds."""
        return blocks_needed(self.max_model_len, self.block_size) if self.has_kv_cache else 0

    @property
    def min_budget_bytes(self) -> int:
        """Weights + activations + the KV of one full-length sequence: the smallest budget that serves anyone."""
        return self.weight_bytes + self.activation_bytes + self.blocks_per_seq * self.kv_bytes_per_block

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Before loading: estimates from the config
# ---------------------------------------------------------------------------------------------
def kv_bytes_per_block(config, block_size: int, dtype_bytes: int) -> int:
    """K and V of one block, every layer: what :attr:`PagedKVStore.bytes_per_block` allocates."""
    return block_size * config.kv_bytes_per_token(dtype_bytes)


def llama_num_parameters(config) -> int:
    """Parameters of a labkit LlamaForCausalLM with this config, counted from the shapes (tied lm_head once)."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    qkv_bias = c.attention_bias or c.qkv_bias
    attn = c.hidden_size * (q + 2 * kv) + q * c.hidden_size + (q + 2 * kv if qkv_bias else 0) \
        + (c.hidden_size if c.attention_bias else 0)
    mlp = 3 * c.hidden_size * c.intermediate_size + ((2 * c.intermediate_size + c.hidden_size) if c.mlp_bias else 0)
    layer = attn + mlp + 2 * c.hidden_size  # two RMSNorms
    embed = c.vocab_size * c.hidden_size
    return c.num_hidden_layers * layer + embed + c.hidden_size + (0 if c.tie_word_embeddings else embed)


def profile_step_shape(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int) -> list[int]:
    """Prompt lengths of the profile run's step: the engine's largest step, as vLLM builds it
    (``max_num_batched_tokens`` split evenly over ``max_num_seqs`` sequences, none past the context)."""
    seqs = min(max_num_seqs, max_num_batched_tokens)
    longest = max_model_len - 1  # a prompt leaves room for one output token
    tokens = min(max_num_batched_tokens, seqs * longest)
    return [tokens // seqs + (i < tokens % seqs) for i in range(seqs)]


def estimate_llm_activation_bytes(config, lengths: list[int], block_size: int, dtype_bytes: int) -> int:
    """A formula for the peak of one step of the engine's plain-torch path (what the CPU runs):

        MLP          N x (3 x intermediate + 4 x hidden) x dtype bytes   (gate, up, their product; residuals)
        attention    per sequence of q tokens over its blocks (span = q rounded up to block_size), fp32:
                     K and V repeated to every query head, and the q x span scores and probabilities
        logits       one row of vocab per sequence, fp32

    The larger of MLP and attention, plus the logits. It is an estimate; the profile run measures.
    """
    c = config
    n = sum(lengths)
    mlp = n * (3 * c.intermediate_size + 4 * c.hidden_size) * dtype_bytes
    attn = 0
    for q in lengths:
        span = blocks_needed(q, block_size) * block_size
        attn += 4 * c.num_attention_heads * (2 * span * c.head_dim + 2 * q * span)
    return max(mlp, attn) + 4 * len(lengths) * c.vocab_size


def estimate_llm(name: str, config, engine_config, dtype: torch.dtype = torch.float32) -> MemoryProfile:
    """A model's profile from its config and the engine's knobs, before any weight is read."""
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    max_model_len = engine_config.max_model_len or config.max_position_embeddings
    lengths = profile_step_shape(engine_config.max_num_batched_tokens, engine_config.max_num_seqs, max_model_len)
    return MemoryProfile(
        name, llama_num_parameters(config) * dtype_bytes,
        estimate_llm_activation_bytes(config, lengths, engine_config.block_size, dtype_bytes),
        kv_bytes_per_block(config, engine_config.block_size, dtype_bytes), engine_config.block_size, max_model_len,
        engine_config.max_num_seqs, engine_config.max_num_batched_tokens, "estimate from config.json")


def estimate_encoder(name: str, config, max_batch: int, max_seq_length: int,
                     dtype: torch.dtype = torch.float32) -> MemoryProfile:
    """A BERT encoder's profile from its config: weights exactly; activations of a (max_batch, max_seq_length)
    forward by a formula (the larger of the MLP's intermediates and the fp32 scores and probabilities)."""
    c, b = config, torch.tensor([], dtype=dtype).element_size()
    emb = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * c.hidden_size + 2 * c.hidden_size
    layer = 4 * (c.hidden_size ** 2 + c.hidden_size) + 2 * c.hidden_size * c.intermediate_size \
        + c.intermediate_size + c.hidden_size + 4 * c.hidden_size
    n = max_batch * max_seq_length
    act = max(n * (2 * c.intermediate_size + 6 * c.hidden_size) * b,
              3 * max_batch * c.num_attention_heads * max_seq_length ** 2 * b)
    return MemoryProfile(name, (emb + c.num_hidden_layers * layer) * b, act, 0, 1, max_seq_length, max_batch,
                         n, "estimate from config.json")


# ---------------------------------------------------------------------------------------------
# After loading: the profile run
# ---------------------------------------------------------------------------------------------
class ProfileOOMError(MemoryError):
    """The profile run ran out of memory. ``min_budget_bytes``: a budget that would fit (extrapolated)."""

    def __init__(self, message: str, min_budget_bytes: int):
        super().__init__(message)
        self.min_budget_bytes = min_budget_bytes


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of CPU tensors created inside the ``with`` block that are still alive, and their peak.

    Every op's outputs pass through ``__torch_dispatch__``; a storage that none of the op's inputs already
    had is new, and a finaliser subtracts it when its last tensor dies. Views and in-place results share an
    input's storage, so they cost nothing, as on a real allocator. ``limit_bytes``: raise
    ``torch.OutOfMemoryError`` when live bytes pass it (a device of that size, for the CPU's profile run).
    """

    def __init__(self, limit_bytes: int | None = None):
        super().__init__()
        self.live = self.peak = 0
        self.limit_bytes = limit_bytes
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if n == 0 or key in inputs or key in self._tracked:
                continue
            self._tracked.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, n)
            if self.limit_bytes is not None and self.live > self.limit_bytes:
                raise torch.OutOfMemoryError(
                    f"CPU profile run: {self.live / MiB:.1f} MiB of live tensors is over the "
                    f"{self.limit_bytes / MiB:.1f} MiB this run may use ({func})")
        return out

    def _freed(self, key: int, n: int) -> None:
        self._tracked.discard(key)
        self.live -= n


def measure_peak_bytes(fn, device: torch.device, limit_bytes: int | None = None) -> tuple[int, str]:
    """(peak bytes ``fn()`` allocates beyond what was already allocated, the method used)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    with LiveTensorBytes(limit_bytes) as tracker:
        fn()
    return tracker.peak, "CPU live-tensor trace (bytes of tensors alive at once; allocator overhead not counted)"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, each shared tensor once (a tied lm_head is the embedding)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def _oom_error(name: str, what: str, weights: int, fitted: tuple[int, int] | None, wanted: int, kv_one_seq: int,
               available: int | None, smaller: str) -> ProfileOOMError:
    have = f" with {available / MiB:.1f} MiB available" if available is not None else ""
    if fitted is None:
        return ProfileOOMError(f"out of memory during the profile run of {name!r} ({what}){have}, even at the "
                               "smallest step: the weights leave no room; give it more memory", weights + kv_one_seq)
    size, peak = fitted
    act = math.ceil(peak * wanted / size)  # activations grow about linearly with the tokens of a step
    need = weights + act + kv_one_seq
    return ProfileOOMError(
        f"out of memory during the profile run of {name!r} ({what}){have}. A step of {size} tokens peaked at "
        f"{peak / MiB:.1f} MiB, so this step needs about {act / MiB:.1f} MiB: a budget of at least {need / MiB:.1f} "
        f"MiB (weights {weights / MiB:.1f} + activations {act / MiB:.1f} + one sequence's KV {kv_one_seq / MiB:.1f}) "
        f"would fit, or lower {smaller}.", need)


def profile_llm(name: str, model, engine_config, *, limit_bytes: int | None = None) -> MemoryProfile:
    """The profile run: the engine's largest step (``profile_step_shape``) on dummy tokens through the
    engine's own runner, its peak measured (see :func:`measure_peak_bytes`). The probe engine's few KV
    blocks are allocated before the measurement starts, so they are not counted.

    ``limit_bytes`` (CPU): the memory this run may use beyond the weights, as if the device held no more.
    On CUDA the device's own capacity is the limit. An out-of-memory is retried at half the tokens until
    one fits, then reported as :class:`ProfileOOMError` with the budget that would fit.
    """
    from labkit.engine import EngineConfig, LLMEngine, SamplingParams

    cfg = engine_config
    device = next(model.parameters()).device
    weights = weight_bytes(model)
    dtype = next(model.parameters()).dtype
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    max_model_len = cfg.max_model_len or model.config.max_position_embeddings
    kv_block = kv_bytes_per_block(model.config, cfg.block_size, dtype_bytes)
    kv_one_seq = blocks_needed(max_model_len, cfg.block_size) * kv_block

    def step_peak(tokens: int) -> tuple[int, str]:
        lengths = profile_step_shape(tokens, cfg.max_num_seqs, max_model_len)
        probe = LLMEngine(model, EngineConfig(
            num_blocks=sum(blocks_needed(n + 1, cfg.block_size) for n in lengths), block_size=cfg.block_size,
            max_num_seqs=len(lengths), max_num_batched_tokens=max(tokens, 1), max_model_len=max_model_len,
            watermark=0.0, enforce_eager=True, attention_backend=cfg.attention_backend,
            kv_cache_dtype=cfg.kv_cache_dtype))
        gen = torch.Generator().manual_seed(0)
        for n in lengths:
            probe.add_request(torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist(),
                              SamplingParams(max_tokens=1, ignore_eos=True))
        try:
            return measure_peak_bytes(probe.step, device, limit_bytes)
        finally:
            del probe
            if device.type == "cuda":
                torch.cuda.empty_cache()

    wanted = cfg.max_num_batched_tokens
    what = f"a step of {wanted} tokens in up to {cfg.max_num_seqs} sequences"
    try:
        peak, method = step_peak(wanted)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        fitted, size = None, wanted // 2
        while size >= cfg.block_size and fitted is None:
            try:
                fitted = (size, step_peak(size)[0])
            except Exception as inner:
                if not _is_oom(inner):
                    raise
                size //= 2
        raise _oom_error(name, what, weights, fitted, wanted, kv_one_seq, limit_bytes,
                         "max_num_batched_tokens") from None
    return MemoryProfile(name, weights, peak, kv_block, cfg.block_size, max_model_len, cfg.max_num_seqs,
                         cfg.max_num_batched_tokens, method)


def profile_encoder(name: str, embedder, max_batch: int, *, limit_bytes: int | None = None) -> MemoryProfile:
    """The embedder's profile run: one forward of ``max_batch`` texts at ``max_seq_length`` tokens each."""
    model = embedder.model
    device = next(model.parameters()).device
    weights = weight_bytes(model)
    T = embedder.max_seq_length

    @torch.no_grad()
    def forward(batch: int):
        ids = torch.randint(1000, model.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(0))
        ids, mask = ids.to(device), torch.ones(batch, T, dtype=torch.long, device=device)
        model(ids, mask)

    try:
        peak, method = measure_peak_bytes(lambda: forward(max_batch), device, limit_bytes)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        fitted, batch = None, max_batch // 2
        while batch >= 1 and fitted is None:
            try:
                fitted = (batch * T, measure_peak_bytes(lambda: forward(batch), device, limit_bytes)[0])
            except Exception as inner:
                if not _is_oom(inner):
                    raise
                batch //= 2
        raise _oom_error(name, f"a batch of {max_batch} texts of {T} tokens", weights, fitted, max_batch * T, 0,
                         limit_bytes, "the batch size") from None
    return MemoryProfile(name, weights, peak, 0, 1, T, max_batch, max_batch * T, method)


# ---------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------
class PlanError(ValueError):
    """A plan that cannot work; the message names the model and what to change."""


def num_kv_blocks(budget_bytes: int, profile: MemoryProfile) -> int:
    """vLLM's sizing: what the budget leaves after weights and activations, in whole blocks."""
    if not profile.has_kv_cache:
        return 0
    return max(0, (budget_bytes - profile.weight_bytes - profile.activation_bytes) // profile.kv_bytes_per_block)


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    profile: MemoryProfile
    budget_bytes: int
    num_blocks: int  # KV pool, in blocks of profile.block_size tokens

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def kv_bytes(self) -> int:
        return self.num_blocks * self.profile.kv_bytes_per_block

    @property
    def free_bytes(self) -> int:
        """Budget left after weights, activations and whole blocks."""
        p = self.profile
        return self.budget_bytes - p.weight_bytes - p.activation_bytes - self.kv_bytes

    def pool_seqs(self, tokens_per_seq: int | None = None) -> int:
        """Sequences of ``tokens_per_seq`` tokens (default: the full max_model_len) whose K/V the pool holds at once."""
        p = self.profile
        if not p.has_kv_cache:
            return 0
        tokens = p.max_model_len if tokens_per_seq is None else min(tokens_per_seq, p.max_model_len)
        return self.num_blocks // blocks_needed(tokens, p.block_size)

    def max_concurrent_seqs(self, tokens_per_seq: int | None = None) -> int:
        """Sequences served at once: what the pool holds, capped by the engine's batch slots (max_num_seqs).
        An encoder keeps no K/V: it serves its batch."""
        p = self.profile
        return min(p.max_num_seqs, self.pool_seqs(tokens_per_seq)) if p.has_kv_cache else p.max_num_seqs


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    device_name: str
    device_bytes: int
    models: list[ModelPlan]

    @property
    def unassigned_bytes(self) -> int:
        return self.device_bytes - sum(m.budget_bytes for m in self.models)

    def __getitem__(self, name: str) -> ModelPlan:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model {name!r} in this plan; it has {[m.name for m in self.models]}")

    def table(self, tokens_per_seq: int | None = None) -> str:
        rows = [f"{self.device_name}: {self.device_bytes / GiB:.2f} GiB, "
                f"unassigned {self.unassigned_bytes / GiB:.2f} GiB",
                f"{'model':10s} {'budget':>10s} {'weights':>10s} {'activ.':>10s} {'KV pool':>10s} {'blocks':>9s} "
                f"{'max seqs':>9s}"]
        for m in self.models:
            p = m.profile
            rows.append(f"{m.name:10s} {m.budget_bytes / MiB:8.1f}Mi {p.weight_bytes / MiB:8.1f}Mi "
                        f"{p.activation_bytes / MiB:8.1f}Mi {m.kv_bytes / MiB:8.1f}Mi {m.num_blocks:9d} "
                        f"{m.max_concurrent_seqs(tokens_per_seq):9d}")
        return "\n".join(rows)


def plan_memory(device_bytes: int, budgets: dict[str, int], profiles: dict[str, MemoryProfile] | list,
                device_name: str = "device") -> MemoryPlan:
    """Give each model its budget (bytes) and size its KV pool. Refuses, naming the model, a plan where
    the budgets exceed the device, a model whose weights + activations exceed its budget, or a KV pool
    smaller than one full-length sequence. Works on estimates as well as on measured profiles."""
    if isinstance(profiles, list):
        profiles = {p.name: p for p in profiles}
    if set(budgets) != set(profiles):
        raise PlanError(f"budgets name {sorted(budgets)} but profiles name {sorted(profiles)}: "
                        "give one budget per model")
    if device_bytes <= 0:
        raise PlanError(f"device_bytes must be positive, got {device_bytes}")
    for name, b in budgets.items():
        if b <= 0:
            raise PlanError(f"{name!r}: budget must be positive, got {b}")
        if b > device_bytes:
            raise PlanError(f"{name!r}: its budget of {b / GiB:.2f} GiB is more than the whole {device_name} "
                            f"({device_bytes / GiB:.2f} GiB)")
    total = sum(budgets.values())
    if total > device_bytes:
        parts = ", ".join(f"{n} {b / GiB:.2f}" for n, b in budgets.items())
        raise PlanError(f"the budgets add up to {total / GiB:.2f} GiB ({parts}), more than the {device_name}'s "
                        f"{device_bytes / GiB:.2f} GiB: lower one of them by {(total - device_bytes) / GiB:.2f} GiB")
    plans = []
    for name, budget in budgets.items():
        p = profiles[name]
        fixed = p.weight_bytes + p.activation_bytes
        if fixed > budget:
            raise PlanError(f"{name!r} does not fit its budget of {budget / MiB:.1f} MiB: weights "
                            f"{p.weight_bytes / MiB:.1f} + activations {p.activation_bytes / MiB:.1f} MiB "
                            f"= {fixed / MiB:.1f} MiB ({p.method}). "
                            f"Give it at least {p.min_budget_bytes / MiB:.1f} MiB, "
                            f"or lower its max_num_batched_tokens / batch")
        blocks = num_kv_blocks(budget, p)
        if p.has_kv_cache and blocks < p.blocks_per_seq:
            raise PlanError(f"{name!r}: its KV pool would hold {blocks} blocks, fewer than the {p.blocks_per_seq} "
                            f"one sequence of max_model_len={p.max_model_len} tokens needs. Give it at least "
                            f"{p.min_budget_bytes / MiB:.1f} MiB, or lower max_model_len")
        plans.append(ModelPlan(p, budget, blocks))
    return MemoryPlan(device_name, device_bytes, plans)


def engine_config_for(plan: ModelPlan, engine_config):
    """The engine's config with the pool the plan gives it (``num_blocks``)."""
    return dataclasses.replace(engine_config, num_blocks=plan.num_blocks)


def device_memory_bytes(device: torch.device | str) -> tuple[int, str]:
    """(total bytes, a name) of a device: the GPU's memory, or this machine's RAM for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, props.name
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return kib * 1024, "CPU RAM"


def pool_as_others_grow(profiles: list[MemoryProfile], device_bytes: int, llm: str, utilization: float = 0.9,
                        points: int = 24, tokens_per_seq: int | None = None) -> list[dict]:
    """The LLM gets ``utilization`` x device minus what the others take; the others' budgets grow from their
    minimum together (each ``scale`` x its min_budget). One row per point, until the LLM no longer fits."""
    by_name = {p.name: p for p in profiles}
    if llm not in by_name:
        raise ValueError(f"no profile named {llm!r}; have {sorted(by_name)}")
    others = [p for p in profiles if p.name != llm]
    total = utilization * device_bytes
    floor = sum(p.min_budget_bytes for p in others)
    room = total - by_name[llm].min_budget_bytes
    if floor > room:
        raise PlanError(f"the other models' smallest budgets ({floor / MiB:.1f} MiB) leave {llm!r} less than its "
                        f"minimum of {by_name[llm].min_budget_bytes / MiB:.1f} MiB")
    rows = []
    for k in range(points):
        scale = 1 + (room / max(floor, 1) - 1) * k / (points - 1)
        budgets = {p.name: int(p.min_budget_bytes * scale) for p in others}
        budgets[llm] = int(total - sum(budgets.values()))
        try:
            plan = plan_memory(device_bytes, budgets, profiles)
        except PlanError:
            break
        m = plan[llm]
        rows.append({"others_bytes": sum(v for n, v in budgets.items() if n != llm), "llm_budget": budgets[llm],
                     "num_blocks": m.num_blocks, "max_seqs": m.max_concurrent_seqs(tokens_per_seq),
                     "pool_seqs": m.pool_seqs(tokens_per_seq)})
    return rows
