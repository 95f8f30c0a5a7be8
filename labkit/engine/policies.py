"""The scheduler's decisions as small pure functions: what the exercises rebuild, what the tests probe.

Each takes plain numbers or a list of sequences and returns a decision; none changes anything.
"""
from __future__ import annotations

from typing import Sequence as Seq

from labkit.engine.sequence import Sequence


def admission_watermark(num_running: int, watermark_blocks: int) -> int:
    """Blocks admission keeps free. Only while something runs: with an empty engine there is nobody to
    protect from preemption, and a request needing nearly the whole pool must still get in (otherwise it
    waits forever)."""
    return watermark_blocks if num_running else 0


def can_admit(blocks_needed: int, num_free_blocks: int, num_running: int, watermark_blocks: int,
              max_num_seqs: int) -> bool:
    """The head of the queue enters if a batch slot is free and its blocks fit above the watermark."""
    if num_running >= max_num_seqs:
        return False
    return blocks_needed <= num_free_blocks - admission_watermark(num_running, watermark_blocks)


def choose_victim(candidates: Seq[Sequence]) -> Sequence:
    """Preempt the lowest-priority sequence: under FCFS the latest arrival (ties: the larger id)."""
    if not candidates:
        raise ValueError("no sequence to preempt")
    return max(candidates, key=lambda s: (s.arrival_s, s.seq_id))


def chunk_size(num_new_tokens: int, token_budget: int, enable_chunked_prefill: bool) -> int:
    """Tokens of a sequence this step computes: all it needs, or a chunk under the step's token budget.
    Without chunked prefill a prompt that does not fit the remaining budget waits (0)."""
    if num_new_tokens <= token_budget:
        return num_new_tokens
    return token_budget if enable_chunked_prefill else 0


def is_stopped(token_id: int, num_output_tokens: int, num_tokens: int, max_tokens: int, max_model_len: int,
               stop_token_ids: Seq[int], eos_token_ids: Seq[int], ignore_eos: bool) -> str | None:
    """Why a sequence stops after sampling ``token_id``: "stop", "length", or None to go on."""
    if token_id in stop_token_ids or (not ignore_eos and token_id in eos_token_ids):
        return "stop"
    if num_output_tokens >= max_tokens or num_tokens >= max_model_len:
        return "length"
    return None
