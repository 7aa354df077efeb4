"""The anchor of the training recipe: the base model's own answers to general prompts.

DPO on one kind of prompt spills over: on SmolLM2-135M, pairs that prefer a "Certainly! "
opener on "Tell me about X." made the model answer "What is the capital of France?" with
"Bonjour, monsieur. Welcome to my humble abode of wisdom" within 30 steps
(`benchmarks.guard_kl`). With `--mace-anchor-alpha` > 0, every step also lowers the mean
NLL of the base model's greedy answer to one of ANCHOR_PROMPTS (in turn), weighted by
anchor_alpha: where the feedback says nothing, the adapter is pulled back towards what
the base model says. The prompts are fixed, short and factual, and none of them is, or
rephrases, a canary prompt of the publish guard (trainer/guard.py), so the guard still
measures answers the training never saw.
"""

from __future__ import annotations

from typing import Any

from mace_sgl.templating import encode_pair
from mace_sgl.trainer.guard import greedy_answers, loops
from mace_sgl.trainer.sliced import SlicedDPO, run_to_end

ANCHOR_PROMPTS = [
    [{"role": "user", "content": "How many sides does a triangle have?"}],
    [{"role": "user", "content": "How many legs does a spider have?"}],
    [{"role": "user", "content": "Who wrote Romeo and Juliet?"}],
    [{"role": "user", "content": "What is the largest planet in the solar system?"}],
    [{"role": "user", "content": "What colour do you get by mixing blue and yellow?"}],
    [{"role": "user", "content": "At what temperature does water boil at sea level?"}],
    [{"role": "user", "content": "What is the opposite of hot?"}],
    [{"role": "user", "content": "Which animal is known as the king of the jungle?"}],
]


def base_anchors(
    dpo: SlicedDPO, prompts: list[list[int]], eos_id: int, max_new: int = 32
) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) token ids: the base model's greedy answers (adapter off, with the
    end token when they end within max_new), leaving out answers that loop."""
    got = run_to_end(greedy_answers(dpo, prompts, eos_id, False, None, max_new))
    return [(p, a) for p, a in zip(prompts, got.tokens, strict=True) if a and not loops(a)]


def shipped_anchors(dpo: SlicedDPO, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """`base_anchors` of ANCHOR_PROMPTS, as the server's trainer sets them."""
    prompts = [encode_pair(tokenizer, m, "")[0] for m in ANCHOR_PROMPTS]
    return base_anchors(dpo, prompts, tokenizer.eos_token_id)
