"""Worked solutions for notebook 03."""


def schedule_step(running, waiting, free_blocks, block_size, max_num_seqs, token_budget):
    scheduled, admitted = [], []
    for seq_id, _num_tokens in running:  # 1. decodes, oldest first, while the budget lasts
        if token_budget == 0:
            break
        scheduled.append((seq_id, 1))
        token_budget -= 1
    num_in_batch = len(running)  # a running sequence keeps its slot even when the budget skipped it
    for seq_id, prompt_len, max_tokens in waiting:  # 2. admission, first come first served
        blocks = -(-(prompt_len + max_tokens) // block_size)  # the whole reservation, up front
        if num_in_batch == max_num_seqs or prompt_len > token_budget or blocks > free_blocks:
            break  # nobody overtakes the head of the queue
        scheduled.append((seq_id, prompt_len))
        admitted.append(seq_id)
        num_in_batch += 1
        token_budget -= prompt_len
        free_blocks -= blocks
    return scheduled, admitted


def decode_intensity(linears, tokens, dtype_bytes):
    flops = nbytes = 0
    for d_in, d_out in linears:
        flops += 2 * tokens * d_in * d_out  # one multiply and one add per weight per row
        nbytes += dtype_bytes * (d_in * d_out + tokens * (d_in + d_out))  # weights once; rows in and out
    return flops / nbytes


def request_metrics(arrival_s, token_times):
    ttft = token_times[0] - arrival_s
    latency = token_times[-1] - arrival_s
    tpot = (latency - ttft) / (len(token_times) - 1) if len(token_times) > 1 else 0.0
    return ttft, tpot, latency
