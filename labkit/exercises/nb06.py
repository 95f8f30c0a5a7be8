"""Notebook 06 exercises: the prefix-cache hash chain, and which blocks a forked sequence must copy."""
import torch

from labkit.exercises import Exercise
from labkit.paged import BlockManager
from labkit.prefix_cache import block_hashes


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _hash_chain_inputs(gen):
    block_size = [1, 2, 4, 8, 16][_int(gen, 0, 5)]
    tokens = torch.randint(0, 50, (_int(gen, 0, 5 * block_size + 3),), generator=gen).tolist()
    salt = [None, "tenant-a", "tenant-b"][_int(gen, 0, 3)]
    return tokens, block_size, salt


def _blocks_to_copy(num_tokens: int, block_size: int, parent_appends: int, child_appends: int) -> list[int]:
    """Run it on the real BlockManager: fork, the parent appends, then the child; report the child's copies."""
    bm = BlockManager(num_blocks=4 * (num_tokens + parent_appends + child_appends) // block_size + 4,
                      block_size=block_size)
    bm.allocate("parent", num_tokens)
    bm.fork("parent", "child")
    bm.append_slots("parent", parent_appends)
    bm.take_copies()
    before = bm.block_table("child")
    bm.append_slots("child", child_appends)
    return sorted(before.index(src) for src, _ in bm.take_copies())


def _copy_inputs(gen):
    return _int(gen, 0, 40), [1, 2, 4, 8, 16][_int(gen, 0, 5)], _int(gen, 0, 3), _int(gen, 0, 20)


EXERCISES = {
    "block_hash_chain": Exercise(
        reference=block_hashes, make_inputs=_hash_chain_inputs,
        spec="hashes of the full blocks of token_ids, each hash_block(parent_hash, block_tokens, salt), "
             "parent_hash None for the first block; a partial last block has no hash."),
    "blocks_to_copy": Exercise(
        reference=_blocks_to_copy, make_inputs=_copy_inputs,
        spec="a child is forked from a parent of num_tokens tokens; the parent appends parent_appends tokens, "
             "then the child child_appends: list the logical block indices the child copies (copy-on-write)."),
}
