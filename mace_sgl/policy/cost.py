"""Cost model: predicted latency and memory of serving and fine-tune work, corrected online.

Each kind of work has a small linear model, latency = w . features, whose weights start from
a profile (measured offline by `mace-sgl profile`) and are corrected by least squares over
an exponentially decaying window (DecayedLeastSquares: bounded over days of steady load)
from every iteration the scheduler observes. A stale or foreign profile therefore
converges to this device (benchmarks/cost_converge.py measures how fast).

Features per kind:
- prefill: [1, tokens, tokens * context / 1024, lora_tokens]  (attention grows with what
  is attended to; lora_tokens: the tokens of requests that run an adapter)
- decode:  [1, batch, context_tokens / 1024, lora_rows]  (context = sum of the batch's KV
  lengths; lora_rows: requests that run an adapter. On CPU SGLang's torch_native LoRA
  path costs about as much again as the base forward per row: without this term, one
  stream alternating adapter and base requests made decode cost bimodal and its running
  error about 100%)
- fwd, head, bwd, head_bwd: [1, tokens]           (one training slice: a layer, or a
  vocabulary chunk of the LM head's forward or backward; tokens = rows it processes)
- guard: [1, tokens]                              (one whole-model forward of the publish
  guard's canary decoding, trainer/guard.py; tokens = rows it processes)
- opt, publish: [1]                               (optimizer step; adapter swap)
Memory of a fine-tune unit is bytes per token per kind (peak extra bytes it holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Per-observation weight decay of the online fit: a window of about 1 / (1 - 0.99) = 100
# observations, long enough to hold both regimes of a load that alternates adapter and
# base requests, short enough to follow a changed device within seconds of decoding.
FORGETTING = 0.99
SERVE_KINDS = ("prefill", "decode")
TRAIN_KINDS = ("fwd", "head", "bwd", "head_bwd", "guard", "opt", "publish")
KINDS = SERVE_KINDS + TRAIN_KINDS


def features(
    kind: str, tokens: int = 0, batch: int = 0, context: int = 0, lora: int = 0
) -> list[float]:
    """The feature vector of one piece of work (see the module docstring); `lora` counts
    the prefill tokens or decode rows that run an adapter."""
    if kind == "prefill":
        return [1.0, float(tokens), tokens * context / 1024.0, float(lora)]
    if kind == "decode":
        return [1.0, float(batch), context / 1024.0, float(lora)]
    if kind in ("opt", "publish"):
        return [1.0]
    if kind in ("fwd", "head", "bwd", "head_bwd", "guard"):
        return [1.0, float(tokens)]
    raise ValueError(f"unknown kind of work {kind!r}; known: {', '.join(KINDS)}")


# Seconds; a deliberately rough start for a device nobody profiled (a 2-core CPU, ~135M
# model). Online correction replaces it within a few dozen iterations.
DEFAULT_WEIGHTS: dict[str, list[float]] = {
    "prefill": [0.02, 4e-4, 1e-5, 4e-4],
    "decode": [0.03, 3e-3, 2e-3, 0.03],
    "fwd": [1e-4, 2e-5],
    "head": [1e-4, 4e-5],  # one chunk of 8192 vocabulary rows
    "bwd": [3e-4, 6e-5],
    "head_bwd": [1e-4, 8e-5],
    "guard": [3e-2, 1e-3],
    "opt": [5e-3],
    "publish": [1e-2],
}
DEFAULT_MEM_PER_TOKEN: dict[str, float] = {
    "fwd": 2e3,
    "head": 1e5,  # float32 logits of one chunk and their exp
    "bwd": 1e5,
    "head_bwd": 1.5e5,
    "guard": 2e4,
    "opt": 0.0,
    "publish": 0.0,
}


class DecayedLeastSquares:
    """Online linear regression over an exponentially decaying window, regularised toward
    the starting weights (a few floats, plain Python; one small solve per observation).

    Keeps A = sum lam^age x x^T and b = sum lam^age x y and predicts with the solution of
    (A + ridge I) w = b + ridge w0. Bounded for runs of days, unlike recursive least
    squares with forgetting: there, every direction of feature space the observations
    leave unexcited (a steady load repeats one feature vector) has its covariance divided
    by the forgetting factor at every update ("covariance windup": predictions reached
    1e61 s after 5,000 identical decode observations, NaN after 20,000). Here such a
    direction only decays back to the starting weights, A + ridge I stays positive
    definite, and excited directions still follow the device within ~1/(1-lam)
    observations. Non-finite observations change nothing.

    The weights are the best fit with every weight >= 0 (every term is a cost), solved
    exactly: not the unconstrained fit with its negative weights set to zero afterwards.
    With nearly collinear features (prefill's tokens and tokens x context, when prompts
    are short and mostly cached) the unconstrained fit pairs a large positive weight with
    a large negative one; zeroing the negative one left the positive one to over-predict
    prefill by 2-3x, and the running error climbed to 149% in a 60-minute soak.
    """

    def __init__(
        self, weights: list[float], forgetting: float = FORGETTING, ridge: float = 1e-3
    ) -> None:
        n = len(weights)
        self.w0 = [max(float(v), 0.0) for v in weights]
        self.w = list(self.w0)
        self.lam = forgetting
        self.ridge = ridge
        self.A = [[0.0] * n for _ in range(n)]
        self.b = [0.0] * n
        self.count = 0
        self.rejected = 0  # updates dropped as non-finite

    @property
    def weights(self) -> list[float]:
        """The fitted weights used for prediction (all >= 0)."""
        return list(self.w)

    def predict(self, x: list[float]) -> float:
        return sum(wi * xi for wi, xi in zip(self.w, x, strict=True))

    def update(self, x: list[float], y: float) -> None:
        if not (math.isfinite(y) and all(math.isfinite(v) for v in x)):
            self.rejected += 1
            return
        n, lam = len(self.w), self.lam
        A = [[lam * self.A[i][j] + x[i] * x[j] for j in range(n)] for i in range(n)]
        b = [lam * self.b[i] + x[i] * y for i in range(n)]
        reg = [[A[i][j] + (self.ridge if i == j else 0.0) for j in range(n)] for i in range(n)]
        w = _solve_nonnegative(reg, [b[i] + self.ridge * self.w0[i] for i in range(n)])
        self.A, self.b, self.w = A, b, w
        self.count += 1


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """x with a x = b (Gaussian elimination, partial pivoting); None if singular or not
    finite."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if not abs(m[pivot][col]) > 1e-300:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [m[r][j] - f * m[col][j] for j in range(n + 1)]
    x = [0.0] * n
    for i in reversed(range(n)):
        x[i] = (m[i][n] - sum(m[i][j] * x[j] for j in range(i + 1, n))) / m[i][i]
    return x if all(math.isfinite(v) for v in x) else None


def _solve_nonnegative(m: list[list[float]], c: list[float]) -> list[float]:
    """argmin over w >= 0 of 1/2 w.M.w - c.w, M symmetric positive definite (the normal
    equations of a least-squares fit).

    The minimum lies inside one face of the orthant {w_i = 0 for i not in S}, where it is
    the face's unconstrained minimum, so the best feasible face minimum is the answer.
    The full solve is tried first (the common case); otherwise every face is (2^n
    solves: n is at most 5 here)."""
    n = len(c)
    full = _solve(m, c)
    if full is not None and all(v >= 0.0 for v in full):
        return full
    best, best_f = [0.0] * n, 0.0  # the corner w = 0
    for mask in range(1, 1 << n):
        free = [i for i in range(n) if mask >> i & 1]
        sub = _solve([[m[i][j] for j in free] for i in free], [c[i] for i in free])
        if sub is None or any(v < 0.0 for v in sub):
            continue
        w = [0.0] * n
        for i, v in zip(free, sub, strict=True):
            w[i] = v
        f = 0.5 * sum(w[i] * m[i][j] * w[j] for i in free for j in free) - sum(
            c[i] * w[i] for i in free
        )
        if f < best_f:
            best, best_f = w, f
    return best


def fit_least_squares(xs: list[list[float]], ys: list[float], ridge: float = 1e-9) -> list[float]:
    """Ordinary least squares (normal equations, Gauss-Jordan): the offline profile fit."""
    n = len(xs[0])
    a = [
        [sum(x[i] * x[j] for x in xs) + (ridge if i == j else 0.0) for j in range(n)]
        for i in range(n)
    ]
    b = [sum(x[i] * y for x, y in zip(xs, ys, strict=True)) for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        b[col], b[pivot] = b[pivot], b[col]
        if abs(a[col][col]) < 1e-30:
            continue
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [a[r][j] - f * a[col][j] for j in range(n)]
                b[r] -= f * b[col]
    return [b[i] / a[i][i] if abs(a[i][i]) > 1e-30 else 0.0 for i in range(n)]


def fit_nonnegative(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares with every weight >= 0: refit without the terms that came out negative
    (an active-set loop; the feature counts here are two or three)."""
    active = list(range(len(xs[0])))
    while True:
        w = fit_least_squares([[x[i] for i in active] for x in xs], ys)
        if all(v >= 0 for v in w) or len(active) == 1:
            full = [0.0] * len(xs[0])
            for i, v in zip(active, w, strict=True):
                full[i] = max(v, 0.0)
            return full
        active = [i for i, v in zip(active, w, strict=True) if v >= 0] or active[:1]


@dataclass
class Observation:
    """One measured piece of work, as the scheduler saw it."""

    kind: str
    seconds: float
    tokens: int = 0
    batch: int = 0
    context: int = 0
    mem_bytes: float | None = None
    lora: int = 0  # prefill tokens / decode rows that run an adapter


@dataclass
class CostModel:
    """Latency and memory predictions for every kind of work, corrected online."""

    weights: dict[str, list[float]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_WEIGHTS.items()}
    )
    mem_per_token: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MEM_PER_TOKEN))
    forgetting: float = FORGETTING

    def __post_init__(self) -> None:
        for kind, w in DEFAULT_WEIGHTS.items():  # kinds a caller did not give start at defaults
            self.weights.setdefault(kind, list(w))
        self.models = {k: DecayedLeastSquares(self.weights[k], self.forgetting) for k in KINDS}
        self.abs_pct_error: dict[str, float] = {}

    def predict(
        self, kind: str, tokens: int = 0, batch: int = 0, context: int = 0, lora: int = 0
    ) -> float:
        """Predicted seconds; never negative; infinite (nothing fits) if not finite."""
        t = self.models[kind].predict(features(kind, tokens, batch, context, lora))
        return max(t, 0.0) if math.isfinite(t) else math.inf

    def unit_coefficients(self, kind: str) -> tuple[float, float, float]:
        """(seconds, seconds per token, bytes per token) of a fine-tune unit kind: the
        same prediction as predict() and memory(), for loops over many units."""
        w = self.models[kind].weights
        return w[0], (w[1] if len(w) > 1 else 0.0), self.mem_per_token.get(kind, 0.0)

    def memory(self, kind: str, tokens: int) -> float:
        """Predicted peak extra bytes of a fine-tune unit."""
        return self.mem_per_token.get(kind, 0.0) * tokens

    def observe(self, obs: Observation) -> float | None:
        """Fold one measurement in: tracks the error it had, then corrects the model.
        Returns that relative error (|predicted - measured| / measured), None if ignored."""
        if not (math.isfinite(obs.seconds) and obs.seconds >= 0.0):
            return None
        x = features(obs.kind, obs.tokens, obs.batch, obs.context, obs.lora)
        model = self.models[obs.kind]
        predicted = max(model.predict(x), 1e-9)
        err = abs(predicted - obs.seconds) / max(obs.seconds, 1e-9)
        prev = self.abs_pct_error.get(obs.kind)
        self.abs_pct_error[obs.kind] = err if prev is None else prev + 0.1 * (err - prev)
        model.update(x, obs.seconds)
        if obs.mem_bytes is not None and obs.tokens:
            per = obs.mem_bytes / obs.tokens
            old = self.mem_per_token.get(obs.kind, per)
            self.mem_per_token[obs.kind] = max(per, old + 0.2 * (per - old))
        return err

    def to_dict(self) -> dict[str, Any]:
        """The profile's `cost` section."""
        return {
            "weights": {k: m.weights for k, m in self.models.items()},
            "mem_per_token": dict(self.mem_per_token),
            "forgetting": self.forgetting,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        weights = {k: list(v) for k, v in DEFAULT_WEIGHTS.items()}
        for kind, w in (data.get("weights") or {}).items():
            if kind in SERVE_KINDS and kind in weights and len(w) == len(weights[kind]) - 1:
                # a profile from before the LoRA term: that term starts from the default
                w = [*w, weights[kind][-1]]
            if kind not in weights or len(w) != len(weights[kind]):
                raise ValueError(
                    f"profile cost weights for {kind!r} must have "
                    f"{len(weights.get(kind, []))} numbers, got {w!r}"
                )
            weights[kind] = [float(v) for v in w]
        mem = dict(DEFAULT_MEM_PER_TOKEN)
        mem.update({k: float(v) for k, v in (data.get("mem_per_token") or {}).items()})
        return cls(
            weights=weights, mem_per_token=mem, forgetting=float(data.get("forgetting", FORGETTING))
        )

    @classmethod
    def fit(cls, samples: list[Observation], base: CostModel | None = None) -> CostModel:
        """Least-squares fit of every kind that has enough samples (the offline profile)."""
        base = base or cls()
        weights = {k: m.weights for k, m in base.models.items()}
        mem = dict(base.mem_per_token)
        for kind in KINDS:
            rows = [s for s in samples if s.kind == kind]
            if len(rows) >= len(weights[kind]) + 1:
                xs = [features(kind, s.tokens, s.batch, s.context, s.lora) for s in rows]
                weights[kind] = fit_nonnegative(xs, [s.seconds for s in rows])
            sized = [s.mem_bytes / s.tokens for s in rows if s.mem_bytes is not None and s.tokens]
            if sized:
                mem[kind] = max(sized)
        return cls(weights=weights, mem_per_token=mem, forgetting=base.forgetting)
