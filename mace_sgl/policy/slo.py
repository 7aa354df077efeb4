"""SLO control: tail TTFT and TBT measured online steer how much training may run.

The scheduler reports every gap between two outputs of running requests (TBT), every
first-token latency (TTFT) and every finished request's mean time per output token
(TPOT). The controller keeps a window of each, and a factor in [0, 1] that scales the
training budget: it drops to zero as soon as a tail nears its target (inference always
wins) and grows by a step per iteration while both tails have slack.

Which tail answers to the TBT target is `tbt_basis` (--mace-slo-tbt-basis): "gap" (the
default, MACE's TBT: the p99 of single token gaps, prefill stalls included) or "request"
(the p99 of finished requests' TPOT: the per-request SLO that `slo_attainment` counts and
LeMix's evaluation uses). With "gap" a request can meet its SLO while the controller
already refuses training: one prefill stall is in the gap tail, but spread over a
request's tokens it is not.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

TBT_BASES = ("gap", "request")


@dataclass(frozen=True)
class SloTargets:
    """Latency targets, milliseconds; the profile's `slo` section or --mace-slo-* flags."""

    ttft_ms: float = 2000.0
    tbt_ms: float = 200.0
    tbt_basis: str = "gap"  # or "request" (module docstring)

    def __post_init__(self) -> None:
        if self.tbt_basis not in TBT_BASES:
            raise ValueError(f"tbt_basis {self.tbt_basis!r}: one of {', '.join(TBT_BASES)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SloTargets:
        """From a profile's `slo` section; an unknown key is an error, as before."""
        unknown = set(data) - {"ttft_ms", "tbt_ms", "tbt_basis"}
        if unknown:
            raise ValueError(f"unknown slo keys {sorted(unknown)}: ttft_ms, tbt_ms, tbt_basis")
        return cls(
            ttft_ms=float(data.get("ttft_ms", cls.ttft_ms)),
            tbt_ms=float(data.get("tbt_ms", cls.tbt_ms)),
            tbt_basis=str(data.get("tbt_basis", cls.tbt_basis)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[max(0, min(len(ordered), rank) - 1)]


class SloController:
    """Online tails, attainment so far, and the training factor they imply."""

    def __init__(
        self,
        targets: SloTargets,
        window: int = 200,
        at_risk: float = 0.9,
        slack: float = 0.7,
        step: float = 0.05,
    ) -> None:
        self.targets = targets
        self.tbt: deque[float] = deque(maxlen=window)
        self.ttft: deque[float] = deque(maxlen=max(window // 4, 16))
        self.tpot: deque[float] = deque(maxlen=max(window // 4, 16))
        self.at_risk, self.slack, self.step = at_risk, slack, step
        self.factor = 0.5
        self.requests = 0
        self.requests_ok = 0
        # Cumulative attainment is an average since start: under a constant load that
        # misses the SLO it slides from the first (unloaded) requests' 1.0 toward the
        # steady rate, which reads like drift. The recent window shows the rate now.
        self.recent_ok: deque[bool] = deque(maxlen=window)
        self.tbt_total = 0
        self.tbt_ok = 0

    def record_tbt(self, seconds: float) -> None:
        self.tbt.append(seconds)
        self.tbt_total += 1
        self.tbt_ok += seconds * 1000.0 <= self.targets.tbt_ms

    def record_ttft(self, seconds: float) -> None:
        self.ttft.append(seconds)

    def record_request(self, ttft_s: float, tpot_s: float | None) -> None:
        """A finished request meets its SLO when TTFT and mean time per output token do."""
        self.requests += 1
        ok = ttft_s * 1000.0 <= self.targets.ttft_ms
        if tpot_s is not None:
            ok = ok and tpot_s * 1000.0 <= self.targets.tbt_ms
            self.tpot.append(tpot_s)
        self.requests_ok += ok
        self.recent_ok.append(ok)

    def tails_ms(self) -> tuple[float | None, float | None]:
        """p99 of the recent TBT (gaps or requests' TPOT, by `tbt_basis`) and TTFTs, ms."""
        window = self.tbt if self.targets.tbt_basis == "gap" else self.tpot
        return _p99_ms(window), _p99_ms(self.ttft)

    def risk(self) -> float:
        """The worst tail as a share of its target (1.0 = at the target)."""
        tbt, ttft = self.tails_ms()
        r = 0.0
        if tbt is not None:
            r = max(r, tbt / self.targets.tbt_ms)
        if ttft is not None:
            r = max(r, ttft / self.targets.ttft_ms)
        return r

    def risk_reason(self) -> str:
        """The tail that stops training, in words (for starvation reports)."""
        tbt, ttft = self.tails_ms()
        parts = []
        if tbt is not None and tbt >= self.at_risk * self.targets.tbt_ms:
            what = "TBT" if self.targets.tbt_basis == "gap" else "request TPOT"
            parts.append(
                f"{what} p99 {tbt:.0f} ms >= {self.at_risk:g} x target {self.targets.tbt_ms:g} ms"
            )
        if ttft is not None and ttft >= self.at_risk * self.targets.ttft_ms:
            parts.append(
                f"TTFT p99 {ttft:.0f} ms >= {self.at_risk:g} x target {self.targets.ttft_ms:g} ms"
            )
        return "SLO at risk: " + "; ".join(parts) if parts else "SLO controller recovering"

    def update(self) -> float:
        """Once per serving iteration: the new training factor."""
        r = self.risk()
        if r >= self.at_risk:
            self.factor = 0.0
        elif r <= self.slack:
            self.factor = min(1.0, self.factor + self.step)
        return self.factor

    def status(self) -> dict[str, Any]:
        return {
            "targets": self.targets.to_dict(),
            "tbt_p99_ms": _p99_ms(self.tbt),
            "tpot_p99_ms": _p99_ms(self.tpot),
            "ttft_p99_ms": _p99_ms(self.ttft),
            "factor": self.factor,
            "requests": self.requests,
            "slo_attainment": self.requests_ok / self.requests if self.requests else None,
            "slo_attainment_recent": sum(self.recent_ok) / len(self.recent_ok)
            if self.recent_ok
            else None,
            "tbt_attainment": self.tbt_ok / self.tbt_total if self.tbt_total else None,
        }


def _p99_ms(window: deque[float]) -> float | None:
    return percentile(list(window), 99) * 1000.0 if window else None
