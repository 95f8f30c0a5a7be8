"""Notebook 04 exercises: block arithmetic of the paged KV cache."""
import torch

from labkit.exercises import Exercise
from labkit.fragmentation import paged_internal_waste
from labkit.paged import SequenceBlocks, blocks_needed

BLOCK_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _block_size(gen):
    return BLOCK_SIZES[_int(gen, 0, len(BLOCK_SIZES))]


def _physical_slot(block_table: list[int], block_size: int, position: int) -> int:
    return SequenceBlocks(block_size, list(block_table), len(block_table) * block_size).slot(position)


def _slot_inputs(gen):
    block_size = _block_size(gen)
    table = torch.randperm(64, generator=gen)[: _int(gen, 1, 10)].tolist()  # distinct physical blocks
    return table, block_size, _int(gen, 0, len(table) * block_size)


EXERCISES = {
    "num_blocks": Exercise(
        reference=blocks_needed, make_inputs=lambda g: (_int(g, 0, 5000), _block_size(g)),
        spec="blocks of block_size slots that num_tokens tokens occupy."),
    "physical_slot": Exercise(
        reference=_physical_slot, make_inputs=_slot_inputs,
        spec="cache slot (block_id * block_size + offset) of the token at `position`, given the sequence's "
             "block table (logical block i -> physical block block_table[i])."),
    "paged_internal_waste": Exercise(
        reference=paged_internal_waste, make_inputs=lambda g: (_int(g, 1, 5000), _block_size(g)),
        spec="empty slots in the last block of a sequence of num_tokens tokens."),
}
