"""Worked solutions for notebook 07."""
from labkit.engine.sequence import SequenceStatus


def choose_victim(candidates):
    victim = candidates[0]
    for seq in candidates[1:]:
        if (seq.arrival_s, seq.seq_id) > (victim.arrival_s, victim.seq_id):  # later arrival, then larger id
            victim = seq
    return victim


def preempt_by_recompute(seq, block_manager, waiting):
    block_manager.free(seq)  # its blocks go back to the pool: its K/V are gone
    seq.num_computed_tokens = 0  # readmission prefills prompt + everything generated so far
    seq.status = SequenceStatus.WAITING
    i = 0  # FCFS: it goes back before every later arrival
    while i < len(waiting) and (waiting[i].arrival_s, waiting[i].seq_id) < (seq.arrival_s, seq.seq_id):
        i += 1
    waiting.insert(i, seq)


def preemption_cost(num_tokens, block_size, kv_bytes_per_token, flops_per_token):
    blocks = (num_tokens + block_size - 1) // block_size
    swap_bytes = 2 * blocks * block_size * kv_bytes_per_token  # device -> host, later host -> device
    return swap_bytes, num_tokens * flops_per_token
