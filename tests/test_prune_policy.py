"""KV pruning policy: the torch reference against brute force, and row compaction on
SGLang's real request-to-token pool and token allocator."""

from __future__ import annotations

import math

import pytest
import torch

from mace_sgl.prune.policy import (
    PrunePolicy,
    compact_row,
    decode_attention_weights,
    select_keep,
    window_attention_weights,
)


def brute_keep(scores: list[float], protected: int, keep: int, sinks: int, window: int):
    n = len(scores)
    forced = {j for j in range(n) if j + protected < sinks or j >= n - window}
    rest = sorted((j for j in range(n) if j not in forced), key=lambda j: (-scores[j], j))
    return sorted(forced | set(rest[: keep - len(forced)]))


@pytest.mark.parametrize("protected", [0, 2, 10])
def test_select_keep_equals_brute_force(protected):
    gen = torch.Generator().manual_seed(protected)
    for trial in range(50):
        n = int(torch.randint(8, 60, (1,), generator=gen))
        # Rounded scores make ties common: ties must go to the earlier position.
        scores = (torch.rand(n, generator=gen) * 4).round() / 4
        window = int(torch.randint(1, 6, (1,), generator=gen))
        forced = len(brute_keep([0.0] * n, protected, 0, 4, window))
        keep = int(torch.randint(forced, n + 1, (1,), generator=gen))
        got = select_keep(scores, protected, keep, 4, window).tolist()
        assert got == brute_keep(scores.tolist(), protected, keep, 4, window), trial
        assert len(got) == keep


def test_select_keep_refuses_a_budget_below_the_forced_tokens():
    with pytest.raises(ValueError):
        select_keep(torch.zeros(10), 0, 3, 4, 2)


def test_budget_parse_and_validation():
    assert PrunePolicy.parse("0.5").is_ratio
    assert PrunePolicy.parse("1").budget_tokens(100) == 100
    assert PrunePolicy.parse("256").budget_tokens(10_000) == 256
    for bad in ("0", "-1", "2.5"):
        with pytest.raises(ValueError):
            PrunePolicy.parse(bad)
    with pytest.raises(ValueError, match="min tokens"):
        PrunePolicy.parse("0.5", min_tokens=-1)
    for bad_decay in (-0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            PrunePolicy.parse("0.5", decay=bad_decay)


@pytest.mark.parametrize("min_tokens", [0, 48])
@pytest.mark.parametrize("budget", ["0.25", "0.5", "0.75", "40"])
def test_held_never_exceeds_budget_once_pruning_runs(budget, min_tokens):
    """Grow one request token by token, applying keep_count as the runtime does."""
    p = PrunePolicy.parse(budget, window=8, sinks=4, interval=16, min_tokens=min_tokens)
    protected, held, prunes = 20, 0, 0
    for unpruned in range(1, 2000):
        held += 1
        keep = p.keep_count(protected, held, unpruned)
        if keep is not None:
            assert max(p.min_keep(protected, held), min_tokens) <= keep < held
            held, prunes = keep, prunes + 1
        # Within budget at every step, unless the window or the minimum is larger.
        assert held <= max(p.budget_tokens(unpruned), p.window + p.interval, min_tokens + 16)
        # Never pruned below the minimum (nor while it holds less).
        assert held >= min(unpruned, min_tokens)
    # Amortized: on the order of one prune per `interval` steps, not one per step.
    assert 0 < prunes <= math.ceil(2000 / min(p.interval, 4))
    if budget == "0.5":
        assert prunes <= 2000 / 8 + 1


def test_ratio_one_never_prunes():
    p = PrunePolicy.parse("1.0", window=4, sinks=4, interval=4)
    assert all(p.keep_count(0, n, n) is None for n in range(1, 500))


def test_decode_weights_equal_brute_force_gqa():
    torch.manual_seed(0)
    hq, hkv, d, n = 8, 2, 16, 23
    q, k = torch.randn(hq, d), torch.randn(n, hkv, d)
    expected = torch.zeros(n)
    for h in range(hq):
        kh = k[:, h // (hq // hkv), :]  # query head h reads kv head h // group
        expected += torch.softmax(kh @ q[h] * 0.25, dim=0)
    got = decode_attention_weights(q, k, 0.25)
    torch.testing.assert_close(got, expected)
    assert got.sum().item() == pytest.approx(hq, rel=1e-5)


def test_window_weights_equal_rows_of_the_full_causal_attention():
    torch.manual_seed(1)
    hq, hkv, d, prefix, new, obs = 4, 2, 8, 5, 12, 3
    q, k = torch.randn(new, hq, d), torch.randn(prefix + new, hkv, d)
    expected = torch.zeros(prefix + new)
    for h in range(hq):
        kh = k[:, h // 2, :]
        for t in range(new - obs, new):
            pos = prefix + t
            logits = kh[: pos + 1] @ q[t, h] * 0.3
            expected[: pos + 1] += torch.softmax(logits, dim=0)
    torch.testing.assert_close(window_attention_weights(q, k, 0.3, prefix, obs), expected)


def test_compacted_h2o_equals_masked_full_attention():
    """Incremental pruning on a compacted row (what the server does) against brute force:
    full attention over every position with pruned ones masked out, scores accumulated
    over the full sequence. Same kept positions and same attention outputs at every step."""
    torch.manual_seed(2)
    hq, hkv, d, protected, steps = 4, 2, 8, 6, 120
    p = PrunePolicy.parse("0.3", window=5, sinks=4, interval=6)
    total = protected + steps
    keys, queries = torch.randn(total, hkv, d), torch.randn(total, hq, d)
    scale = d**-0.5

    # Compacted: `row` holds positions (the "slots"), scores follow the row.
    row = torch.arange(total, dtype=torch.int32)
    scores = torch.zeros(total)
    length = protected
    # Brute force: a mask over every position.
    kept = torch.zeros(total, dtype=torch.bool)
    kept[:protected] = True
    full_scores = torch.zeros(total)
    for pos in range(protected, total):
        held, unpruned = length - protected, pos - protected
        keep = p.keep_count(protected, held, unpruned)
        if keep is not None:
            sel = select_keep(scores[protected:length], protected, keep, p.sinks, p.window)
            dropped = compact_row(row, scores, protected, length, sel)
            length -= dropped.numel()
            # Brute force selects among the kept private positions by full-sequence scores.
            priv = torch.nonzero(kept[protected:pos]).flatten() + protected
            bsel = brute_keep(full_scores[priv].tolist(), protected, keep, p.sinks, p.window)
            new_kept = torch.zeros(total, dtype=torch.bool)
            new_kept[:protected] = True
            new_kept[priv[bsel]] = True
            assert set(dropped.tolist()) == set(priv.tolist()) - set(priv[bsel].tolist())
            kept = new_kept
        # Decode step at `pos`: its key joins the row, then it attends.
        row[length] = pos
        length += 1
        kept[pos] = True
        slots = row[:length].long()
        w = decode_attention_weights(queries[pos], keys[slots], scale)
        scores[:length] += w
        idx = torch.nonzero(kept[: pos + 1]).flatten()
        assert slots.tolist() == idx.tolist()
        w_full = decode_attention_weights(queries[pos], keys[idx], scale)
        full_scores[idx] += w_full
        torch.testing.assert_close(w, w_full)
        torch.testing.assert_close(scores[:length], full_scores[idx])
    assert length - protected <= max(p.budget_tokens(steps), p.window + p.interval)
    assert length < total  # it did prune


def test_compaction_on_sglang_pools_frees_exactly_the_dropped_private_slots():
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    pool = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    alloc = TokenToKVPoolAllocator(
        size=100, dtype=torch.bfloat16, device="cpu", kvcache=None, need_sort=False
    )
    # Two requests share a 10-token "radix" prefix; each has 30 private tokens.
    shared = alloc.alloc(10)
    rows = []
    for _ in range(2):
        (row,) = pool.alloc_rows(1)
        rows.append(row)
        private = alloc.alloc(30)
        pool.write((row, slice(0, 10)), shared.to(torch.int32))
        pool.write((row, slice(10, 40)), private.to(torch.int32))
    before = alloc.available_size()
    scores = torch.rand(pool.req_to_token.shape[0], 64)
    row = rows[0]
    original = pool.req_to_token[row, :40].clone()
    other = pool.req_to_token[rows[1], :40].clone()
    kept = select_keep(scores[row, 10:40], 10, 12, 4, 5)
    dropped = compact_row(pool.req_to_token[row], scores[row], 10, 40, kept)

    assert dropped.numel() == 18
    assert alloc.available_size() == before  # compaction alone frees nothing
    alloc.free(dropped)
    assert alloc.available_size() == before + 18
    # The shared prefix and the other request are untouched; kept slots keep their order.
    assert torch.equal(pool.req_to_token[row, :10], original[:10])
    assert torch.equal(pool.req_to_token[rows[1], :40], other)
    assert pool.req_to_token[row, 10:22].tolist() == original[10:40][kept].tolist()
    assert set(dropped.tolist()).isdisjoint(set(shared.tolist()))
    assert set(dropped.tolist()) | set(pool.req_to_token[row, 10:22].tolist()) == set(
        original[10:40].tolist()
    )
    free = alloc.free_pages
    assert free.unique().numel() == free.numel()  # no double free
    in_use = set(pool.req_to_token[row, :22].tolist()) | set(other.tolist())
    assert in_use.isdisjoint(set(free.tolist()))


def batched_case(device: str):
    torch.manual_seed(3)
    bs, hq, hkv, d, slots = 5, 6, 2, 16, 400
    k_cache = torch.randn(slots, hkv, d, device=device)
    rtt = torch.randint(1, slots, (8, 64), dtype=torch.int32, device=device)
    rows = torch.tensor([3, 0, 7, 2, 5], device=device)
    lens = torch.tensor([10, 64, 1, 33, 47], device=device)
    q = torch.randn(bs, hq, d, device=device)
    return q, k_cache, rtt, rows, lens


def test_batched_decode_weights_equal_one_request_at_a_time():
    """The GPU path's batched score (padded gather) against the per-request reference."""
    from mace_sgl.prune.policy import batched_decode_weights

    q, k_cache, rtt, rows, lens = batched_case("cpu")
    got = batched_decode_weights(q, k_cache, rtt, rows, lens, 64, 0.25)
    for i in range(q.shape[0]):
        n = int(lens[i])
        ref = decode_attention_weights(q[i], k_cache[rtt[rows[i], :n].long()], 0.25)
        torch.testing.assert_close(got[i, :n], ref)
        assert not got[i, n:].any()
