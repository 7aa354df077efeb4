"""GPU memory held back from SGLang's static pool for training and KV-pruning scores.

SGLang sizes its KV pool at start from `--mem-fraction-static`: that share of GPU memory
holds the weights and the KV pool, the rest is left for activations. The trainer's LoRA,
gradients and AdamW states, its slices' activations and fp32 logits, and the KV-pruning
score tensor (allocated after the pool is sized) all come out of "the rest", so without a
reserve an out-of-memory error can hit SGLang's forward instead of the trainer. The
launcher (cli.py) therefore lowers the static share by the reserve before SGLang starts,
and the trainer plans its slices inside the reserve (trainer/runtime.py `_mem_free`).

Plain Python, no torch: the numbers come from the model's config.json and the flags, so
`mace-sgl serve --profile NAME --print-args` resolves them on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# fp32 copies of each tenant's LoRA weights the trainer holds all the time: the weights,
# their gradient, AdamW's two moments and the rollback snapshot.
RESIDENT_COPIES = 5

MB = 2**20
# Sequence length the estimate assumes for one DPO pair's longer sequence when neither
# --context-length nor the model bounds it lower (a prompt plus an answer).
ESTIMATE_SEQ_TOKENS = 4096
HEAD_CHUNK_ROWS = 8192  # as trainer/sliced.py
# The least static share left after the reserve: below it the KV pool is too small to
# serve, and the reserve (or the share) is wrong for this GPU.
MIN_STATIC_FRACTION = 0.3


@dataclass(frozen=True)
class GpuReserve:
    """Bytes held back from SGLang's static share, and why."""

    train_bytes: int = 0  # trainer: resident LoRA state + its largest slice
    prune_bytes: int = 0  # KV-pruning scores: one fp32 per (request row, position)

    @property
    def total_bytes(self) -> int:
        return self.train_bytes + self.prune_bytes

    def as_dict(self) -> dict[str, float]:
        return {
            "train_mb": round(self.train_bytes / MB, 1),
            "prune_scores_mb": round(self.prune_bytes / MB, 1),
            "total_mb": round(self.total_bytes / MB, 1),
        }


def _dims(model_config: dict[str, Any]) -> dict[str, int]:
    text = model_config.get("text_config", model_config)
    hidden = int(text["hidden_size"])
    heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    return {
        "hidden": hidden,
        "inter": int(text.get("intermediate_size") or 4 * hidden),
        "layers": int(text["num_hidden_layers"]),
        "q": heads * head_dim,
        "kv": int(text.get("num_key_value_heads") or heads) * head_dim,
        "vocab": int(text["vocab_size"]),
        "max_pos": int(text.get("max_position_embeddings") or ESTIMATE_SEQ_TOKENS),
    }


def lora_params(model_config: dict[str, Any], rank: int, targets: list[str]) -> int:
    """Parameters of one LoRA adapter (A and B of every target module, every layer)."""
    d = _dims(model_config)
    shapes = {  # (in, out) of each adaptable projection
        "q_proj": (d["hidden"], d["q"]),
        "k_proj": (d["hidden"], d["kv"]),
        "v_proj": (d["hidden"], d["kv"]),
        "o_proj": (d["q"], d["hidden"]),
        "gate_proj": (d["hidden"], d["inter"]),
        "up_proj": (d["hidden"], d["inter"]),
        "down_proj": (d["inter"], d["hidden"]),
    }
    per_layer = sum(rank * sum(shapes[t]) for t in targets if t in shapes)
    return per_layer * d["layers"]


def base_params(model_config: dict[str, Any]) -> int:
    """Parameters of the base model (embedding, layers, final norm, an untied head)."""
    d = _dims(model_config)
    text = model_config.get("text_config", model_config)
    attn = d["hidden"] * (d["q"] + 2 * d["kv"]) + d["q"] * d["hidden"]
    layer = attn + 3 * d["hidden"] * d["inter"] + 2 * d["hidden"]
    embed = d["vocab"] * d["hidden"]
    head = 0 if text.get("tie_word_embeddings", model_config.get("tie_word_embeddings")) else embed
    return embed + d["layers"] * layer + d["hidden"] + head


def estimate_train_bytes(
    model_config: dict[str, Any],
    rank: int,
    targets: list[str],
    tenants: int = 1,
    head_chunks: int = 0,
    seq_tokens: int | None = None,
    dtype_bytes: int = 2,
    base_copy: bool = False,
) -> int:
    """What the sliced DPO trainer holds at its peak, with 25% headroom:

    - with `base_copy` (--mace-train-dtype float32), its float32 copy of the base
      weights, and activations in float32;

    - per tenant, its LoRA in fp32 with gradient, AdamW's two moments and the rollback
      snapshot (5 copies);
    - the layer inputs a step keeps for its backward (every layer, both sequences of the
      pair, model dtype) and one layer's recompute activations (about 4 hidden-wide and
      3 intermediate-wide tensors per token);
    - one vocabulary chunk of the LM head in fp32 (logits, softmax, gradient) over the
      sequence.
    """
    d = _dims(model_config)
    seq = min(seq_tokens or ESTIMATE_SEQ_TOKENS, d["max_pos"])
    copy = 0
    if base_copy:  # the copy, and the activations computed from it, are float32
        copy, dtype_bytes = 4 * base_params(model_config), 4
    lora = RESIDENT_COPIES * 4 * lora_params(model_config, rank, targets) * max(tenants, 1)
    kept = 2 * d["layers"] * seq * d["hidden"] * dtype_bytes
    layer = seq * (4 * d["hidden"] + 3 * d["inter"]) * dtype_bytes
    chunks = head_chunks or math.ceil(d["vocab"] / HEAD_CHUNK_ROWS)
    rows = math.ceil(d["vocab"] / max(1, min(chunks, d["vocab"])))
    head = 3 * rows * seq * 4
    return int(1.25 * (copy + lora + kept + max(layer, head)))


def prune_score_bytes(rows: int, max_len: int) -> int:
    """The KV-pruning score tensor (prune/runtime.py): fp32 per request row and position,
    plus an int64 offset per row."""
    return rows * max_len * 4 + rows * 8


def lowered_fraction(static_fraction: float, reserve: GpuReserve, total_bytes: float) -> float:
    """SGLang's static share after taking the reserve out of it; refuses (ValueError) a
    reserve that would leave less than MIN_STATIC_FRACTION of the GPU to serve."""
    if total_bytes <= 0:
        raise ValueError(f"GPU memory must be positive, got {total_bytes}")
    lowered = static_fraction - reserve.total_bytes / total_bytes
    if lowered < MIN_STATIC_FRACTION:
        raise ValueError(
            f"the training/pruning reserve of {reserve.total_bytes / MB:.0f} MiB would leave "
            f"--mem-fraction-static at {lowered:.3f} of {total_bytes / 2**30:.1f} GiB "
            f"(from {static_fraction:.3f}); lower --mace-train-memory-mb, train a smaller "
            "rank or fewer tenants, or give --mem-fraction-static yourself"
        )
    return round(lowered, 4)
