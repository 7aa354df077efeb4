"""Priorities P(t): task type, waiting time (aging) and, for fine-tune work, its DPO loss.

P(t) = type_weight[type] + aging * waited_s + gamma * loss (fine-tune only). Higher runs
first. The type order decode > prefill > fine-tune holds for fresh work; a prefill that
has waited (type_weight[decode] - type_weight[prefill]) / aging seconds outranks new
decodes, so no request starves. Fine-tune priorities only order fine-tune units among
themselves (misaligned pairs, with high loss, train first; old ones are not starved); how
much training runs at all is the SLO controller's decision, so inference always wins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# A pair that never trained has DPO loss log(2) at a zero-initialised adapter.
UNTRAINED_LOSS = 0.6931


@dataclass(frozen=True)
class Priorities:
    """Parameters of P(t); stored in the profile's `priorities` section."""

    type_weight: dict[str, float] = field(
        default_factory=lambda: {"decode": 3.0, "prefill": 2.0, "train": 1.0}
    )
    aging: float = 1.0  # priority per second waited
    gamma: float = 1.0  # priority per nat of DPO loss

    def score(self, kind: str, waited_s: float, loss: float | None = None) -> float:
        """P(t) of one task; `kind` is decode, prefill or train."""
        p = self.type_weight[kind] + self.aging * max(waited_s, 0.0)
        if kind == "train":
            p += self.gamma * (UNTRAINED_LOSS if loss is None else loss)
        return p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Priorities:
        base = cls()
        weights = {**base.type_weight, **(data.get("type_weight") or {})}
        return cls(
            type_weight={k: float(v) for k, v in weights.items()},
            aging=float(data.get("aging", base.aging)),
            gamma=float(data.get("gamma", base.gamma)),
        )
