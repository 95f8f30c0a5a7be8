"""Notebook 04 exercises: build the paged KV cache's block allocator (a free list in LRU order plus a
reference count per block), check it against ``labkit.paged.BlockAllocator`` on random operation
sequences, then serve requests with it inside the engine.

The learner passes a class; ``adapt`` turns it into "run these operations on a fresh instance and note
what each one did", so the checker compares operation by operation and says which one first differs.
"""
from __future__ import annotations

import functools

import torch

from labkit.exercises import Exercise
from labkit.paged import BlockAllocator, DoubleFreeError, NoFreeBlocksError

# What an operation raised, as the most specific of these it is an instance of (DoubleFreeError is a ValueError).
ERRORS = (DoubleFreeError, NoFreeBlocksError, ValueError)


def _error_name(e: Exception) -> str:
    return next((cls.__name__ for cls in ERRORS if isinstance(e, cls)), type(e).__name__)


def run_ops(allocator_cls, num_blocks: int, ops: list[tuple[str, int | None]]) -> list[dict]:
    """Build ``allocator_cls(num_blocks)`` and apply ``ops`` (("allocate", None), ("free", block_id),
    ("incref", block_id)); after each, note what it returned (allocate) or raised, the ref counts and the
    free list in the order allocate will hand blocks out."""
    a = allocator_cls(num_blocks)
    trace = []
    for op, arg in ops:
        rec = {"op": "allocate()" if op == "allocate" else f"{op}({arg})"}
        try:
            if op == "allocate":
                rec["returned"] = a.allocate()
            else:
                getattr(a, op)(arg)
        except NotImplementedError:
            raise
        except Exception as e:  # noted, compared with what the reference raised
            rec["raised"] = _error_name(e)
        rec["ref_count"] = list(a.ref_count)
        rec["free list"] = list(a.free_block_ids())
        rec["num_free_blocks"] = a.num_free_blocks
        trace.append(rec)
    return trace


def run_cases(allocator_cls, cases: list[tuple[int, list]]) -> list[list[dict]]:
    """:func:`run_ops` on a fresh allocator for each (num_blocks, ops) case."""
    return [run_ops(allocator_cls, n, ops) for n, ops in cases]


def _reference_ops(cases):
    return run_cases(BlockAllocator, cases)


# Every trial runs these edge cases, then one random sequence.
_EDGE_CASES = [
    (0, [("allocate", None), ("free", 0), ("incref", 0)]),  # an empty pool
    (3, [("allocate", None), ("free", 0), ("free", 0)]),  # double free
    (2, [("allocate", None), ("incref", 1), ("free", 2), ("free", -1)]),  # incref of a free block; ids out of range
    (4, [("allocate", None)] * 4 + [("free", 2), ("free", 0), ("free", 3), ("allocate", None), ("allocate", None),
                                    ("allocate", None)]),  # LRU: freed blocks come back in the order freed
    (3, [("allocate", None), ("incref", 0), ("free", 0), ("allocate", None), ("free", 0), ("allocate", None),
         ("allocate", None), ("allocate", None)]),  # a shared block returns only when its last holder frees it
]


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _random_ops(gen) -> tuple[int, list]:
    """Mostly legal operations on blocks in use (so the pool fills, empties and reorders), with some
    double frees, increfs of free blocks, ids out of range and allocations from an empty pool."""
    n = [0, 1, 2, 3, 5, 8][_int(gen, 0, 6)]
    ref = BlockAllocator(n)
    ops = []
    for _ in range(_int(gen, 5, 40)):
        used = [b for b in range(n) if ref.ref_count[b] > 0]
        r = _int(gen, 0, 100)
        if r < 40 or not used:
            op, arg = "allocate", None
        elif r < 90:
            op, arg = ("free" if r < 72 else "incref"), used[_int(gen, 0, len(used))]
        else:
            op, arg = ("free" if r < 95 else "incref"), _int(gen, -1, n + 1)  # maybe free, maybe out of range
        ops.append((op, arg))
        try:
            ref.allocate() if op == "allocate" else getattr(ref, op)(arg)
        except (ValueError, NoFreeBlocksError):
            pass
    return n, ops


def _ops_inputs(gen):
    return ([(n, list(ops)) for n, ops in _EDGE_CASES] + [_random_ops(gen)],)


def _explain_ops(args, got, expected) -> str:
    (cases,) = args
    c = next(k for k, (g, e) in enumerate(zip(got, expected)) if g != e)
    (num_blocks, _), got, expected = cases[c], got[c], expected[c]
    i = next((k for k, (g, e) in enumerate(zip(got, expected)) if g != e), min(len(got), len(expected)))
    before = ", ".join(f"{r['op']} -> {r['returned']}" if "returned" in r else r["op"] for r in expected[:i])
    lines = [f"  a pool of {num_blocks} blocks; operations before: {before or '(none)'}",
             f"  operation {i + 1}, {expected[i]['op']}:"]
    g, e = got[i], expected[i]
    for key in ("returned", "raised", "ref_count", "free list", "num_free_blocks"):
        if g.get(key, "nothing") != e.get(key, "nothing"):
            lines.append(f"    {key:16s} yours: {g.get(key, 'nothing')}   expected: {e.get(key, 'nothing')}")
    return "\n".join(lines)


# ---- the learner's allocator inside the engine ------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _model():
    from labkit.checkpoint import load_default_model

    model, _ = load_default_model()
    return model


def serve_with_allocator(allocator_cls, num_blocks: int, block_size: int, requests) -> dict:
    """Serve ``requests`` ((prompt ids, max_tokens) each) on the shipped model with the engine in notebook 04's
    configuration (paged, preemption by recompute) over ``allocator_cls(num_blocks)``; returns every request's
    tokens, the preemptions, and each step's block tables (which block went where)."""
    model = _model()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and steadier on a shared machine
    try:
        return _serve(model, allocator_cls, num_blocks, block_size, requests)
    finally:
        torch.set_num_threads(threads)


def _serve(model, allocator_cls, num_blocks, block_size, requests) -> dict:
    from labkit.engine import EngineConfig, LLMEngine, SamplingParams
    from labkit.engine.block_manager import EngineBlockManager

    cfg = EngineConfig.preset("paged", num_blocks=num_blocks, block_size=block_size, max_num_seqs=4, watermark=0.0,
                              max_num_batched_tokens=64)
    engine = LLMEngine(model, cfg, eos_token_ids=())
    # the engine's block manager, built over the given allocator instead of labkit.paged.BlockAllocator
    engine.scheduler.block_manager = EngineBlockManager(num_blocks, block_size, max_model_len=engine.max_model_len,
                                                        allocator=allocator_cls(num_blocks))
    seqs = [engine.add_request(list(p), SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in requests]
    tables = []
    engine.observers.append(lambda eng, out: tables.append({s.seq.seq_id: list(s.seq.block_table)
                                                            for s in out.scheduled}))
    engine.run(max_steps=2000)
    return {"tokens": [s.output_token_ids for s in seqs], "preemptions": sum(s.num_preemptions for s in seqs),
            "block tables per step": tables}


def _engine_inputs(gen):
    block_size = [2, 4, 8][_int(gen, 0, 3)]
    requests = [(tuple(torch.randint(1, 4096, (_int(gen, 3, 16),), generator=gen).tolist()), _int(gen, 4, 12))
                for _ in range(_int(gen, 3, 6))]
    longest = max(len(p) + n for p, n in requests)
    need = -(-longest // block_size)
    return need + _int(gen, 0, need), block_size, requests  # a small pool: someone gets preempted


def _reference_engine(num_blocks, block_size, requests):
    return serve_with_allocator(BlockAllocator, num_blocks, block_size, requests)


def _explain_engine(args, got, expected) -> str:
    num_blocks, block_size, requests = args
    head = f"  {len(requests)} requests, a pool of {num_blocks} blocks of {block_size} tokens"
    for i, (g, e) in enumerate(zip(got["tokens"], expected["tokens"])):
        if g != e:
            return f"{head}\n  request {i}'s tokens differ: yours {g}, expected {e}"
    if got["preemptions"] != expected["preemptions"]:
        return f"{head}\n  preemptions: yours {got['preemptions']}, expected {expected['preemptions']}"
    steps = zip(got["block tables per step"], expected["block tables per step"])
    k = next((k for k, (g, e) in enumerate(steps) if g != e), None)
    if k is not None:
        return (f"{head}\n  same tokens, but at step {k} the blocks went elsewhere: yours "
                f"{got['block tables per step'][k]}, expected {expected['block tables per step'][k]} "
                "(check the order of your free list)")
    return f"{head}\n  the runs took a different number of steps"


_SPEC = ("BlockAllocator(num_blocks): ref_count (a list, one count per block), num_free_blocks, free_block_ids() "
         "(free blocks in the order allocate hands them out), allocate() -> the block freed longest ago "
         "(NoFreeBlocksError when none is free), incref(block_id) (ValueError if it is free), free(block_id) "
         "(ref_count - 1; at 0 the block goes to the back of the free list; DoubleFreeError if it is already free); "
         "ValueError for an id outside [0, num_blocks).")

EXERCISES = {
    "block_allocator": Exercise(
        reference=_reference_ops, make_inputs=_ops_inputs, adapt=lambda cls: functools.partial(run_cases, cls),
        explain=_explain_ops, trials=30,
        spec=_SPEC),
    "block_allocator_in_engine": Exercise(
        reference=_reference_engine, make_inputs=_engine_inputs, explain=_explain_engine, trials=2,
        adapt=lambda cls: functools.partial(serve_with_allocator, cls),
        spec="the same allocator, plugged into the engine: every request must get the tokens (and every step the "
             "blocks) it gets with labkit.paged.BlockAllocator."),
}
