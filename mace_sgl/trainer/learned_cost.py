"""The cost model the policy learned online, kept in STATE/learned_cost.json.

A restarted server would otherwise start again from the profile's (or the built-in)
weights and mispredict prefill and decode until enough iterations corrected them. The
file is rewritten atomically at most every SAVE_EVERY_S seconds; at start it replaces
the profile's cost model only when it was learned from the same starting point on the
same model, device and thread count (`key`), since costs learned elsewhere mean nothing
here. A missing, corrupt or foreign file is ignored with a log line: the cost model
corrects itself online either way.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from mace_sgl.policy.cost import CostModel

logger = logging.getLogger("mace_sgl.trainer")

FILE = "learned_cost.json"
SAVE_EVERY_S = 60.0


def key(profile_source: str, model_path: str, device: str, threads: int) -> dict[str, Any]:
    """What a learned cost model is valid for."""
    return {
        "profile": profile_source,
        "model_path": str(model_path),
        "device": device,
        "threads": int(threads),
    }


def load(path: Path, want: dict[str, Any]) -> CostModel | None:
    """The cost model saved at `path` for `want`, or None."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("key") != want:
            logger.info("learned cost model in %s is for %s, not %s: not used",
                        path, data.get("key"), want)  # fmt: skip
            return None
        return CostModel.from_dict(data["cost"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("learned cost model in %s not read: %s", path, e)
        return None


class CostSaver:
    """Writes the live cost model to `path` every SAVE_EVERY_S seconds."""

    def __init__(self, path: Path, key: dict[str, Any], cost: CostModel, resumed: bool) -> None:
        self.path, self.key, self.cost = path, key, cost
        self.resumed = resumed
        self.saved_at = time.monotonic()
        self.saves = 0
        self.failures = 0

    def maybe_save(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self.saved_at < SAVE_EVERY_S:
            return False
        self.saved_at = now
        return self.save()

    def save(self) -> bool:
        tmp = self.path.with_suffix(".tmp")
        try:
            body = {"key": self.key, "cost": self.cost.to_dict(), "saved_unix": time.time()}
            tmp.write_text(json.dumps(body, indent=1) + "\n")
            tmp.replace(self.path)
        except (OSError, ValueError) as e:  # a full disk must not stop serving
            self.failures += 1
            logger.warning("learned cost model not saved to %s: %s", self.path, e)
            return False
        self.saves += 1
        return True

    def status(self) -> dict[str, Any]:
        return {"resumed": self.resumed, "saves": self.saves, "failures": self.failures}
