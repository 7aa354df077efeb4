"""mace-sgl configuration: the MaceConfig dataclass, YAML profiles and --mace-* flags.

Precedence, lowest first: SGLang's defaults < platform defaults (CPU settings chosen at
runtime) < the profile's `sglang:` section < flags on the command line. `mace:` fields
follow the same rule: dataclass default < profile < --mace-* flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_VAR = "MACE_SGL_CONFIG"
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


DPO_SPANS = ("whole", "edit")  # --mace-dpo-span: trainer/sliced.py SlicedDPO(span=)
DECAY_PER = ("step", "pair")  # --mace-adapter-decay-per: trainer/sliced.py SlicedDPO(decay_per=)
FEEDBACK_OVERFLOWS = ("refuse", "evict")  # --mace-feedback-overflow: add_feedback(evict=)
PICK_ORDERS = ("newest", "oldest")  # --mace-pick-order: sidecar/store.py pick_next(order=)


@dataclass(frozen=True)
class MaceConfig:
    """Settings of mace-sgl itself; every field is also a --mace-<name> flag."""

    profile: str | None = field(
        default=None,
        metadata={"help": "Name or path of the profile these settings came from.", "flag": False},
    )
    state_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory for the feedback store and adapter checkpoints. "
            "Default: $XDG_STATE_HOME/mace-sgl (~/.local/state/mace-sgl)."
        },
    )
    adapter_name: str = field(
        default="live",
        metadata={"help": "Name of the adapter that feedback trains when it names none."},
    )
    adapters: str = field(
        default="",
        metadata={
            "help": "Comma-separated tenants to create at start (besides the default "
            "adapter): each adapter name gets its own LoRA, trained on its own feedback."
        },
    )
    auto_adapters: bool = field(
        default=False,
        metadata={
            "help": "Let the first feedback naming an unknown adapter create that tenant "
            "(without it such feedback is a 404 and nothing is stored)."
        },
    )
    feedback_max_bytes: int = field(
        default=1 << 20,
        metadata={"help": "Largest POST /mace/feedback body accepted; larger ones get 413."},
    )
    feedback_backlog: int = field(
        default=10_000,
        metadata={
            "help": "Never-trained feedback pairs one adapter may have stored; a POST "
            "/mace/feedback that would pass it gets 429 and stores nothing (0: no bound). "
            "On a server that does not train nothing drains them until it is started "
            "with --mace-train."
        },
    )
    feedback_overflow: str = field(
        default="refuse",
        metadata={
            "help": "What a POST /mace/feedback that would pass --mace-feedback-backlog "
            "does: `refuse` (429, nothing stored) or `evict` (the adapter's oldest "
            "never-trained pairs that no step holds are deleted to make room, counted in "
            "/mace/status feedback_evicted: under shifting preferences the newest pairs "
            "state the one users want now).",
            "choices": FEEDBACK_OVERFLOWS,
        },
    )
    feedback_retain: int = field(
        default=100_000,
        metadata={
            "help": "Feedback pairs kept once they trained (or were tried: a rolled-back "
            "step counts); the sidecar deletes the oldest beyond it every minute, "
            "whether or not --mace-max-train-count would replay them (-1: keep all)."
        },
    )
    train: bool = field(
        default=False,
        metadata={"help": "Serve a live LoRA adapter and train it with DPO on feedback."},
    )
    default_adapter: str | None = field(
        default=None,
        metadata={"help": "Adapter used by requests that name none (e.g. `live`)."},
    )
    lora_rank: int = field(default=16, metadata={"help": "Rank of the live adapter."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling alpha/rank)."})
    lora_targets: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated modules the live adapter adapts."},
    )
    beta: float = field(default=0.1, metadata={"help": "DPO beta."})
    rpo_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the mean NLL of the chosen answer added to the DPO loss "
            "(trl's rpo_alpha; 0: plain DPO). It covers the whole chosen answer, also "
            "when DPO compares the edit alone (--mace-dpo-span edit)."
        },
    )
    anchor_alpha: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the anchor term: each step also lowers the mean NLL of the "
            "base model's own answer to one of a few fixed general prompts "
            "(trainer/anchor.py; 0: off). At 1.0, 30 steps of a 'Certainly!' opener kept "
            "every canary fact (none refused) where plain DPO lost one from step 18 "
            "(benchmarks.guard_kl)."
        },
    )
    adapter_decay: float = field(
        default=0.0,
        metadata={
            "help": "Share of the adapter's change to the base weights taken away after "
            "every optimizer step (LoRA B scaled by 1 - decay; per new pair instead with "
            "--mace-adapter-decay-per pair), so that a preference the "
            "feedback no longer asks for fades (half-life ln 2 / -ln(1 - decay) steps: 1.9 "
            "at 0.3) while the current one is renewed by its own pairs; without feedback "
            "there are no steps and nothing fades. 0: off (a learned preference stays "
            "until pairs undo it)."
        },
    )
    adapter_decay_per: str = field(
        default="step",
        metadata={
            "help": "What --mace-adapter-decay counts. step: every optimizer step decays "
            "the adapter once. pair: a step decays it once per pair in it that never "
            "trained before, and steps on replayed pairs not at all, so a preference fades "
            "as new feedback arrives, not as idle time replays the pairs it holds; replay "
            "(--mace-max-train-count) then renews the current preference several times "
            "per pair, which per step it cannot outgrow (the adapter's size under decay "
            "is about lr x (1 - decay) / decay per weight per renewal). A pair is new "
            "until the store counted a step of it: a step the guard refused is rolled "
            "back with its decay, and the pair's retries count as replays.",
            "choices": DECAY_PER,
        },
    )
    dpo_span: str = field(
        default="edit",
        metadata={
            "help": "Which tokens of a pair the DPO term compares. edit: from the first "
            "token where chosen and rejected differ up to the ending they share, which is "
            "dropped (trainer/sliced.py edit_span): where chosen edits rejected "
            "('Certainly! ' + answer), DPO on that shared ending under two openings lowers "
            "the plain answer itself; a one-phase opener run (benchmarks.recipe, 3 seeds, "
            "lr 1e-3) won 0.47 against whole's 0.26 with fewer answers losing content. "
            "whole: every completion token. The RPO term (--mace-rpo-alpha) covers the "
            "whole chosen answer either way.",
            "choices": DPO_SPANS,
        },
    )
    lr: float = field(
        default=5e-5,
        metadata={
            "help": "AdamW learning rate. On SmolLM2-135M 5e-4 collapsed after 32 pairs "
            "while 5e-5 learned and stayed fluent (DESIGN.md)."
        },
    )
    pairs_per_step: int = field(
        default=1, metadata={"help": "Preference pairs per optimizer step."}
    )
    publish_every: int = field(
        default=1, metadata={"help": "Publish a new adapter version every N optimizer steps."}
    )
    train_tokens_per_iter: int = field(
        default=2,
        metadata={
            "help": "Training reserve per serving iteration, in training tokens; converted "
            "to time with the measured cost per token, so it is honoured in time."
        },
    )
    train_floor: float = field(
        default=0.0,
        metadata={
            "help": "Share of busy time (0..1) that trains even when the SLO controller "
            "allows none, so that training makes some progress under overload at a "
            "bounded latency cost (at most 0.5 s of training, or one larger unit, after "
            "an iteration). 0 (default): off, the SLO always wins."
        },
    )
    malloc_trim_s: float = field(
        default=60.0,
        metadata={
            "help": "Seconds between two malloc_trim(0) calls in an idle scheduler, which "
            "give glibc's free heap pages back to the OS (see `memory` in /mace/status): "
            "training steps leave tens of MB of free heap behind. 0: never."
        },
    )
    head_chunks: int = field(
        default=0,
        metadata={
            "help": "Vocabulary chunks of the LM head, one training slice each (0: one "
            "per 8192 vocabulary rows, 6 for SmolLM2's 49k; 1: the whole head in one "
            "slice). Smaller slices fit the room of busy serving iterations."
        },
    )
    train_dtype: str = field(
        default="auto",
        metadata={
            "help": "What the trainer computes in. model: SGLang's own weight tensors, "
            "shared (no copy). float32: a float32 copy of the base weights for the "
            "trainer (one more copy of the model in memory; serving keeps its dtype). "
            "auto (default): float32 on a CPU without native bf16 math (no AVX512-BF16 "
            "or AMX, where a bf16 training step is about 10x slower than a float32 "
            "one), else model.",
            "choices": ("auto", "model", "float32"),
        },
    )
    train_memory_mb: float = field(
        default=0.0,
        metadata={
            "help": "GPU only: MiB held back from SGLang's --mem-fraction-static for the "
            "trainer (LoRA, gradients, AdamW, rollback snapshot, its largest slice); "
            "training slices are planned inside it. 0: estimated at start from the "
            "model's config, the rank and the tenants (mace_sgl/gpu_memory.py). An "
            "explicit --mem-fraction-static is taken as given and must leave it free."
        },
    )
    prune_reserve_mb: float = field(
        default=0.0,
        metadata={
            "help": "Resolved by the launcher on a GPU with --mace-kv-prune: MiB of the "
            "KV-pruning score tensor, held back like the training reserve.",
            "flag": False,
        },
    )
    reserve_pending: bool = field(
        default=False,
        metadata={
            "help": "Set by the launcher when the reserve must come out of the static "
            "share SGLang resolves (its own default, or a profile's share on a GPU of "
            "unknown size): the plugin's resolution hook does it (plugin/gpu_reserve.py).",
            "flag": False,
        },
    )
    replicas: int = field(
        default=1,
        metadata={
            "help": "Set by the launcher from --dp-size: data-parallel replicas, each "
            "scheduler with its own trainer; one of them trains at a time and every "
            "replica serves the same adapter version (trainer/replicas.py).",
            "flag": False,
        },
    )
    replica_store: str = field(
        default="",
        metadata={
            "help": "Set by the launcher with --dp-size > 1: a fresh owner-only directory "
            "where the replicas' gloo group rendezvouses (a FileStore, no TCP store).",
            "flag": False,
        },
    )
    train_ranks: str = field(
        default="",
        metadata={
            "help": "With --dp-size > 1: comma-separated data-parallel ranks whose "
            "trainers may run steps (default: every replica); the others only serve and "
            "install what those publish (e.g. 1 for a dedicated training replica)."
        },
    )
    sync_every_s: float = field(
        default=0.0,
        metadata={
            "help": "With --dp-size > 1: send a published adapter to the other replicas "
            "at most every this many seconds, the newest version only (0: at every "
            "publish). Periodic sync is the `separate` baseline's; steps report to the "
            "sidecar only once their version reached every replica."
        },
    )
    sync_addr: str = field(
        default="",
        metadata={
            "help": "Several servers, one adapter: HOST:PORT where the servers' adapter "
            "group meets (a torch.distributed TCPStore that server 0 serves on that "
            "address only). Needs --mace-sync-world-size and --mace-sync-rank; every "
            "server runs the same model, flags and --dp-size (README: Several servers)."
        },
    )
    sync_world_size: int = field(
        default=1,
        metadata={"help": "Servers in the adapter group (--mace-sync-addr); 1: this one only."},
    )
    sync_rank: int = field(
        default=0,
        metadata={"help": "This server's rank in the adapter group, 0..world size - 1."},
    )
    sync_host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "The address this server's schedulers accept the adapter group's "
            "connections on (gloo). Loopback by default: servers on other machines need "
            "an address they can reach."
        },
    )
    placement: str = field(
        default="lemix",
        metadata={
            "help": "With --dp-size > 1: how SGLang's data-parallel controller places "
            "requests. lemix: by predicted response time, away from a replica busy "
            "training (policy/placement.py); sglang: SGLang's own --load-balance-method.",
            "choices": ("lemix", "sglang"),
        },
    )
    max_train_count: int = field(
        default=3, metadata={"help": "Times one feedback pair may train (replay bound)."}
    )
    pick_order: str = field(
        default="newest",
        metadata={
            "help": "Which never-trained feedback pairs train first: `newest` (the "
            "preference users state now; older pairs follow when no newer one waits; "
            "the trainer keeps that order for the pairs it holds and gives held ones back "
            "when newer ones wait) or `oldest` (arrival order). Trained pairs replay by "
            "last DPO loss either way.",
            "choices": PICK_ORDERS,
        },
    )
    keep_versions: int = field(
        default=20,
        metadata={"help": "Adapter checkpoints kept on disk (newest); older ones are deleted."},
    )
    guard_max_kl: float = field(
        default=1.0,
        metadata={
            "help": "Publish guard backstop: the largest mean KL (nats per token) of a "
            "candidate version from the base model on its own greedy answers to fixed canary "
            "prompts. A version above it, or whose canary answers lose the base answers' "
            "content (--mace-guard-min-keep), turn empty or loop, is not published and "
            "training rolls back (trainer/guard.py; `guard` in /mace/status)."
        },
    )
    guard_min_keep: float = field(
        default=0.5,
        metadata={
            "help": "Publish guard bound: the least share of the base model's content words "
            "that each of a candidate's canary answers must keep (0 turns the check off; "
            "trainer/guard.py)."
        },
    )
    guard_open_keep: float = field(
        default=0.3,
        metadata={
            "help": "Publish guard bound on open canary prompts: the least share of the base "
            "answer's content words an open answer keeps, or half of it when the answer is "
            "short and on topic; a version where half of the open answers fall below is "
            "refused (0 turns the check off and skips those prompts; trainer/guard.py)."
        },
    )
    guard_tokens: int = field(
        default=16,
        metadata={"help": "Tokens each canary answer of the publish guard may run to."},
    )
    guard_merge: str = field(
        default="auto",
        metadata={
            "help": "How the publish guard's candidate answers its canaries: on, with the "
            "adapter merged into a copy of the weights it adapts (one more copy of them "
            "in memory during a check; a check 1.2x faster on a 2-core AMD EPYC, "
            "benchmarks.guard_cost); off, with peft's unmerged LoRA layers; auto "
            "(default): on where the trainer runs on the CPU, off on a GPU.",
            "choices": ("auto", "on", "off"),
        },
    )
    measure_swap: bool = field(
        default=False,
        metadata={
            "help": "At start, time the in-place publish against SGLang's unload + "
            "load_lora_adapter_from_tensors (reported in /mace/status; for benchmarks)."
        },
    )
    policy: str = field(
        default="mace",
        metadata={
            "help": "Scheduling policy of training work: inference-only (never trains), "
            "fcfs-reserve (fixed reserve per iteration, arrival order) or mace (SLO-"
            "controlled reserve, DPO-loss priorities, best-fit packing); synchronous "
            "(serving waits while queued feedback trains: a benchmark baseline).",
            "choices": ("inference-only", "fcfs-reserve", "mace", "synchronous"),
        },
    )
    cost_profile: str | None = field(
        default=None,
        metadata={
            "help": "Profile JSON written by `mace-sgl profile` (cost model, priorities, "
            "SLO targets). Without one the cost model starts from rough defaults and "
            "corrects itself online.",
            "flag_name": "--mace-profile",
        },
    )
    slo_ttft_ms: float | None = field(
        default=None,
        metadata={"help": "TTFT target in ms (default: the profile's, else 2000).", "type": float},
    )
    slo_tbt_ms: float | None = field(
        default=None,
        metadata={
            "help": "Time-between-tokens target in ms (default: the profile's, else 200).",
            "type": float,
        },
    )
    slo_tbt_basis: str | None = field(
        default=None,
        metadata={
            "help": "Which tail the SLO controller holds under the TBT target: 'gap' "
            "(p99 of single token gaps, MACE's TBT) or 'request' (p99 of finished "
            "requests' mean time per output token, what SLO attainment counts). "
            "Default: the profile's, else gap.",
            "choices": ("gap", "request"),
        },
    )
    lookahead: int = field(
        default=4,
        metadata={
            "help": "Feedback pairs the trainer holds ahead of the step it runs; their "
            "reference log-probs are packed into spare room of serving iterations."
        },
    )
    kv_prune: bool = field(
        default=False,
        metadata={
            "help": "Prune each request's private KV (heavy hitters + recent window + "
            "sinks) with the mace_prune attention backend; frees slots in SGLang's pool."
        },
    )
    kv_budget: str = field(
        default="0.5",
        metadata={
            "help": "Private KV a request may keep under --mace-kv-prune: a ratio "
            "(0 < r <= 1) of its unpruned private tokens, or a token count (integer > 1)."
        },
    )
    kv_prune_window: int = field(
        default=32,
        metadata={"help": "Most recent private tokens never pruned (and prefill window)."},
    )
    kv_prune_sinks: int = field(
        default=4, metadata={"help": "First tokens of a sequence never pruned (sinks)."}
    )
    kv_prune_interval: int = field(
        default=16,
        metadata={"help": "Decode steps of headroom left after a prune (amortizes it)."},
    )
    kv_prune_min: int = field(
        default=64,
        metadata={
            "help": "Private tokens a request may always keep under --mace-kv-prune (the "
            "budget never goes below it), so short answers are not cut to the window."
        },
    )
    kv_prune_decay: float = field(
        default=0.9,
        metadata={
            "help": "Factor (0..1) on accumulated attention scores at each decode step: "
            "1 keeps plain H2O sums; lower values weigh recent attention more."
        },
    )
    kv_ram_fraction: float = field(
        default=0.10,
        metadata={
            "help": "CPU only: share of available RAM the KV pool may take when "
            "--max-total-tokens is not given (SGLang would otherwise take ~70%)."
        },
    )
    kv_tokens_min: int = field(
        default=2048,
        metadata={"help": "CPU only: lower bound on the KV pool sized from RAM, in tokens."},
    )
    kv_tokens_max: int = field(
        default=131072,
        metadata={"help": "CPU only: upper bound on the KV pool sized from RAM, in tokens."},
    )

    @property
    def trains(self) -> bool:
        """Whether this server trains what it stores (--mace-train, a policy that trains;
        paused counts as training)."""
        return self.train and self.policy != "inference-only"

    @property
    def synced(self) -> bool:
        """Whether other schedulers (replicas, servers) share this one's adapters."""
        return self.replicas > 1 or self.sync_world_size > 1

    def __post_init__(self) -> None:
        if not 0.0 < self.kv_ram_fraction <= 0.9:
            raise ValueError(f"kv_ram_fraction must be in (0, 0.9], got {self.kv_ram_fraction}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.sync_every_s < 0:
            raise ValueError(f"sync_every_s must be >= 0, got {self.sync_every_s}")
        if self.sync_world_size < 1 or not 0 <= self.sync_rank < self.sync_world_size:
            raise ValueError(
                f"--mace-sync-rank {self.sync_rank} of --mace-sync-world-size "
                f"{self.sync_world_size}: ranks are 0..world size - 1"
            )
        if (self.sync_world_size > 1) != bool(self.sync_addr):
            raise ValueError(
                "--mace-sync-addr and --mace-sync-world-size > 1 go together: name the "
                "group's HOST:PORT and how many servers it has (or neither)"
            )
        if self.sync_addr:
            split_addr(self.sync_addr)
        # Checked once the launcher set `replicas` from --dp-size (ranks are its).
        bad = [r for r in self.training_ranks or () if not 0 <= r < self.replicas]
        if bad and self.replicas > 1:
            raise ValueError(f"--mace-train-ranks {bad}: ranks are 0..{self.replicas - 1}")
        if min(self.pairs_per_step, self.publish_every, self.lora_rank, self.max_train_count) < 1:
            raise ValueError(
                "pairs_per_step, publish_every, lora_rank and max_train_count must be >= 1"
            )
        if self.train and self.synced and self.publish_every != 1:
            # Replicas and servers share a step's result when it is published: one held
            # back would be lost to the next step that runs elsewhere (the CLI says so too).
            raise ValueError(
                "--mace-train with --dp-size > 1 or --mace-sync-world-size > 1 needs "
                "--mace-publish-every 1: replicas share each step's result when it is "
                "published, and an unpublished step would be lost to the next step that "
                "runs on another replica"
            )
        if self.feedback_overflow not in FEEDBACK_OVERFLOWS:
            raise ValueError(
                f"--mace-feedback-overflow {self.feedback_overflow!r}: one of "
                f"{', '.join(FEEDBACK_OVERFLOWS)}"
            )
        if self.pick_order not in PICK_ORDERS:
            raise ValueError(
                f"--mace-pick-order {self.pick_order!r}: one of {', '.join(PICK_ORDERS)}"
            )
        if self.adapter_decay_per not in DECAY_PER:
            raise ValueError(
                f"adapter_decay_per must be step or pair, got {self.adapter_decay_per!r}"
            )
        if self.dpo_span not in DPO_SPANS:
            raise ValueError(f"dpo_span must be whole or edit, got {self.dpo_span!r}")
        if self.policy not in ("inference-only", "fcfs-reserve", "mace", "synchronous"):
            raise ValueError(
                f"unknown policy {self.policy!r}; choose inference-only, fcfs-reserve, mace "
                "or synchronous"
            )
        if not self.anchor_alpha >= 0:  # also refuses NaN
            raise ValueError(f"anchor_alpha must be >= 0, got {self.anchor_alpha}")
        if not 0.0 <= self.adapter_decay < 1.0:  # also refuses NaN
            raise ValueError(f"adapter_decay must be in [0, 1), got {self.adapter_decay}")
        if self.rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if not 0.0 <= self.train_floor <= 1.0:
            raise ValueError(f"train_floor must be a share in [0, 1], got {self.train_floor}")
        if not (self.malloc_trim_s >= 0 and math.isfinite(self.malloc_trim_s)):
            raise ValueError(f"malloc_trim_s must be >= 0 seconds, got {self.malloc_trim_s}")
        if not self.guard_max_kl > 0:  # also refuses NaN
            raise ValueError(f"guard_max_kl must be > 0 nats/token, got {self.guard_max_kl}")
        if not 0.0 <= self.guard_min_keep <= 1.0:
            raise ValueError(f"guard_min_keep must be in [0, 1], got {self.guard_min_keep}")
        if not 0.0 <= self.guard_open_keep <= 1.0:
            raise ValueError(f"guard_open_keep must be in [0, 1], got {self.guard_open_keep}")
        if self.guard_tokens < 1:
            raise ValueError(f"guard_tokens must be >= 1, got {self.guard_tokens}")
        if not (self.train_memory_mb >= 0 and math.isfinite(self.train_memory_mb)):
            raise ValueError(f"train_memory_mb must be >= 0 MiB, got {self.train_memory_mb}")
        if self.head_chunks < 0:
            raise ValueError(f"head_chunks must be >= 0, got {self.head_chunks}")
        if self.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {self.lookahead}")
        if self.train_tokens_per_iter < 0:
            raise ValueError("train_tokens_per_iter must be >= 0")
        if self.feedback_backlog < 0 or self.feedback_retain < -1:
            raise ValueError(
                "feedback_backlog must be >= 0 (0: no bound) and feedback_retain >= -1 "
                f"(-1: keep all), got {self.feedback_backlog} and {self.feedback_retain}"
            )
        if self.feedback_max_bytes <= 0:
            raise ValueError(f"feedback_max_bytes must be positive, got {self.feedback_max_bytes}")
        if not 0 < self.kv_tokens_min <= self.kv_tokens_max:
            raise ValueError(
                f"need 0 < kv_tokens_min <= kv_tokens_max, got "
                f"{self.kv_tokens_min} and {self.kv_tokens_max}"
            )

        from mace_sgl.feedback import ADAPTER_NAME

        for name in [self.adapter_name, *self.tenant_names]:
            if not ADAPTER_NAME.match(name):
                raise ValueError(
                    f"adapter name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
                    "starting with a letter or digit"
                )

        if self.kv_prune:
            self.prune_policy()  # bad budgets or windows fail at start-up

    def prune_policy(self) -> Any:
        """The PrunePolicy of the --mace-kv-* flags."""
        from mace_sgl.prune.policy import PrunePolicy

        return PrunePolicy.parse(
            self.kv_budget,
            window=self.kv_prune_window,
            sinks=self.kv_prune_sinks,
            interval=self.kv_prune_interval,
            decay=self.kv_prune_decay,
            min_tokens=self.kv_prune_min,
        )

    @property
    def state_path(self) -> Path:
        """state_dir, or the per-user default."""
        if self.state_dir:
            return Path(self.state_dir)
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "mace-sgl"

    @property
    def training_ranks(self) -> list[int] | None:
        """--mace-train-ranks as a list of ranks (None: every replica may train)."""
        try:
            ranks = [int(r) for r in self.train_ranks.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"--mace-train-ranks {self.train_ranks!r}: ranks like 0,1") from None
        return ranks or None

    @property
    def targets(self) -> list[str]:
        """lora_targets as a list."""
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]

    @property
    def tenant_names(self) -> list[str]:
        """--mace-adapters as a list (the default adapter not included)."""
        return [t.strip() for t in self.adapters.split(",") if t.strip()]

    @property
    def adapter_dir(self) -> Path:
        """Where versions of the default adapter are checkpointed (peft format)."""
        return self.tenant_dir(self.adapter_name)

    def tenant_dir(self, name: str) -> Path:
        """Where versions of adapter `name` are checkpointed: STATE/adapters/NAME/vN."""
        return self.state_path / "adapters" / name

    @property
    def store_path(self) -> Path:
        """The SQLite feedback store."""
        return self.state_path / "feedback.sqlite3"

    def to_env(self) -> str:
        """JSON for the MACE_SGL_CONFIG variable that SGLang's subprocesses inherit."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> MaceConfig:
        """The config the launcher exported, or the defaults (e.g. under stock launch_server)."""
        raw = os.environ.get(ENV_VAR)
        return cls(**json.loads(raw)) if raw else cls()


@dataclass(frozen=True)
class Profile:
    """A YAML profile: defaults for SGLang's own flags and for MaceConfig fields."""

    name: str
    sglang: dict[str, Any]
    mace: dict[str, Any]
    # The machine the profile is for: `device` (cpu or cuda), and on a GPU its
    # `gpu_memory_gb` (the training reserve is taken out of that) and a `name`.
    target: dict[str, Any] = field(default_factory=dict)

    @property
    def target_device(self) -> str | None:
        return self.target.get("device")


TARGET_KEYS = {"device", "name", "gpu_memory_gb"}


def resolve_profile_path(name_or_path: str) -> Path:
    """A profile given as a file path, or by name from configs/ (e.g. `cpu-dev`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"profile file not found: {path}")
        return path
    candidate = CONFIGS_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"unknown profile {name_or_path!r}; known: {', '.join(known)}")
    return candidate


def load_profile(name_or_path: str, sglang_dests: set[str]) -> Profile:
    """Read and validate a profile; unknown keys are errors, not silently ignored."""
    path = resolve_profile_path(name_or_path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile is a mapping with `sglang:` and `mace:` sections")
    unknown_sections = set(data) - {"sglang", "mace", "target"}
    if unknown_sections:
        raise ValueError(f"{path}: unknown sections {sorted(unknown_sections)}")
    target = dict(data.get("target") or {})
    bad = sorted(set(target) - TARGET_KEYS)
    if bad:
        raise ValueError(f"{path}: unknown target keys {bad}; known: {sorted(TARGET_KEYS)}")
    if target.get("device", "cpu") not in ("cpu", "cuda"):
        raise ValueError(f"{path}: target device must be cpu or cuda, got {target['device']!r}")
    sglang = {k.replace("-", "_"): v for k, v in (data.get("sglang") or {}).items()}
    mace = {k.replace("-", "_"): v for k, v in (data.get("mace") or {}).items()}
    bad = sorted(set(sglang) - sglang_dests)
    if bad:
        raise ValueError(f"{path}: not SGLang server arguments: {bad}")
    mace_fields = {f.name for f in dataclasses.fields(MaceConfig)} - {"profile"}
    bad = sorted(set(mace) - mace_fields)
    if bad:
        raise ValueError(f"{path}: not mace fields: {bad}; known: {sorted(mace_fields)}")
    name = path.stem if path.parent == CONFIGS_DIR else str(path)
    return Profile(name=name, sglang=sglang, mace=mace, target=target)


def add_mace_args(parser: argparse.ArgumentParser) -> None:
    """Add --profile and one --mace-<field> flag per MaceConfig field."""
    group = parser.add_argument_group("mace-sgl")
    group.add_argument(
        "--profile",
        default=None,
        help="YAML profile: a name from configs/ (cpu-dev, h100, orin-agx) or a file "
        "path. Default: cpu-dev on a machine without a GPU, none otherwise.",
    )
    group.add_argument(
        "--print-args",
        action="store_true",
        default=False,
        help="Print the SGLang server arguments and the mace configuration that the "
        "profile and the flags resolve to, as one JSON object, and exit without starting "
        "anything. Resolves for the profile's target device, whatever this machine is.",
    )
    for f in dataclasses.fields(MaceConfig):
        if not f.metadata.get("flag", True):
            continue
        flag = f.metadata.get("flag_name", f"--mace-{f.name.replace('_', '-')}")
        if isinstance(f.default, bool):
            group.add_argument(
                flag,
                dest=f"mace_{f.name}",
                action="store_true",
                default=None,
                help=f.metadata["help"].replace("%", "%%"),
            )
            continue
        group.add_argument(
            flag,
            dest=f"mace_{f.name}",
            # Optional fields name their type; the rest take their default's.
            type=f.metadata.get("type") or (str if f.default is None else type(f.default)),
            choices=f.metadata.get("choices"),
            default=None,
            help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"),
        )


def build_mace_config(args: argparse.Namespace, profile: Profile | None) -> MaceConfig:
    """MaceConfig from dataclass defaults < profile `mace:` < --mace-* flags."""
    values: dict[str, Any] = dict(profile.mace) if profile else {}
    for f in dataclasses.fields(MaceConfig):
        flag_value = getattr(args, f"mace_{f.name}", None)
        if flag_value is not None:
            values[f.name] = flag_value
    return MaceConfig(profile=profile.name if profile else None, **values)


def kv_bytes_per_token(model_config: dict[str, Any], dtype_bytes: int = 2) -> int:
    """Bytes of K and V one token takes across all layers of a decoder (MHA/GQA)."""
    text = model_config.get("text_config", model_config)
    layers = int(text["num_hidden_layers"])
    heads = int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // heads)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def kv_tokens_for_ram(
    cfg: MaceConfig, model_config: dict[str, Any], available_bytes: int, dtype_bytes: int = 2
) -> int:
    """KV pool size in tokens for a CPU run: a share of free RAM, clamped to the bounds."""
    per_token = kv_bytes_per_token(model_config, dtype_bytes)
    tokens = int(available_bytes * cfg.kv_ram_fraction) // per_token
    return max(cfg.kv_tokens_min, min(cfg.kv_tokens_max, tokens))


def cpu_server_defaults(
    cfg: MaceConfig,
    model_config: dict[str, Any] | None,
    available_bytes: int,
    dtype_bytes: int = 2,
) -> dict[str, Any]:
    """SGLang settings that make a CPU-only machine work (see DESIGN.md, measured facts)."""
    defaults: dict[str, Any] = {
        "device": "cpu",
        "attention_backend": "torch_native",
        # LoRA kernels (csgmv/triton) need CUDA; torch_native is the CPU path.
        "lora_backend": "torch_native",
        # An idle scheduler otherwise spins a whole core.
        "sleep_on_idle": True,
    }
    if model_config is not None:
        defaults["max_total_tokens"] = kv_tokens_for_ram(
            cfg, model_config, available_bytes, dtype_bytes
        )
    return defaults


def split_addr(addr: str) -> tuple[str, int]:
    """'HOST:PORT' (an IPv6 host in brackets) -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--mace-sync-addr {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:29600")
    return host.strip("[]"), int(port)
