"""Worked solutions for notebook 06."""
from labkit.prefix_cache import hash_block


def block_hash_chain(token_ids, block_size, salt):
    hashes, parent = [], None
    num_full = len(token_ids) // block_size
    for i in range(num_full):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], salt)
        hashes.append(parent)
    return hashes


def append_slot(seq, allocator, copies):
    bs = seq.block_size
    if seq.num_tokens % bs == 0:  # no block yet, or the last one is full: a fresh block
        seq.block_table.append(allocator.allocate())  # raises NoFreeBlocksError before anything changed
    else:
        last = seq.block_table[-1]
        if allocator.ref_count[last] > 1:  # partial and shared: copy-on-write
            new = allocator.allocate()
            allocator.free(last)  # one reference fewer; the other holders keep it
            seq.block_table[-1] = new
            copies.append((last, new))
    seq.num_tokens += 1
    pos = seq.num_tokens - 1
    return seq.block_table[pos // bs] * bs + pos % bs


def match_prefix(token_ids, block_size, cached, salt):
    hit, parent = [], None
    for i in range((len(token_ids) - 1) // block_size):  # full blocks, never the one with the last token
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], salt)
        if parent not in cached:
            break
        hit.append(cached[parent])
    return hit
