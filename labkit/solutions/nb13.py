"""Worked solutions for notebook 13."""


def num_kv_blocks(budget_bytes, weight_bytes, activation_bytes, block_size, kv_bytes_per_token):
    left = budget_bytes - weight_bytes - activation_bytes
    if left <= 0:
        return 0
    return left // (block_size * kv_bytes_per_token)


def max_users(num_blocks, block_size, tokens_per_user, max_num_seqs):
    blocks_per_user = (tokens_per_user + block_size - 1) // block_size
    return min(max_num_seqs, num_blocks // blocks_per_user)
