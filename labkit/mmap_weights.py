"""Running a model straight from its memory-mapped safetensors file, and what that costs.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range) and the
raw bytes. Memory-map it and each tensor is just a view at an offset (``torch.frombuffer``): loading
copies nothing, and a page of weights is read from disk the first time a matmul touches it (a *major*
page fault) or mapped from the page cache if another reader already brought it in (a *minor* fault).

    cold cache (posix_fadvise DONTNEED):  first token -> faults -> disk reads -> slow
    warm cache:                           every page already in RAM -> mapped, not read -> full speed
    MoE:                                  a token reads only its experts' pages; the rest may stay on disk

"mmap is not free, it just moves bandwidth around": the bytes still cross from disk to RAM once, and
again after the kernel evicts them. :func:`measure_generation` counts it on this machine (faults from
``getrusage``, bytes from ``/proc/self/io``, resident pages of the file from ``mincore``), and
:func:`expert_cache_replay` asks how many expert bytes a small LRU cache of resident experts would move.

    python -m labkit.mmap_weights --model data/model_moe      # prints cold / warm / expert-cache numbers
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import json
import mmap
import os
import pathlib
import resource
import struct
import time

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8, "U8": torch.uint8,
          "I32": torch.int32, "I64": torch.int64}
PAGE = mmap.PAGESIZE


class MappedSafetensors:
    """A safetensors file memory-mapped once; ``tensors`` are views into it (copy-on-write, the file is never
    written). Keep this object alive as long as the tensors are used; ``evict()`` drops its pages from RAM."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        self.fd = os.open(self.path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size
        self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)  # private mapping: writable views, file untouched
        (header_len,) = struct.unpack("<Q", self.mm[:8])
        header = json.loads(self.mm[8:8 + header_len])
        self.data_start = 8 + header_len
        self.ranges, self.tensors = {}, {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {meta['dtype']}, not one of {sorted(DTYPES)}")
            begin, end = meta["data_offsets"]
            self.ranges[name] = (self.data_start + begin, self.data_start + end)
            dtype = DTYPES[meta["dtype"]]
            count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
            t = torch.frombuffer(self.mm, dtype=dtype, count=count, offset=self.data_start + begin) if count else \
                torch.empty(0, dtype=dtype)
            self.tensors[name] = t.reshape(meta["shape"])

    def evict(self) -> None:
        """Drop the file's pages from this mapping and from the page cache: the next read comes from disk."""
        self.mm.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def resident_bytes(self) -> int:
        """Bytes of the file in RAM for this mapping's view (mincore: pages in the page cache)."""
        libc = ctypes.CDLL(None, use_errno=True)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        pages = (self.size + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(self.size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(v & 1 for v in vec) * PAGE


def load_mmap(model_dir: str | pathlib.Path):
    """(model, tokenizer, mapping): labkit's model whose parameters are views of the mapped file (its own dtype,
    bf16 for the shipped models: converting to fp32 would copy every weight into RAM)."""
    from labkit.checkpoint import Tokenizer
    from labkit.config import LlamaConfig
    from labkit.model import LlamaForCausalLM, rope_inv_freq

    model_dir = pathlib.Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{model_dir}: load_mmap reads one model.safetensors, found {[f.name for f in files]}")
    config = LlamaConfig.from_file(model_dir / "config.json")
    mapping = MappedSafetensors(files[0])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = dict(mapping.tensors)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{files[0]}: tensors missing for this config: {missing[:6]}")
    model.load_state_dict({k: state[k] for k in model.state_dict()}, assign=True)
    model.model.rotary_emb.inv_freq = rope_inv_freq(config)
    tokenizer = Tokenizer(model_dir / "tokenizer.json", eos_token_id=0)
    return model.eval(), tokenizer, mapping


# --- counters ----------------------------------------------------------------------------------------
def _read_bytes() -> int:
    """Bytes this process caused to be read from storage (/proc/self/io), or -1 where the kernel hides it."""
    try:
        for line in open("/proc/self/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _rss_kb() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0])
    return out


@dataclasses.dataclass
class Counters:
    seconds: float
    major_faults: int
    minor_faults: int
    disk_read_bytes: int
    rss_file_kb: int  # resident file-backed pages of this process (the mapping) after the run
    resident_file_bytes: int  # bytes of the weight file in RAM after the run (mincore)


@torch.no_grad()
def measure_generation(model, mapping: MappedSafetensors | None, prompt_ids: list[int], new_tokens: int,
                       cold: bool = False, label: str | None = None) -> dict:
    """Greedy-generate ``new_tokens`` (KV cache on) and count what it cost; ``cold`` evicts the file first.
    ``mapping=None``: a model whose weights were copied into RAM (the baseline mmap is compared with)."""
    from labkit.generate import generate
    from labkit.kv_cache import ContiguousCache

    if cold:
        mapping.evict()
    r0, b0, t0 = resource.getrusage(resource.RUSAGE_SELF), _read_bytes(), time.perf_counter()
    gen = generate(model, prompt_ids, new_tokens, cache=ContiguousCache(model.config, 1, len(prompt_ids) + new_tokens,
                                                                        dtype=next(model.parameters()).dtype))
    seconds = time.perf_counter() - t0
    r1, b1 = resource.getrusage(resource.RUSAGE_SELF), _read_bytes()
    c = Counters(seconds, r1.ru_majflt - r0.ru_majflt, r1.ru_minflt - r0.ru_minflt,
                 (b1 - b0) if b0 >= 0 else -1, _rss_kb().get("RssFile", -1),
                 mapping.resident_bytes() if mapping else -1)
    n = len(gen.token_ids)
    return {"run": label or ("mmap, cold cache" if cold else "mmap, warm cache"), "tokens": n,
            "tokens_per_s": n / seconds,
            "disk_read_bytes_per_token": c.disk_read_bytes / n if c.disk_read_bytes >= 0 else None,
            **dataclasses.asdict(c), "token_ids": gen.token_ids}


# --- an LRU cache of resident experts -------------------------------------------------------------
def expert_cache_replay(trace: torch.Tensor, capacity: int, bytes_per_expert: int) -> dict:
    """Replay a routing trace (steps, layers, E) bool through an LRU cache of ``capacity`` (layer, expert)
    entries: every expert a step uses must be resident; a miss moves its bytes in (evicting the least recently
    used). Returns hit rate and bytes moved per step (per generated token when each step is one token)."""
    steps, layers, experts = trace.shape
    if not 0 < capacity:
        raise ValueError(f"capacity must be at least one expert, got {capacity}")
    lru: collections.OrderedDict = collections.OrderedDict()
    hits = misses = 0
    for s in range(steps):
        for layer in range(layers):
            for e in torch.nonzero(trace[s, layer]).flatten().tolist():
                key = (layer, e)
                if key in lru:
                    hits += 1
                    lru.move_to_end(key)
                    continue
                misses += 1
                lru[key] = True
                if len(lru) > capacity:
                    lru.popitem(last=False)
    total = hits + misses
    return {"capacity": capacity, "capacity_share": capacity / (layers * experts), "hit_rate": hits / max(total, 1),
            "bytes_moved_per_token": misses * bytes_per_expert / max(steps, 1), "misses": misses}


@torch.no_grad()
def decode_routing_trace(model, prompt_ids: list[int], new_tokens: int) -> torch.Tensor:
    """(steps, layers, E) bool: the experts each decode step used while greedy-generating (KV cache on)."""
    from labkit.generate import generate
    from labkit.kv_cache import ContiguousCache
    from labkit.moe import moe_blocks

    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("decode_routing_trace needs an MoE model (data/model_moe)")
    steps: list[list[torch.Tensor]] = []

    def hook(block, args, out):
        x = args[0].reshape(-1, args[0].shape[-1])[-1:]  # the step's newest token
        if block is blocks[0]:
            steps.append([])
        steps[-1].append(block.dispatch(x).selected[0])

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        generate(model, prompt_ids, new_tokens, cache=ContiguousCache(model.config, 1, len(prompt_ids) + new_tokens,
                                                                      dtype=next(model.parameters()).dtype))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([torch.stack(s) for s in steps[1:]])  # drop the prefill step


def expert_bytes(model, dtype_bytes: int | None = None) -> int:
    """Bytes of one expert's three matrices: in the model's dtype, or at ``dtype_bytes`` a weight (2: bf16 as stored)."""
    from labkit.moe import moe_blocks

    ex = moe_blocks(model)[0].experts[0]
    return sum(p.numel() * (dtype_bytes or p.element_size()) for p in ex.parameters())


def mmap_figure(runs: list[dict], cache_rows: list[dict]):
    """Left: tokens/s and disk bytes per token, cold vs warm. Right: LRU expert cache, hit rate and MB moved per
    token against cache size."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, specs=[[{"secondary_y": True}, {"secondary_y": True}]],
                        subplot_titles=["mmap'd weights: cold vs warm page cache", "LRU cache of resident experts"])
    names = [r["run"] for r in runs]
    fig.add_trace(go.Bar(x=names, y=[r["tokens_per_s"] for r in runs], name="tokens/s", marker_color="seagreen",
                         offsetgroup=0), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[(r["disk_read_bytes_per_token"] or 0) / 1e3 for r in runs],
                         name="disk KB read per token", marker_color="firebrick", offsetgroup=1), row=1, col=1,
                  secondary_y=True)
    if cache_rows:
        x = [100 * r["capacity_share"] for r in cache_rows]
        fig.add_trace(go.Scatter(x=x, y=[r["hit_rate"] for r in cache_rows], name="hit rate", mode="lines+markers"),
                      row=1, col=2)
        fig.add_trace(go.Scatter(x=x, y=[r["bytes_moved_per_token"] / 1e3 for r in cache_rows],
                                 name="KB moved per token", mode="lines+markers", line=dict(dash="dash")),
                      row=1, col=2, secondary_y=True)
        fig.update_xaxes(title="cache size (% of all experts)", row=1, col=2)
    fig.update_yaxes(title="tokens/s", row=1, col=1)
    fig.update_yaxes(title="KB per token", row=1, col=1, secondary_y=True)
    fig.update_yaxes(title="hit rate", range=[0, 1.05], row=1, col=2)
    fig.update_yaxes(title="KB per token", row=1, col=2, secondary_y=True)
    fig.update_layout(height=420, barmode="group")
    return fig


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from labkit.checkpoint import DEFAULT_MODEL_DIR, load_pretrained

    parser = argparse.ArgumentParser(description="Run a model from its mmap'd safetensors: faults, disk reads, "
                                                 "tokens/s cold vs warm, and an LRU expert cache.")
    parser.add_argument("--model", type=pathlib.Path, default=DEFAULT_MODEL_DIR.parent / "model_moe")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", default="It is a truth universally acknowledged")
    ns = parser.parse_args(argv)
    model, tok, mapping = load_mmap(ns.model)
    prompt = tok.encode(ns.prompt)
    print(f"{mapping.path}: {mapping.size / 1e6:.1f} MB mapped; page size {PAGE} B; weights {next(model.parameters()).dtype}")
    runs = [measure_generation(model, mapping, prompt, ns.tokens, cold) for cold in (True, False, True, False)]
    resident, _ = load_pretrained(ns.model, dtype=next(model.parameters()).dtype)
    runs.append(measure_generation(resident, None, prompt, ns.tokens, label="copied into RAM"))
    if runs[-1]["token_ids"] != runs[1]["token_ids"]:
        raise RuntimeError("the mmap'd and the copied model generated different tokens: the mapping is wrong")
    print(f"{'run':>17} {'tok/s':>7} {'major':>6} {'minor':>6} {'disk KB/token':>13} {'file MB in RAM':>14}")
    for r in runs:
        per_tok = "n/a" if r["disk_read_bytes_per_token"] is None else f"{r['disk_read_bytes_per_token'] / 1e3:.1f}"
        in_ram = "-" if r["resident_file_bytes"] < 0 else f"{r['resident_file_bytes'] / 1e6:.2f}"
        print(f"{r['run']:>17} {r['tokens_per_s']:7.1f} {r['major_faults']:6d} {r['minor_faults']:6d} {per_tok:>13} "
              f"{in_ram:>14}")
    result = {"runs": runs, "expert_cache": []}
    if model.config.num_local_experts:
        trace = decode_routing_trace(model, prompt, ns.tokens)
        per_expert = expert_bytes(model)
        total = trace.shape[1] * trace.shape[2]
        print(f"\nLRU expert cache over {trace.shape[0]} decode steps ({trace.shape[1]} layers x {trace.shape[2]} experts, "
              f"{per_expert / 1e3:.0f} KB each; a token uses {int(trace[0].sum())} experts a step):")
        print(f"{'cache':>6} {'share':>6} {'hit rate':>8} {'KB moved/token':>14}")
        for cap in sorted({max(1, round(total * f)) for f in (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)}):
            r = expert_cache_replay(trace, cap, per_expert)
            result["expert_cache"].append(r)
            print(f"{cap:6d} {r['capacity_share']:6.0%} {r['hit_rate']:8.1%} {r['bytes_moved_per_token'] / 1e3:14.1f}")
    return result


if __name__ == "__main__":
    main()
