"""KV pruning policy in plain torch: attention scores, budgets, and which tokens to keep.

Heavy hitters + recent window + attention sinks (the H2O / SnapKV family). A request's KV
row is [protected | private]: the protected prefix belongs to SGLang's radix tree and is
never pruned; within the private part the policy keeps
  - sinks: the first `sinks` positions of the sequence (when they are private at all),
  - the recent window: the last `window` private positions,
  - heavy hitters: the remaining budget, by attention accumulated over decode steps
    (summed over heads and layers, since one row of slots serves every layer), each
    step's past scores first multiplied by `decay` (1: plain H2O sums, which favour old
    tokens that had more steps to collect attention; below 1: recent attention counts
    more, TOVA-like as it nears 0).
Nothing here knows SGLang; the backend and runtime feed it tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrunePolicy:
    """How much private KV a request may hold, and when pruning runs."""

    # A ratio (0 < budget <= 1) of the request's unpruned private tokens, or an
    # absolute number of private tokens (an integer > 1).
    budget: float
    window: int = 32
    sinks: int = 4
    # Steps of headroom left after a prune, so pruning runs about once per `interval`
    # decode steps instead of every step while the budget still holds at every step.
    interval: int = 16
    # Factor on every accumulated score before each decode step adds its attention.
    decay: float = 1.0
    # Private tokens a request may always hold: the budget never goes below this. Below
    # it, pruning would keep little more than the window and drop the oldest tokens with
    # no choice by score (at budget 0.5 and window 32, a request would be cut back to
    # its window from its 40th token on).
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if self.budget <= 0:
            raise ValueError(f"kv budget must be positive, got {self.budget}")
        if self.budget > 1 and self.budget != int(self.budget):
            raise ValueError(f"an absolute kv budget must be an integer, got {self.budget}")
        if self.window < 1 or self.sinks < 0 or self.interval < 1:
            raise ValueError("need window >= 1, sinks >= 0, interval >= 1")
        if self.min_tokens < 0:
            raise ValueError(f"kv prune min tokens must be >= 0, got {self.min_tokens}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"kv prune decay must be in [0, 1], got {self.decay}")

    @classmethod
    def parse(cls, budget: str | float, **kwargs: float) -> PrunePolicy:
        """`0.5` is a ratio, `256` an absolute token count; `1` means keep everything."""
        return cls(budget=float(budget), **kwargs)

    @property
    def is_ratio(self) -> bool:
        return self.budget <= 1.0

    def budget_tokens(self, unpruned: int) -> int:
        """Private tokens a request with `unpruned` private tokens (never pruned) may hold."""
        if self.is_ratio:
            return math.floor(self.budget * unpruned + 1e-9)
        return int(self.budget)

    def min_keep(self, protected: int, held: int) -> int:
        """Private tokens that are never dropped: the window and the private sinks."""
        return min(held, self.window + max(0, self.sinks - protected))

    def keep_count(self, protected: int, held: int, unpruned: int) -> int | None:
        """How many of `held` private tokens to keep now, or None to leave the row alone.

        Prunes when the request holds more than its budget (never less than min_tokens),
        down to a target that keeps it within budget for the next `interval` steps (a
        ratio budget grows by `budget` per step while the row grows by one), never below
        min_keep or min_tokens.
        """
        budget = self.budget_tokens(unpruned)
        if held <= max(budget, self.min_tokens):
            return None
        growth = (
            math.ceil((1.0 - self.budget) * self.interval) if self.is_ratio else (self.interval)
        )
        floor = max(self.min_keep(protected, held), self.min_tokens)
        target = max(floor, budget - growth)
        # Below min_keep the budget cannot hold; prune in steps of `interval` then.
        if held - target < max(1, min(self.interval, growth)):
            return None
        return target


def select_keep(
    scores: torch.Tensor, protected: int, keep: int, sinks: int, window: int
) -> torch.Tensor:
    """Indices (into the private part, ascending) of the `keep` private tokens to keep.

    `scores[j]` is the accumulated attention of private token j, at row position
    `protected + j`. Sinks and the recent window are kept first; the rest of `keep`
    goes to the highest scores, ties to the earlier position.
    """
    n = scores.shape[0]
    idx = torch.arange(n, device=scores.device)
    forced = (idx + protected < sinks) | (idx >= n - window)
    n_forced = int(forced.sum())
    if keep < n_forced:
        raise ValueError(f"keep={keep} is below the {n_forced} forced tokens")
    cand = idx[~forced]
    order = torch.sort(scores[cand], descending=True, stable=True).indices
    heavy = cand[order[: keep - n_forced]]
    return torch.sort(torch.cat([idx[forced], heavy])).values


def decode_attention_weights(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one decode query over its keys, summed over query heads, in fp32.

    q: [num_q_heads, head_dim]; k: [kv_len, num_kv_heads, head_dim] (GQA when the head
    counts differ). Returns [kv_len].
    """
    hq, d = q.shape
    hkv = k.shape[1]
    qg = q.float().view(hkv, hq // hkv, d)
    logits = torch.einsum("hgd,lhd->hgl", qg, k.float()) * scale
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1))


def batched_decode_weights(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    rows: torch.Tensor,
    lens: torch.Tensor,
    max_len: int,
    scale: float,
) -> torch.Tensor:
    """decode_attention_weights for a whole decode batch at once (the GPU path).

    q: [bs, num_q_heads, head_dim]; rows/lens: each request's req_to_token row and KV
    length. Keys are gathered padded to max_len; returns [bs, max_len], zero past each
    request's length.
    """
    bs, hq, d = q.shape
    cols = torch.arange(max_len, device=lens.device)
    valid = cols[None, :] < lens[:, None]
    slots = torch.where(valid, req_to_token[rows][:, :max_len], 0).long()
    keys = k_cache[slots].float()  # [bs, max_len, kv_heads, dim]
    hkv = keys.shape[2]
    qg = q.reshape(bs, hkv, hq // hkv, d).float()
    logits = torch.einsum("bhgd,blhd->bhgl", qg, keys) * scale
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(1, 2)) * valid


def window_attention_weights(
    q: torch.Tensor, k: torch.Tensor, scale: float, prefix_len: int, obs: int
) -> torch.Tensor:
    """SnapKV-style prefill scores: causal attention of the last `obs` new queries.

    q: [num_new, num_q_heads, head_dim] for positions prefix_len .. prefix_len+num_new-1;
    k: [prefix_len + num_new, num_kv_heads, head_dim]. Returns [kv_len], summed over the
    observation queries and heads.
    """
    t, hq, d = q.shape
    kv_len, hkv = k.shape[0], k.shape[1]
    w = min(obs, t)
    qw = q[t - w :].float().view(w, hkv, hq // hkv, d)
    logits = torch.einsum("whgd,lhd->hgwl", qw, k.float()) * scale
    q_pos = torch.arange(prefix_len + t - w, prefix_len + t, device=q.device)
    causal = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
    logits = logits.masked_fill(~causal, float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1, 2))


def compact_row(
    row: torch.Tensor, scores: torch.Tensor, start: int, end: int, kept: torch.Tensor
) -> torch.Tensor:
    """Move row[start:end][kept] to row[start:start+len(kept)] in order; same for scores.

    `row` (a request's slots) and `scores` are views of one request's row, updated in
    place; positions before `start` are untouched. Returns the dropped slots (int64).
    """
    n = end - start
    keep_mask = torch.zeros(n, dtype=torch.bool, device=row.device)
    keep_mask[kept] = True
    part = row[start:end].clone()
    dropped = part[~keep_mask].to(torch.int64)
    m = kept.numel()
    row[start : start + m] = part[kept]
    kept_scores = scores[start:end][kept].clone()
    scores[start : start + m] = kept_scores
    scores[start + m : end] = 0
    return dropped
