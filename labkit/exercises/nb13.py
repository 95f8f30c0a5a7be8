"""Notebook 13 exercises: size a KV pool from a budget, and count the users it serves."""
import torch

from labkit.exercises import Exercise
from labkit.paged import blocks_needed


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _num_kv_blocks(budget_bytes: int, weight_bytes: int, activation_bytes: int, block_size: int,
                   kv_bytes_per_token: int) -> int:
    """vLLM's sizing: whole blocks in what the budget leaves after weights and activations (never negative)."""
    return max(0, (budget_bytes - weight_bytes - activation_bytes) // (block_size * kv_bytes_per_token))


def _blocks_inputs(gen):
    w, a = _int(gen, 1, 1 << 30), _int(gen, 1, 1 << 28)
    return _int(gen, 1, 1 << 32), w, a, [1, 8, 16, 32][_int(gen, 0, 4)], _int(gen, 1, 1 << 18)


def _max_users(num_blocks: int, block_size: int, tokens_per_user: int, max_num_seqs: int) -> int:
    """Users served at once: full sequences the pool holds, capped by the engine's batch slots."""
    return min(max_num_seqs, num_blocks // blocks_needed(tokens_per_user, block_size))


def _users_inputs(gen):
    return _int(gen, 0, 100000), [1, 8, 16, 32][_int(gen, 0, 4)], _int(gen, 1, 8192), _int(gen, 1, 512)


EXERCISES = {
    "num_kv_blocks": Exercise(
        reference=_num_kv_blocks, make_inputs=_blocks_inputs,
        spec="(budget - weights - activations) // bytes per block, where a block is block_size tokens of "
             "kv_bytes_per_token each; 0 if the budget does not even cover weights and activations."),
    "max_users": Exercise(
        reference=_max_users, make_inputs=_users_inputs,
        spec="how many users of tokens_per_user tokens the pool serves at once: whole blocks per user, "
             "capped by max_num_seqs."),
}
