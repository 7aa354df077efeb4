"""DPO cut into slices of one decoder layer each, so training fits between serving iterations.

The DPO gradient factorises: dL/dtheta = c_chosen * dlogp(chosen)/dtheta +
c_rejected * dlogp(rejected)/dtheta with c_chosen = -beta * sigmoid(-beta * margin) * w and
c_rejected = -c_chosen (an RPO term, rpo_alpha * mean NLL of the chosen tokens, adds
-rpo_alpha / len(chosen) * w to c_chosen; an anchor term, anchor_alpha * the mean NLL of
the base model's own answer to a general prompt, is one more sequence with coefficient
-anchor_alpha / len(answer)). So a step is: reference log-probs (adapter
disabled, no grad), policy log-probs (no grad, layer inputs kept), the loss, then for
each sequence a backward that recomputes one layer at a time from its kept input
(activation checkpointing by hand).
Every piece is a slice of one layer of one sequence, or of one vocabulary chunk of the
LM head: over SmolLM2's 49k-token vocabulary the head costs about eight decoder layers,
too much for the room a busy serving iteration leaves, so its forward ("head") and its
backward ("head_bwd") run a chunk of rows of the output matrix per slice
(`head_chunks`). The forward keeps a running log-sum-exp and the target logits across
chunks; the backward reuses that log-sum-exp (the head and the final norm carry no LoRA
weights, so it does not change within a step) and accumulates the gradient of the
normed hidden states chunk by chunk: d logp / d logits = onehot(target) - softmax.

With span "edit" (`--mace-dpo-span edit`), a pair is first cut to its edit
(`edit_span`): the ending chosen and rejected share is dropped from both in the DPO
margin; an RPO term still covers the whole chosen completion (its backward then has a
coefficient per token: DPO's and RPO's on the edit, RPO's alone after it).

`step_slices()` is a generator that yields a `SliceSpec` describing the work it is about
to do; the caller decides whether that work fits, then resumes it to run it.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from mace_sgl.config import DECAY_PER, DPO_SPANS


@dataclass(frozen=True)
class Pair:
    """One preference pair as token ids, ready to train."""

    sample_id: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    weight: float = 1.0
    new: bool = True  # never trained before (decay_per="pair" counts these)

    @property
    def tokens(self) -> int:
        """Its tokens: the prompt twice, chosen and rejected (what a step processes
        for it is SlicedDPO.step_tokens: the DPO span's, and the whole chosen with RPO)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(frozen=True)
class SliceSpec:
    """The work a slice is about to do: its kind and the tokens it processes."""

    # "fwd" (no-grad layer), "head" (one vocabulary chunk of the LM head), "bwd"
    # (recompute + backward of a layer), "head_bwd" (a chunk of the head's backward),
    # "guard" (a whole-model forward of the publish guard, trainer/guard.py),
    # "opt", "publish"
    kind: str
    tokens: int


@dataclass
class StepResult:
    """What one optimizer step produced."""

    losses: dict[int, float] = field(default_factory=dict)  # sample_id -> DPO loss
    margins: dict[int, float] = field(default_factory=dict)
    grad_norm: float = 0.0
    anchor_nll: float | None = None  # mean NLL of the anchor answer, when one ran
    ok: bool = True
    error: str = ""


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    rpo_alpha: float = 0.0,
    chosen_tokens: int = 1,
) -> torch.Tensor:
    """The sigmoid DPO loss of trl's DPOTrainer (loss_type="sigmoid", no label smoothing),
    plus, as trl's `rpo_alpha`, rpo_alpha times the mean NLL of the chosen tokens (RPO,
    Pang et al. 2024: keeps the chosen answers likely, where plain DPO on a model's own
    samples can lower both sequences and drift into degenerate text)."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(beta * logits)
    if rpo_alpha:
        loss = loss - rpo_alpha * policy_chosen / chosen_tokens
    return loss


def edit_span(pair: Pair) -> Pair:
    """The pair without the ending its chosen and rejected completions share.

    Feedback often edits the served answer: chosen = "Certainly! " + rejected, or its
    lines prefixed. The tokens after the last edit are the same text in both, but each
    follows a different opening, so their policy-to-reference log-ratios do not cancel in
    the DPO margin: the loss raises the answer after the new opening and lowers the same
    answer after the old one, which is the model's plain answer to every prompt. Cut at
    the shared ending, the margin compares the edit alone (the shared beginning cancels
    exactly either way). Each completion keeps at least one token past the shared
    beginning, so a pure cut (chosen = the first sentence of rejected) keeps its end of
    sequence against rejected's continuation. A shared ending of one token is kept: it is
    the end of sequence alone, and where the tokenizer merged the cut's last punctuation
    with what followed ('."'), dropping it would lose the cut's end of sequence (or, for
    an append, rejected's). Applying it twice changes nothing more."""
    c, r = pair.chosen_ids, pair.rejected_ids
    first = 0  # the first position where they differ
    while first < min(len(c), len(r)) and c[first] == r[first]:
        first += 1
    room = min(len(c), len(r)) - first - 1
    shared = 0  # length of the common ending, within that room
    while shared < room and c[-1 - shared] == r[-1 - shared]:
        shared += 1
    if shared < 2:
        return pair
    return replace(pair, chosen_ids=c[: len(c) - shared], rejected_ids=r[: len(r) - shared])


class SlicedDPO:
    """DPO steps on a peft LoRA model, executed one layer-slice at a time."""

    def __init__(
        self,
        peft_model: Any,
        beta: float = 0.1,
        lr: float = 5e-5,
        max_grad_norm: float = 1.0,
        rpo_alpha: float = 0.0,
        head_chunks: int = 0,
        anchor_alpha: float = 0.0,
        decay: float = 0.0,
        span: str = "whole",
        decay_per: str = "step",
    ) -> None:
        """head_chunks: vocabulary chunks of the LM head, one slice each (0: one chunk
        per HEAD_CHUNK_ROWS rows of the output matrix; 1: the whole head at once).
        anchor_alpha: weight of the anchor term (see `set_anchors`).
        decay: share of the adapter's change taken away after every step: each LoRA B
        matrix is scaled by 1 - decay, so every adapted weight's delta (B A x scale) is
        too, exactly. A preference that the pairs stop renewing fades geometrically.
        decay_per: "step" (every successful step decays once) or "pair" (once per new
        pair in the step, `Pair.new`; a step of replayed pairs only does not decay).
        span: "whole" (every completion token) or "edit" (`edit_span`: without the
        ending chosen and rejected share; the RPO term still covers the whole chosen
        completion, so what follows the edit stays as likely as the chosen answer has
        it: the chosen side then runs whole, with a coefficient per token)."""
        if span not in DPO_SPANS:
            raise ValueError(f"span must be one of {DPO_SPANS}, got {span!r}")
        if decay_per not in DECAY_PER:
            raise ValueError(f"decay_per must be one of {DECAY_PER}, got {decay_per!r}")
        self.decay_per = decay_per
        self.span = span
        self.peft = peft_model
        self.lm = peft_model.get_base_model()
        self.head_ranges = head_ranges(self.lm.lm_head, head_chunks)
        self.beta = beta
        self.rpo_alpha = rpo_alpha
        self.anchor_alpha = anchor_alpha
        self.anchors: list[tuple[list[int], list[int]]] = []
        self._next_anchor = 0
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.decay = decay
        self.lora_b = [
            p for n, p in peft_model.named_parameters() if p.requires_grad and "lora_B" in n
        ]
        self.lr = lr
        self.optimizer = self.new_optimizer()
        self.device = next(iter(self.lm.parameters())).device
        # The LoRA-wrapped modules of each decoder layer, to switch the adapter off where
        # a slice runs (see _mode).
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.lora_by_layer = [
            [m for m in layer.modules() if isinstance(m, BaseTunerLayer)]
            for layer in self.lm.model.layers
        ]
        self.lora_all = [m for layer in self.lora_by_layer for m in layer]

    @classmethod
    def for_config(cls, peft_model: Any, cfg: Any) -> SlicedDPO:
        """The training recipe of a MaceConfig: beta, lr, rpo_alpha, anchor_alpha,
        adapter_decay(_per), dpo_span and head_chunks (the anchors: `set_anchors`)."""
        return cls(
            peft_model,
            beta=cfg.beta,
            lr=cfg.lr,
            rpo_alpha=cfg.rpo_alpha,
            head_chunks=cfg.head_chunks,
            anchor_alpha=cfg.anchor_alpha,
            decay=cfg.adapter_decay,
            span=cfg.dpo_span,
            decay_per=cfg.adapter_decay_per,
        )

    def new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh AdamW over the LoRA parameters (one per tenant: its state follows the
        tensors the parameters point at while that tenant is in the model)."""
        return torch.optim.AdamW(self.params, lr=self.lr, weight_decay=0.0)

    def set_anchors(self, anchors: list[tuple[list[int], list[int]]]) -> None:
        """(prompt ids, answer ids) pairs, the base model's own answers to general prompts
        (trainer/anchor.py). Each step adds anchor_alpha x the mean NLL of the next one's
        answer tokens (in turn): a pull back towards what the base model says where the
        feedback says nothing, against a preference spilling over into facts."""
        self.anchors = [(list(p), list(a)) for p, a in anchors if a]
        self._next_anchor = 0

    # -- forward pieces --------------------------------------------------------------

    def _positions(self, n: int) -> torch.Tensor:
        return torch.arange(n, device=self.device).unsqueeze(0)

    def _normed(self, hidden: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """The final norm of the hidden states that predict the completion tokens."""
        return self.lm.model.norm(hidden[:, prompt_len - 1 : -1])

    def _head_forward(
        self, hidden: torch.Tensor, ids: torch.Tensor, prompt_len: int
    ) -> Generator[SliceSpec, None, tuple[torch.Tensor, torch.Tensor]]:
        """Log-prob of each completion token given the final hidden states, a vocabulary
        chunk per slice; also returns each position's log-sum-exp (float32) for the
        backward. Runs in no-grad mode."""
        targets = ids[0, prompt_len:]
        rows = targets.shape[0]
        weight = self.lm.lm_head.weight
        hn = lse = picked = None
        for lo, hi in self.head_ranges:
            yield SliceSpec("head", rows)
            # tensors made here, not before the first yield: the caller may run it in
            # inference mode, and inference tensors cannot be updated in place outside it
            with torch.inference_mode(False), torch.no_grad():
                if hn is None:
                    hn = self._normed(hidden, prompt_len)[0]
                    lse = torch.full((rows,), -math.inf, device=self.device)
                    picked = torch.zeros(rows, device=self.device)
                logits = F.linear(hn, weight[lo:hi]).float()  # (rows, hi - lo)
                lse = torch.logaddexp(lse, logits.logsumexp(-1))
                inside = (targets >= lo) & (targets < hi)
                col = (targets - lo).clamp(0, hi - lo - 1).unsqueeze(-1)
                picked += torch.where(inside, logits.gather(1, col).squeeze(-1), 0.0)
        return picked - lse, lse

    def _head_backward(
        self,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        prompt_len: int,
        coef: float | torch.Tensor,
        lse: torch.Tensor,
    ) -> Generator[SliceSpec, None, torch.Tensor]:
        """Gradient of sum_t coef_t * logp(completion token t) with respect to the final
        hidden states (the head's input), a vocabulary chunk per slice. `coef`: one
        number for every token, or one per completion token."""
        targets = ids[0, prompt_len:]
        rows = targets.shape[0]
        weight = self.lm.lm_head.weight
        grad_hn = None
        if isinstance(coef, torch.Tensor):
            coef = coef.to(device=self.device, dtype=torch.float32).unsqueeze(-1)
        for lo, hi in self.head_ranges:
            yield SliceSpec("head_bwd", rows)
            with torch.inference_mode(False), torch.no_grad():
                if grad_hn is None:
                    hn = self._normed(hidden, prompt_len)[0]
                    grad_hn = torch.zeros(hn.shape, dtype=torch.float32, device=self.device)
                logits = F.linear(hn, weight[lo:hi]).float()
                d = -torch.exp(logits - lse.unsqueeze(-1))  # -softmax over the whole vocab
                inside = (targets >= lo) & (targets < hi)
                d[inside.nonzero().squeeze(-1), (targets - lo)[inside]] += 1.0
                # the matmul in the weights' dtype, as autograd's backward of the linear
                grad_hn += ((coef * d).to(weight.dtype) @ weight[lo:hi]).float()
        with self._mode(adapter=True, grad=True):
            h = hidden.detach().requires_grad_(True)
            hn = self._normed(h, prompt_len)
            hn.backward(grad_hn.to(hn.dtype).unsqueeze(0))
        return h.grad

    def forward_slices(
        self, ids: torch.Tensor, prompt_len: int, adapter: bool, keep: list | None
    ) -> Generator[SliceSpec, None, float]:
        """No-grad forward of one sequence, a layer per slice; returns its log-prob
        (the sum of `token_slices`' per token)."""
        return float((yield from self.token_slices(ids, prompt_len, adapter, keep)).sum())

    def token_slices(
        self, ids: torch.Tensor, prompt_len: int, adapter: bool, keep: list | None
    ) -> Generator[SliceSpec, None, torch.Tensor]:
        """No-grad forward of one sequence, a layer per slice; returns the log-prob of
        each completion token (float32).

        With `keep`, the input of every layer and the final hidden state are appended
        to it, for the backward pass. Grad mode and the adapter switch are set inside each
        slice, never held across a yield: the caller runs serving code between slices.
        """
        n = ids.shape[1]
        with self._mode(adapter, grad=False, lora=()):  # no LoRA in the embedding
            pos = self._positions(n)
            h = self.lm.model.embed_tokens(ids)
            rope = self.lm.model.rotary_emb(h, pos)
        for layer, lora in zip(self.lm.model.layers, self.lora_by_layer, strict=True):
            yield SliceSpec("fwd", n)
            if keep is not None:
                keep.append(h)
            with self._mode(adapter, grad=False, lora=lora):
                h = layer(h, position_ids=pos, position_embeddings=rope)
        logps, lse = yield from self._head_forward(h, ids, prompt_len)
        if keep is not None:
            keep.extend((h, lse))
        return logps

    @contextmanager
    def _mode(
        self,
        adapter: bool,
        grad: bool,
        lora: Sequence[Any] | None = None,
        merged: dict[Any, torch.Tensor] | None = None,
    ) -> Iterator[None]:
        """Grad mode and the adapter switch for one slice. Without the adapter, only the
        LoRA modules in `lora` (default: every one) are switched off and back on:
        peft's own `disable_adapter()` walks the whole model and costs 50-90 ms a call on
        SmolLM2-135M (one core), more than the layer a reference slice runs. With
        `merged` (`merged_weights`, adapter on, no grad), its modules run as plain linear
        maps with their merged weights."""
        with ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
            if not adapter:
                stack.enter_context(_adapters_off(self.lora_all if lora is None else lora))
            elif merged:
                stack.enter_context(_merged_in(merged))
            yield

    def mergeable(self) -> bool:
        """Whether `merged_weights` can stand in for every LoRA module: peft LoRA Linear
        layers in (out, in) layout, not merged into their base already, each active
        adapter plain LoRA (no variant such as DoRA, no LoRA bias)."""
        from peft.tuners.lora import Linear as LoraLinear

        return all(
            isinstance(m, LoraLinear)
            and not m.merged
            and not m.fan_in_fan_out
            and not any(
                a in getattr(m, "lora_variant", {}) or getattr(m, "lora_bias", {}).get(a)
                for a in m.active_adapters
            )
            for m in self.lora_all
        )

    def merged_weights(self, modules: Sequence[Any] | None = None) -> dict[Any, torch.Tensor]:
        """Each LoRA module's (of `modules`, default: every one) base weight plus its
        active adapters' delta (B A x scaling), summed in float32 and rounded once into a
        new tensor of the base weight's dtype (one module at a time: the float32
        temporary is one layer's): one more copy of the adapted weights, while it is
        held. The base weights (SGLang's, shared) are not touched: peft's own merge adds
        the delta in place and its unmerge takes it off again, which in bf16 leaves
        rounding behind in the weights that serve. For inference only: gradients do not
        reach the LoRA parameters through it. Why: the unmerged adapter runs two more
        small matrix products per adapted layer, with dtype casts, at every position
        (`benchmarks.guard_cost`). Needs `mergeable`."""
        out: dict[Any, torch.Tensor] = {}
        with torch.inference_mode(False), torch.no_grad():
            for m in self.lora_all if modules is None else modules:
                weight = m.get_base_layer().weight
                merged = weight.float()
                for name in m.active_adapters:
                    if name in m.lora_A:
                        a, b = m.lora_A[name].weight, m.lora_B[name].weight
                        merged = torch.addmm(merged, b.float(), a.float(), alpha=m.scaling[name])
                out[m] = merged.to(weight.dtype)
        return out

    def backward_slices(
        self, ids: torch.Tensor, prompt_len: int, kept: list, coef: float | torch.Tensor
    ) -> Iterator[SliceSpec]:
        """Backward of coef * logp(sequence) into the LoRA grads, a layer (or a chunk of
        the head) per slice; `coef` one number, or one per completion token. `kept`: the
        layer inputs, the final hidden states and the head's log-sum-exp, as
        token_slices (or forward_slices) left them."""
        n = ids.shape[1]
        pos = self._positions(n)
        hidden, lse = kept[-2], kept[-1]
        grad = yield from self._head_backward(hidden, ids, prompt_len, coef, lse)
        kept[-2] = kept[-1] = None
        with self._mode(adapter=True, grad=False):
            rope = self.lm.model.rotary_emb(hidden, pos)
        for i in range(len(self.lm.model.layers) - 1, -1, -1):
            yield SliceSpec("bwd", n)
            with self._mode(adapter=True, grad=True):
                x = kept[i].detach().requires_grad_(True)
                out = self.lm.model.layers[i](x, position_ids=pos, position_embeddings=rope)
                out.backward(grad)
                grad = x.grad
            kept[i] = None  # free activations as soon as they are used

    # -- one optimizer step ------------------------------------------------------------

    def _ids(self, prompt: list[int], completion: list[int]) -> torch.Tensor:
        with torch.inference_mode(False):  # autograd must be able to save it
            return torch.tensor([prompt + completion], device=self.device)

    def trained(self, pair: Pair) -> Pair:
        """The tokens of `pair` DPO compares: all of them, or its edit (`span`)."""
        return edit_span(pair) if self.span == "edit" else pair

    def _sides(self, pair: Pair) -> tuple[Pair, list[int]]:
        """(the pair DPO compares, the chosen ids the step runs).

        With the edit span, RPO still covers the whole chosen answer (what follows the
        edit too): a causal model's log-probs of the edit are the same on the whole
        sequence, so the chosen side runs whole and DPO sums its first
        `len(cut.chosen_ids)` tokens. Otherwise the chosen side is the cut's.
        """
        cut = self.trained(pair)
        if self.rpo_alpha and cut is not pair:
            return cut, pair.chosen_ids
        return cut, cut.chosen_ids

    def step_tokens(self, pair: Pair) -> int:
        """Tokens a step processes for `pair` (see _sides)."""
        cut, chosen = self._sides(pair)
        return cut.tokens + len(chosen) - len(cut.chosen_ids)

    def ref_slices(self, pair: Pair) -> Generator[SliceSpec, None, tuple[float, float]]:
        """Reference log-probs (adapter disabled) of chosen and rejected, sliced.

        They do not depend on the adapter, so they can be computed ahead of the step, in
        whatever room an iteration leaves (see step_slices' `refs`). They cover the
        tokens DPO compares; the chosen side runs on the same sequence as in the step
        (whole, with RPO under the edit span), so both give the same numbers.
        """
        pair, chosen = self._sides(pair)
        refs = []
        for i, completion in enumerate((chosen, pair.rejected_ids)):
            ids = self._ids(pair.prompt_ids, completion)
            tokens = yield from self.token_slices(ids, len(pair.prompt_ids), False, None)
            refs.append(float(tokens[: len(pair.chosen_ids) if i == 0 else None].sum()))
        return refs[0], refs[1]

    def step_slices(
        self, pairs: list[Pair], refs: dict[int, tuple[float, float]] | None = None
    ) -> Generator[SliceSpec, None, StepResult]:
        """One DPO optimizer step over `pairs` (gradient accumulation), sliced.

        `refs` maps sample ids to reference log-probs computed ahead by ref_slices;
        pairs without one compute theirs inside the step.
        """
        result = StepResult()
        self.optimizer.zero_grad(set_to_none=True)
        total_weight = sum(p.weight for p in pairs) or 1.0
        for whole in pairs:
            pair, chosen = self._sides(whole)
            k = len(pair.chosen_ids)  # DPO's chosen tokens; the step may run more
            seqs = []
            known = (refs or {}).get(pair.sample_id)
            for i, completion in enumerate((chosen, pair.rejected_ids)):
                ids = self._ids(pair.prompt_ids, completion)
                if known is not None:
                    ref = known[i]
                else:
                    ref_tokens = yield from self.token_slices(
                        ids, len(pair.prompt_ids), False, None
                    )
                    ref = float(ref_tokens[: k if i == 0 else None].sum())
                kept: list = []
                tokens = yield from self.token_slices(ids, len(pair.prompt_ids), True, kept)
                seqs.append((ids, kept, tokens, ref))
            (ids_c, kept_c, tok_c, ref_c), (ids_r, kept_r, tok_r, ref_r) = seqs
            pol_c, pol_r = float(tok_c[:k].sum()), float(tok_r.sum())
            margin = (pol_c - ref_c) - (pol_r - ref_r)
            loss = -F.logsigmoid(torch.tensor(self.beta * margin)).item()
            n_chosen = len(chosen)
            result.losses[pair.sample_id] = loss
            result.margins[pair.sample_id] = margin
            if not math.isfinite(loss - float(tok_c.sum())):
                result.ok, result.error = False, f"non-finite loss for sample {pair.sample_id}"
                return result
            # dL/dlogp(chosen) of the DPO term; the rejected sequence gets the opposite
            # sign. The RPO term only adds to the chosen side, on each of its tokens.
            coef = -self.beta * torch.sigmoid(torch.tensor(-self.beta * margin)).item()
            w = pair.weight / total_weight
            prompt_len = len(pair.prompt_ids)
            coef_c: float | torch.Tensor = (coef - self.rpo_alpha / n_chosen) * w
            if n_chosen > k:  # RPO past the edit: per-token coefficients
                coef_c = torch.full((n_chosen,), -self.rpo_alpha / n_chosen * w)
                coef_c[:k] += coef * w
            yield from self.backward_slices(ids_c, prompt_len, kept_c, coef_c)
            yield from self.backward_slices(ids_r, prompt_len, kept_r, -coef * w)
        if self.anchor_alpha and self.anchors:
            prompt, answer = self.anchors[self._next_anchor % len(self.anchors)]
            self._next_anchor += 1
            ids = self._ids(prompt, answer)
            kept = []
            logp = yield from self.forward_slices(ids, len(prompt), True, kept)
            result.anchor_nll = -logp / len(answer)
            if not math.isfinite(logp):
                result.ok, result.error = False, "non-finite anchor log-prob"
                return result
            yield from self.backward_slices(
                ids, len(prompt), kept, -self.anchor_alpha / len(answer)
            )
        yield SliceSpec("opt", 0)
        decays = 1 if self.decay_per == "step" else sum(p.new for p in pairs)
        with self._mode(adapter=True, grad=False):
            return self._optimizer_step(result, decays)

    def _optimizer_step(self, result: StepResult, decays: int = 1) -> StepResult:
        """Clip, step, then decay the adapter `decays` times (see decay_per)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        result.grad_norm = float(norm)
        if not math.isfinite(result.grad_norm):
            result.ok, result.error = False, "non-finite gradient norm"
            self.optimizer.zero_grad(set_to_none=True)
            return result
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.decay and decays:
            for b in self.lora_b:
                b.mul_((1.0 - self.decay) ** decays)
        return result


@contextmanager
def _adapters_off(modules: Sequence[Any]) -> Iterator[None]:
    """peft's public per-module switch (`enable_adapters`), restored on the way out."""
    for m in modules:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in modules:
            m.enable_adapters(True)


@contextmanager
def _merged_in(weights: dict[Any, torch.Tensor]) -> Iterator[None]:
    """Each module in `weights` runs as the plain linear map with its merged weight (an
    instance `forward`, which nn.Module's call takes before the class's), restored on the
    way out."""

    def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        return lambda x, *args, **kwargs: F.linear(x, weight, bias)

    for m, weight in weights.items():
        m.forward = linear(weight, m.get_base_layer().bias)
    try:
        yield
    finally:
        for m in weights:
            del m.forward


HEAD_CHUNK_ROWS = 8192  # rows of the output matrix per head slice when head_chunks = 0


def head_ranges(lm_head: Any, chunks: int) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of the LM head's weight, one per slice: `chunks` of them (0:
    ceil(vocab / HEAD_CHUNK_ROWS)), never more than the vocabulary has rows."""
    if chunks < 0:
        raise ValueError(f"head chunks must be >= 0, got {chunks}")
    if not isinstance(lm_head, torch.nn.Linear) or lm_head.bias is not None:
        raise ValueError(
            f"the sliced head needs a plain bias-free nn.Linear LM head, got "
            f"{type(lm_head).__name__} (is lm_head a LoRA target? it must not be)"
        )
    vocab = lm_head.weight.shape[0]
    n = chunks or math.ceil(vocab / HEAD_CHUNK_ROWS)
    n = max(1, min(n, vocab))
    bounds = [round(i * vocab / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def run_to_end(gen: Generator[SliceSpec, None, Any]) -> Any:
    """Drive a slice generator to completion and return its result (tests, idle use)."""
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value
