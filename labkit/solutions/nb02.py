"""Worked solutions for notebook 02."""


def write_and_read(k_cache, v_cache, row, positions, k, v):
    last = int(positions.max())
    if last >= k_cache.shape[2]:  # max_len: the reservation made when the request was admitted
        raise ValueError(f"position {last} does not fit a reservation of {k_cache.shape[2]} slots")
    k_cache[row][:, positions] = k  # k_cache[row] is (Hkv, max_len, D): token t goes to position positions[t]
    v_cache[row][:, positions] = v
    return k_cache[row, :, : last + 1], v_cache[row, :, : last + 1]  # positions 0 .. last, nothing older


def reservation_waste(prompt_len, output_len, reserved):
    # step k fills prompt_len + k slots; the rest of the reservation is empty that step.
    # (closed form: output_len * (reserved - prompt_len) - output_len * (output_len - 1) // 2)
    return sum(reserved - (prompt_len + k) for k in range(output_len))
