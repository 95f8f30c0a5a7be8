"""Worked solutions for notebook 03."""


def fcfs_admit(waiting, free_slots, free_kv_tokens):
    admitted = 0
    for prompt_len, max_new_tokens in waiting:
        if admitted == free_slots:  # no slot left
            break
        free_kv_tokens -= prompt_len + max_new_tokens  # reserve the whole request up front
        if free_kv_tokens < 0:  # the head does not fit: nobody behind it may overtake
            break
        admitted += 1
    return admitted


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
