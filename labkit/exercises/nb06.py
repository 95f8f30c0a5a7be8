"""Notebook 06 exercises: the block hash chain, ``append_slot`` with copy-on-write, and the prefix-cache lookup.

``append_slot`` is checked inside a real :class:`labkit.paged.BlockManager`: random sequences of allocate /
fork / append / free (small pools, so blocks run out; empty sequences, full and shared last blocks), the
learner's function doing every append, compared after each operation with the package's. ``match_prefix``
is checked on random caches (chains broken in the middle, salts, prompts that end on a block boundary) and
plugged into the engine's prefix cache (``LLMEngine``, preset "prefix", a tiny random model): the same
tokens and the same cached-token counts as with the package's lookup.
"""
from __future__ import annotations

import random

import torch

from labkit.exercises import Exercise
from labkit.paged import BlockAllocator, BlockManager, SequenceBlocks
from labkit.prefix_cache import PrefixCachingBlockManager, block_hashes


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def tiny_llama(seed: int = 0, vocab_size: int = 64):
    """A small random Llama (fp32, spread weights: no near-ties in argmax) for the engine checks."""
    from labkit.config import LlamaConfig
    from labkit.model import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.3)
    return model


# ---- 1. the hash chain ------------------------------------------------------------------------------
def _hash_chain_inputs(gen):
    block_size = [1, 2, 4, 8, 16][_int(gen, 0, 5)]
    tokens = torch.randint(0, 50, (_int(gen, 0, 5 * block_size + 3),), generator=gen).tolist()
    salt = [None, "tenant-a", "tenant-b"][_int(gen, 0, 3)]
    return tokens, block_size, salt


# ---- 2. append_slot with copy-on-write ----------------------------------------------------------------
def _append_slot(seq: SequenceBlocks, allocator: BlockAllocator, copies: list) -> int:
    """The package's append_slot (BlockManager.append_slot) on one sequence's blocks."""
    bm = BlockManager(allocator.num_blocks, seq.block_size, allocator=allocator)
    bm.seqs["seq"] = seq
    slot = bm.append_slot("seq")
    copies.extend(bm.take_copies())
    return slot


def _block_ops_inputs(gen):
    rng = random.Random(_int(gen, 0, 2**31))
    block_size = rng.choice([1, 2, 4])
    num_blocks = rng.randint(3, 10)
    ops, ids = [], []
    for _ in range(rng.randint(15, 40)):
        r = rng.random()
        if not ids or r < 0.15:
            ids.append(f"s{len(ids)}")
            ops.append(("allocate", ids[-1], rng.randint(0, 3 * block_size)))
        elif r < 0.3:
            ids.append(f"s{len(ids)}")
            ops.append(("fork", rng.choice(ids[:-1]), ids[-1]))
        elif r < 0.38:
            ops.append(("free", rng.choice(ids)))
        else:
            ops.append(("append_slot", rng.choice(ids)))
    return ops, num_blocks, block_size


def _drive_block_manager(append_slot, ops, num_blocks, block_size) -> dict:
    """Play ``ops`` on a BlockManager whose appends all go through ``append_slot``; after each operation record
    what it returned and the whole state (block tables, ref counts, free list in order)."""
    bm = BlockManager(num_blocks, block_size)
    trace = {}
    for i, op in enumerate(ops):
        kind, seq_id = op[0], op[1]
        rec = {}
        if kind == "fork" and (seq_id not in bm.seqs or op[2] in bm.seqs):
            rec["skipped"] = True
        elif kind != "allocate" and kind != "fork" and seq_id not in bm.seqs:
            rec["skipped"] = True  # its allocation failed earlier, or it was freed
        else:
            try:
                if kind == "allocate":
                    bm.allocate(seq_id, op[2])
                elif kind == "fork":
                    bm.fork(seq_id, op[2])
                elif kind == "free":
                    bm.free(seq_id)
                else:
                    copies: list = []
                    rec["slot"] = append_slot(bm.seqs[seq_id], bm.allocator, copies)
                    rec["copies"] = [tuple(c) for c in copies]
            except NotImplementedError:
                raise
            except Exception as e:  # noqa: BLE001  (the error is part of the behaviour compared)
                rec["error"] = type(e).__name__
        rec["block_tables"] = {s: list(b.block_table) for s, b in bm.seqs.items()}
        rec["num_tokens"] = {s: b.num_tokens for s, b in bm.seqs.items()}
        rec["ref_count"] = list(bm.ref_count)
        rec["free_blocks"] = bm.allocator.free_block_ids()
        trace[f"op {i}: {kind}{op[1:]}"] = rec
    return trace


# ---- 3. prefix-cache lookup over the hash chain --------------------------------------------------------
def _match_prefix(token_ids: list[int], block_size: int, cached: dict, salt: str | None) -> list[int]:
    """The package's lookup (PrefixCachingBlockManager.match_prefix) over the cache ``cached`` (hash -> block)."""
    bm = PrefixCachingBlockManager(1, block_size)
    bm.hash_to_block = dict(cached)
    return bm.match_prefix(token_ids, salt)


def _prefix_inputs(gen):
    rng = random.Random(_int(gen, 0, 2**31))
    block_size = rng.choice([1, 2, 4, 8])
    vocab = rng.choice([2, 3, 64])  # tiny vocabularies: many shared prefixes
    cached, next_block, earlier = {}, 0, []
    for _ in range(rng.randint(0, 4)):  # earlier prompts, some salted, some with a block evicted
        toks = [rng.randrange(vocab) for _ in range(rng.randint(1, 5 * block_size))]
        salt = rng.choice([None, None, "tenant-a"])
        earlier.append((toks, salt))
        hashes = block_hashes(toks, block_size, salt)
        if len(hashes) > 1 and rng.random() < 0.4:
            hashes.pop(rng.randrange(len(hashes) - 1))  # evicted: the chain breaks there, later blocks remain
        for h in hashes:
            if h not in cached:
                cached[h] = next_block
                next_block += 1
    queries = []
    for _ in range(12):
        salt = rng.choice([None, None, "tenant-a", "tenant-b"])
        if earlier and rng.random() < 0.7:  # an earlier prompt, cut and continued, maybe with its own salt
            toks, their_salt = rng.choice(earlier)
            salt = their_salt if rng.random() < 0.7 else salt
            cut = rng.choice([len(toks), rng.randint(0, len(toks)), (len(toks) // block_size) * block_size])
            toks = toks[:cut] + [rng.randrange(vocab) for _ in range(rng.choice([0, 0, 1, block_size]))]
        else:
            toks = [rng.randrange(vocab) for _ in range(rng.randint(0, 5 * block_size + 1))]
        queries.append((toks, salt))
    engine_case = (block_size, [(rng.choice([0, 1, 2]), rng.randint(1, 6), rng.random() < 0.3)
                                for _ in range(rng.randint(3, 5))], rng.randint(0, 2**31))
    return cached, queries, block_size, engine_case


def _drive_prefix_lookup(match_prefix, cached, queries, block_size, engine_case) -> dict:
    """Direct lookups, then the engine (prefix caching on) with ``match_prefix`` as its lookup."""
    from labkit.engine import EngineConfig, LLMEngine, SamplingParams

    out = {}
    for i, (toks, salt) in enumerate(queries):
        out[f"lookup {i} (tokens {toks}, salt {salt!r})"] = list(match_prefix(list(toks), block_size, dict(cached), salt))
    bs, shape, seed = engine_case
    rng = random.Random(seed)
    model = tiny_llama(seed % 3)
    heads = [[rng.randrange(64) for _ in range(rng.randint(bs, 4 * bs))] for _ in range(3)]
    engine = LLMEngine(model, EngineConfig.preset("prefix", num_blocks=64, block_size=bs, max_num_seqs=2),
                       eos_token_ids=())
    pc = engine.block_manager.bm
    pc.match_prefix = lambda token_ids, cache_salt=None: list(
        match_prefix(list(token_ids), pc.block_size, dict(pc.hash_to_block), cache_salt))
    seqs, prompt, salt = [], None, None
    for j, (head, tail, repeat) in enumerate(shape):
        if not (repeat and prompt):  # a repeated prompt lies entirely in the cache: its last token is computed
            prompt = heads[head] + [rng.randrange(64) for _ in range(tail)]
            salt = rng.choice([None, None, "tenant-a"])
        seqs.append(engine.add_request(prompt, SamplingParams(max_tokens=3), arrival_s=float(j), cache_salt=salt))
    from labkit.side_channel import one_thread

    try:
        with one_thread():  # a tiny model: more threads only fight over a shared machine's cores
            engine.run(max_steps=200)
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001
        out["engine error"] = type(e).__name__
        return out
    for s in seqs:
        out[f"engine request {s.seq_id}"] = {"output tokens": s.output_token_ids,
                                              "num_cached_tokens": s.num_cached_tokens}
    return out


EXERCISES = {
    "block_hash_chain": Exercise(
        reference=block_hashes, make_inputs=_hash_chain_inputs,
        spec="hashes of the full blocks of token_ids, each hash_block(parent_hash, block_tokens, salt), "
             "parent_hash None for the first block; a partial last block has no hash."),
    "append_slot": Exercise(
        reference=_append_slot, make_inputs=_block_ops_inputs, harness=_drive_block_manager, trials=30,
        spec="append_slot(seq, allocator, copies) -> slot: room for one more token of seq (a SequenceBlocks). "
             "Last block full or none: allocate a new one. Last block partial and shared (ref_count > 1): "
             "copy-on-write: allocate a private block, drop one reference to the shared one, put the new block "
             "in the table and append (src, dst) to copies. Then count the token and return its slot. If no "
             "block is free, raise NoFreeBlocksError having changed nothing."),
    "match_prefix": Exercise(
        reference=_match_prefix, make_inputs=_prefix_inputs, harness=_drive_prefix_lookup, trials=8,
        spec="match_prefix(token_ids, block_size, cached, salt) -> block ids of the longest cached prefix: "
             "walk the chain h = hash_block(h_prev, block, salt) over the full blocks, stop at the first hash not "
             "in cached (hash -> block id), and never include the block that holds the last token (at most "
             "(len(token_ids) - 1) // block_size blocks): the model needs that token's logits."),
}
