"""Notebook 02 exercises: the contiguous cache's write and read of a row, and what a reservation wastes."""
import torch

from labkit.exercises import Exercise
from labkit.fragmentation import reservation_waste
from labkit.kv_cache import contiguous_read, contiguous_write


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _write_and_read(k_cache, v_cache, row, positions, k, v):
    """Reference: ContiguousCache's own write and read (labkit.kv_cache), for one row of one layer."""
    rows = torch.tensor([row])
    contiguous_write(k_cache, v_cache, rows, positions[None], k[None], v[None])
    keys, values = contiguous_read(k_cache, v_cache, rows, int(positions.max()) + 1)
    return keys[0], values[0]


def _cache_ops(gen):
    """A random life of one layer's contiguous cache: requests prefill a row (a new request may take over a row
    another one used), decode one token at a time, prefill in chunks, and sometimes overrun the reservation.
    Returns (batch_size, num_kv_heads, max_len, head_dim, ops); op = (row, start, k, v) with k, v (Hkv, T, D)."""
    batch_size, max_len, head_dim = _int(gen, 1, 4), _int(gen, 4, 20), _int(gen, 2, 6)
    num_kv_heads = [1, 2, 3][_int(gen, 0, 3)]
    lengths = [0] * batch_size
    ops = []
    for _ in range(_int(gen, 4, 14)):
        row = _int(gen, 0, batch_size)
        kind = _int(gen, 0, 6)
        if kind == 0 or lengths[row] == 0:  # a new request takes the row: prefill from position 0
            start, n = 0, _int(gen, 1, max_len + 1)
            if _int(gen, 0, 2):
                n = num_kv_heads  # T == Hkv: a transposed write would have the right shape and the wrong values
        elif kind == 1:  # a prompt prefilled in chunks
            start, n = lengths[row], _int(gen, 1, 5)
        else:  # decode: one token
            start, n = lengths[row], 1
        if _int(gen, 0, 8) == 0:
            start, n = max_len - 1, 2  # runs past the reservation: must raise and write nothing
        k = torch.randn(num_kv_heads, n, head_dim, generator=gen)
        v = torch.randn(num_kv_heads, n, head_dim, generator=gen)
        ops.append((row, start, k, v))
        if start + n <= max_len:
            lengths[row] = start + n
    return batch_size, num_kv_heads, max_len, head_dim, ops


def _serve_cache(fn, batch_size, num_kv_heads, max_len, head_dim, ops):
    """Run every op through ``fn`` on one zeroed cache; return what each op read (or 'ValueError' where the
    reservation overflowed) and the cache at the end."""
    k_cache = torch.zeros(batch_size, num_kv_heads, max_len, head_dim)
    v_cache = torch.zeros_like(k_cache)
    reads = {}
    for i, (row, start, k, v) in enumerate(ops):
        positions = torch.arange(start, start + k.shape[1])
        op = f"op {i}: row {row}, positions {start}..{start + k.shape[1] - 1}"
        try:
            keys, values = fn(k_cache, v_cache, row, positions, k, v)
        except ValueError:
            reads[op] = "ValueError"
            continue
        reads[op] = {"keys": keys.clone(), "values": values.clone()}
    return {"reads": reads, "k_cache": k_cache, "v_cache": v_cache}


def _waste_inputs(gen):
    prompt, output = _int(gen, 1, 500), _int(gen, 1, 800)
    return prompt, output, prompt + output - 1 + _int(gen, 0, 1500)


EXERCISES = {
    "write_and_read": Exercise(
        reference=_write_and_read, make_inputs=_cache_ops, harness=_serve_cache, trials=30,
        spec="one layer of a contiguous KV cache: k_cache, v_cache (batch_size, num_kv_heads, max_len, head_dim); "
             "the request in row `row` keeps its token at position p in k_cache[row, :, p]. Store this step's "
             "k, v (num_kv_heads, T, head_dim) at `positions` (T,) and return (keys, values) "
             "(num_kv_heads, positions[-1] + 1, head_dim): the row's positions 0 .. positions[-1], which attention "
             "reads. A position >= max_len does not fit the reservation: raise ValueError and write nothing.",
        hints=("Check the reservation first: if positions.max() >= max_len (k_cache.shape[2]), raise ValueError "
               "before you write anything.",
               "k_cache[row] is the row's (num_kv_heads, max_len, head_dim) block; k_cache[row][:, positions] = k "
               "puts token t of k at position positions[t]. Do not reshape k to make shapes fit: that relabels "
               "numbers, it does not move them (the checker uses T == num_kv_heads to catch it).",
               "Read with a slice, k_cache[row, :, : last + 1] where last = positions.max(): the old tokens of "
               "a row a new request took over lie beyond that and must not be read.")),
    "reservation_waste": Exercise(
        reference=reservation_waste, make_inputs=_waste_inputs,
        spec="slot-steps a contiguous reservation of `reserved` slots holds but leaves empty while a request "
             "with prompt_len prompt tokens generates output_len tokens (its K/V fill prompt_len + k slots "
             "at its k-th step, k = 0 .. output_len - 1: the last token is returned, never fed back).",
        hints=("At step k its K/V fill prompt_len + k slots; the empty slots are reserved minus that.",
               "Sum the empty slots over the output_len steps (a loop is fine; a closed form exists too).")),
}
