"""Worked solutions for notebook 02."""


def kv_bytes_per_token(config, dtype_bytes):
    # one K vector and one V vector of head_dim numbers, per KV head, per layer
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype_bytes


def reservation_waste(prompt_len, output_len, reserved):
    # step k fills prompt_len + k slots; the rest of the reservation is empty that step.
    # (closed form: output_len * (reserved - prompt_len) - output_len * (output_len - 1) // 2)
    return sum(reserved - (prompt_len + k) for k in range(output_len))
