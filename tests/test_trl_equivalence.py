"""The trainer's DPO loss (with and without rpo_alpha) is trl's own, on the same log-probs.

trl's DPOTrainer computes its loss in `_compute_loss(model, inputs)`; it is called here on
a trainer-shaped stand-in that carries only the attributes that method reads (building a
real DPOTrainer needs datasets and training arguments, not what is under test). With
precomputed reference log-probs (trl's `precompute_ref_logps`) both sides see the same
inputs: the loss values and the LoRA gradients must agree.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mace_sgl.trainer.sliced import dpo_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

PROMPT = [5, 17, 33, 41, 8]
CHOSEN = [60, 61, 62, 63, 2]
REJECTED = [70, 71, 2]
BETA = 0.1


def lora_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    torch.manual_seed(3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():  # a non-zero adapter: policy and reference differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def logp(model, completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([PROMPT + completion])
    logits = model(input_ids=ids).logits.float()[:, len(PROMPT) - 1 : -1]
    return torch.gather(logits.log_softmax(-1), 2, ids[:, len(PROMPT) :, None]).sum()


def trl_loss(model, ref_c: torch.Tensor, ref_r: torch.Tensor, rpo_alpha: float) -> torch.Tensor:
    """trl's DPO (+ its "sft" term weighted rpo_alpha: RPO) on the batch [chosen, rejected]."""
    width = len(PROMPT) + max(len(CHOSEN), len(REJECTED))
    ids = torch.zeros((2, width), dtype=torch.long)
    attention = torch.zeros((2, width), dtype=torch.long)
    completion = torch.zeros((2, width), dtype=torch.long)
    for row, answer in enumerate((CHOSEN, REJECTED)):
        seq = PROMPT + answer
        ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
        completion[row, len(PROMPT) : len(seq)] = 1
    accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        unwrap_model=lambda m: m,
    )
    stand_in = SimpleNamespace(
        model=model,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid", "sft"] if rpo_alpha else ["sigmoid"],
        loss_weights=[1.0, rpo_alpha] if rpo_alpha else [1.0],
        beta=BETA,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "ref_chosen_logps": ref_c.reshape(1),
        "ref_rejected_logps": ref_r.reshape(1),
    }
    return trl_dpo.DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("rpo_alpha", [0.0, 0.5])
def test_dpo_loss_and_gradients_equal_trl(tiny_model_dir: Path, rpo_alpha: float):
    model = lora_model(tiny_model_dir)
    model.train()
    with torch.no_grad(), model.disable_adapter():
        ref_c, ref_r = logp(model, CHOSEN), logp(model, REJECTED)

    ours = dpo_loss(
        logp(model, CHOSEN), logp(model, REJECTED), ref_c, ref_r, BETA,
        rpo_alpha=rpo_alpha, chosen_tokens=len(CHOSEN),
    )  # fmt: skip
    ours.backward()
    ours_grads = lora_grads(model)

    theirs = trl_loss(model, ref_c, ref_r, rpo_alpha)
    theirs.backward()
    theirs_grads = lora_grads(model)

    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    assert ours.item() != pytest.approx(0.6931, abs=1e-3)  # the adapter moved the margin
    assert ours_grads.keys() == theirs_grads.keys() and ours_grads
    for name, g in ours_grads.items():
        torch.testing.assert_close(g, theirs_grads[name], rtol=1e-4, atol=1e-6, msg=name)
