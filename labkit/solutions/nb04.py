"""Worked solutions for notebook 04."""


def num_blocks(num_tokens, block_size):
    return -(-num_tokens // block_size)  # ceiling division without floats


def physical_slot(block_table, block_size, position):
    logical_block, offset = divmod(position, block_size)
    return block_table[logical_block] * block_size + offset


def paged_internal_waste(num_tokens, block_size):
    return (block_size - num_tokens % block_size) % block_size
