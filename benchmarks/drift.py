"""Drift: continuous alignment against periodic, synchronous and naive retraining.

    python -m benchmarks.drift [--quick | --full] [--out DIR] [--model-path P]

The workload: prompts shipped in the repository (benchmarks/align.py, 270 of them; 60
are kept for evaluation, `eval_pool`, and never served as load) served under an
open-loop Poisson load, and a sequence of preference phases that change over time, read
from --phases FILE (YAML or JSON; default benchmarks/phases/default.yaml: concise,
opener, bullets). Each phase has
a deterministic judge and an edit that satisfies it; benchmarks/phases.py documents the
rules (judges: starts_with, ends_with, contains, max_words, line_prefix, regex; edits:
prepend, append, first_sentence, lines_with_prefix, replace) and the degeneration check
every judge applies: an empty answer, a repetition loop, a refusal, or one that keeps
too little of the base answer's content loses, where the base model's own answer to the
same prompt is not degenerate.

Online DPO: every `--feedback-every`-th answer the server streams back is judged by the
phase current when it finished; when the edit scores higher, the pair (chosen = edit,
rejected = the served answer) is posted to /mace/feedback, interleaved with the requests.

Baselines, each on a fresh `mace-sgl serve --mace-train` (same code, same flags):
- inference-only: --mace-policy inference-only (feedback stored, never trained);
- periodic (Ekya-style): the server never trains in its loop; every `--period-s` seconds
  this process trains the feedback of the last window with the same sliced DPO code
  (outside the serving loop, on the same CPU) and swaps the adapter in through SGLang's
  /load_lora_adapter;
- synchronous: --mace-policy synchronous (serving waits while queued feedback trains);
- continuous: --mace-policy fcfs-reserve (naive colocation, fixed reserve);
- mace: --mace-policy mace.

Evaluations: --evals-per-phase (3) per phase, each on --eval-prompts (24) held-out
prompts sent as concurrent requests (batched decoding is several times faster per token
than one stream on CPU), greedy, up to --eval-max-tokens (128; an answer cut off there is
judged as it stands). The held-out prompts are the first --eval-prompts of the pool whose
base answer finishes within that bound (read once a seed, in waves of --eval-prompts
concurrent requests): the bound is one the base model's answers fit in, and open
questions that make the small base model write 300-400 tokens or loop are left out
rather than decoded to the bound by every evaluation. A served version
(adapter name and version) answers only once: greedy decoding of the same weights gives
the same answers, so a later evaluation of it judges those answers again (under the
phase current then) and its timeline entry says `reused`.

The clock counts serving only. A phase is --evals-per-phase windows of
`--phase-s / --evals-per-phase` seconds of Poisson load (each lasts those seconds,
its idle end after the last arrival included, and then waits for its requests to
finish; until 2026-12-07 a window ended with its last request, 5-14 s instead of 16.7
at the default rate, and the training baselines lost that idle time), and after each
window training pauses (POST /mace/train/pause; the periodic trainer's thread too), the
evaluation runs, and training resumes. An evaluation is an
observer, not load: on 2 CPU cores one takes 20-60 s, and with a wall clock the load
(and with it the feedback) had ended before the second phase's first evaluation, so
phases 2 and 3 got no feedback at all. Times in the timeline, recover_s, throughput,
training tokens/s and device utilisation are over the serving windows.

SLO targets: with neither --slo-ttft-ms nor --slo-tbt-ms, inference-only runs first in
each seed and the targets are its own p99 TTFT and p99 time per output token times
--slo-headroom (1.1): targets this host just meets without training, so that the SLO
controller of the training baselines (watching requests' time per output token,
`--mace-slo-tbt-basis request`) has the room the host really has: fixed targets are a
guess about the host (200 ms TBT was missed by inference alone when evaluations still ran
beside the load, its TBT p99 1.3 s on 2 CPU cores, 2026-12-02). Every baseline's
`slo_attainment` is counted against the seed's targets (`slo_targets` in results.json;
`tpot_p99_ms` is the tail the time-per-token target judges). `base_answers` in
results.json names, per seed, the pool prompts left out because their base answer was
cut off at --eval-max-tokens (`skipped_prompts`) and any held-out one that still was
(`cut_prompts`: only where the pool ran out; judged as it stands).

Metrics per baseline (means over the evaluations; phase boundaries in the plot):
win_rate of the served adapter against the frozen base under the current judge (win 1,
tie 0.5, a degenerate answer loses) on held-out prompts; degenerate_share, the share of
evaluated answers that are degenerate; guard_refusals, versions the trainer's guard
refused (`rejected_versions`; 0 for periodic, which publishes every round unchecked);
clpd, the mean log-prob of chosen minus rejected on held-out pairs of the current phase (edit of the
base answer vs the base answer); recover_s, the
mean time after a drift until the win rate reaches --recover-at (the phase length when it
never does); TTFT/TBT p99, SLO attainment, throughput from the load; training tokens/s.
What trained: `pairs_posted.PHASE` and `pairs_trained.PHASE` (of the pairs posted in
that phase, those trained at least once: read from the server's store after it stops,
so the pairs of a step still in its guard check at the end are not among them; periodic:
its own rounds), `train_steps` (optimizer steps, the unchecked last one included),
`pairs_handed_back` (pairs the trainer gave back untrained when its hold shrank) and
`pairs_superseded` (pairs it gave back for never-trained ones waiting in the store
that a step takes first, pick order newest): from /mace/status, none for periodic; and these three so far
in each timeline entry. Where the server's time went in the serving windows
(`time_spent`, and each timeline entry's `time` for its window): seconds of serving
forwards, of training units by what they were for (`ref`, `step`, `guard`, `publish`),
and of training starved (work waiting, no unit run; the policy's reason last seen).

--seeds N repeats the whole run N times (load seeds 1..N, or K..K+N-1 with --first-seed K,
to finish a run in pieces, which `--merge A/results.json B/results.json --out DIR` joins
into one results.json; DIR/seed-K/): every metric in
results.json is the mean over seeds, `ci95` per baseline gives [low, high] (Student t,
N - 1 degrees of freedom; [x, x] for one seed) and `seeds` keeps each seed's figures.
results.json is written after every seed (`seeds_done`), so a run stopped early keeps
the seeds it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.align import completion_logprob
from benchmarks.align import prompts as shipped_prompts
from benchmarks.loadgen import RequestResult, poisson_load, summarize, tail_targets
from benchmarks.phases import DEFAULT_FILE, Phase, degenerate_kind, judged, load_phases
from benchmarks.serve_smoke import machine
from benchmarks.server_flags import add_flags, server_flags
from benchmarks.stats import aggregate
from mace_sgl.config import MaceConfig
from mace_sgl.launcher import Server

BASELINES = ("inference-only", "periodic", "synchronous", "continuous", "mace")
POLICY = {
    "inference-only": "inference-only",
    "periodic": "inference-only",
    "synchronous": "synchronous",
    "continuous": "fcfs-reserve",
    "mace": "mace",
}


class Client:
    """Chat and scoring calls against one server, for one adapter name at a time."""

    def __init__(self, server: Server, tokenizer: Any, max_tokens: int) -> None:
        self.server, self.tokenizer, self.max_tokens = server, tokenizer, max_tokens
        self.adapter: str | None = "live"

    def body(self, prompt: str, adapter: str | None, max_tokens: int | None = None) -> dict:
        body: dict[str, Any] = {
            "model": "default",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": 0.0,
        }
        if adapter:
            body["lora_path"] = adapter
        return body

    def answer(self, prompt: str, adapter: str | None, max_tokens: int | None = None) -> str:
        return self.answer_ending(prompt, adapter, max_tokens)[0]

    def answer_ending(
        self, prompt: str, adapter: str | None, max_tokens: int | None = None
    ) -> tuple[str, bool]:
        """The answer, and whether it was cut off at `max_tokens` (finish_reason length)."""
        r = self.server.post("/v1/chat/completions", self.body(prompt, adapter, max_tokens))
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice.get("finish_reason") == "length"

    def logprob(self, prompt: str, completion: str, adapter: str | None) -> float:
        return completion_logprob(self.server, self.tokenizer, prompt, completion, adapter)


@dataclasses.dataclass(frozen=True)
class BaseAnswers:
    """The frozen base model's greedy answers to the held-out prompts evaluation uses (one
    seed's, the same for every baseline), in evaluation order. The prompts are the first
    --eval-prompts of `eval_pool()` whose base answer finished within --eval-max-tokens;
    only where the pool runs out first do cut ones fill the rest (`cut`: judged as they
    stand). `skipped` names every pool prompt asked whose base answer was cut and that is
    not used (those after the last held-out prompt too). Both are named in results.json
    (`base_answers`)."""

    text: dict[str, str]
    cut: list[str]
    skipped: list[str] = dataclasses.field(default_factory=list)

    @property
    def prompts(self) -> list[str]:
        return list(self.text)

    def summary(self) -> dict[str, Any]:
        return {"prompts": len(self.text), "cut": len(self.cut), "cut_prompts": self.cut,
                "skipped": len(self.skipped), "skipped_prompts": self.skipped}  # fmt: skip


def read_base_answers(
    ask: Callable[[list[str]], list[tuple[str, bool]]], pool: list[str], n: int
) -> BaseAnswers:
    """The base answers for evaluation: `ask(prompts)` answers a wave of prompts at once
    (batched, as evaluations are), each as (answer, cut off at the bound). Waves of `n`
    go down the pool until `n` answers finished within the bound: the first `n` finished
    ones in pool order are the held-out set; where the pool runs out first, its first
    cut ones fill the rest. `skipped` names every cut one asked and not used.

    A bound the base model's answers fit in: open questions ("What is interesting about
    the ocean?") make SmolLM2-135M write 300-400 tokens or loop, and 11 of the 24
    held-out prompts drift used before ran past 128 tokens (2026-12-07), so every
    evaluation decoded them to the bound and judged them cut. Leaving them out keeps the
    bound and the evaluation's cost."""
    got: dict[str, tuple[str, bool]] = {}
    for start in range(0, len(pool), n):
        if sum(not cut for _, cut in got.values()) >= n:
            break
        wave = pool[start : start + n]
        got.update(zip(wave, ask(wave), strict=True))
    finished = [p for p in got if not got[p][1]][:n]
    cut_ones = [p for p in got if got[p][1]]
    used = set(finished + cut_ones[: n - len(finished)])
    chosen = [p for p in got if p in used]  # pool order
    return BaseAnswers(
        {p: got[p][0] for p in chosen},
        [p for p in chosen if got[p][1]],
        [p for p in cut_ones if p not in used],
    )


def concurrently(answer: Callable[[str], tuple[str, bool]]) -> Callable[[list[str]], list]:
    """`answer` for one prompt made into an answer for a wave: every prompt at once."""

    def ask(prompts: list[str]) -> list[tuple[str, bool]]:
        with ThreadPoolExecutor(len(prompts)) as threads:
            return list(threads.map(answer, prompts))

    return ask


def training_recipe(args: argparse.Namespace) -> MaceConfig:
    """The training recipe every adapting baseline gets: the servers' flags, and the
    periodic trainer's SlicedDPO (the server's default beta)."""
    return dataclasses.replace(
        MaceConfig(),
        lr=args.lr,
        rpo_alpha=args.rpo_alpha,
        anchor_alpha=args.anchor_alpha,
        adapter_decay=args.adapter_decay,
        adapter_decay_per=args.adapter_decay_per,
        dpo_span=args.dpo_span,
    )


class PeriodicTrainer:
    """Ekya-style retraining outside the serving loop: every period, DPO on the window of
    feedback received since the last round, then a swap through SGLang's adapter API."""

    def __init__(
        self, client: Client, model_path: str, out: Path, period_s: float, recipe: MaceConfig
    ) -> None:
        """recipe: the servers' training recipe (lr, beta, rpo_alpha, anchor_alpha,
        adapter_decay(_per), dpo_span; SlicedDPO.for_config), its LoRA shape too."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mace_sgl.trainer.shared import attach_lora
        from mace_sgl.trainer.sliced import SlicedDPO

        # One thread: two OpenMP pools (server and this trainer) spinning on 2 cores made
        # a first SmolLM2 run stall serving until a request timed out after 120 s.
        torch.set_num_threads(1)
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
        self.model = attach_lora(base, recipe.lora_rank, recipe.lora_alpha, recipe.targets)
        self.dpo = SlicedDPO.for_config(self.model, recipe)
        if recipe.anchor_alpha:  # the same anchors as the server's trainer
            from mace_sgl.trainer.anchor import shipped_anchors

            tok = AutoTokenizer.from_pretrained(model_path)
            self.dpo.set_anchors(shipped_anchors(self.dpo, tok))
        self.client, self.out, self.period_s = client, out, period_s
        self.window: list[tuple[dict[str, Any], str]] = []  # (pair, its phase)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        # cleared while an evaluation runs: the period counts running time only, and a
        # round in progress waits between pairs (as the server's trainer pauses between
        # slices)
        self.running = threading.Event()
        self.running.set()
        self.swap_lock = threading.Lock()  # held while client.adapter changes
        self.rounds = 0
        self.trained_tokens = 0
        self.trained_by_phase: Counter[str] = Counter()  # pairs trained, by their phase
        self.train_seconds = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def feedback(self, pair: dict[str, Any], phase: str) -> None:
        with self.lock:
            self.window.append((pair, phase))

    def _run(self) -> None:
        tick, waited = 0.5, 0.0
        while not self.stop_event.wait(tick):
            if not self.running.is_set():
                continue
            waited += tick
            if waited < self.period_s:
                continue
            waited = 0.0
            with self.lock:
                window, self.window = self.window, []
            if window:
                self._round(window)

    def _wait_running(self) -> bool:
        """Block while paused; False once stopped."""
        while not self.running.wait(0.5):
            if self.stop_event.is_set():
                return False
        return not self.stop_event.is_set()

    def _round(self, window: list[tuple[dict[str, Any], str]]) -> None:
        from mace_sgl.templating import encode_pair
        from mace_sgl.trainer.sliced import Pair, run_to_end

        tok = self.client.tokenizer
        start = time.monotonic()
        for i, (p, phase) in enumerate(window):
            if not self._wait_running():
                return
            msgs = [{"role": "user", "content": p["prompt"]}]
            prompt, chosen = encode_pair(tok, msgs, p["chosen"])
            _, rejected = encode_pair(tok, msgs, p["rejected"])
            pair = Pair(i, prompt, chosen, rejected)
            run_to_end(self.dpo.step_slices([pair]))
            self.trained_tokens += self.dpo.step_tokens(pair)  # as the server counts them
            self.trained_by_phase[phase] += 1
        self.rounds += 1
        path = self.out / f"periodic-{self.rounds}"
        self.model.save_pretrained(str(path))
        name = f"periodic-{self.rounds}"
        while True:  # no swap in the middle of an evaluation (see `quiet`)
            if not self._wait_running():
                return
            with self.swap_lock:
                if not self.running.is_set():
                    continue  # paused after the wait: wait again
                r = self.client.server.post(
                    "/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}
                )
                r.raise_for_status()
                old, self.client.adapter = self.client.adapter, name
                break
        if old and old.startswith("periodic-"):
            self.client.server.post("/unload_lora_adapter", {"lora_name": old})
        self.train_seconds += time.monotonic() - start

    def quiet(self) -> None:
        """Pause, and wait for a swap already under way: after this, `client.adapter`
        stays as it is until `running` is set again."""
        self.running.clear()
        with self.swap_lock:
            pass

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=600)


def evaluate(client: Client, phase: Phase, held_out: list[str], base: dict[str, str],
             max_tokens: int, served: tuple, memo: dict[tuple, list]) -> dict:  # fmt: skip
    """One evaluation: every held-out prompt at once, judged against the base answer.

    `served` names what answers (the adapter and its version): greedy decoding of the
    same weights gives the same answers (up to batch-dependent rounding at near ties),
    so a version evaluated before is judged again
    on its answers in `memo` (and, in the same phase, its margins) instead of being asked
    again. inference-only never changes version, and mace often keeps one for several
    windows: on 2 CPU cores an evaluation takes 20-60 s, most of a seed's time."""
    adapter = served[0]
    reused = ("answers", served) in memo
    if not reused:
        with ThreadPoolExecutor(len(held_out)) as pool:
            memo["answers", served] = list(
                pool.map(lambda p: client.answer(p, adapter, max_tokens), held_out)
            )
    answers = memo["answers", served]
    wins, bad = judged(phase, answers, [base[p] for p in held_out])
    scored = [p for p in held_out if phase.score(phase.edit(base[p])) > phase.score(base[p])]

    def margin(p: str) -> float:
        chosen = phase.edit(base[p])
        return client.logprob(p, chosen, adapter) - client.logprob(p, base[p], adapter)

    if ("margins", served, phase.name) not in memo:
        with ThreadPoolExecutor(max(1, len(scored))) as pool:
            memo["margins", served, phase.name] = list(pool.map(margin, scored))
    margins = memo["margins", served, phase.name]
    pairs = zip(answers, held_out, bad, strict=True)
    kinds = Counter(degenerate_kind(a, base[p], phase.brief) for a, p, b in pairs if b)
    return {
        "win_rate": statistics.mean(wins),
        "degenerate_share": sum(bad) / len(bad),
        "clpd": statistics.mean(margins) if margins else None,
        "served": list(served),
        "reused": reused,
        "example": answers[0][:120],
        "degenerate_examples": [a[:120] for a, b in zip(answers, bad, strict=True) if b][:3],
        "degenerate_kinds": dict(kinds),
    }


# The training recipe's flags every adapting baseline gets as --mace-FLAG (--lr apart:
# drift has a default of its own).
RECIPE_FLAGS = ("guard-max-kl", "guard-min-keep", "guard-open-keep", "rpo-alpha",
                "anchor-alpha", "adapter-decay", "dpo-span", "adapter-decay-per",
                "publish-every", "max-train-count", "pick-order", "guard-merge")  # fmt: skip


PROGRESS = ("train_steps", "pairs_handed_back", "pairs_superseded")


def progress(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Steps completed, pairs handed back and pairs superseded between two /mace/status
    `training` reads."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in PROGRESS}


def time_spent(before: dict[str, Any], after: dict[str, Any], wall: float) -> dict[str, Any]:
    """Where a window's wall time went on the server, between two /mace/status `training`
    reads: seconds of serving forwards, of training units by what they were for (the
    reference passes, the DPO step, the guard check, the publish), of training starved
    (work waiting, no unit run: the policy's reason at the end), and the rest idle."""
    serve = after["serving_seconds"] - before["serving_seconds"]
    by_work = {
        k: round(v - before.get("train_seconds_by_work", {}).get(k, 0.0), 2)
        for k, v in after.get("train_seconds_by_work", {}).items()
    }
    train = after["train_seconds"] - before["train_seconds"]
    starve = after["starvation"]["total_s"] - before["starvation"]["total_s"]
    return {
        "wall_s": round(wall, 2),
        "serve_s": round(serve, 2),
        "train_s": round(train, 2),
        "train_s_by_work": by_work,
        "starved_s": round(starve, 2),
        "starved_why": after["starvation"]["reason"],
    }


def time_spent_total(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """time_spent() of every window, summed (the policy's last reason dropped)."""
    keys = ("wall_s", "serve_s", "train_s", "starved_s")
    total: dict[str, Any] = {k: round(sum(w[k] for w in windows), 2) for k in keys}
    works = sorted({k for w in windows for k in w["train_s_by_work"]})
    total["train_s_by_work"] = {
        k: round(sum(w["train_s_by_work"].get(k, 0.0) for w in windows), 2) for k in works
    }
    return total


def trained_pairs(store_path: Path, posted_ids: dict[str, list[int]]) -> dict[str, int]:
    """Of the pairs posted in each phase (their store ids), how many trained at least once,
    read from the server's feedback store after it stopped: a loss recorded (a step the
    guard refused counts; a rolled-back one, whose Result carries no loss, does not,
    nor does a pair whose last Result was such a one)."""
    import sqlite3

    # Opened read-write, though only read: a WAL store needs its -shm file writable.
    conn = sqlite3.connect(str(store_path))
    try:
        query = "SELECT id FROM feedback WHERE train_count > 0 AND last_loss IS NOT NULL"
        trained = {row[0] for row in conn.execute(query)}
    finally:
        conn.close()
    return {phase: sum(i in trained for i in ids) for phase, ids in posted_ids.items()}


def eval_pool() -> list[str]:
    """The prompts evaluation may use, in the order it takes them, never trained on:
    every ninth shipped prompt, then every ninth from the fifth on (60 of the 270).
    read_base_answers takes the first --eval-prompts of them whose base answer finishes
    within --eval-max-tokens."""
    every = shipped_prompts()
    return every[::9] + every[4::9]


def run_baseline(name: str, args: argparse.Namespace, tokenizer: Any, out: Path,
                 base_answers: BaseAnswers | None, seed: int = 1
                 ) -> tuple[dict[str, Any], BaseAnswers]:  # fmt: skip
    phases = args.phase_list
    pool = eval_pool()
    train_prompts = [p for p in shipped_prompts() if p not in pool]
    flags = ["--log-level", "warning", "--mace-train", "--mace-policy", POLICY[name],
             "--mace-state-dir", str(out / f"state-{name}"), "--mace-lr", str(args.lr),
             "--mace-slo-ttft-ms", str(args.slo_ttft_ms),
             "--mace-slo-tbt-ms", str(args.slo_tbt_ms),
             "--mace-slo-tbt-basis", "request", *server_flags(args, RECIPE_FLAGS)]  # fmt: skip
    if args.model_path:
        flags += ["--model-path", args.model_path]
    if args.profile:
        flags += ["--mace-profile", args.profile]
    server = Server(flags, out / f"server-{name}.log", timeout_s=600)
    client = Client(server, tokenizer, args.max_tokens)
    periodic = None
    try:
        model_path = server.get("/mace/status").json()["model_path"]
        if base_answers is None:  # frozen base: greedy, no adapter; same for every baseline
            base_answers = read_base_answers(
                concurrently(lambda p: client.answer_ending(p, None, args.eval_max_tokens)),
                pool,
                args.eval_prompts,
            )
            if base_answers.cut:
                print(f"{len(base_answers.cut)} of {args.eval_prompts} base answers were cut "
                      f"off at --eval-max-tokens {args.eval_max_tokens}: the pool of "
                      f"{len(pool)} prompts ran out", flush=True)  # fmt: skip
        held_out = base_answers.prompts
        if name == "periodic":
            periodic = PeriodicTrainer(client, model_path, out / "periodic", args.period_s,
                                       training_recipe(args))  # fmt: skip
        phase_box = {"phase": phases[0]}
        posted = [0]
        posted_ids: dict[str, list[int]] = {p.name: [] for p in phases}  # the store's ids
        sent = [0]  # requests sent in earlier windows: prompts go on round the list

        def make_body(i: int) -> dict[str, Any]:
            return client.body(train_prompts[(sent[0] + i) % len(train_prompts)], client.adapter)

        def on_result(i: int, body: dict[str, Any], r: RequestResult) -> None:
            text = (r.text or "").strip()  # as the edits strip it: the endings then match
            if r.error or not text or (sent[0] + i) % args.feedback_every:
                return
            phase = phase_box["phase"]
            chosen = phase.edit(text)
            if phase.score(chosen) <= phase.score(text):
                return
            pair = {"prompt": body["messages"][0]["content"], "chosen": chosen,
                    "rejected": text}  # fmt: skip
            stored = server.post("/mace/feedback", {**pair, "prompt": body["messages"]})
            if not stored.ok:
                return
            posted_ids[phase.name].extend(stored.json()["ids"])
            if periodic is not None:
                periodic.feedback(pair, phase.name)
            posted[0] += 1

        def training(on: bool) -> None:
            """Pause or resume training (the server's, and the periodic thread's)."""
            if periodic is not None:
                periodic.running.set() if on else periodic.quiet()
            server.post("/mace/train/resume" if on else "/mace/train/pause", {})
            deadline = time.monotonic() + 60
            while server.get("/mace/status").json()["training"]["paused"] == on:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"training still {'paused' if on else 'running'}")
                time.sleep(0.2)

        status0 = server.get("/mace/status").json()["training"]
        memo: dict[tuple, list] = {}  # evaluate's answers and margins per served version
        results: list[RequestResult] = []
        timeline = []
        wall = 0.0  # serving seconds: the windows of load, evaluations excluded
        busy = 0.0  # scheduler seconds (forwards + training units) within the windows
        window_s = args.eval_every_s
        windows = max(1, int(args.phase_s / window_s + 1e-6))  # evaluations per phase
        bar = tqdm(total=windows * len(phases), desc=name, unit="eval", file=sys.stderr)
        for k, phase in enumerate(phases):
            phase_box["phase"] = phase
            phase_wall = 0.0
            for j in range(windows):
                before = server.get("/mace/status").json()["training"]
                t = time.monotonic()
                window = poisson_load(server.url, args.rate, window_s, make_body,
                                      seed=1000 * seed + k * windows + j,
                                      on_result=on_result, drain_s=args.drain_s)  # fmt: skip
                sent[0] += len(window)
                results.extend(window)
                dt = time.monotonic() - t
                wall, phase_wall = wall + dt, phase_wall + dt
                after = server.get("/mace/status").json()["training"]
                busy += sum(after[f] - before[f] for f in ("serving_seconds", "train_seconds"))
                training(False)
                served = (client.adapter, server.get("/mace/status").json()["training"][
                    "adapter_version"])  # fmt: skip
                ev = evaluate(client, phase, held_out, base_answers.text, args.eval_max_tokens,
                              served, memo)  # fmt: skip
                training(True)
                timeline.append({"t": round(wall, 1), "phase": phase.name,
                                 "since_drift": round(phase_wall, 1), **ev,
                                 # so far: when steps completed, and pairs given back
                                 **({} if periodic else progress(status0, after)),
                                 # this window: where the server's time went
                                 "time": time_spent(before, after, dt)})  # fmt: skip
                bar.update(1)
                bar.set_postfix(phase=phase.name, win=f"{ev['win_rate']:.2f}")
        bar.close()
        status1 = server.get("/mace/status").json()["training"]
    finally:
        if periodic is not None:
            periodic.stop()
        server.stop()
    if periodic is not None:
        trained = periodic.trained_tokens
        trained_by_phase = dict(periodic.trained_by_phase)
    else:
        trained = status1["trained_tokens"] - status0["trained_tokens"]
        trained_by_phase = trained_pairs(out / f"state-{name}" / "feedback.sqlite3", posted_ids)
    recover = []
    for phase in phases:
        hits = [e["since_drift"] for e in timeline
                if e["phase"] == phase.name and e["win_rate"] >= args.recover_at]  # fmt: skip
        recover.append(min(hits) if hits else args.phase_s)
    summary = summarize(results, args.slo_ttft_ms, args.slo_tbt_ms, wall)
    clpds = [e["clpd"] for e in timeline if e["clpd"] is not None]
    row = {
        "win_rate": statistics.mean(e["win_rate"] for e in timeline),
        "degenerate_share": statistics.mean(e["degenerate_share"] for e in timeline),
        # the last evaluation of each phase (the goal: each at least 0.75)
        **{
            f"last_win_rate.{p.name}": [e["win_rate"] for e in timeline if e["phase"] == p.name][-1]
            for p in phases
            if any(e["phase"] == p.name for e in timeline)
        },
        # periodic publishes every round unchecked (no guard): it refused none
        "guard_refusals": (
            0
            if periodic is not None
            else status1["rejected_versions"] - status0["rejected_versions"]
        ),
        "clpd": statistics.mean(clpds) if clpds else None,
        "recover_s": statistics.mean(recover),
        "ttft_p50_ms": summary["ttft_p50_ms"],
        "ttft_p99_ms": summary["ttft_p99_ms"],
        "tbt_p50_ms": summary["tbt_p50_ms"],
        "tbt_p99_ms": summary["tbt_p99_ms"],
        # the time-per-output-token tail, which the TBT target counts for attainment
        "tpot_p99_ms": summary["tpot_p99_ms"],
        "e2e_p99_ms": summary["e2e_p99_ms"],
        # share of the serving windows the scheduler ran forwards or training units (the
        # periodic baseline's training runs in this process and is not in it)
        "device_utilisation": busy / wall,
        "slo_attainment": summary["slo_attainment"],
        "throughput_tok_s": summary["throughput_tok_s"],
        "train_tokens_per_s": trained / wall,
        "requests": summary["requests"],
        "errors": summary["errors"],
        "error_samples": summary["error_samples"],
        "empty": summary["empty"],
        "feedback_posted": posted[0],
        # per phase: pairs posted, and how many of them trained at least once (the
        # server's store; periodic: its own rounds, each pair once)
        **{f"pairs_posted.{p.name}": len(posted_ids[p.name]) for p in phases},
        **{f"pairs_trained.{p.name}": trained_by_phase.get(p.name, 0) for p in phases},
        # optimizer steps; pairs the trainer gave back untrained when its hold shrank, and
        # for newer pairs (none of these for periodic: its own rounds)
        **{k: None if periodic is not None else v for k, v in progress(status0, status1).items()},
        # the serving windows' time, summed: serving, training by work, starved
        "time_spent": time_spent_total([e["time"] for e in timeline]),
        "timeline": timeline,
        "gaps": [g for r in results for g in r.gaps],
        "ttfts": [r.ttft for r in results if r.ttft is not None],
        "_results": results,  # for attainment against the seed's targets (main)
        "_wall": wall,
    }
    return row, base_answers


def plot(baselines: dict[str, dict[str, Any]], phases: list[Phase], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for name, row in baselines.items():
        for i, metric in enumerate(("ttfts", "gaps")):
            values = sorted(row[metric])
            if values:
                ys = [(k + 1) / len(values) for k in range(len(values))]
                ax[i].plot([1000 * v for v in values], ys, label=name)
    for i, title in enumerate(("TTFT", "TBT")):
        ax[i].set_xscale("log")
        ax[i].set_xlabel(f"{title} (ms)")
        ax[i].set_ylabel("CDF")
        ax[i].grid(True, alpha=0.3)
        ax[i].legend()
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=100)

    fig, ax = plt.subplots(figsize=(10, 4))
    for name, row in baselines.items():
        ax.plot([e["t"] for e in row["timeline"]], [e["win_rate"] for e in row["timeline"]],
                marker="o", label=name)  # fmt: skip
    # phase starts on the serving clock (windows wait for their requests, so a phase
    # takes a little longer than --phase-s)
    first = next(iter(baselines.values()), {"timeline": []})["timeline"]
    for phase in phases:
        starts = [e["t"] - e["since_drift"] for e in first if e["phase"] == phase.name]
        x = min(starts) if starts else 0.0
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.text(x + 2, 1.02, phase.name, fontsize=9)
    ax.set_xlabel("seconds of serving (evaluations excluded)")
    ax.set_ylabel("win rate vs frozen base")
    ax.set_ylim(-0.05, 1.1)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "win_rate.png", dpi=100)


def write_results(out: Path, args: argparse.Namespace, table: dict[str, Any], seeds: int,
                  slo_targets: list[dict[str, Any]],
                  base_answers: list[dict[str, Any]]) -> None:  # fmt: skip
    """DIR/results.json over the `seeds` seeds finished so far (`seeds_done`)."""
    settings = {k: v for k, v in vars(args).items() if k != "phase_list"}
    result = {
        "baselines": table,
        "slo_targets": slo_targets,  # per seed: what slo_attainment was counted against
        "base_answers": base_answers,  # per seed: how many were cut off at the bound
        "phases": [
            {"name": p.name, "judge": p.judge_rule, "edit": p.edit_rule} for p in args.phase_list
        ],  # fmt: skip
        "settings": settings,
        "seeds_done": seeds,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")


# Settings that may differ between the pieces of one run (--merge).
PIECE_SETTINGS = ("out", "seeds", "first_seed", "merge", "phases")


def merge(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """One results.json over the seeds of several (pieces of one run, e.g. --first-seed 1
    --seeds 1 and --first-seed 2 --seeds 2): every baseline's seeds joined in the order
    given and aggregated again, the SLO targets per seed joined. ValueError where their
    settings (other than PIECE_SETTINGS), phases or baselines differ."""

    def seeds(baselines: dict[str, Any]) -> int:  # every baseline has a row per seed
        return len(next(iter(baselines.values()))["seeds"])

    def same(piece: dict[str, Any]) -> dict[str, Any]:
        settings = {k: v for k, v in piece["settings"].items() if k not in PIECE_SETTINGS}
        return {"settings": settings, "phases": piece["phases"],
                "baselines": sorted(piece["baselines"])}  # fmt: skip

    first = pieces[0]
    for piece in pieces[1:]:
        a, b = same(first), same(piece)
        if a != b:
            diff = sorted(k for k in a["settings"].keys() | b["settings"].keys()
                          if a["settings"].get(k) != b["settings"].get(k))  # fmt: skip
            raise ValueError(f"not pieces of one run: settings {diff}, or phases or "
                             "baselines differ")  # fmt: skip
    table = {
        name: aggregate([row for p in pieces for row in p["baselines"][name]["seeds"]])
        for name in first["baselines"]
    }
    return {
        **first,
        "baselines": table,
        "slo_targets": [t for p in pieces for t in p["slo_targets"]],
        "base_answers": [b for p in pieces for b in p.get("base_answers", [])],
        "seeds_done": seeds(table),
        "merged_from": [
            {
                "first_seed": p["settings"].get("first_seed", 1),
                "seeds": seeds(p["baselines"]),
                "date": p.get("date"),
            }
            for p in pieces
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the default sizes (2 CPU cores; --full scales them up)",
    )
    parser.add_argument("--full", action="store_true", help="longer phases (GPU)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--profile", default=None, help="--mace-profile for the servers")
    parser.add_argument("--baselines", default=",".join(BASELINES))
    parser.add_argument("--phase-s", type=float, default=None)
    parser.add_argument(
        "--eval-every-s",
        type=float,
        default=None,
        help="seconds of load between evaluations (phase-s / evals-per-phase)",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=120.0,
        help="longest wait for a window's requests after its load",
    )
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--evals-per-phase", type=int, default=3)
    parser.add_argument("--eval-max-tokens", type=int, default=128)
    parser.add_argument("--phases", default=str(DEFAULT_FILE), help="phase file, YAML or JSON")
    parser.add_argument("--seeds", type=int, default=1, help="repeat the run N times")
    parser.add_argument("--first-seed", type=int, default=1,
                        help="load seeds K..K+N-1 (finish a --seeds run in pieces)")  # fmt: skip
    parser.add_argument("--merge", nargs="+", default=None, metavar="RESULTS",
                        help="write --out's results.json over the seeds of these results "
                             "files (runs of the same settings) and run nothing")  # fmt: skip
    # ~20% of what SmolLM2 serves on 2 CPU cores (0.84 requests/s of 64 tokens): a decode
    # iteration costs about the same at any batch size there, so the device is idle only
    # while no request is in flight (about half the time at this rate).
    parser.add_argument("--rate", type=float, default=0.15, help="requests per second")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--feedback-every", type=int, default=1)
    parser.add_argument("--period-s", type=float, default=None)
    parser.add_argument("--lr", type=float, default=2e-4)
    add_flags(parser, RECIPE_FLAGS, " for every adapting baseline")
    parser.add_argument("--recover-at", type=float, default=0.75)
    parser.add_argument(
        "--slo-ttft-ms",
        type=float,
        default=None,
        help="TTFT target; default: derived from inference-only (docstring)",
    )
    parser.add_argument(
        "--slo-tbt-ms",
        type=float,
        default=None,
        help="time-per-output-token target; default: as --slo-ttft-ms",
    )
    parser.add_argument("--slo-headroom", type=float, default=1.1,
                        help="derived targets: inference-only's p99s times this")  # fmt: skip
    args = parser.parse_args()
    if args.merge:
        if not args.out:
            parser.error("--merge writes DIR/results.json: give --out DIR")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        merged = merge([json.loads(Path(p).read_text()) for p in args.merge])
        (out / "results.json").write_text(json.dumps(merged, indent=2) + "\n")
        print(f"{out / 'results.json'}: {merged['seeds_done']} seeds")
        return
    if args.seeds < 1 or args.first_seed < 1:
        parser.error("--seeds and --first-seed must be >= 1")
    if args.evals_per_phase < 1:
        parser.error("--evals-per-phase must be >= 1")
    available = len(eval_pool())
    if not 1 <= args.eval_prompts <= available:
        parser.error(f"--eval-prompts must be 1..{available} (the prompts evaluation may use)")
    names = args.baselines.split(",")
    derive = args.slo_ttft_ms is None or args.slo_tbt_ms is None
    if derive and (args.slo_ttft_ms is not None or args.slo_tbt_ms is not None):
        parser.error("give both --slo-ttft-ms and --slo-tbt-ms, or neither (derived)")
    if not args.slo_headroom > 0:
        parser.error("--slo-headroom must be > 0")
    if derive and "inference-only" not in names:
        parser.error("SLO targets are derived from the inference-only baseline: add it to "
                     "--baselines, or give --slo-ttft-ms and --slo-tbt-ms")  # fmt: skip
    if derive:  # inference-only first: its run sets the others' targets
        names = ["inference-only"] + [n for n in names if n != "inference-only"]
    scale = 4.0 if args.full else 1.0
    args.phase_s = args.phase_s or 50.0 * scale
    args.eval_every_s = args.eval_every_s or args.phase_s / args.evals_per_phase
    try:
        args.phase_list = load_phases(args.phases)
    except (OSError, ValueError) as e:  # a phase file's fault: say which, no traceback
        parser.error(f"--phases {args.phases}: {e}")
    args.period_s = args.period_s or args.phase_s / 3
    from transformers import AutoTokenizer

    from mace_sgl.models import ensure_default_model

    out = Path(args.out or tempfile.mkdtemp(prefix="drift-"))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path or str(ensure_default_model()))
    runs: dict[str, list[dict[str, Any]]] = {}
    slo_targets: list[dict[str, Any]] = []  # per seed
    base_summaries: list[dict[str, Any]] = []  # per seed
    for finished, seed in enumerate(range(args.first_seed, args.first_seed + args.seeds), 1):
        seed_out = out / f"seed-{seed}" if args.seeds > 1 or args.first_seed > 1 else out
        seed_out.mkdir(parents=True, exist_ok=True)
        baselines: dict[str, dict[str, Any]] = {}
        base_answers = None
        # inference-only's server never trains: the targets it runs with steer nothing
        targets = (2000.0, 200.0) if derive else (args.slo_ttft_ms, args.slo_tbt_ms)
        for name in names:
            run_args = argparse.Namespace(**{**vars(args), "slo_ttft_ms": targets[0],
                                             "slo_tbt_ms": targets[1]})  # fmt: skip
            baselines[name], base_answers = run_baseline(
                name, run_args, tokenizer, seed_out, base_answers, seed
            )
            if derive and name == "inference-only":
                # inference-only's own p99 TTFT and time per output token
                targets = tail_targets(baselines[name]["_results"], args.slo_headroom)
                print(f"seed {seed}: SLO targets from inference-only: TTFT "
                      f"{targets[0]:.0f} ms, TPOT {targets[1]:.0f} ms", flush=True)  # fmt: skip
        slo_targets.append({"ttft_ms": targets[0], "tbt_ms": targets[1],
                            "from": "inference-only" if derive else "flags"})  # fmt: skip
        if base_answers is not None:
            base_summaries.append({"seed": seed, **base_answers.summary()})
        for row in baselines.values():  # every baseline against the same targets
            done = summarize(row["_results"], targets[0], targets[1], row["_wall"])
            row["slo_attainment"] = done["slo_attainment"]
        plot(baselines, args.phase_list, seed_out)
        for name, row in baselines.items():
            runs.setdefault(name, []).append(
                {k: v for k, v in row.items() if k not in ("gaps", "ttfts", "_results", "_wall")}
            )
        # After every seed: a run stopped later keeps the seeds it finished.
        table = {name: aggregate(rows) for name, rows in runs.items()}
        write_results(out, args, table, finished, slo_targets, base_summaries)
    keys = ("win_rate", "degenerate_share", "clpd", "recover_s", "ttft_p99_ms", "tbt_p99_ms",
            "slo_attainment", "throughput_tok_s", "train_tokens_per_s", "guard_refusals")  # fmt: skip
    print(json.dumps({n: {k: r.get(k) for k in keys} for n, r in table.items()}, indent=2))


if __name__ == "__main__":
    main()
