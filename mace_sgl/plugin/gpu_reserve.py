"""The GPU reserve in the static share SGLang resolves (launcher process).

When no --mem-fraction-static was given (or a profile gave one for a GPU of unknown
size), the launcher marks the reserve `reserve_pending` and this wraps SGLang 0.5.23's
`handle_gpu_memory_settings` resolution step: after SGLang chose the share for this GPU,
the trainer's and the pruning scores' reserve (mace_sgl/gpu_memory.py) comes out of it,
declared through SGLang's own resolution record, before any scheduler sizes its KV pool.
"""

from __future__ import annotations

import logging
from typing import Any

from mace_sgl import gpu_memory
from mace_sgl.config import MaceConfig

logger = logging.getLogger("mace_sgl")

STEP = "handle_gpu_memory_settings"


def install(cfg: MaceConfig) -> None:
    """Register the wrapper when the launcher left the reserve to resolution."""
    if not cfg.reserve_pending:
        return
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook

    register_resolution_hook(STEP)(lambda server_args, previous: lower_share(
        server_args, previous, reserve_of(cfg)
    ))  # fmt: skip


def reserve_of(cfg: MaceConfig) -> gpu_memory.GpuReserve:
    return gpu_memory.GpuReserve(
        int(cfg.train_memory_mb * gpu_memory.MB) if cfg.train else 0,
        int(cfg.prune_reserve_mb * gpu_memory.MB) if cfg.kv_prune else 0,
    )


def lower_share(server_args: Any, previous: Any, reserve: gpu_memory.GpuReserve) -> None:
    """Run SGLang's step, then lower the share it resolved by the reserve."""
    from sglang.srt.arg_groups.model_override_base import resolving_view
    from sglang.srt.arg_groups.overrides import declare_resolution
    from sglang.srt.utils.common import get_device_memory_capacity

    previous(server_args)
    view = resolving_view(server_args)
    share = view.mem_fraction_static
    if share is None or reserve.total_bytes == 0:
        return
    gpu_mib = get_device_memory_capacity(view.device)
    if not gpu_mib:
        raise ValueError(
            "mace-sgl: cannot read this GPU's memory size to hold the training/pruning "
            f"reserve ({reserve.total_bytes / gpu_memory.MB:.0f} MiB) back from "
            "--mem-fraction-static; give --mem-fraction-static yourself"
        )
    lowered = gpu_memory.lowered_fraction(share, reserve, gpu_mib * gpu_memory.MB)
    logger.info(
        "mem-fraction-static %.3f -> %.3f: %s held back for training/pruning",
        share,
        lowered,
        reserve.as_dict(),
    )
    declare_resolution(server_args, "mace-sgl gpu reserve", mem_fraction_static=lowered)
