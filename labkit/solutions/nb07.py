"""Worked solutions for notebook 07."""


def choose_victim(running):
    victim = running[0]
    for arrival, req_id in running[1:]:
        if arrival > victim[0] or (arrival == victim[0] and req_id > victim[1]):
            victim = (arrival, req_id)
    return victim[1]


def preemption_cost(num_tokens, block_size, kv_bytes_per_token, flops_per_token):
    blocks = (num_tokens + block_size - 1) // block_size
    swap_bytes = 2 * blocks * block_size * kv_bytes_per_token  # device -> host, later host -> device
    return swap_bytes, num_tokens * flops_per_token
