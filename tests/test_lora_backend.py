"""The gathered CPU LoRA path equals SGLang's own per-segment torch path."""

from __future__ import annotations

import pytest
import torch
from sglang.srt.lora.torch_ops.lora_ops import sgemm_lora_a_fwd, sgemm_lora_b_fwd

from mace_sgl.plugin.lora_backend import gathered_lora_a, gathered_lora_b, plan_gather

SLOTS, RANK = 4, 8


def sglang_lora(x, a, b, offsets, seg_lens, seg_slots, ranks, scalings, base):
    n_slices = len(offsets) - 1
    y = sgemm_lora_a_fwd(
        x,
        a,
        torch.tensor(seg_slots),
        torch.tensor(seg_lens),
        torch.tensor(ranks),
        torch.tensor(scalings),
        n_slices,
    )
    return sgemm_lora_b_fwd(
        y,
        b,
        torch.tensor(seg_slots),
        torch.tensor(seg_lens),
        torch.tensor(ranks),
        torch.tensor(offsets),
        base,
    )


@pytest.mark.parametrize(
    "offsets", [[0, 24], [0, 24, 32, 40], [0, 48, 96]], ids=["o_proj", "qkv", "gate_up"]
)
@pytest.mark.parametrize(
    "seg_lens,seg_slots",
    [
        ([1, 1, 1, 1, 1, 1], [0, 1, 2, 1, 3, 0]),  # decode, interleaved tenants
        ([3, 1, 2], [2, 0, 1]),  # short prefill chunks
        ([1, 1, 1], [1, 3, 1]),  # slot 3 holds no adapter (rank 0): base rows
        ([1, 1, 1], [2, 3, 2]),  # slots from 2 on only
        ([40], [1]),  # one adapter: plain matmuls at any length
    ],
)
def test_gathered_path_equals_sglangs(offsets, seg_lens, seg_slots):
    torch.manual_seed(0)
    in_dim = 24
    n_slices = len(offsets) - 1
    ranks = [RANK, RANK, RANK, 0]
    scalings = [2.0, 0.5, 1.0, 0.0]
    a = torch.randn(SLOTS, n_slices * RANK, in_dim)
    b = torch.randn(SLOTS, offsets[-1], RANK)
    a[3].zero_()
    b[3].zero_()
    x = torch.randn(sum(seg_lens), in_dim)
    base = torch.randn(sum(seg_lens), offsets[-1])

    plan = plan_gather(seg_lens, seg_slots, ranks, scalings)
    assert plan is not None
    ours = gathered_lora_b(gathered_lora_a(x, a, plan), b, offsets, plan, base.clone())
    theirs = sglang_lora(x, a, b, offsets, seg_lens, seg_slots, ranks, scalings, base.clone())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # The adapters really act: the result is not just the base output.
    assert (ours - base).abs().max() > 0.1


def test_plan_leaves_sglangs_loop_where_it_fits():
    ranks, scalings = [RANK, RANK, 4, 0], [1.0, 1.0, 1.0, 0.0]
    assert plan_gather([100, 100], [0, 1], ranks, scalings) is None  # long prefill segments
    assert plan_gather([1, 1], [0, 2], ranks, scalings) is None  # ranks 8 and 4
    assert plan_gather([1, 1], [3, 3], ranks, scalings) is None  # no adapter at all
    plan = plan_gather([2, 1], [1, 3], ranks, scalings)
    assert plan is not None and (plan.first, plan.slots, plan.rank) == (1, 3, RANK)
    assert plan.slot_of_row.tolist() == [0, 0, 2]
    assert plan.scale_of_row.flatten().tolist() == [1.0, 1.0, 0.0]
    one = plan_gather([500], [1], ranks, scalings)  # one slot, any length
    assert one is not None and (one.first, one.slots) == (1, 1)


def test_backend_class_routes_each_call(monkeypatch):
    """Planned calls take the gathered path; a call with other rows (pruned LM head) and
    a buffer of another max rank fall back to SGLang's loop, with the same result."""
    from sglang.srt.lora.backend.torch_backend import TorchNativeLoRABatchInfo

    from mace_sgl.plugin.lora_backend import GatheredTorchLoRABackend

    torch.manual_seed(1)
    backend = GatheredTorchLoRABackend(SLOTS, torch.device("cpu"))
    seg_lens, seg_slots = [1, 1, 1], [0, 1, 0]
    ranks, scalings = [RANK, RANK, 0, 0], [1.0, 2.0, 0.0, 0.0]
    backend.batch_info = TorchNativeLoRABatchInfo(
        bs=3,
        num_segments=3,
        max_len=1,
        use_cuda_graph=False,
        seg_lens=None,
        seg_indptr=None,
        weight_indices=None,
        lora_ranks=None,
        scalings=None,
        permutation=None,
        seg_lens_cpu=torch.tensor(seg_lens),
        weight_indices_cpu=torch.tensor(seg_slots),
        lora_ranks_cpu=torch.tensor(ranks),
        scalings_cpu=torch.tensor(scalings),
    )
    backend.gather_plan = plan_gather(seg_lens, seg_slots, ranks, scalings)
    offsets = torch.tensor([0, 24, 32, 40])
    a, b = torch.randn(SLOTS, 3 * RANK, 16), torch.randn(SLOTS, 40, RANK)
    x = torch.randn(3, 16)
    calls = []
    monkeypatch.setattr(
        "mace_sgl.plugin.lora_backend.gathered_lora_a",
        lambda *args, _f=gathered_lora_a: calls.append("a") or _f(*args),
    )
    got = backend.run_qkv_lora(x, a, b, None, offsets, 24, torch.zeros(3, 40))
    want = sglang_lora(
        x, a, b, offsets.tolist(), seg_lens, seg_slots, ranks, scalings, torch.zeros(3, 40)
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls == ["a"]
    # Two rows (not the planned three): SGLang's loop, no gathered call.
    backend.run_lora_a_sgemm(x[:2], a[:, :RANK], 1, pruned_batch_info=None)
    # A buffer whose max rank is twice the adapters' rank: the loop too.
    backend.run_qkv_lora(
        x, torch.randn(SLOTS, 6 * RANK, 16), torch.randn(SLOTS, 40, 2 * RANK), None, offsets, 24
    )
    assert calls == ["a"]
