"""Worked solutions for notebook 06."""
from labkit.prefix_cache import hash_block


def block_hash_chain(token_ids, block_size, salt):
    hashes, parent = [], None
    num_full = len(token_ids) // block_size
    for i in range(num_full):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], salt)
        hashes.append(parent)
    return hashes


def blocks_to_copy(num_tokens, block_size, parent_appends, child_appends):
    # Only a partial last block is ever written again, and only a shared one is copied.
    last_is_partial = num_tokens % block_size != 0
    if not last_is_partial or child_appends == 0:
        return []
    if parent_appends > 0:
        return []  # the parent wrote first and took a private copy: the child now holds the original alone
    return [num_tokens // block_size]
