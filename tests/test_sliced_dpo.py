"""Sliced DPO gives the same loss and LoRA gradients as plain autograd DPO."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mace_sgl.trainer.sliced import Pair, SlicedDPO, dpo_loss, edit_span, run_to_end


def lora_model(model_dir: Path, seed: int = 1):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(seed)  # LoRA A is initialised randomly: same seed, same model
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():  # non-zero B, so that A gets gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def full_logp(model, ids: list[int], prompt_len: int) -> torch.Tensor:
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits.float()
    logp = logits[:, prompt_len - 1 : -1].log_softmax(-1)
    return torch.gather(logp, 2, x[:, prompt_len:].unsqueeze(-1)).sum()


def logps(model, pair: Pair) -> tuple[torch.Tensor, ...]:
    """Policy log-probs of chosen and rejected (with grad), then the reference's."""
    seqs = []
    for completion in (pair.chosen_ids, pair.rejected_ids):
        ids = pair.prompt_ids + completion
        with torch.no_grad(), model.disable_adapter():
            ref = full_logp(model, ids, len(pair.prompt_ids))
        seqs.append((full_logp(model, ids, len(pair.prompt_ids)), ref))
    (pc, rc), (pr, rr) = seqs
    return pc, pr, rc, rr


PAIRS = [
    Pair(1, [5, 17, 33, 41], [60, 61, 62, 2], [70, 71, 2], 1.0),
    Pair(2, [9, 8, 7], [100, 101, 2], [102, 103, 104, 105, 2], 3.0),
]


def test_dpo_loss_matches_the_closed_form():
    loss = dpo_loss(
        torch.tensor(-3.0), torch.tensor(-5.0), torch.tensor(-4.0), torch.tensor(-4.0), 0.1
    )
    assert loss.item() == pytest.approx(
        -torch.nn.functional.logsigmoid(torch.tensor(0.2)).item()
    )  # beta * ((1) - (-1))


def test_rpo_term_is_the_mean_nll_of_the_chosen_tokens():
    args = torch.tensor(-3.0), torch.tensor(-5.0), torch.tensor(-4.0), torch.tensor(-4.0), 0.1
    plain = dpo_loss(*args)
    rpo = dpo_loss(*args, rpo_alpha=0.5, chosen_tokens=4)
    assert (rpo - plain).item() == pytest.approx(0.5 * 3.0 / 4)


@pytest.mark.parametrize(
    "refs_ahead,rpo_alpha,head_chunks",
    [(False, 0.0, 1), (True, 0.0, 3), (False, 0.7, 3), (False, 0.0, 0)],
    ids=["refs-in-step", "refs-ahead-3-chunks", "rpo-3-chunks", "auto-chunks"],
)
def test_sliced_step_equals_autograd(
    tiny_model_dir: Path, refs_ahead: bool, rpo_alpha: float, head_chunks: int
):
    beta = 0.1
    ref_model = lora_model(tiny_model_dir)
    ref_model.zero_grad()
    total = sum(p.weight for p in PAIRS)
    losses = {}
    for pair in PAIRS:
        pc, pr, rc, rr = logps(ref_model, pair)
        losses[pair.sample_id] = dpo_loss(pc, pr, rc, rr, beta).item()
        loss = dpo_loss(pc, pr, rc, rr, beta, rpo_alpha, len(pair.chosen_ids))
        (loss * pair.weight / total).backward()
    expected = {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.requires_grad}

    model = lora_model(tiny_model_dir)
    dpo = SlicedDPO(
        model, beta=beta, lr=1e-3, max_grad_norm=1e9, rpo_alpha=rpo_alpha, head_chunks=head_chunks
    )
    chunks = len(dpo.head_ranges)
    assert chunks == (head_chunks or 1)  # the tiny vocabulary is under one 8192-row chunk
    refs = None
    if refs_ahead:  # reference log-probs computed before the step, as the trainer may
        refs = {p.sample_id: run_to_end(dpo.ref_slices(p)) for p in PAIRS}
    gen = dpo.step_slices(PAIRS, refs)
    specs = []

    def step():
        # SGLang's event loop runs in inference mode; every slice must cope with that.
        with torch.inference_mode():
            return next(gen)

    # Peek every grad before the optimizer step: stop at the "opt" slice.
    spec = step()
    while spec.kind != "opt":
        specs.append(spec)
        spec = step()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    n_layers = len(model.get_base_model().model.layers)
    # per sequence: 2 forwards of (layers + head chunks) and one backward of (head chunks
    # + layers); with the references computed ahead, one forward fewer
    passes = 2 if refs_ahead else 3
    assert len(specs) == len(PAIRS) * 2 * (passes * (n_layers + chunks))
    assert sum(s.kind == "head_bwd" for s in specs) == len(PAIRS) * 2 * chunks
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.inference_mode():
        result = run_to_end(gen)
    assert torch.is_grad_enabled(), "a slice leaked its grad mode to the caller"
    assert result.ok
    assert result.losses == pytest.approx(losses, rel=1e-5)
    changed = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])
    ]
    assert changed, "the optimizer step changed no LoRA weight"


ANCHORS = [([4, 6, 8], [11, 12, 13, 2]), ([21, 22], [30, 31, 2])]


@pytest.mark.parametrize("steps", [1, 3])
def test_anchor_term_is_the_mean_nll_of_the_next_anchor(tiny_model_dir: Path, steps: int):
    """Each step adds anchor_alpha x the mean NLL of one anchor answer, in turn: step 3
    of 2 anchors uses the first again. The sliced gradient equals autograd's."""
    beta, alpha = 0.1, 0.8
    model = lora_model(tiny_model_dir)
    dpo = SlicedDPO(model, beta=beta, lr=0.0, max_grad_norm=1e9, anchor_alpha=alpha)
    dpo.set_anchors(ANCHORS)
    for _ in range(steps - 1):  # lr 0: the weights stay as they are
        assert run_to_end(dpo.step_slices(PAIRS[:1])).ok
    gen = dpo.step_slices(PAIRS[:1])
    spec = next(gen)
    while spec.kind != "opt":
        spec = next(gen)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    result = run_to_end(gen)

    ref_model = lora_model(tiny_model_dir)
    pc, pr, rc, rr = logps(ref_model, PAIRS[0])
    prompt, answer = ANCHORS[(steps - 1) % len(ANCHORS)]
    nll = -full_logp(ref_model, prompt + answer, len(prompt)) / len(answer)
    (dpo_loss(pc, pr, rc, rr, beta) + alpha * nll).backward()
    assert result.anchor_nll == pytest.approx(nll.item(), rel=1e-5)
    for name, p in ref_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_decay_shrinks_every_adapted_weight_delta_by_its_share(tiny_model_dir: Path):
    """After a step (lr 0: AdamW leaves the weights), B is scaled by 1 - decay and A is
    not, so each adapted module's delta B A x scale shrinks by exactly that share; a
    step that fails is not decayed."""
    decay = 0.25
    model = lora_model(tiny_model_dir)
    dpo = SlicedDPO(model, lr=0.0, decay=decay)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(dpo.lora_b) == sum("lora_B" in n for n in before) > 0
    assert run_to_end(dpo.step_slices(PAIRS[:1])).ok
    for n, p in model.named_parameters():
        if p.requires_grad:
            scale = 1.0 - decay if "lora_B" in n else 1.0
            torch.testing.assert_close(p.detach(), before[n] * scale, msg=n)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    delta = (q.lora_B["default"].weight @ q.lora_A["default"].weight) * q.scaling["default"]
    b0, a0 = (before[f"{k}.weight"] for k in (
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"))  # fmt: skip
    torch.testing.assert_close(delta, (b0 @ a0) * q.scaling["default"] * (1.0 - decay))

    with torch.no_grad():  # a non-finite loss: no step, so no decay either
        dpo.lora_b[0][0, 0] = float("nan")
    kept = [b.detach().clone() for b in dpo.lora_b]
    assert not run_to_end(dpo.step_slices(PAIRS[:1])).ok
    for b, k in zip(dpo.lora_b, kept, strict=True):
        torch.testing.assert_close(b.detach(), k, equal_nan=True)


def test_decay_per_pair_counts_new_pairs_and_skips_replays(tiny_model_dir: Path):
    """decay_per="pair": B scaled by (1 - decay) ** (new pairs in the step); a step of
    replayed pairs only leaves B as the optimizer left it (lr 0: unchanged)."""
    import dataclasses

    decay = 0.25
    model = lora_model(tiny_model_dir)
    dpo = SlicedDPO(model, lr=0.0, decay=decay, decay_per="pair")
    with torch.no_grad():  # B starts at zero: give it something to shrink
        for b in dpo.lora_b:
            b.normal_()
    b0 = [b.detach().clone() for b in dpo.lora_b]
    old = [dataclasses.replace(p, new=False) for p in PAIRS[:2]]
    assert run_to_end(dpo.step_slices(old)).ok
    for b, k in zip(dpo.lora_b, b0, strict=True):
        torch.testing.assert_close(b.detach(), k)
    assert run_to_end(dpo.step_slices([PAIRS[0], old[1]])).ok  # one new pair
    for b, k in zip(dpo.lora_b, b0, strict=True):
        torch.testing.assert_close(b.detach(), k * (1 - decay))
    assert run_to_end(dpo.step_slices(PAIRS[:2])).ok  # two new pairs
    for b, k in zip(dpo.lora_b, b0, strict=True):
        torch.testing.assert_close(b.detach(), k * (1 - decay) ** 3)
    with pytest.raises(ValueError, match="decay_per"):
        SlicedDPO(model, decay_per="token")


EOS = 2


@pytest.mark.parametrize(
    ("chosen", "rejected", "want_chosen", "want_rejected"),
    [
        # an opening prepended: the shared answer after it goes, one rejected token stays
        ([9, 8, 40, 41, 42, EOS], [40, 41, 42, EOS], [9, 8, 40], [40]),
        # every line prefixed: cut after the last edit
        ([7, 40, 5, 7, 41, 42, EOS], [40, 5, 41, 42, EOS], [7, 40, 5, 7], [40, 5]),
        # chosen is rejected's first sentence: its end of sequence stays against the rest
        ([40, 41, EOS], [40, 41, 43, 44, EOS], [40, 41, EOS], [40, 41, 43, 44, EOS]),
        # two unrelated answers share their last word and the end of sequence: both go
        ([50, 51, 52, EOS], [60, 52, EOS], [50, 51], [60]),
        # ... only the end of sequence: it stays
        ([50, 51, EOS], [60, EOS], [50, 51, EOS], [60, EOS]),
        # a cut whose last punctuation the tokenizer merged with what followed (8 = '.',
        # 9 = '."'): the cut keeps its end of sequence
        ([40, 8, EOS], [40, 9, 44, 8, EOS], [40, 8, EOS], [40, 9, 44, 8, EOS]),
        # an append: rejected keeps its end of sequence against the added text
        ([40, 41, 70, 71, EOS], [40, 41, EOS], [40, 41, 70, 71, EOS], [40, 41, EOS]),
        # nothing shared at the end
        ([50, 51], [60, 61], [50, 51], [60, 61]),
        # the same answer twice: nothing to compare, nothing cut
        ([40, EOS], [40, EOS], [40, EOS], [40, EOS]),
    ],
)
def test_edit_span_drops_the_ending_chosen_and_rejected_share(
    chosen, rejected, want_chosen, want_rejected
):
    pair = Pair(1, [3, 4], chosen, rejected, 2.0)
    got = edit_span(pair)
    assert (got.chosen_ids, got.rejected_ids) == (want_chosen, want_rejected)
    assert (got.sample_id, got.prompt_ids, got.weight) == (1, [3, 4], 2.0)
    assert edit_span(got) == got  # once is all it does


def test_edit_span_step_trains_the_edit_only(tiny_model_dir: Path):
    """span="edit": the step's losses and gradients are those of the whole-span step on
    the cut pairs, and references computed ahead are the cut pairs' too (without RPO;
    with it, the next test)."""
    pairs = [Pair(1, [5, 17, 33], [9, 8, 40, 41, 42, EOS], [40, 41, 42, EOS])]
    cut = [edit_span(p) for p in pairs]
    assert cut[0].chosen_ids == [9, 8, 40]

    def grads_and_losses(span: str, step_pairs: list[Pair], refs_ahead: bool):
        model = lora_model(tiny_model_dir)
        dpo = SlicedDPO(model, lr=0.0, max_grad_norm=1e9, span=span)
        refs = (
            {p.sample_id: run_to_end(dpo.ref_slices(p)) for p in step_pairs} if refs_ahead else None
        )
        gen = dpo.step_slices(step_pairs, refs)
        while next(gen).kind != "opt":
            pass
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return grads, run_to_end(gen).losses

    want_grads, want_losses = grads_and_losses("whole", cut, False)
    whole_grads, _ = grads_and_losses("whole", pairs, False)
    for refs_ahead in (False, True):
        grads, losses = grads_and_losses("edit", pairs, refs_ahead)
        assert losses == pytest.approx(want_losses, rel=1e-6)
        for name, g in want_grads.items():
            torch.testing.assert_close(grads[name], g, msg=name)
    assert any(not torch.allclose(whole_grads[n], g) for n, g in want_grads.items())
    with pytest.raises(ValueError, match="span"):
        SlicedDPO(lora_model(tiny_model_dir), span="tokens")
    # the server's recipe: edit by default, whole when configured
    from mace_sgl.config import MaceConfig

    model = lora_model(tiny_model_dir)
    assert SlicedDPO.for_config(model, MaceConfig()).span == "edit"
    assert SlicedDPO.for_config(model, MaceConfig(dpo_span="whole")).span == "whole"


@pytest.mark.parametrize("refs_ahead", [False, True])
def test_edit_span_with_rpo_keeps_the_whole_chosen_answer_likely(
    tiny_model_dir: Path, refs_ahead: bool
):
    """span="edit" with rpo_alpha: DPO compares the cut pair, the RPO term is the mean
    NLL of the whole chosen answer (the text after the edit too), as plain autograd of
    that loss gives."""
    beta, rpo = 0.1, 0.7
    pairs = [
        Pair(1, [5, 17, 33], [9, 8, 40, 41, 42, EOS], [40, 41, 42, EOS], 1.0),
        # a cut (chosen ends where rejected goes on): edit_span leaves it whole
        Pair(2, [6, 7], [40, 41, EOS], [40, 41, 43, 44, EOS], 2.0),
    ]
    ref_model = lora_model(tiny_model_dir)
    ref_model.zero_grad()
    losses = {}
    for whole in pairs:
        cut = edit_span(whole)
        pc, pr, rc, rr = logps(ref_model, cut)
        losses[whole.sample_id] = dpo_loss(pc, pr, rc, rr, beta).item()
        n = len(whole.prompt_ids)
        nll = -full_logp(ref_model, whole.prompt_ids + whole.chosen_ids, n) / len(whole.chosen_ids)
        ((dpo_loss(pc, pr, rc, rr, beta) + rpo * nll) * whole.weight / 3.0).backward()
    want = {n: p.grad.clone() for n, p in ref_model.named_parameters() if p.requires_grad}

    model = lora_model(tiny_model_dir)
    dpo = SlicedDPO(model, beta=beta, lr=0.0, max_grad_norm=1e9, rpo_alpha=rpo, span="edit",
                    head_chunks=3)  # fmt: skip
    refs = {p.sample_id: run_to_end(dpo.ref_slices(p)) for p in pairs} if refs_ahead else None
    gen = dpo.step_slices(pairs, refs)
    with torch.inference_mode():  # as SGLang's event loop runs every slice
        while next(gen).kind != "opt":
            pass
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.inference_mode():
        assert run_to_end(gen).losses == pytest.approx(losses, rel=1e-5)
    # what the runtime counts as trained: the prompt twice, chosen whole, rejected cut
    assert dpo.step_tokens(pairs[0]) == 2 * 3 + 6 + 1
    assert SlicedDPO(model, span="edit").step_tokens(pairs[0]) == 2 * 3 + 3 + 1  # no RPO


def test_non_finite_loss_is_reported_not_stepped(tiny_model_dir: Path):
    model = lora_model(tiny_model_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = run_to_end(SlicedDPO(model).step_slices(PAIRS[:1]))
    assert not result.ok and "non-finite" in result.error
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, before[n], equal_nan=True)


def test_head_ranges_cover_the_vocabulary_once():
    from mace_sgl.trainer.sliced import head_ranges

    head = torch.nn.Linear(8, 49152, bias=False)
    assert head_ranges(head, 0) == [(i * 8192, (i + 1) * 8192) for i in range(6)]
    ranges = head_ranges(head, 5)
    assert ranges[0][0] == 0 and ranges[-1][1] == 49152 and len(ranges) == 5
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert head_ranges(torch.nn.Linear(8, 3, bias=False), 10) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="bias-free"):
        head_ranges(torch.nn.Linear(8, 16), 2)
