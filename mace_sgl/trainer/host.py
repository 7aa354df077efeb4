"""The one typed object through which the trainer meets the SGLang scheduler it lives in.

The plugin (plugin/train_hooks.py) builds a `TrainerHost` from the scheduler's model
runner; every trainer part takes what it needs from it (the weights to share, the LoRA
manager whose adapters it publishes into, the device) and nothing else of SGLang's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mace_sgl.config import MaceConfig
from mace_sgl.trainer.streams import DeviceStreams


@dataclass(frozen=True)
class TrainerHost:
    """What training shares with serving in one scheduler process."""

    model: Any  # SGLang's loaded model (torch.nn.Module): the base weights training shares
    lora_manager: Any  # SGLang's LoRAManager: served adapters, their CPU copies, pool slots
    model_path: str  # the checkpoint directory (config.json, tokenizer)
    cfg: MaceConfig
    # Where serving and training run on a GPU (trainer/streams.py); CPU: no streams.
    streams: DeviceStreams = field(default_factory=DeviceStreams.cpu)
    dp_rank: int = 0  # which data-parallel replica this scheduler serves

    @classmethod
    def from_model_runner(
        cls,
        runner: Any,
        cfg: MaceConfig,
        streams: DeviceStreams | None = None,
        dp_rank: int = 0,
    ) -> TrainerHost:
        """The host of SGLang's ModelRunner `runner` (tensor parallel size 1)."""
        return cls(
            runner.model,
            runner.lora_manager,
            runner.model_config.model_path,
            cfg,
            streams or DeviceStreams.cpu(),
            dp_rank,
        )

    @property
    def device(self) -> torch.device:
        return next(iter(self.model.parameters())).device

    def tenant_names(self) -> dict[str, str]:
        """{adapter name: SGLang's lora id} of every loaded adapter whose files lie under
        STATE/adapters/NAME: the tenants. Adapters a user passed with --lora-paths from
        elsewhere are served but not trained."""
        root = (self.cfg.state_path / "adapters").resolve()
        out = {}
        for uid, ref in list(self.lora_manager.lora_refs.items()):
            path = Path(ref.lora_path or "").resolve()
            if path.parent.parent == root and path.parent.name == ref.lora_name:
                out[ref.lora_name] = uid
        return out
