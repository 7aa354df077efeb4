"""The `mace_prune` attention backend: SGLang's own attention plus score capture.

CPU: SGLang's TorchNativeAttnBackend (same SDPA calls, so outputs equal torch_native
until a row is pruned) that also accumulates each decode query's attention per KV
position, and SnapKV-style window scores at prefill. GPU: SGLang's FlashInferAttnBackend;
pruning compacts req_to_token, so FlashInfer's kv_indices (built from req_to_token and
seq_lens) already skip pruned slots, and scores come from a small torch matmul over the
kept keys after each decode kernel. Both shift decode positions back to the original
positions. Chosen at runtime by device; the pruning itself is runtime.KvPruner.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from torch.nn.functional import scaled_dot_product_attention

from mace_sgl.prune import runtime
from mace_sgl.prune.policy import (
    PrunePolicy,
    batched_decode_weights,
    decode_attention_weights,
    window_attention_weights,
)

logger = logging.getLogger("mace_sgl.prune")

NAME = "mace_prune"


class _ScoreMixin:
    """What both devices share: the pruner, positions, prefill scores."""

    pruner: runtime.KvPruner
    req_to_token_pool: Any
    token_to_kv_pool: Any

    def _init_pruner(self, model_runner: Any, policy: PrunePolicy) -> None:
        rtt = model_runner.req_to_token_pool.req_to_token
        self.pruner = runtime.KvPruner(policy, rtt.shape[0], rtt.shape[1], rtt.device)

    def _before_forward(self, forward_batch: Any) -> None:
        mode = forward_batch.forward_mode
        if mode.is_decode():
            forward_batch.positions = self.pruner.shift_positions(
                forward_batch.positions, forward_batch.req_pool_indices
            )
        elif mode.is_extend() and forward_batch.extend_prefix_lens_cpu is not None:
            self.pruner.start_extend(
                forward_batch.req_pool_indices.tolist(),
                list(forward_batch.extend_prefix_lens_cpu),
            )

    def _score_extend(self, q: torch.Tensor, layer: Any, forward_batch: Any) -> None:
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        rtt = self.req_to_token_pool.req_to_token
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        rows = forward_batch.req_pool_indices.tolist()
        seq_lens = forward_batch.seq_lens_cpu.tolist()
        start = 0
        for row, prefix, n in zip(
            rows, forward_batch.extend_prefix_lens_cpu, seq_lens, strict=True
        ):
            new = n - prefix
            k = k_cache[rtt[row, :n]]
            w = window_attention_weights(
                q_[start : start + new], k, layer.scaling, prefix, self.pruner.policy.window
            )
            self.pruner.scores[row, :n] += w
            start += new


class MacePruneTorchBackend(_ScoreMixin, TorchNativeAttnBackend):
    """CPU: torch_native attention with per-request decode score accumulation."""

    def __init__(self, model_runner: Any, policy: PrunePolicy) -> None:
        super().__init__(model_runner)
        self._init_pruner(model_runner, policy)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        super().init_forward_metadata(forward_batch)
        self._before_forward(forward_batch)

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: Any,
        forward_batch: Any,
        save_kv_cache: bool = True,
    ) -> torch.Tensor:
        o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        if forward_batch.extend_prefix_lens_cpu is not None:
            self._score_extend(q, layer, forward_batch)
        return o

    def _run_sdpa_forward_decode(
        self,
        query: torch.Tensor,
        output: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        encoder_lens: torch.Tensor | None = None,
        scaling: float | None = None,
        enable_gqa: bool = False,
        causal: bool = False,
        is_cross_attn: bool = False,
        sliding_window_size: int | None = None,
    ) -> torch.Tensor:
        """torch_native's decode loop (no encoder, no sliding window) plus scores."""
        if encoder_lens is not None or (sliding_window_size or -1) > -1:
            raise NotImplementedError("mace_prune: encoder or sliding-window attention")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        query = query.movedim(0, query.dim() - 2)  # [heads, tokens, dim]
        scores = self.pruner.scores
        for i, (row, n) in enumerate(
            zip(req_pool_indices.tolist(), seq_lens.tolist(), strict=True)
        ):
            tokens = req_to_token[row, :n]
            k = k_cache[tokens]  # [n, kv_heads, dim]
            v = v_cache[tokens]
            q = query[:, i : i + 1, :]
            kq, vq = k.movedim(0, 1), v.movedim(0, 1)
            if not (q.dtype == kq.dtype == vq.dtype):
                kq, vq = kq.to(q.dtype), vq.to(q.dtype)
            out = scaled_dot_product_attention(
                q.unsqueeze(0),
                kq.unsqueeze(0),
                vq.unsqueeze(0),
                enable_gqa=enable_gqa,
                scale=scaling,
                is_causal=causal,
            )
            output[i : i + 1] = out.squeeze(0).movedim(1, 0)
            scores[row, :n] += decode_attention_weights(q[:, 0, :], k, scale)
        return output


def _flashinfer_class() -> type:
    """FlashInfer variant, built lazily: flashinfer is importable only on CUDA machines."""
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    class MacePruneFlashInferBackend(_ScoreMixin, FlashInferAttnBackend):
        """GPU: FlashInfer attention on compacted rows; scores by torch after decode."""

        def __init__(self, model_runner: Any, policy: PrunePolicy) -> None:
            super().__init__(model_runner, init_new_workspace=model_runner.init_new_workspace)
            self._init_pruner(model_runner, policy)

        def init_forward_metadata(self, forward_batch: Any) -> None:
            super().init_forward_metadata(forward_batch)
            self._before_forward(forward_batch)

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # noqa: ANN001, ANN201
            o = super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
            if forward_batch.extend_prefix_lens_cpu is not None:
                self._score_extend(q, layer, forward_batch)
            return o

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):  # noqa: ANN001, ANN201
            o = super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
            self._score_decode(q, layer, forward_batch)
            return o

        def _score_decode(self, q: torch.Tensor, layer: Any, forward_batch: Any) -> None:
            rows, lens = forward_batch.req_pool_indices, forward_batch.seq_lens
            max_len = int(forward_batch.seq_lens_cpu.max())
            w = batched_decode_weights(
                q.reshape(q.shape[0], layer.tp_q_head_num, layer.qk_head_dim),
                self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.req_to_token_pool.req_to_token,
                rows,
                lens,
                max_len,
                layer.scaling,
            )
            self.pruner.scores[rows, :max_len] += w

    return MacePruneFlashInferBackend


def check_supported(server_args: Any) -> None:
    """Refuse the settings under which compacting rows between decodes is not safe."""
    problems = []
    if not getattr(server_args, "disable_overlap_schedule", False):
        problems.append("needs --disable-overlap-schedule (rows change between decodes)")
    if (server_args.page_size or 1) != 1:
        problems.append("needs --page-size 1")
    if getattr(server_args, "speculative_algorithm", None):
        problems.append("does not support speculative decoding")
    if getattr(server_args, "enable_mixed_chunk", False):
        problems.append("does not support --enable-mixed-chunk")
    if (server_args.tp_size or 1) != 1 or (server_args.dp_size or 1) != 1:
        problems.append("supports tp_size = dp_size = 1 only")
    if problems:
        raise ValueError("attention backend mace_prune: " + "; ".join(problems))


def create_backend(model_runner: Any) -> Any:
    """Factory registered under `mace_prune` in SGLang's attention registry."""
    from mace_sgl.config import MaceConfig

    check_supported(model_runner.server_args)
    cfg = MaceConfig.from_env()
    policy = cfg.prune_policy()
    if str(model_runner.device).startswith("cuda"):
        backend = _flashinfer_class()(model_runner, policy)
    else:
        backend = MacePruneTorchBackend(model_runner, policy)
    logger.info("mace_prune attention (%s) with %s", type(backend).__name__, policy)
    return backend
