"""Worked solutions for notebook 12."""


def tpot(e2e_s, ttft_s, num_output_tokens):
    if num_output_tokens < 2:
        return None  # one token: there is no time *between* tokens to average
    return (e2e_s - ttft_s) / (num_output_tokens - 1)


def goodput(ttft_s, tpot_s, wall_s, ttft_slo_s=None, tpot_slo_s=None):
    good = 0
    for first, per_token in zip(ttft_s, tpot_s):
        if ttft_slo_s is not None and first > ttft_slo_s:
            continue
        if tpot_slo_s is not None and per_token is not None and per_token > tpot_slo_s:
            continue
        good += 1
    return good / wall_s


def burst_ttft(num_users, service_s, first_token_s):
    # the k-th request in line starts after k whole answers
    return [k * service_s + first_token_s for k in range(num_users)]
