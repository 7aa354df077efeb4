"""The profile file: what `mace-sgl profile` measured and `--mace-profile FILE` loads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mace_sgl.policy.cost import CostModel
from mace_sgl.policy.packing import PackingParams
from mace_sgl.policy.priority import Priorities
from mace_sgl.policy.slo import SloTargets

FORMAT = "mace-sgl-profile/1"


@dataclass
class Profile:
    """Cost model, priority and packing parameters, and SLO targets for one device+model."""

    cost: CostModel = field(default_factory=CostModel)
    priorities: Priorities = field(default_factory=Priorities)
    packing: PackingParams = field(default_factory=PackingParams)
    slo: SloTargets = field(default_factory=SloTargets)
    meta: dict[str, Any] = field(default_factory=dict)  # device, model, date, fit errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "meta": self.meta,
            "cost": self.cost.to_dict(),
            "priorities": self.priorities.to_dict(),
            "packing": self.packing.to_dict(),
            "slo": self.slo.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format: {data.get('format')!r})")
        slo = data.get("slo") or {}
        return cls(
            cost=CostModel.from_dict(data.get("cost") or {}),
            priorities=Priorities.from_dict(data.get("priorities") or {}),
            packing=PackingParams.from_dict(data.get("packing") or {}),
            slo=SloTargets.from_dict(slo),
            meta=dict(data.get("meta") or {}),
        )

    def save(self, path: Path) -> None:
        """Write atomically (a half-written profile must never be loaded)."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read profile {path}: {e}") from e
        return cls.from_dict(data)
