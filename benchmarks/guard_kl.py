"""What the publish guard measures while a preference is learned, and while a model collapses.

Chooses and documents the defaults of `--mace-guard-max-kl` and `--mace-guard-min-keep`
(trainer/guard.py). No server: the embedded default model in plain HF + peft, trained with
the server's own sliced DPO (one pair per step, the default recipe unless a drive says
otherwise), with the guard's reading (mean KL from the base on the candidate's own canary
answers, the share of each base answer's content kept, new empty and looping answers)
taken after every step. Drives:

- style:    chosen = "Certainly! " + the base answer, rejected = the base answer;
- brief:    chosen = the base answer's first sentence, rejected = the base answer;
- closing:  chosen = the base answer + " I hope this helps!", rejected = the base answer;
- lines:    chosen = the base answer with "> " before every non-empty line;
- collapse: chosen = "No, no, no.", rejected = the base answer, at 10x the learning rate
            (5e-4 collapsed SmolLM2-135M within 32 pairs: DESIGN.md);
- vacuous:  chosen = "Certainly! The answer to this question is:", rejected = the base
            answer, at 10x the learning rate: a fluent answer without content, what the
            trained baselines of `benchmarks.drift` slid into (2026-12-02) while the
            factual canaries passed (at 1x, 2e-4, the canary answers had not moved after
            12 steps: the anchor holds them).

The benign drives must pass the guard while they learn (their margin grows); the collapse
and the vacuous drive must be refused before their canary answers degenerate. Writes results.json with
every step's reading and a summary per drive.

    python -m benchmarks.guard_kl --out DIR [--steps 40] [--drives style,...]
        [--lr LR] [--rpo-alpha A] [--beta B] [--anchor-alpha A] [--adapter-decay D]
        [--dpo-span whole|edit] [--adapter-decay-per step|pair] [--model-path P]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.colocate import TOPICS
from benchmarks.recipe import RECIPE_KEYS
from benchmarks.serve_smoke import machine
from mace_sgl.config import DECAY_PER, DPO_SPANS, MaceConfig
from mace_sgl.templating import encode_pair
from mace_sgl.trainer.anchor import shipped_anchors
from mace_sgl.trainer.guard import Guard
from mace_sgl.trainer.shared import attach_lora
from mace_sgl.trainer.sliced import Pair, SlicedDPO, run_to_end

DRIVES = {
    "style": (lambda base: "Certainly! " + base, 1.0),
    "brief": (lambda base: re.split(r"(?<=[.!?])\s", base.strip())[0], 1.0),
    "closing": (lambda base: base.strip() + " I hope this helps!", 1.0),
    "lines": (lambda base: "\n".join("> " + x if x.strip() else x for x in base.split("\n")), 1.0),
    "collapse": (lambda base: "No, no, no.", 10.0),
    "vacuous": (lambda base: "Certainly! The answer to this question is:", 10.0),
}


def base_answers(model: Any, tokenizer: Any, prompts: list[list[dict]], max_new: int) -> list[str]:
    out = []
    with torch.no_grad(), model.disable_adapter():
        for messages in prompts:
            ids, _ = encode_pair(tokenizer, messages, "")
            gen = model.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
            out.append(tokenizer.decode(gen[0, len(ids) :], skip_special_tokens=True).strip())
    return out


def run_drive(name: str, model_path: str, steps: int, cfg: MaceConfig) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    lm.config._attn_implementation = "sdpa"
    model = attach_lora(lm, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
    edit, lr_scale = DRIVES[name]
    dpo = SlicedDPO.for_config(model, dataclasses.replace(cfg, lr=cfg.lr * lr_scale))
    if cfg.anchor_alpha:
        dpo.set_anchors(shipped_anchors(dpo, tokenizer))
    prompts = [[{"role": "user", "content": f"Tell me about {t}."}] for t in TOPICS]
    bases = base_answers(model, tokenizer, prompts, 48)
    pairs = []
    for i, (messages, base) in enumerate(zip(prompts, bases, strict=True)):
        prompt, chosen = encode_pair(tokenizer, messages, edit(base))
        _, rejected = encode_pair(tokenizer, messages, base)
        pairs.append(Pair(i, prompt, chosen, rejected))
    guard = Guard.for_config(dpo, tokenizer, cfg)
    rows = []
    for step in range(steps):
        pair = dataclasses.replace(pairs[step % len(pairs)], new=step < len(pairs))
        t0 = time.monotonic()
        result = run_to_end(dpo.step_slices([pair]))
        t1 = time.monotonic()
        reading = run_to_end(guard.check(step + 1))
        rows.append({
            "step": step + 1,
            "loss": result.losses[pair.sample_id],
            "margin": result.margins[pair.sample_id],
            "kl_per_token": reading.kl_per_token,
            "kl_by_answer": reading.kl_by_answer,
            "keep_by_answer": reading.keep_by_answer,
            "on_topic_by_answer": reading.on_topic_by_answer,
            "why": reading.why,
            "empty": reading.empty,
            "loops": reading.loops,
            "would_publish": reading.published,
            "answers": reading.answers,
            "step_s": t1 - t0,
            "guard_s": time.monotonic() - t1,
        })  # fmt: skip
        print(f"{name} step {step + 1}: margin {rows[-1]['margin']:+.2f} "
              f"kl {reading.kl_per_token:.3f} keep {reading.keep_by_answer} "
              f"on-topic {reading.on_topic_by_answer} empty {reading.empty} "
              f"loops {reading.loops} {reading.why!r} | {reading.answers[0][:40]!r} "
              f"| {reading.answers[-1][:60]!r}", flush=True)  # fmt: skip
    kls = [r["kl_per_token"] for r in rows]
    first_bad = next((r["step"] for r in rows if r["empty"] or r["loops"]), None)
    return {
        "drive": name,
        "lr": cfg.lr * lr_scale,
        "steps": rows,
        "summary": {
            "kl_max": max(kls),
            "kl_last": kls[-1],
            "margin_first": rows[0]["margin"],
            "margin_last": rows[-1]["margin"],
            "first_empty_or_loop_step": first_bad,
            "refused_at_default": sum(not r["would_publish"] for r in rows),
            "base_canary_answers": guard.base_answers,
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--drives", default="style,brief,collapse")
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--lr", type=float, default=None, help="default: the server's")
    parser.add_argument("--rpo-alpha", type=float, default=None, help="default: the server's")
    parser.add_argument("--beta", type=float, default=None, help="default: the server's")
    parser.add_argument("--anchor-alpha", type=float, default=None, help="default: the server's")
    parser.add_argument("--adapter-decay", type=float, default=None, help="default: the server's")
    parser.add_argument("--dpo-span", choices=DPO_SPANS, help="default: the server's")
    parser.add_argument("--adapter-decay-per", choices=DECAY_PER, help="default: the server's")
    return parser.parse_args(argv)


def recipe(args: argparse.Namespace) -> MaceConfig:
    """The server's defaults with the recipe flags given."""
    # the recipe keys this module has flags for (not max_train_count: no replay here)
    given = {k: getattr(args, k) for k in RECIPE_KEYS if getattr(args, k, None) is not None}
    return dataclasses.replace(MaceConfig(), **given)


def main() -> None:
    args = parse_args()
    if args.model_path is None:
        from mace_sgl.models import ensure_default_model

        args.model_path = str(ensure_default_model(progress=False))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = recipe(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "settings": {"steps": args.steps, "guard_max_kl": cfg.guard_max_kl,
                     "guard_tokens": cfg.guard_tokens, "guard_min_keep": cfg.guard_min_keep,
                     "guard_open_keep": cfg.guard_open_keep, "lr": cfg.lr, "beta": cfg.beta,
                     "rpo_alpha": cfg.rpo_alpha, "anchor_alpha": cfg.anchor_alpha,
                     "adapter_decay": cfg.adapter_decay,
                     "adapter_decay_per": cfg.adapter_decay_per, "dpo_span": cfg.dpo_span,
                     "model_path": args.model_path},
        "machine": machine(),
        "drives": [],
    }  # fmt: skip
    for drive in args.drives.split(","):
        results["drives"].append(run_drive(drive, args.model_path, args.steps, cfg))
        (out / "results.json").write_text(json.dumps(results, indent=2))  # after each drive
    for d in results["drives"]:
        print(
            d["drive"],
            json.dumps({k: v for k, v in d["summary"].items() if k != "base_canary_answers"}),
        )


if __name__ == "__main__":
    main()
