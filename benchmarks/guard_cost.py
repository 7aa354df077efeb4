"""What one publish-guard check costs, with the adapter merged and with peft's own LoRA layers.

`python -m benchmarks.guard_cost [--steps 6] [--repeats 7] [--model-path P] [--dtype
bfloat16|float32] [--lr LR] [--out DIR]`

Every candidate version is checked before it is published (trainer/guard.py): under
`benchmarks.drift`'s load the checks took 65% of the trainer's time (README, 2026-12-07),
most of it the batched greedy decode of the canary answers. peft's unmerged LoRA layers
run two more small matrix products per adapted layer, with dtype casts, at every decode
position; `--mace-guard-merge` (the default on CPU) answers with the adapter merged into
a copy of the adapted weights instead (`SlicedDPO.merged_weights`).

No server: the embedded default model (or `--model-path`) in plain HF + peft with the
server's default LoRA and recipe, trained `--steps` DPO steps on a style preference
("Certainly! " before the base model's own answer), so the adapter has moved. Then, in
one run, `--repeats` checks each way, the two ways alternating (and which goes first
alternating too). Reported per way: the check's seconds and its largest slice's
(median, min, max; a slice must fit between serving iterations, and the merge runs in
the prefill slices, a share of the layers in each), the ratio of the medians, the merge's own seconds, and whether the
two ways agree (how many of the canary answers differ, the largest difference of their
KLs: the merged weights are rounded to the model's dtype once, the unmerged path adds a
float32 LoRA output to the base's).
DIR/results.json when --out is given.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.serve_smoke import machine
from benchmarks.stats import emit
from mace_sgl.config import MaceConfig
from mace_sgl.templating import encode_pair
from mace_sgl.trainer.guard import Guard, greedy_answers
from mace_sgl.trainer.shared import attach_lora
from mace_sgl.trainer.sliced import Pair, SlicedDPO, run_to_end

PROMPTS = [
    "Tell me about rivers.",
    "Tell me about the moon.",
    "Tell me about bread.",
    "Tell me about trains.",
]


def spread(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def timed_check(guard: Guard, version: int) -> tuple[float, float, Any]:
    """One check driven slice by slice: its seconds, its largest slice's, its reading."""
    gen = guard.check(version)
    largest, t0 = 0.0, time.perf_counter()
    while True:
        t = time.perf_counter()
        try:
            next(gen)
        except StopIteration as stop:
            return time.perf_counter() - t0, max(largest, time.perf_counter() - t), stop.value
        largest = max(largest, time.perf_counter() - t)


def run(
    model_path: str, steps: int, repeats: int, dtype: str, lr: float | None = None
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    cfg = MaceConfig() if lr is None else MaceConfig(lr=lr)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    lm.config._attn_implementation = "sdpa"
    model = attach_lora(lm, cfg.lora_rank, cfg.lora_alpha, cfg.targets)
    dpo = SlicedDPO.for_config(model, cfg)
    guard = Guard.for_config(dpo, tokenizer, cfg)
    chats = [[{"role": "user", "content": text}] for text in PROMPTS]
    ids = [encode_pair(tokenizer, messages, "")[0] for messages in chats]
    base = run_to_end(greedy_answers(dpo, ids, tokenizer.eos_token_id, False, None, 32))
    pairs = []
    for i, (messages, tokens) in enumerate(zip(chats, base.tokens, strict=True)):
        answer = tokenizer.decode(tokens, skip_special_tokens=True)
        prompt, chosen = encode_pair(tokenizer, messages, "Certainly! " + answer)
        _, rejected = encode_pair(tokenizer, messages, answer)
        pairs.append(Pair(i, prompt, chosen, rejected))
    for s in range(steps):
        result = run_to_end(dpo.step_slices([pairs[s % len(pairs)]]))
        if not result.ok:
            raise RuntimeError(f"training step {s} failed: {result.error}")
    t = time.perf_counter()
    dpo.merged_weights()
    merge_s = time.perf_counter() - t
    ways: dict[str, dict[str, list]] = {
        w: {"check_s": [], "largest_slice_s": [], "readings": [], "merged_decode": []}
        for w in ("unmerged", "merged")
    }
    for r in range(repeats):
        order = ("unmerged", "merged") if r % 2 == 0 else ("merged", "unmerged")
        for way in order:
            guard.merge = way == "merged"
            seconds, largest, reading = timed_check(guard, r + 1)
            ways[way]["check_s"].append(seconds)
            ways[way]["largest_slice_s"].append(largest)
            ways[way]["readings"].append(reading)
            ways[way]["merged_decode"].append(guard.status()["merged_decode"])
    plain, merged = ways["unmerged"]["readings"][0], ways["merged"]["readings"][0]
    out: dict[str, Any] = {
        "machine": machine(),
        "model_path": model_path,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "steps": steps,
        "lr": cfg.lr,
        "repeats": repeats,
        "merge_s": merge_s,
        "answers": len(plain.answers),
        "answers_that_differ": sum(
            a != b for a, b in zip(plain.answers, merged.answers, strict=True)
        ),
        "kl_max_abs_diff": max(
            abs(a - b) for a, b in zip(plain.kl_by_answer, merged.kl_by_answer, strict=True)
        ),
        "kl_per_token": {"unmerged": plain.kl_per_token, "merged": merged.kl_per_token},
        "published": {"unmerged": plain.published, "merged": merged.published},
    }
    for way, got in ways.items():
        out[way] = {
            "check_s": spread(got["check_s"]),
            "largest_slice_s": spread(got["largest_slice_s"]),
            "merged_decode": all(got["merged_decode"])
            if way == "merged"
            else any(got["merged_decode"]),
        }
    out["speedup"] = out["unmerged"]["check_s"]["median"] / out["merged"]["check_s"]["median"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model-path", default=None, help="default: the embedded model")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--lr", type=float, default=None, help="default: the server's")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.model_path is None:
        from mace_sgl.models import ensure_default_model

        args.model_path = str(ensure_default_model(progress=False))
    result = run(args.model_path, args.steps, args.repeats, args.dtype, args.lr)
    emit(result, args.out)


if __name__ == "__main__":
    main()
