"""Per-row pruning state in the scheduler process, and the prune step between decodes.

The attention backend accumulates scores into `KvPruner.scores` (indexed like SGLang's
req_to_token: one row per request slot, one column per KV position) and shifts decode
positions by `offsets`. Each time SGLang has prepared a decode batch (the slot of the
token about to be decoded is allocated; no forward is in flight, since the scheduler runs
without overlap when pruning is on), `prune_batch` compacts the rows of requests over
budget (counting that token, so a request is within budget during every forward), hands
the dropped slots back to SGLang's allocator and shortens the lengths SGLang keeps, so
everything SGLang reads stays consistent:

  req_to_token[row, :seq_len]   compacted, order kept; [0, cache_protected_len) untouched
  batch.seq_lens(_cpu)[i]       = kv_committed_len = kv_allocated_len = compacted length
  positions (RoPE)              = compacted position + offsets[row] = original position
  req.skip_radix_cache_insert   True once pruned: the tree never gets a compacted row,
                                and release_kv_cache frees exactly [protected, length)
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mace_sgl.prune.policy import PrunePolicy, compact_row, select_keep

logger = logging.getLogger("mace_sgl.prune")


class KvPruner:
    """Scores, position offsets and counters for every request slot of one model runner."""

    def __init__(self, policy: PrunePolicy, rows: int, max_len: int, device: Any) -> None:
        self.policy = policy
        self.scores = torch.zeros(rows, max_len, dtype=torch.float32, device=device)
        self.offsets = torch.zeros(rows, dtype=torch.int64, device=device)
        # Host mirror of offsets: the prune decision needs no device sync.
        self.pruned = [0] * rows
        self.prunes = 0
        self.pruned_tokens_total = 0
        # The running batch last pruned (SGLang filters it in place) and its pools, for
        # the status; read only in this process, between iterations.
        self.batch: Any = None

    # --- called by the attention backend, inside the forward -------------------------

    def start_extend(self, rows: list[int], prefix_lens: list[int]) -> None:
        """A (chunk of a) prefill: positions unshifted, and no score from the row's last
        owner past the prefix (a decode adds to scores[row, :length], so every column
        from the length on must read zero)."""
        for row, lo in zip(rows, prefix_lens, strict=True):
            self.scores[row, lo:] = 0
            self.offsets[row] = 0
            self.pruned[row] = 0

    def shift_positions(self, positions: torch.Tensor, req_pool_indices: torch.Tensor) -> Any:
        """Decode positions from compacted lengths back to the original positions."""
        return positions + self.offsets[req_pool_indices].to(positions.dtype)

    # --- called by the scheduler once a decode batch is prepared ---------------------

    def prune_batch(self, batch: Any) -> int:
        """Prune every request of a decode batch that is over budget; tokens freed."""
        reqs = batch.reqs
        if not reqs:
            return 0
        rtt = batch.req_to_token_pool.req_to_token
        allocator = batch.tree_cache.token_to_kv_pool_allocator
        lens = batch.seq_lens_cpu.tolist()
        new_lens = list(lens)
        freed = 0
        self.batch = batch
        self.decay_scores(reqs)
        for i, req in enumerate(reqs):
            kv = req.kv
            row, n, protected = kv.req_pool_idx, lens[i], kv.cache_protected_len
            if row is None or req.finished():
                continue
            held = n - protected
            unpruned = held + self.pruned[row]
            # Streaming sessions hand rows to the next turn; their rows stay whole.
            if req.session is not None or held <= 0:
                continue
            keep = self.policy.keep_count(protected, held, unpruned)
            if keep is None:
                continue
            if not n == kv.kv_committed_len == kv.kv_allocated_len:
                # Only plain decode (page size 1, no speculation) keeps these equal.
                logger.warning(
                    "kv prune skipped for %s: lengths %d/%d/%d",
                    req.rid,
                    n,
                    kv.kv_committed_len,
                    kv.kv_allocated_len,
                )
                continue
            kept = select_keep(
                self.scores[row, protected:n],
                protected,
                keep,
                self.policy.sinks,
                self.policy.window,
            )
            dropped = compact_row(rtt[row], self.scores[row], protected, n, kept)
            allocator.free(dropped.to(allocator.free_pages.device))
            p = dropped.numel()
            kv.kv_committed_len -= p
            kv.kv_allocated_len -= p
            req.skip_radix_cache_insert = True
            self.pruned[row] += p
            self.offsets[row] += p
            new_lens[i] = n - p
            freed += p
            self.prunes += 1
        if freed:
            dev = batch.seq_lens.device
            batch.seq_lens = torch.tensor(new_lens, dtype=batch.seq_lens.dtype, device=dev)
            batch.seq_lens_cpu = torch.tensor(new_lens, dtype=batch.seq_lens_cpu.dtype)
            batch.seq_lens_sum = None
            self.pruned_tokens_total += freed
        return freed

    def decay_scores(self, reqs: list[Any]) -> None:
        """Once per decode step, before its attention is added: scores *= decay."""
        if self.policy.decay >= 1.0:
            return
        rows = [r.kv.req_pool_idx for r in reqs if r.kv.req_pool_idx is not None]
        if rows:
            idx = torch.tensor(rows, dtype=torch.int64, device=self.scores.device)
            self.scores[idx] *= self.policy.decay

    def held_and_unpruned(self) -> tuple[int, int, int]:
        """(requests, private KV tokens held, unpruned count) of the running requests."""
        count = held = unpruned = 0
        for req in getattr(self.batch, "reqs", None) or []:
            kv = req.kv
            if kv.req_pool_idx is None or req.finished():
                continue
            count += 1
            h = kv.kv_committed_len - kv.cache_protected_len
            held += h
            unpruned += h + self.pruned[kv.req_pool_idx]
        return count, held, unpruned

    def status(self) -> dict[str, Any]:
        """The `kv` entry of /mace/status: private KV held against the unpruned count."""
        p = self.policy
        count, held, unpruned = self.held_and_unpruned()
        pool: dict[str, int] = {}
        if self.batch is not None:
            tree = self.batch.tree_cache
            allocator = tree.token_to_kv_pool_allocator
            # SGLang's identity: available + evictable + protected + private = size.
            pool = {
                "pool_size": int(allocator.size),
                "pool_available": int(allocator.available_size()),
                "tree_evictable": int(tree.evictable_size()),
                "tree_protected": int(tree.protected_size()),
            }
        return {
            "budget": p.budget,
            "budget_kind": "ratio" if p.is_ratio else "tokens",
            "window": p.window,
            "sinks": p.sinks,
            "interval": p.interval,
            "decay": p.decay,
            "min_tokens": p.min_tokens,
            # Private KV tokens of the running requests, as held and as they would be
            # without pruning (the radix-shared prefix is not counted: never pruned).
            "running_requests": count,
            "held_tokens": held,
            "unpruned_tokens": unpruned,
            "prunes": self.prunes,
            "pruned_tokens_total": self.pruned_tokens_total,
            **pool,
        }
