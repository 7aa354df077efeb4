"""Training recipes compared on the drift benchmark's preference shifts, without a server.

`benchmarks.drift` measures serving and training together and costs about 6 minutes per
baseline and seed on 2 CPU cores (17 for one seed of three baselines); choosing a recipe
(learning rate, beta, `rpo_alpha`, `anchor_alpha`, `adapter_decay`, `adapter_decay_per`, `dpo_span`,
`max_train_count` with `--replay`) needs
many more runs than that allows. This benchmark
keeps drift's pairs and judge and drops the serving: the default model in plain HF +
peft (bfloat16 by default, as drift's periodic trainer), trained with the server's own
sliced DPO and anchors. In each phase of the phase file (`benchmarks/phases.py`),
`--steps` training prompts in turn: the prompt's current greedy answer (`--max-tokens`,
as drift serves) is the rejected answer and the phase's edit of it the chosen one, and
the pair is skipped, as drift skips it, when the answer is empty or the edit does not
raise the judge's score (an answer that already starts with "Certainly"). Each pair
trains one step when it arrives; `--replay N` then takes N more steps on kept pairs, as
the server's trainer does between arrivals: each step the kept pair (of every phase so
far) with the highest last DPO loss among those trained fewer than `max_train_count`
times (`--mace-max-train-count`, a recipe key). No publish guard. After each phase the
held-out prompts'
greedy answers (`--eval-max-tokens`) are judged against the base model's answers by
drift's own `verdict` and `degenerate`. Held-out prompts are the first `--held-out` of
drift's 24, chosen as drift chooses them (its pool's prompts whose base answers finish
within `--eval-max-tokens`), and no prompt of drift's pool is trained on.

    python -m benchmarks.recipe --out DIR [--seeds 3] [--steps 8] [--held-out 12]
        [--recipe NAME:key=value,key=value ...] [--phases FILE] [--lr LR] [--replay N]

A recipe is a name and the recipe keys it changes from the server's defaults, e.g.
`--recipe decay0.3:adapter_decay=0.3 --recipe whole:dpo_span=whole`; `--lr` (drift --quick's
2e-4 by default) is the learning rate of every recipe that names none. Without
`--recipe`, `server` (the server's defaults at `--lr`) and `decay0.3` run. A seed sets the LoRA
initialisation and the order of the training prompts. DIR/results.json holds per recipe
the mean over seeds of `win_rate` (all phases), `degenerate_share`,
`last_win_rate.<phase>`, `degenerate.<phase>`, `words.<phase>`, `b_norm.<phase>` (the
LoRA B matrices' norm at the phase's end: how much adapter there is), `steps`, `replays`
and `skipped`,
a `ci95` entry of [low, high] per metric, and every seed's row.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.align import prompts as shipped_prompts
from benchmarks.phases import DEFAULT_FILE, Phase, judged, load_phases
from benchmarks.serve_smoke import machine
from benchmarks.stats import aggregate
from mace_sgl.config import MaceConfig

RECIPE_KEYS = (
    "lr", "beta", "rpo_alpha", "anchor_alpha", "adapter_decay", "adapter_decay_per",
    "dpo_span", "max_train_count",
)  # fmt: skip
WORDS = ("dpo_span", "adapter_decay_per")  # the keys whose values are words, not numbers
COUNTS = ("max_train_count",)  # whole numbers
POSITIVE = ("lr", "beta", "max_train_count")  # the others may be 0 (off)
DRIFT_HELD_OUT = 24  # benchmarks.drift's --eval-prompts


def drift_held_out(learner: Learner, n: int, max_tokens: int) -> list[str]:
    """The first `n` of drift's held-out prompts, chosen as drift chooses them: the
    prompts of its pool whose base answer (this learner's, greedy) finishes within
    `max_tokens` (benchmarks.drift read_base_answers)."""
    from benchmarks.drift import eval_pool, read_base_answers

    def ask(wave: list[str]) -> list[tuple[str, bool]]:
        return learner.answers_ending(wave, max_tokens, adapter=False)

    return read_base_answers(ask, eval_pool(), n).prompts


def parse_recipe(spec: str) -> tuple[str, dict[str, float | str]]:
    """ "name:key=value,key=value" -> (name, {key: value}); keys from RECIPE_KEYS, values
    checked by MaceConfig's own validation."""
    name, _, rest = spec.partition(":")
    if not name:
        raise ValueError(f"recipe {spec!r}: give a name before the colon")
    changes: dict[str, float | str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in RECIPE_KEYS:
            raise ValueError(
                f"recipe {spec!r}: {item!r} is not key=value with a key of {RECIPE_KEYS}"
            )
        if key in WORDS:
            changes[key] = value  # MaceConfig checks it below
            continue
        try:
            changes[key] = int(value) if key in COUNTS else float(value)
        except ValueError:
            kind = "a whole number" if key in COUNTS else "a number"
            raise ValueError(f"recipe {spec!r}: {value!r} is not {kind}") from None
        v = changes[key]
        if not math.isfinite(v) or v < 0 or (key in POSITIVE and v == 0):
            low = "> 0" if key in POSITIVE else ">= 0"
            raise ValueError(f"recipe {spec!r}: {key} must be finite and {low}, got {value}")
    dataclasses.replace(MaceConfig(), **changes)  # raises on out-of-range values
    return name, changes


class Learner:
    """The model, its LoRA adapter and the server's sliced DPO with a recipe."""

    def __init__(
        self, model_path: str, cfg: MaceConfig, seed: int, dtype: torch.dtype = torch.bfloat16
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mace_sgl.templating import encode_pair
        from mace_sgl.trainer.anchor import shipped_anchors
        from mace_sgl.trainer.shared import attach_lora
        from mace_sgl.trainer.sliced import SlicedDPO

        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        lm.config._attn_implementation = "sdpa"
        torch.manual_seed(seed)  # LoRA A's initialisation
        self.model = attach_lora(lm, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
        self.dpo = SlicedDPO.for_config(self.model, cfg)
        self.encode = encode_pair
        if cfg.anchor_alpha:  # the server's anchors
            self.dpo.set_anchors(shipped_anchors(self.dpo, self.tok))

    def answers(self, prompts: list[str], max_new: int, adapter: bool = True,
                sample: dict[str, Any] | None = None) -> list[str]:  # fmt: skip
        """Answers, batched: greedy, or sampled with `sample`'s generate() keywords
        (e.g. temperature, top_p) plus `seed` for torch's generator."""
        return [text for text, _ in self.answers_ending(prompts, max_new, adapter, sample)]

    def answers_ending(self, prompts: list[str], max_new: int, adapter: bool = True,
                       sample: dict[str, Any] | None = None) -> list[tuple[str, bool]]:  # fmt: skip
        """answers(), each with whether it was cut off at `max_new` (no end token)."""
        chats = [
            self.tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        enc = self.tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        kw: dict[str, Any] = dict(max_new_tokens=max_new, pad_token_id=self.tok.pad_token_id)
        if sample is None:
            kw["do_sample"] = False
        else:
            sample = dict(sample)
            torch.manual_seed(sample.pop("seed", 0))
            kw.update(do_sample=True, **sample)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if not adapter:
                stack.enter_context(self.model.disable_adapter())
            out = self.model.generate(**enc, **kw)
        n = enc["input_ids"].shape[1]
        ends = self.model.generation_config.eos_token_id
        ends = set(ends if isinstance(ends, list) else [ends]) | {self.tok.eos_token_id}
        return [
            (self.tok.decode(o[n:], skip_special_tokens=True).strip(),
             not ends & set(o[n:].tolist()))
            for o in out
        ]  # fmt: skip

    def b_norm(self) -> float:
        """Frobenius norm of all LoRA B matrices: 0 at the start, the adapter's size."""
        return math.sqrt(sum(float(b.detach().float().pow(2).sum()) for b in self.dpo.lora_b))

    def step(self, kept: Kept) -> float | None:
        """One optimizer step on one pair: its DPO loss, None if the step failed."""
        from mace_sgl.trainer.sliced import Pair, run_to_end

        chat = [{"role": "user", "content": kept.prompt}]
        prompt_ids, chosen_ids = self.encode(self.tok, chat, kept.chosen)
        _, rejected_ids = self.encode(self.tok, chat, kept.rejected)
        pair = Pair(kept.sample_id, prompt_ids, chosen_ids, rejected_ids, new=kept.count == 0)
        result = run_to_end(self.dpo.step_slices([pair]))
        if result.ok:
            return result.losses[kept.sample_id]
        return None


@dataclasses.dataclass
class Kept:
    """A pair fed back, and what the server's store keeps of it for replay."""

    sample_id: int
    prompt: str
    chosen: str
    rejected: str
    count: int = 0  # steps it trained
    loss: float = 0.0  # its DPO loss in its last step


def train_once(learner: Learner, kept: Kept, row: dict[str, Any]) -> None:
    loss = learner.step(kept)
    kept.count += 1  # the server counts a failed step's pairs too (they trained once)
    if loss is None:
        row["failed_steps"] += 1
    # a failed step's loss is mostly non-finite: the store keeps NULL, which orders as 0
    kept.loss = 0.0 if loss is None or not math.isfinite(loss) else loss


def replay_pick(kept: list[Kept], max_train_count: int) -> Kept | None:
    """The server's replay order (sidecar/store.py::pick_next for trained pairs): the
    highest last loss first, the oldest on ties, none trained max_train_count times."""
    left = [k for k in kept if k.count < max_train_count]
    return max(left, key=lambda k: k.loss) if left else None


def judge(phase: Phase, answers: list[str], base: list[str]) -> dict[str, float]:
    """Win rate against the base answers and degenerate share, drift's rules."""
    wins, bad = judged(phase, answers, base)
    return {
        "win_rate": statistics.mean(wins),
        "degenerate_share": statistics.mean(bad),
        "words": statistics.mean(len(a.split()) for a in answers),
    }


def run_recipe(
    model_path: str,
    cfg: MaceConfig,
    phases: list[Phase],
    seed: int,
    steps: int,
    train: list[str],
    held_out: list[str],
    max_tokens: int,
    eval_max_tokens: int,
    dtype: torch.dtype = torch.bfloat16,
    replay: int = 0,
) -> dict[str, Any]:
    """One seed of one recipe: every phase's steps (each new pair, then `replay` steps on
    kept pairs), then its held-out verdicts."""
    learner = Learner(model_path, cfg, seed, dtype)
    order = list(train)
    random.Random(seed).shuffle(order)
    base = learner.answers(held_out, eval_max_tokens, adapter=False)
    row: dict[str, Any] = {"steps": 0, "replays": 0, "skipped": 0, "failed_steps": 0}
    wins, bad, k = [], [], 0
    kept: list[Kept] = []
    for phase in phases:
        for _ in range(steps):
            prompt = order[k % len(order)]
            k += 1
            answer = learner.answers([prompt], max_tokens)[0]
            chosen = phase.edit(answer)
            if not answer or phase.score(chosen) <= phase.score(answer):
                row["skipped"] += 1  # drift posts no feedback for it either
                continue
            row["steps"] += 1
            kept.append(Kept(k, prompt, chosen, answer))
            train_once(learner, kept[-1], row)
            for _ in range(replay):
                again = replay_pick(kept, cfg.max_train_count)
                if again is None:
                    break
                row["replays"] += 1
                train_once(learner, again, row)
        got = judge(phase, learner.answers(held_out, eval_max_tokens), base)
        row[f"last_win_rate.{phase.name}"] = got["win_rate"]
        row[f"degenerate.{phase.name}"] = got["degenerate_share"]
        row[f"words.{phase.name}"] = got["words"]
        row[f"b_norm.{phase.name}"] = learner.b_norm()
        wins.append(got["win_rate"])
        bad.append(got["degenerate_share"])
    return {"win_rate": statistics.mean(wins), "degenerate_share": statistics.mean(bad), **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--phases", default=str(DEFAULT_FILE), help="phase file, YAML or JSON")
    parser.add_argument("--recipe", action="append", default=None, help="NAME:key=value,...")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="pairs (steps) per phase")
    parser.add_argument("--lr", type=float, default=2e-4, help="as drift --quick")
    parser.add_argument(
        "--replay", type=int, default=0, help="steps on kept pairs after each new pair"
    )
    parser.add_argument("--held-out", type=int, default=12, help="held-out prompts")
    parser.add_argument("--max-tokens", type=int, default=48, help="served answers")
    parser.add_argument("--eval-max-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args()
    if min(args.seeds, args.steps, args.max_tokens, args.eval_max_tokens) < 1:
        parser.error("--seeds, --steps, --max-tokens and --eval-max-tokens must be >= 1")
    if args.replay < 0:
        parser.error("--replay must be >= 0")
    if not 1 <= args.held_out <= DRIFT_HELD_OUT:
        parser.error(f"--held-out must be in 1..{DRIFT_HELD_OUT} (drift's held-out prompts)")
    try:
        recipes = [parse_recipe(s) for s in args.recipe or ["server", "decay0.3:adapter_decay=0.3"]]
    except ValueError as e:
        parser.error(str(e))
    if len({n for n, _ in recipes}) != len(recipes):
        parser.error("recipe names must differ")
    if args.model_path is None:
        from mace_sgl.models import ensure_default_model

        args.model_path = str(ensure_default_model(progress=False))
    phases = load_phases(args.phases)
    from benchmarks.drift import eval_pool

    held_out = drift_held_out(Learner(args.model_path, MaceConfig(), seed=1,
                                      dtype=getattr(torch, args.dtype)),
                              args.held_out, args.eval_max_tokens)  # fmt: skip
    train = [p for p in shipped_prompts() if p not in eval_pool()]  # as drift splits them
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table: dict[str, Any] = {}
    for name, changes in recipes:
        cfg = dataclasses.replace(MaceConfig(), **{"lr": args.lr, **changes})
        rows = []
        for seed in range(1, args.seeds + 1):
            t0 = time.monotonic()
            row = run_recipe(args.model_path, cfg, phases, seed, args.steps, train, held_out,
                             args.max_tokens, args.eval_max_tokens,
                             getattr(torch, args.dtype), args.replay)  # fmt: skip
            row["wall_s"] = time.monotonic() - t0
            rows.append(row)
            print(name, json.dumps(row), flush=True)
        table[name] = {"recipe": {k: getattr(cfg, k) for k in RECIPE_KEYS}, **aggregate(rows)}
    results = {
        "recipes": table,
        "phases": [{"name": p.name, "judge": p.judge_rule, "edit": p.edit_rule} for p in phases],
        "settings": {k: v for k, v in vars(args).items() if k != "recipe"},
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for name, r in table.items():
        print(f"{name}: win {r['win_rate']:.3f} {[round(x, 3) for x in r['ci95']['win_rate']]} "
              f"degenerate {r['degenerate_share']:.3f} "
              f"{[round(x, 3) for x in r['ci95']['degenerate_share']]}")  # fmt: skip


if __name__ == "__main__":
    main()
