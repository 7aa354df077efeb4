"""LeMix placement of requests on data-parallel replicas (plain Python, no SGLang).

LeMix (arXiv 2507.21276, `assign_node` in its public code) scores each node with

    score = (idle + beta x length consistency) / (alpha x predicted response time)

and sends the task to the best score. Here a node is one data-parallel replica of
`mace-sgl serve --dp-size N`, and what it knows comes from two places:

- SGLang's own load snapshot of the replica (what its data-parallel controller and
  /v1/loads read): running and waiting requests, queued tokens, uncached tokens
  waiting for prefill, the cumulative prefill busy time per uncached token, and the
  decode step-time moments (a least-squares line of step time against batch size);
- the replica's training state (plugin/placement.py carries it from its scheduler):
  whether it holds a training step, the predicted length of its next training unit
  (a request arriving meanwhile waits for it) and the training time the policy adds
  to each serving iteration while it has training work, the SLO budget or the train
  floor's share, whichever is more (`Policy.training_reserve_s`: each decode step of
  that replica is that much longer).

The predicted response time of a request with p prompt tokens and n new tokens is

    RT = slot wait + unit_ms (if training) + (uncached queue + p) x prefill ms/token
         + n x (step_ms(running + 1) + reserve_ms) / (1 - u)

so a replica busy training scores worse by exactly the time training would add. Here
u is the replica's recent share of time in prefill (below: every prefill stalls the
running decodes), the step's batch is capped at SGLang's --max-running-requests, and
the slot wait is 0 below that cap and, at it, the time until enough running requests
finish to admit this one (`slot_wait_ms`: k requests waiting for a slot, R = the cap
running, one finishing every n x step / R). Without these terms a replica at its cap,
64% of its time in prefill, still won the score over a trainer, and its first tokens
waited 10-13 s inside it (`benchmarks.lemix`, 2026-12-05, Intel Xeon: ~30 requests in
flight, e2e p50 41 s, at a cap of 32).

The idle term is 1 for a replica with nothing running or waiting, 1/(1 + requests)
otherwise; length consistency compares p with the mean prompt length recently placed
there (LeMix groups similar lengths: similar sequences batch better). Between two
snapshots (SGLang refreshes them at most every 20 ms) each placement adds its own
tokens and request to the chosen replica's view, so a burst does not all go to one.

Serving first: a request goes to a replica *without training work* whenever one is
predicted to hold the SLO with headroom, and LeMix's score chooses among those; else to
a trainer predicted to hold it (its unit in flight counted), so a trainer serves the
overflow; it scores every replica only when none holds it. Each trainer carries its SLO
targets (ms) in its training slot. "Holds the SLO" is

    a free running slot: running + waiting + placed < max_running_requests (SGLang
                   admits no more: a request beyond waits for one to finish, seconds)
    first token  = step_ms(running) (the iteration in flight, if any)
                   + unit_ms (a trainer's unit in flight)
                   + (uncached queue + p) x prefill ms/token   <= TTFT_HEADROOM x TTFT target
    later tokens = (step_ms(running + 1) + reserve_ms) / (1 - u)
                                                               <= TBT_HEADROOM x TBT target

where u is the replica's recent share of time in prefill (from the snapshots' prefill
busy counter, over about UTIL_WINDOW_S): every prefill stalls the running decodes. The
headrooms are what a prediction of the typical request needs for the slowest to meet
the target: under round robin at 1.2x one replica's capacity (`benchmarks.lemix`,
2026-12-05, Intel Xeon) p99/p50 was 1.9 for TTFT and 1.5 for time per output token.
Without the running-slot check (and with headrooms 0.5 / 0.9, no stalls) the replica
without training took 80% of the requests and 93% of them missed the SLO, waiting for
one of its 32 running slots; with it, but scoring every replica past the headroom, it
still took 84% (88% missed): the trainer's predicted response time, 128 tokens x its
reserve, lost every score. Without targets (no trainer writes its slot: no
--mace-train) this step is skipped.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# LeMix's defaults (alpha on response time, beta on length consistency).
ALPHA = 0.15
BETA = 0.05
# Costs assumed before a replica has measured its own (CPU-sized; replaced as soon as
# its snapshot carries prefill and decode counters).
DEFAULT_PREFILL_MS_PER_TOKEN = 1.0
DEFAULT_DECODE_STEP_MS = 30.0
# Share of the SLO targets a replica without training work may be predicted to use and
# still be preferred over every trainer (module docstring).
TTFT_HEADROOM = 0.5
TBT_HEADROOM = 0.7
# Seconds over which a replica's share of time in prefill is averaged (exponentially).
UTIL_WINDOW_S = 5.0
# The decode share never counted below this (a replica always prefilling still decodes).
MIN_DECODE_SHARE = 0.1
# A decode step's weight in the fit halves every this many seconds (DecayingMoments).
DECODE_HALF_LIFE_S = 600.0
# Decay stops while the fit holds fewer steps' weight than this (a replica long without
# decodes keeps its last fit, finite, instead of decaying it to nothing).
DECODE_MIN_WEIGHT = 32.0


@dataclass(frozen=True)
class DecodeMoments:
    """SGLang's decode step-time sums: count, sum batch, sum step us, sum batch^2,
    sum batch x step us (load_snapshot.decode_moments, first five entries)."""

    n: float
    sb: float
    st: float
    sbb: float
    sbt: float

    @classmethod
    def from_list(cls, values: list[float] | None) -> DecodeMoments | None:
        if not values or len(values) < 5 or values[0] <= 0:
            return None
        return cls(*(float(v) for v in values[:5]))

    def step_ms(self, batch: int) -> float:
        """Predicted decode step time at `batch` requests, in ms: the least-squares line
        through the steps these sums hold (placement's: DecayingMoments), its slope
        never negative; a fit without spread in batch sizes, or a prediction that is not
        positive, falls back to the mean step."""
        mean_t = self.st / self.n
        den = self.n * self.sbb - self.sb * self.sb
        if den <= 1e-9:
            return mean_t / 1000.0
        slope = (self.n * self.sbt - self.sb * self.st) / den
        intercept = (self.st - slope * self.sb) / self.n
        t = intercept + max(0.0, slope) * batch
        if not math.isfinite(t) or t <= 0:
            t = mean_t
        return t / 1000.0


@dataclass
class DecayingMoments:
    """One replica's decode moments with older steps weighing less: SGLang's sums run
    from the replica's start, so over days a fit through them follows a device whose
    step time changed (a neighbour's load, a longer context mix, a throttled clock) ever
    more slowly. Each snapshot's new steps (the difference from the last cumulative
    sums) are added to sums whose weight halves every `half_life_s`, never below
    `min_weight` steps (no decodes for hours keep the fit they had). Sums that went
    backwards (the replica restarted) start over."""

    half_life_s: float = DECODE_HALF_LIFE_S
    min_weight: float = DECODE_MIN_WEIGHT
    last: DecodeMoments | None = None  # the cumulative sums at the last update
    at: float = 0.0  # when (seconds, any clock the caller keeps to)
    sums: DecodeMoments | None = None

    def update(self, cumulative: DecodeMoments | None, now: float) -> DecodeMoments | None:
        """The decayed sums after this snapshot's `cumulative` sums at `now`."""
        if cumulative is None:
            return self.sums
        last, fields = self.last, [f.name for f in dataclasses.fields(DecodeMoments)]
        if (
            last is None
            or self.sums is None
            or any(getattr(cumulative, f) < getattr(last, f) for f in fields)
        ):  # the first sums, or a sum went backwards: the replica restarted
            self.last, self.at, self.sums = cumulative, now, cumulative
            return self.sums
        keep = 0.5 ** (max(now - self.at, 0.0) / self.half_life_s)
        if self.sums.n * keep < self.min_weight:
            keep = min(1.0, self.min_weight / self.sums.n)
        old = self.sums
        self.sums = DecodeMoments(
            *(getattr(old, f) * keep + getattr(cumulative, f) - getattr(last, f) for f in fields)
        )
        self.last, self.at = cumulative, now
        return self.sums


@dataclass(frozen=True)
class TrainingLoad:
    """One replica's training state, as its trainer reports it for placement."""

    training: bool = False  # holds training work (units run between iterations)
    unit_ms: float = 0.0  # the length of its training units, recently
    reserve_ms: float = 0.0  # training time its policy adds to each serving iteration
    ttft_ms: float = 0.0  # its SLO targets (0: not known)
    tbt_ms: float = 0.0


@dataclass(frozen=True)
class ReplicaLoad:
    """What placement knows of one replica at one moment."""

    dp_rank: int
    running_reqs: int = 0
    waiting_reqs: int = 0
    waiting_uncached_tokens: int = 0
    total_tokens: int = 0  # queued plus running tokens (SGLang's num_total_tokens)
    prefill_ms_per_token: float | None = None  # measured, None before any prefill
    prefill_busy_us: float = 0.0  # cumulative time in prefill (SGLang's counter)
    max_running_reqs: int = 0  # SGLang's --max-running-requests (0: not known)
    decode: DecodeMoments | None = None
    timestamp: float = 0.0  # of SGLang's snapshot
    # The replica's training state (0 / False without --mace-train).
    training: bool = False  # holds a training step (units will run between iterations)
    unit_ms: float = 0.0  # predicted length of its next training unit
    reserve_ms: float = 0.0  # training time its policy adds to each serving iteration
    ttft_ms: float = 0.0  # its SLO targets, from its trainer (0: not known)
    tbt_ms: float = 0.0


@dataclass
class Placement:
    """One placement decision: the rank, the replicas it chose among (LemixPlacement.
    choose) and every replica's score and prediction."""

    dp_rank: int
    scores: dict[int, float]
    predicted_ms: dict[int, float]
    candidates: tuple[int, ...] = ()


@dataclass
class LemixPlacement:
    """Chooses a replica per request by LeMix's score over ReplicaLoad views."""

    alpha: float = ALPHA
    beta: float = BETA
    ttft_headroom: float = TTFT_HEADROOM
    tbt_headroom: float = TBT_HEADROOM
    # Mean prompt length placed on each replica (exponential, for length consistency).
    mean_len: dict[int, float] = field(default_factory=dict)
    # Mean max_new_tokens placed on each replica (exponential, for the wait for a slot).
    mean_new: dict[int, float] = field(default_factory=dict)
    # Requests and tokens placed since each replica's last snapshot (timestamp).
    pending: dict[int, tuple[float, int, int]] = field(default_factory=dict)
    placed: dict[int, int] = field(default_factory=dict)
    # Per replica: (snapshot time, prefill busy us then, recent share of time in prefill).
    prefill_util: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    _tie: int = 0

    def predict_ms(self, load: ReplicaLoad, prompt_tokens: int, new_tokens: int) -> float:
        """Predicted response time (ms) of a request placed on `load`'s replica now."""
        rt = self.slot_wait_ms(load, new_tokens)
        rt += self._prefill_ms(load, prompt_tokens)
        rt += max(1, new_tokens) * self._per_token_ms(load)
        if load.training:
            rt += load.unit_ms
        return max(rt, 1e-3)

    def holds_slo(self, load: ReplicaLoad, prompt_tokens: int) -> bool:
        """Whether a request placed on `load`'s replica now is predicted to meet its SLO
        targets with headroom (module docstring); False when they are not known."""
        if load.ttft_ms <= 0 or load.tbt_ms <= 0:
            return False
        if 0 < load.max_running_reqs <= self._admitted(load):
            return False
        in_flight = _decode_step_ms(load, load.running_reqs) if load.running_reqs > 0 else 0.0
        first = in_flight + self._prefill_ms(load, prompt_tokens)
        if load.training:
            first += load.unit_ms  # a training unit may be in flight too
        later = self._per_token_ms(load)
        return (
            first <= self.ttft_headroom * load.ttft_ms and later <= self.tbt_headroom * load.tbt_ms
        )

    def slot_wait_ms(self, load: ReplicaLoad, new_tokens: int) -> float:
        """How long a request placed now waits for one of SGLang's running slots (ms):
        0 below --max-running-requests; at it, k requests (those already waiting for a
        slot, this one included) wait for the k-th of the running ones to finish. With
        R = the cap running requests spread evenly over their n new tokens, one finishes
        every n x step / R: the wait is k x n x step / R, where step is a decode step of R
        plus the reserve, over the decode share (prefill stalls), and n the mean
        max_new_tokens placed on the replica (this request's before any; requests that
        stop early at EOS make it an overestimate). The prefill of the requests ahead
        is in the decode share and again in the queued prefill (`_prefill_ms`): counted
        twice in part, which errs against a full replica."""
        cap = load.max_running_reqs
        ahead = self._admitted(load) + 1 - cap
        if cap <= 0 or ahead <= 0:
            return 0.0
        n = self.mean_new.get(load.dp_rank, float(max(1, new_tokens)))
        step = (_decode_step_ms(load, cap) + load.reserve_ms) / self._decoding(load)
        return ahead * n * step / cap

    def prefill_share(self, load: ReplicaLoad) -> float:
        """The replica's recent share of time in prefill, updated from each new snapshot
        (exponential over UTIL_WINDOW_S of snapshot time)."""
        last = self.prefill_util.get(load.dp_rank)
        if last is None or load.timestamp < last[0] or load.prefill_busy_us < last[1]:
            self.prefill_util[load.dp_rank] = (load.timestamp, load.prefill_busy_us, 0.0)
            return 0.0
        stamp, busy_us, share = last
        dt = load.timestamp - stamp
        if dt <= 0:
            return share
        now = min(1.0, (load.prefill_busy_us - busy_us) / 1e6 / dt)
        share += (1.0 - math.exp(-dt / UTIL_WINDOW_S)) * (now - share)
        self.prefill_util[load.dp_rank] = (load.timestamp, load.prefill_busy_us, share)
        return share

    def _prefill_ms(self, load: ReplicaLoad, prompt_tokens: int) -> float:
        """The queued prefill ahead of a request, its own included (ms)."""
        _, _, extra_tokens = self._pending(load)
        prefill = load.prefill_ms_per_token or DEFAULT_PREFILL_MS_PER_TOKEN
        return (load.waiting_uncached_tokens + extra_tokens + prompt_tokens) * prefill

    def _admitted(self, load: ReplicaLoad) -> int:
        """Requests running or waiting on the replica, those placed since its snapshot
        included."""
        _, extra_reqs, _ = self._pending(load)
        return load.running_reqs + load.waiting_reqs + extra_reqs

    def _per_token_ms(self, load: ReplicaLoad) -> float:
        """Each new token of a request placed now: a decode step with it in the batch
        plus the training reserve, stretched by the prefill stalls (ms)."""
        return (self._step_ms(load) + load.reserve_ms) / self._decoding(load)

    def _decoding(self, load: ReplicaLoad) -> float:
        """The replica's share of time left to decoding (every prefill stalls it)."""
        return max(MIN_DECODE_SHARE, 1.0 - self.prefill_share(load))

    def _step_ms(self, load: ReplicaLoad) -> float:
        """One decode step with the request in the batch (ms); SGLang never decodes more
        than its running cap at once (the requests beyond wait: `slot_wait_ms`)."""
        batch = self._admitted(load) + 1
        if load.max_running_reqs > 0:
            batch = min(batch, load.max_running_reqs)
        return _decode_step_ms(load, batch)

    def score(self, load: ReplicaLoad, prompt_tokens: int, rt_ms: float) -> float:
        busy = self._admitted(load)
        idle = 1.0 if busy == 0 else 1.0 / (1.0 + busy)
        mean = self.mean_len.get(load.dp_rank)
        if mean is None or prompt_tokens <= 0:
            consistency = 1.0
        else:
            consistency = 1.0 - abs(prompt_tokens - mean) / max(prompt_tokens, mean, 1.0)
        return (idle + self.beta * consistency) / (self.alpha * rt_ms / 1000.0)

    def choose(self, loads: list[ReplicaLoad], prompt_tokens: int, new_tokens: int) -> Placement:
        """The best-scoring replica among the candidates (replicas without training work
        predicted to hold the SLO, else any replica predicted to hold it, else all; ties:
        in turn), recorded as placed there."""
        if not loads:
            raise ValueError("no replica to place on")
        predicted = {ld.dp_rank: self.predict_ms(ld, prompt_tokens, new_tokens) for ld in loads}
        scores = {ld.dp_rank: self.score(ld, prompt_tokens, predicted[ld.dp_rank]) for ld in loads}
        holding = [ld for ld in loads if self.holds_slo(ld, prompt_tokens)]
        serving = [ld.dp_rank for ld in holding if not ld.training]
        candidates = tuple(sorted(serving or [ld.dp_rank for ld in holding] or scores))
        best = max(scores[r] for r in candidates)
        tied = [r for r in candidates if scores[r] >= best * (1 - 1e-9)]
        rank = tied[self._tie % len(tied)]
        self._tie += 1
        chosen = next(ld for ld in loads if ld.dp_rank == rank)
        self._record(chosen, prompt_tokens, new_tokens)
        return Placement(rank, scores, predicted, candidates)

    def _pending(self, load: ReplicaLoad) -> tuple[float, int, int]:
        stamp, reqs, tokens = self.pending.get(load.dp_rank, (load.timestamp, 0, 0))
        if stamp != load.timestamp:  # a fresh snapshot counts what was placed before it
            return load.timestamp, 0, 0
        return stamp, reqs, tokens

    def _record(self, load: ReplicaLoad, prompt_tokens: int, new_tokens: int) -> None:
        stamp, reqs, tokens = self._pending(load)
        self.pending[load.dp_rank] = (stamp, reqs + 1, tokens + prompt_tokens)
        self.placed[load.dp_rank] = self.placed.get(load.dp_rank, 0) + 1
        _ewma(self.mean_len, load.dp_rank, prompt_tokens)
        _ewma(self.mean_new, load.dp_rank, max(1, new_tokens))


def _ewma(means: dict[int, float], key: int, value: float) -> None:
    mean = means.get(key)
    means[key] = float(value) if mean is None else 0.9 * mean + 0.1 * value


def _decode_step_ms(load: ReplicaLoad, batch: int) -> float:
    """A decode step of `batch` requests on `load`'s replica (ms): its measured line, or
    DEFAULT_DECODE_STEP_MS before it has one."""
    return load.decode.step_ms(batch) if load.decode else DEFAULT_DECODE_STEP_MS
