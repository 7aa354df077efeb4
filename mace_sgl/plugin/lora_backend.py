"""SGLang's CPU LoRA backend (`--lora-backend torch_native`), without a Python loop per segment.

Why: SGLang's torch_native backend applies LoRA one *segment* at a time: a run of
consecutive batch rows that share an adapter. In a decode batch of requests for
different tenants almost every row is its own segment, and each segment costs a handful
of small matmuls, `.item()` calls and slicing per LoRA module per layer. Measured on the
2-core dev box (SmolLM2-135M shapes, 30 layers, rank 16, bf16, 2026-12-03): 8 decode rows
as 1 segment 48 ms of LoRA work per forward, as 8 segments 360 ms, as 16 segments 666 ms.
That alone made TBT with 8 tenants several times that with one.

How: every row is multiplied by all adapter slots the batch uses in one matmul, and
each row then keeps its own adapter's result (a gather). With one adapter in the batch
that is plain matmuls (no `.item()` syncs either: 8 rows 37 ms against SGLang's 64 ms);
with several it costs `slots` times the (small) LoRA FLOPs and no Python per segment
(8 rows of 8 tenants: 77 ms against 345 ms). Batches of several adapters in long
segments (prefill), unequal ranks, or any call shape this plan was not made for (the
pruned LM-head rows) run SGLang's own code.
Results equal SGLang's to rounding (tests/test_lora_backend.py).

The class replaces the torch_native entry of SGLang's LoRA backend registry in the
scheduler process (plugin/__init__.py), so `--lora-backend torch_native` stays the flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.lora.backend.torch_backend import TorchNativeLoRABackend
from torch import Tensor

# A batch goes the gathered way when its segments are this short on average: above it the
# per-segment overhead is small against the segment's own matmuls, and the gathered way's
# extra FLOPs (one pass per adapter slot) would cost more than the loop.
MAX_MEAN_SEGMENT = 16


@dataclass(frozen=True)
class GatherPlan:
    """Per-row adapter slots of one batch, for the gathered path."""

    rows: int  # tokens in the batch
    first: int  # adapter slots first..first+slots-1 cover every row's slot
    slots: int
    rank: int  # the one LoRA rank of every adapter the batch uses
    slot_of_row: torch.Tensor  # [rows] int64, relative to `first`
    scale_of_row: torch.Tensor  # [rows, 1] float32: the adapter's scaling, 0 for no adapter


def plan_gather(
    seg_lens: list[int], seg_slots: list[int], lora_ranks: list[int], scalings: list[float]
) -> GatherPlan | None:
    """A GatherPlan for segments (lengths, slot of each), or None where SGLang's loop fits."""
    if not seg_lens:
        return None
    rows = sum(seg_lens)
    first, last = min(seg_slots), max(seg_slots)
    # One slot: plain matmuls, no extra FLOPs, whatever the length. Several: each row is
    # multiplied by every slot in the span, worth it only for short segments.
    if last > first and rows > MAX_MEAN_SEGMENT * len(seg_lens):
        return None
    ranks = {lora_ranks[s] for s in seg_slots if lora_ranks[s] > 0}
    if len(ranks) != 1:
        return None  # no adapter at all, or unequal ranks (slice layouts differ)
    slot_of_row = torch.repeat_interleave(
        torch.tensor(seg_slots, dtype=torch.int64), torch.tensor(seg_lens, dtype=torch.int64)
    )
    scale = torch.tensor(
        [scalings[s] if lora_ranks[s] > 0 else 0.0 for s in range(len(lora_ranks))],
        dtype=torch.float32,
    )
    return GatherPlan(
        rows=rows,
        first=first,
        slots=last - first + 1,
        rank=ranks.pop(),
        slot_of_row=slot_of_row - first,
        scale_of_row=scale[slot_of_row].unsqueeze(1),
    )


def gathered_lora_a(x: torch.Tensor, weights: torch.Tensor, plan: GatherPlan) -> torch.Tensor:
    """x [rows, in] @ A[slot of row]^T * scaling -> [rows, weights.shape[1]]."""
    slots = weights[plan.first : plan.first + plan.slots]  # contiguous view [slots, out, in]
    out = slots.shape[1]
    every = x @ slots.reshape(plan.slots * out, -1).T  # [rows, slots * out]
    index = plan.slot_of_row.view(-1, 1, 1).expand(-1, 1, out)
    mine = every.view(plan.rows, plan.slots, out).gather(1, index).squeeze(1)
    return mine * plan.scale_of_row.to(mine.dtype)


def gathered_lora_b(
    x: torch.Tensor,
    weights: torch.Tensor,
    slice_offsets: list[int],
    plan: GatherPlan,
    base_output: torch.Tensor | None,
) -> torch.Tensor:
    """Slice s of x [rows, S*rank] @ B[slot of row][slice s]^T, added to base_output."""
    if base_output is None:
        base_output = torch.zeros(plan.rows, slice_offsets[-1], dtype=x.dtype, device=x.device)
    rank = plan.rank
    for s in range(len(slice_offsets) - 1):
        lo, hi = slice_offsets[s], slice_offsets[s + 1]
        xs = x[:, s * rank : (s + 1) * rank]  # [rows, rank]
        ws = weights[plan.first : plan.first + plan.slots, lo:hi, :rank]  # [slots, out_s, rank]
        every = torch.matmul(ws, xs.T)  # [slots, out_s, rows]
        index = plan.slot_of_row.view(-1, 1, 1).expand(-1, 1, hi - lo)
        mine = every.permute(2, 0, 1).gather(1, index).squeeze(1)  # [rows, out_s]
        base_output[:, lo:hi] += mine
    return base_output


class GatheredTorchLoRABackend(TorchNativeLoRABackend):
    """TorchNativeLoRABackend with the gathered path for many-segment batches."""

    name = "torch_native"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gather_plan: GatherPlan | None = None

    def prepare_lora_batch(self, *args: Any, **kwargs: Any) -> None:
        super().prepare_lora_batch(*args, **kwargs)
        info = self.batch_info
        self.gather_plan = None
        if info.use_cuda_graph:
            return
        self.gather_plan = plan_gather(
            info.seg_lens_cpu.tolist(),
            info.weight_indices_cpu.tolist(),
            info.lora_ranks_cpu.tolist(),
            info.scalings_cpu.tolist(),
        )

    def _plan_for(self, x: torch.Tensor, kwargs: dict[str, Any]) -> GatherPlan | None:
        plan = self.gather_plan
        if plan is None or kwargs.get("pruned_batch_info") is not None:
            return None
        return plan if x.shape[0] == plan.rows else None

    def _fits(self, plan: GatherPlan, a: torch.Tensor, slices: int) -> bool:
        # A holds each slot's slices packed at the adapter's rank; that is the buffer's
        # full height only when every adapter has the pool's max rank.
        return a.shape[1] == slices * plan.rank

    def run_lora_a_sgemm(
        self, x: Tensor, weights: Tensor, stack_num: int = 1, *args: Any, **kwargs: Any
    ) -> Tensor:
        plan = self._plan_for(x, kwargs)
        if plan is None or not self._fits(plan, weights, stack_num):
            return super().run_lora_a_sgemm(x, weights, stack_num, *args, **kwargs)
        return gathered_lora_a(x, weights, plan)

    def run_lora_b_sgemm(
        self,
        x: Tensor,
        weights: Tensor,
        output_offset_cpu: Tensor,
        base_output: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        offsets = [int(v) for v in output_offset_cpu.tolist()]
        plan = self._plan_for(x, kwargs)
        if plan is None or x.shape[1] != (len(offsets) - 1) * plan.rank:
            return super().run_lora_b_sgemm(
                x, weights, output_offset_cpu, base_output, *args, **kwargs
            )
        return gathered_lora_b(x, weights, offsets, plan, base_output)

    def run_qkv_lora(
        self,
        x: Tensor,
        qkv_lora_a: Tensor,
        qkv_lora_b: Tensor,
        output_offset: Tensor,
        output_offset_cpu: Tensor,
        max_qkv_out_dim: int,
        base_output: Tensor | None = None,
        n_slices: int = 3,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        plan = self._plan_for(x, kwargs)
        if plan is None or not self._fits(plan, qkv_lora_a, n_slices):
            return super().run_qkv_lora(
                x,
                qkv_lora_a,
                qkv_lora_b,
                output_offset,
                output_offset_cpu,
                max_qkv_out_dim,
                base_output,
                n_slices,
                *args,
                **kwargs,
            )
        a = gathered_lora_a(x, qkv_lora_a, plan)
        offsets = [int(v) for v in output_offset_cpu.tolist()]
        return gathered_lora_b(a, qkv_lora_b, offsets, plan, base_output)

    def run_gate_up_lora(
        self,
        x: Tensor,
        gate_up_lora_a: Tensor,
        gate_up_lora_b: Tensor,
        output_offset_cpu: Tensor,
        base_output: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        offsets = [int(v) for v in output_offset_cpu.tolist()]
        plan = self._plan_for(x, kwargs)
        if plan is None or not self._fits(plan, gate_up_lora_a, len(offsets) - 1):
            return super().run_gate_up_lora(
                x, gate_up_lora_a, gate_up_lora_b, output_offset_cpu, base_output, *args, **kwargs
            )
        a = gathered_lora_a(x, gate_up_lora_a, plan)
        return gathered_lora_b(a, gate_up_lora_b, offsets, plan, base_output)


def install() -> None:
    """Make SGLang's registry build this class for `--lora-backend torch_native`."""
    from sglang.srt.lora.backend import lora_registry

    from mace_sgl.plugin.cpu import INSTALLED

    lora_registry.LORA_SUPPORTED_BACKENDS["torch_native"] = lambda: GatheredTorchLoRABackend
    INSTALLED.append("lora_gathered")
