"""Publishing trained LoRA weights into SGLang's LoRA pool in place, and to disk.

SGLang keeps each adapter twice: a CPU-side `LoRAAdapter` (per-layer dict of normalised
weights: q/k/v stacked into qkv_proj, gate/up into gate_up_proj, along dim 0) and, while it
is resident, a slot of `LoRAMemoryPool`'s A/B buffers. Both are updated here: the CPU copy
tensor by tensor, then the slot through the pool's own `load_lora_weight_to_buffer`, so the
buffer layout stays SGLang's business. No file round trip, no re-parsing of the adapter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mace_sgl.trainer.streams import DeviceStreams

STACKS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_LAYER = re.compile(r"layers\.(\d+)\.")


def peft_layer_weights(peft_model: Any) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"q_proj.lora_A": tensor, ...}} from a peft model's adapter parameters."""
    return layer_weights(peft_model.named_parameters())


def layer_weights(
    named: Iterable[tuple[str, torch.Tensor]],
) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"q_proj.lora_A": tensor, ...}} from (peft parameter name, tensor) pairs."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, p in named:
        if "lora_" not in name:
            continue
        layer = int(_LAYER.search(name).group(1))
        module = name.split(".lora_")[0].rsplit(".", 1)[-1]
        kind = "lora_A" if ".lora_A." in name else "lora_B"
        out.setdefault(layer, {})[f"{module}.{kind}"] = p.detach()
    return out


def normalised(weights: dict[str, torch.Tensor], sglang_name: str) -> torch.Tensor:
    """The tensor SGLang stores under `sglang_name` (e.g. ...qkv_proj.lora_A.weight)."""
    kind = "lora_A" if ".lora_A" in sglang_name else "lora_B"
    for fused, parts in STACKS.items():
        if f".{fused}." in sglang_name:
            return torch.cat([weights[f"{p}.{kind}"] for p in parts], 0)
    module = sglang_name.split(f".{kind}")[0].rsplit(".", 1)[-1]
    return weights[f"{module}.{kind}"]


class PoolPublisher:
    """Writes a peft adapter's weights into SGLang's copy of adapter `name`, in place."""

    def __init__(self, lora_manager: Any, name: str, streams: DeviceStreams | None = None) -> None:
        self.manager = lora_manager
        self.streams = streams or DeviceStreams.cpu()
        uids = [uid for uid, ref in lora_manager.lora_refs.items() if ref.lora_name == name]
        if len(uids) != 1:
            raise ValueError(
                f"adapter {name!r} is not loaded in SGLang (have: "
                f"{sorted(r.lora_name for r in lora_manager.lora_refs.values())})"
            )
        self.uid = uids[0]
        self._compact()

    def _compact(self) -> None:
        """Keep SGLang's CPU copy of the adapter in the dtype of its pool slots (the
        model's): it loads the checkpoint's fp32 as it stands, twice the bytes of what
        it serves, held for every adapter whether resident or not."""
        dtype = getattr(self.manager.memory_pool, "dtype", None)
        if dtype is None:
            return
        for layer in self.manager.loras[self.uid].layers:
            for key, w in layer.weights.items():
                if w.is_floating_point() and w.dtype != dtype:
                    layer.weights[key] = w.to(dtype)
            if getattr(layer, "pinned_weights", None):
                layer.pinned_weights.clear()

    def loaded(self) -> bool:
        """Whether SGLang still holds this adapter under the id it was found with."""
        return self.uid in self.manager.loras

    def publish(self, peft_model: Any) -> None:
        """Copy the weights; afterwards new forwards of this adapter use them."""
        self.publish_weights(peft_model.named_parameters())

    def publish_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy LoRA weights given as (peft parameter name, tensor) pairs. On a GPU the
        caller runs on the training stream: the copy into the CPU copy waits for that
        stream only (the weights' last writer)."""
        adapter = self.manager.loras[self.uid]
        per_layer = layer_weights(named)
        with torch.no_grad():
            for i, layer in enumerate(adapter.layers):
                for sg_name, dst in layer.weights.items():
                    src = normalised(per_layer[i], sg_name)
                    if src.shape != dst.shape:
                        raise ValueError(
                            f"{sg_name}: trainer {tuple(src.shape)} vs SGLang {tuple(dst.shape)}"
                        )
                    dst.copy_(src)
                # A pinned staging copy (GPU) would otherwise be reused stale.
                if getattr(layer, "pinned_weights", None):
                    layer.pinned_weights.clear()
        pool = self.manager.memory_pool
        buffer_id = pool.uid_to_buffer_id.get(self.uid)
        if buffer_id is None:
            return  # not resident: the next batch loads the updated CPU copy
        # On a GPU the slot is written on the forward stream, after the forwards queued
        # before and before those queued after (trainer/streams.py), and after a load of
        # this adapter SGLang may still run on its loader stream
        # (--enable-lora-overlap-loading), which would otherwise land old weights later.
        pending = getattr(self.manager, "pending_lora_load_events", None) or {}
        with self.streams.publish_point(after=pending.get(self.uid)):
            pool.load_lora_weight_to_buffer(
                self.uid,
                buffer_id,
                adapter,
                self.manager.lora_modules,
                self.manager.embed_tokens_module,
                self.manager.lm_head_module,
            )
            self.manager._notify_lora_slots_updated({buffer_id})


def checkpoints(adapter_dir: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints `vN/` under adapter_dir as (N, path), oldest first."""
    found = [
        (int(d.name[1:]), d)
        for d in adapter_dir.glob("v*")
        if d.name[1:].isdigit() and (d / "adapter_model.safetensors").is_file()
    ]
    return sorted(found)


def lora_config_dict(rank: int, alpha: int, targets: list[str]) -> dict[str, Any]:
    """The adapter_config.json fields SGLang and peft both read for our adapters."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "lora_dropout": 0.0,
        "bias": "none",
    }


def write_zero_adapter(
    out: Path, config: dict[str, Any], rank: int, alpha: int, targets: list[str]
) -> Path:
    """A peft-format adapter of all-zero weights: serving it equals the base model.

    SGLang needs an adapter on disk to reserve the slot at start-up; the trainer then
    overwrites its weights in place.
    """
    from safetensors.torch import save_file

    text = config.get("text_config", config)
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    heads, kv_heads = (
        text["num_attention_heads"],
        text.get("num_key_value_heads") or text["num_attention_heads"],
    )
    hd = text.get("head_dim") or hidden // heads
    dims = {
        "q_proj": (hidden, heads * hd),
        "k_proj": (hidden, kv_heads * hd),
        "v_proj": (hidden, kv_heads * hd),
        "o_proj": (heads * hd, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    tensors = {}
    for i in range(text["num_hidden_layers"]):
        for m in targets:
            group = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            d_in, d_out = dims[m]
            base = f"base_model.model.model.layers.{i}.{group}.{m}"
            tensors[f"{base}.lora_A.weight"] = torch.zeros(rank, d_in)
            tensors[f"{base}.lora_B.weight"] = torch.zeros(d_out, rank)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = lora_config_dict(rank, alpha, targets)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
