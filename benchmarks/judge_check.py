"""How often the drift judge calls the base model's own answers degenerate, and each
phase's ceiling.

The degeneration check (benchmarks/phases.py) compares an answer with the base model's
greedy answer to the same prompt. A model that learned a style words its answers
differently, so the check must let through what the base model itself says when it
words an answer differently. This module answers drift's held-out prompts (chosen as
drift chooses them: benchmarks.recipe drift_held_out) greedily (the reference) and
`--samples` more times by sampling (temperature `--temperature`), all with the
adapter-free base model, and reports:

- `samples`: the share of sampled answers judged degenerate, by kind (under the
  max_words rule's bounds too, on their first sentences, as the concise edit cuts them);
- `off_topic`: the same shares for each sampled answer judged against the greedy answer
  to the prompt half the list away (another topic): a negative control, the share of
  off-topic answers the content bound catches (`degenerate_share`, higher is better);
- `phases.NAME.ceiling`: the win rate of the phase's edit applied to each sampled answer
  against the greedy answer: what a learner that got the style exactly right, and whose
  content varies as the base model's does, would score. A phase with a low ceiling
  cannot reach a high win rate in drift whatever the recipe.

It exits 1 when more than `--max-share` (0.1) of the sampled answers are degenerate
(whole answers or first sentences, the worse of the two):
a judge that refuses the base model's own answers measures wording, not degeneration.

    python -m benchmarks.judge_check --out DIR [--samples 3] [--phases FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.phases import (
    DEFAULT_FILE,
    degenerate,
    degenerate_kind,
    judged,
    load_phases,
    sentences,
)
from benchmarks.recipe import DRIFT_HELD_OUT, Learner, drift_held_out
from benchmarks.serve_smoke import machine
from mace_sgl.config import MaceConfig


def kinds(answers: list[str], base: list[str], brief: bool) -> dict[str, float]:
    """Share of `answers` judged degenerate, overall and by kind."""
    found = [
        degenerate_kind(a, b, brief) if degenerate(a, b, brief) else None
        for a, b in zip(answers, base, strict=True)
    ]
    out = {"degenerate_share": sum(k is not None for k in found) / len(found)}
    for k in ("empty", "loop", "refusal", "content"):
        out[k] = found.count(k) / len(found)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--phases", default=str(DEFAULT_FILE), help="phase file, YAML or JSON")
    parser.add_argument("--samples", type=int, default=3, help="sampled answers per prompt")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--eval-max-tokens", type=int, default=128, help="as drift")
    parser.add_argument("--max-share", type=float, default=0.1)
    args = parser.parse_args()
    if args.samples < 1 or args.temperature <= 0 or args.eval_max_tokens < 1:
        parser.error("--samples and --eval-max-tokens must be >= 1, --temperature > 0")
    if not 0 <= args.max_share <= 1:
        parser.error("--max-share must be in [0, 1]")
    if args.model_path is None:
        from mace_sgl.models import ensure_default_model

        args.model_path = str(ensure_default_model(progress=False))
    phases = load_phases(args.phases)
    learner = Learner(args.model_path, MaceConfig(), seed=1)
    held_out = drift_held_out(learner, DRIFT_HELD_OUT, args.eval_max_tokens)  # drift's
    t0 = time.monotonic()
    greedy = learner.answers(held_out, args.eval_max_tokens, adapter=False)
    answers: list[str] = []
    for seed in range(args.samples):
        answers += learner.answers(held_out, args.eval_max_tokens, adapter=False,
                                   sample={"temperature": args.temperature, "top_p": 0.95,
                                           "seed": seed})  # fmt: skip
    base = greedy * args.samples
    half = len(held_out) // 2
    other = (greedy[half:] + greedy[:half]) * args.samples  # another prompt's greedy answer
    firsts = [(sentences(a) or [""])[0] for a in answers]
    results: dict[str, Any] = {
        "samples": {
            "whole": kinds(answers, base, False),
            "first_sentence": kinds(firsts, base, True),
        },
        "off_topic": {
            "whole": kinds(answers, other, False),
            "first_sentence": kinds(firsts, other, True),
        },
        "phases": {},
        "examples": [
            {"prompt": p, "greedy": g, "sampled": a}
            for p, g, a in zip(held_out, greedy, answers[: len(held_out)], strict=True)
        ][:6],  # fmt: skip
    }
    for phase in phases:
        wins, bad = judged(phase, [phase.edit(a) for a in answers], base)
        results["phases"][phase.name] = {
            "ceiling": statistics.mean(wins),
            "edited_degenerate_share": statistics.mean(bad),
        }
    worst = max(results["samples"]["whole"]["degenerate_share"],
                results["samples"]["first_sentence"]["degenerate_share"])  # fmt: skip
    results.update(
        settings={k: v for k, v in vars(args).items()},
        prompts=len(held_out),
        wall_s=time.monotonic() - t0,
        machine=machine(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        ok=worst <= args.max_share,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for part, r in results["samples"].items():
        print(f"base samples ({part}): degenerate {r['degenerate_share']:.3f} "
              + " ".join(f"{k} {r[k]:.3f}" for k in ("empty", "loop", "refusal", "content")))  # fmt: skip
    for part, r in results["off_topic"].items():
        print(f"off-topic control ({part}): caught {r['degenerate_share']:.3f}")
    for name, r in results["phases"].items():
        print(f"{name}: ceiling {r['ceiling']:.3f}, "
              f"edited degenerate {r['edited_degenerate_share']:.3f}")  # fmt: skip
    if not results["ok"]:
        print(f"judge_check: {worst:.3f} of the base model's own answers are judged "
              f"degenerate (> --max-share {args.max_share})", file=sys.stderr)  # fmt: skip
        sys.exit(1)


if __name__ == "__main__":
    main()
