"""The publish guard: measures each candidate adapter version on its own answers.

Degeneration (the collapse into "No, no, no.", empty answers, repetition loops, a fact
lost) changes what the model *says*, so that is what the guard looks at. Before a version
is published the candidate answers a fixed set of canary prompts greedily, and the guard
measures, per answer:

- keep: the share of the base answer's content words (letters or digits, lower-cased,
  without a short list of function words) that the candidate's answer still contains. The
  candidate may run half again as many tokens as the base answer it is compared with,
  so that an opener or a list marker does not push content out of its window.
  Learning a style keeps the content ("Certainly! The capital of France is Paris."); a
  collapse or a lost fact does not ("Aw, no.", "A week is a magical number").
- kl_per_token: the mean, over the candidate's answer tokens, of KL(candidate || base) of
  the next-token distributions at that position, with the base model (adapter disabled)
  teacher-forced on the same tokens. It is a backstop for a wholesale shift only: a
  learned opener moves a few tokens a lot and a collapsed model's loop is one the base
  model continues too, so both measure about 0.5 nats/token on short answers
  (`benchmarks.guard_kl`, `benchmarks.align`) and the mean cannot tell them apart.
- empty: answers with nothing but whitespace before the end-of-sequence token;
- loops: answers in which one token n-gram recurs (LOOP_NGRAM tokens, LOOP_REPEATS times);
- content on open prompts (OPEN_PROMPTS, answered with OPEN_BUDGET x `max_new_tokens`): factual
  canaries keep their facts while a model slides into content-free or generic answers
  ("Certainly! The answer to this question is:", "1. The ocean is huge.", "The ocean is
  a vast, mysterious place": `benchmarks.drift`, 2026-12-02, where the factual canaries
  passed every such version). An open answer holds its content when it keeps at least
  `open_keep` of the base answer's content words (recall; any style, any opener), or
  when it is short and on topic: at least half that share kept and at least
  OPEN_ON_TOPIC of its own content words drawn from the base answer or the prompt
  (precision; a brevity preference cuts recall, not precision). One open answer may
  miss (a benign rephrasing of an open question moves many words); a version where
  at least half of the open answers the adapter changed lose their content is refused.

keep, content, empty and loops count only for prompts where the base model's own answer is neither
empty nor a loop (the small base model loops now and then by itself), and only for answers
whose own mean KL from the base is at least ATTRIBUTE_KL: an answer the base model gives
nearly as readily is not the adapter's doing. (Measured on SmolLM2-135M: one DPO step at
the default learning rate flipped a near tie on the first token of "What is the capital
of France?", and the answer became a loop, "L'Étoile, la Marseillaise, la femme, la
femme, ...", at a KL of 0.003 nats/token: the base model continues that opening the same
way.) A version with kl_per_token above `max_kl`, an answer keeping less than `min_keep`
of its base answer's content, open answers that lost theirs (above), or any new empty or
looping answer, is refused and the
trainer rolls back to the last published version (weights and optimizer state).

The candidate prefills the prefix the canary prompts share (the chat template's system
turn) in one slice and each prompt's own tokens over it in one slice each, then decodes
all of them together, one slice per position (their caches joined, left-padded and
masked), and the base model then scores each answer in one teacher-forced pass over its
own prompt states, kept from its first pass (`PromptStates`: the base weights never
change) ("guard" units of the cost model): the largest slice is about one short prompt's
forward, so the check fits between serving iterations like any other training work. On
SmolLM2-135M, 2-core Xeon (bf16): 608 tokens and 3.6 s a check, largest slice 0.08 s;
decoding (36 positions of 8 answers, about 60 ms each) is most of it, while one DPO step
with the anchor term takes about 1.7 s. Decoding from drafts (the last passed version's
answers, verified in the prompt's pass: speculative decoding) saved nothing at drift's
learning rate (3.95 s against 3.98 s over 8 steps): one step changes at least one of the
8 answers early, and the batched decode runs until the longest is done. Earlier forms,
oldest first: all prompts as one batch from the prefill on (its prefill slice took 2.3 s
on a 2-core Xeon, too large for the room between serving iterations; a 60-minute soak
with it saw TBT p99 of 1.2-4.5 s around checks); one prompt at a time (4x the decode
slices, each about as long as a batched one on CPU: in `benchmarks.tenants` the guard was
about 15 of the 27 s that one version took on the 2-core Xeon); each whole prompt
prefilled and teacher-forced again (1095 tokens, 3.7 s, largest slice 0.10 s).
"""

from __future__ import annotations

import math
import re
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mace_sgl.trainer.sliced import SlicedDPO, SliceSpec, run_to_end

# Prompts with short answers of definite content (facts, a list), which a preference
# about style should not break. Fixed, so that every version is measured the same way.
# Open questions make poor canaries for `keep`: a benign rephrasing of "Name three
# colours." ("Sure! Here are three more colours: * Red: a classic ...") kept 0.33 of the
# base answer's words in `benchmarks.align` (2026-12-02), a false refusal.
CANARY_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "List the first three months of the year."}],
    [{"role": "user", "content": "How many days are there in a week?"}],
    [{"role": "user", "content": "What is the chemical symbol for gold?"}],
]
# Open questions: the content of their answers, not a fact, is what a slide into generic
# or empty-of-content answers changes. Neither these nor rephrasings of them are prompts
# of the anchor (trainer/anchor.py) or of the benchmarks.
OPEN_PROMPTS = [
    [{"role": "user", "content": "What does a doctor do?"}],
    [{"role": "user", "content": "Why do we need sleep?"}],
    [{"role": "user", "content": "What is a volcano?"}],
    [{"role": "user", "content": "How do plants grow?"}],
]
OPEN_BUDGET = 1.5  # an open answer's tokens, in units of --mace-guard-tokens
OPEN_ON_TOPIC = 0.5  # share of a short answer's content words from the base answer/prompt
LOOP_NGRAM, LOOP_REPEATS = 4, 3
ATTRIBUTE_KL = 0.05  # nats/token: below it an answer is one the base model gives as well
# Words that carry no content of their own: an answer may gain or lose them freely.
FUNCTION_WORDS = frozenset(
    "a an the and or but so of to in on at by for with from as is are was were be been it "
    "its this that these those there here i you he she we they me my your our their his her "
    "them us do does did has have had not no yes can will would could should may might "
    "which what who whom whose when where why how than then also very just all any some "
    "such into about over out up if because".split()
)


def content_words(text: str) -> set[str]:
    """The lower-cased words of letters or digits in `text`, without FUNCTION_WORDS and
    single letters (the "s" of "it's")."""
    found = re.findall(r"[^\W_]+", text.lower())
    return {w for w in found if (len(w) > 1 or w.isdigit()) and w not in FUNCTION_WORDS}


def loops(ids: list[int]) -> bool:
    """One token n-gram of LOOP_NGRAM tokens seen LOOP_REPEATS times or more."""
    seen: dict[tuple[int, ...], int] = {}
    for i in range(len(ids) - LOOP_NGRAM + 1):
        gram = tuple(ids[i : i + LOOP_NGRAM])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= LOOP_REPEATS:
            return True
    return False


@dataclass
class Answers:
    """Greedy answers to a set of prompts, and their KL from the base when measured."""

    tokens: list[list[int]]  # each answer's tokens, up to and with the end token
    kl_per_token: float = 0.0  # mean KL(candidate || base) over the answers' tokens
    kl_by_answer: list[float] = field(default_factory=list)  # the same, per answer
    states: PromptStates | None = None  # the answering model's own (asked without base)


@dataclass
class Reading:
    """The guard's measurement of one candidate version, as /mace/status shows it."""

    version: int  # the version it would have become
    kl_per_token: float
    kl_by_answer: list[float]
    keep_by_answer: list[float]  # share of the base answer's content words kept (1.0 where
    # the adapter did not make the answer, or the base answer has none); factual, then open
    on_topic_by_answer: list[float]  # open answers: share of their content words drawn
    # from the base answer or the prompt
    empty: int  # new empty answers (the base's answer to that prompt is not empty)
    loops: int  # new looping answers
    published: bool
    why: str  # "" when published
    answers: list[str] = field(default_factory=list)  # the candidate's, cut to 80 chars


class Guard:
    """Decides whether a candidate version may be published (see the module docstring)."""

    def __init__(
        self,
        dpo: SlicedDPO,
        prompts: list[list[int]],
        eos_id: int,
        decode: Any,
        max_kl: float,
        max_new_tokens: int = 16,
        min_keep: float = 0.5,
        open_prompts: list[tuple[list[int], str]] = (),
        open_keep: float = 0.0,
        merge: bool = False,
    ) -> None:
        """prompts: the factual canary prompts as token ids (chat template applied);
        decode: token ids -> text; max_kl: the bound on kl_per_token (nats); min_keep: the
        least share of a base answer's content words each factual answer must keep;
        open_prompts: (token ids, text) of the open canaries, answered with OPEN_BUDGET x
        max_new_tokens and judged by open_keep (module docstring; 0: none asked);
        merge: the candidate answers with its adapter merged into a copy of the weights
        (`greedy_answers`; the peft model must be `SlicedDPO.mergeable`)."""
        if merge and not dpo.mergeable():
            raise ValueError("the guard's merged decode needs peft LoRA Linear layers only")
        self.merge = merge
        self.dpo = dpo
        self.factual = len(prompts)
        self.prompts = list(prompts)
        self.open_topics: list[set[str]] = []
        if open_keep:  # 0 asks no open prompt
            self.prompts += [ids for ids, _ in open_prompts]
            self.open_topics = [content_words(text) for _, text in open_prompts]
        self.eos_id = eos_id
        self.decode = decode
        self.max_kl = max_kl
        self.max_new_tokens = max_new_tokens
        self.min_keep = min_keep
        self.open_keep = open_keep
        self.log = GuardLog()  # the record of `check` calls that name no other
        base = run_to_end(self.answer_slices(adapter=False, base=None, scale=1.0))
        self.base_states = base.states  # each check's teacher forcing starts from them
        self.base_tokens = base.tokens
        self.base_answers = [self.decode(t)[:80] for t in base.tokens]  # for the status
        texts = [self._text(t) for t in base.tokens]
        self.base_empty = [not x.strip() for x in texts]
        self.base_loops = [loops(t) for t in base.tokens]
        self.base_words = [content_words(x) for x in texts]

    @classmethod
    def for_config(cls, dpo: SlicedDPO, tokenizer: Any, cfg: Any) -> Guard:
        """The guard of a MaceConfig: CANARY_PROMPTS and OPEN_PROMPTS in the tokenizer's
        chat template, the --mace-guard-* bounds."""
        from mace_sgl.templating import encode_pair

        return cls(
            dpo,
            [encode_pair(tokenizer, m, "")[0] for m in CANARY_PROMPTS],
            tokenizer.eos_token_id,
            tokenizer.decode,
            cfg.guard_max_kl,
            cfg.guard_tokens,
            cfg.guard_min_keep,
            [(encode_pair(tokenizer, m, "")[0], m[-1]["content"]) for m in OPEN_PROMPTS],
            cfg.guard_open_keep,
            merge=guard_merges(cfg.guard_merge, dpo),
        )

    def _text(self, tokens: list[int]) -> str:
        """An answer's text, without the end token."""
        return self.decode([t for t in tokens if t != self.eos_id])

    def _keep(self, i: int, text: str) -> float:
        """Share of base answer i's content words that `text` (an answer) contains."""
        base = self.base_words[i]
        if not base or self.base_empty[i] or self.base_loops[i]:
            return 1.0
        return len(base & content_words(text)) / len(base)

    def _on_topic(self, i: int, text: str) -> float:
        """Share of `text`'s content words found in base answer i or in open prompt i's
        own words (0 for an answer without content words)."""
        mine = content_words(text)
        known = self.base_words[i] | self.open_topics[i - self.factual]
        return len(mine & known) / len(mine) if mine else 0.0

    def _holds_content(self, keep: float, on_topic: float) -> bool:
        """An open answer keeps its base answer's content, or is short and on topic."""
        return keep >= self.open_keep or (keep >= self.open_keep / 2 and on_topic >= OPEN_ON_TOPIC)

    def check(
        self, version: int, log: GuardLog | None = None
    ) -> Generator[SliceSpec, None, Reading]:
        """Measure the adapter as it is now (the candidate); returns the Reading, whose
        `published` says whether it passed. Counts refusals by their first reason in `log`
        (each tenant keeps its own; the base answers are shared)."""
        log = log if log is not None else self.log
        got = yield from self.answer_slices(adapter=True, base=self.base_states, scale=1.5)
        ours = [kl >= ATTRIBUTE_KL for kl in got.kl_by_answer]  # the adapter's doing
        texts = [self._text(t) for t in got.tokens]
        keep = [
            self._keep(i, x) if o else 1.0 for i, (x, o) in enumerate(zip(texts, ours, strict=True))
        ]
        lost = sum(k < self.min_keep for k in keep[: self.factual])
        on_topic = [self._on_topic(i, texts[i]) for i in range(self.factual, len(texts))]
        off = sum(
            o and not self._holds_content(k, t)
            for k, t, o in zip(keep[self.factual :], on_topic, ours[self.factual :], strict=True)
        )
        empty = sum(
            not x.strip() and not b and o
            for x, b, o in zip(texts, self.base_empty, ours, strict=True)
        )
        looping = sum(
            loops(t) and not b and o
            for t, b, o in zip(got.tokens, self.base_loops, ours, strict=True)
        )
        why = ""
        if not math.isfinite(got.kl_per_token) or got.kl_per_token > self.max_kl:
            why = f"kl {got.kl_per_token:.3f} nats/token > {self.max_kl:g}"
            log.refused["kl"] += 1
        elif lost:
            why = f"{lost} canary answer(s) kept < {self.min_keep:g} of the base's content"
            log.refused["keep"] += 1
        elif off and off * 2 >= len(on_topic):
            why = f"{off} of {len(on_topic)} open answers lost the base's content"
            log.refused["content"] += 1
        elif empty:
            why = f"{empty} canary answer(s) became empty"
            log.refused["empty"] += 1
        elif looping:
            why = f"{looping} canary answer(s) loop"
            log.refused["loop"] += 1
        log.checked += 1
        log.last = Reading(
            version=version,
            kl_per_token=got.kl_per_token,
            kl_by_answer=[round(k, 4) for k in got.kl_by_answer],
            keep_by_answer=[round(k, 3) for k in keep],
            on_topic_by_answer=[round(t, 3) for t in on_topic],
            empty=empty,
            loops=looping,
            published=not why,
            why=why,
            answers=[self.decode(t)[:80] for t in got.tokens],
        )
        return log.last

    def answer_slices(
        self, adapter: bool, base: PromptStates | None, scale: float
    ) -> Generator[SliceSpec, None, Answers]:
        """The canary prompts' greedy answers (see `greedy_answers`), each up to `scale`
        times its budget: max_new_tokens for a factual prompt, OPEN_BUDGET times that for
        an open one."""
        budgets = [self.max_new_tokens] * self.factual
        budgets += [OPEN_BUDGET * self.max_new_tokens] * (len(self.prompts) - self.factual)
        limits = [int(b * scale) for b in budgets]
        return greedy_answers(
            self.dpo, self.prompts, self.eos_id, adapter, base, limits, merge=self.merge
        )

    def status(self, log: GuardLog | None = None) -> dict[str, Any]:
        log = log if log is not None else self.log
        return {
            "merged_decode": self.merge,
            "max_kl": self.max_kl,
            "min_keep": self.min_keep,
            "open_keep": self.open_keep,
            **log.status(),
            "base_answers": self.base_answers,
        }


def guard_merges(setting: str, dpo: SlicedDPO) -> bool:
    """--mace-guard-merge: on, off, or auto (on where the trainer runs on the CPU, whose
    memory holds the copy of the adapted weights easily, and its peft model allows it;
    off on a GPU, whose memory the trainer shares with SGLang's KV cache)."""
    if setting == "auto":
        return dpo.device.type == "cpu" and dpo.mergeable()
    return setting == "on"


@dataclass
class GuardLog:
    """What the guard measured for one tenant: checks, refusals by reason, the last
    reading."""

    checked: int = 0
    refused: dict[str, int] = field(
        default_factory=lambda: {"kl": 0, "keep": 0, "content": 0, "empty": 0, "loop": 0}
    )
    last: Reading | None = None

    def status(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "refused": sum(self.refused.values()),
            "refused_by": dict(self.refused),
            "last": asdict(self.last) if self.last else None,
        }


@dataclass
class PromptStates:
    """The base model's state after each prompt (adapter off): the prompt's KV cache, per
    layer (keys, values), and the next-token log-probs. The base weights never change,
    so the guard keeps them from its first pass over the canaries and scores every
    candidate's answers over them: only the answer tokens run again."""

    kv: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per prompt, per layer
    first: list[torch.Tensor]  # per prompt: log-probs of the first answer token


def common_prefix(prompts: list[list[int]]) -> int:
    """Length of the token prefix every prompt shares (the chat template's system turn),
    leaving each prompt at least one token of its own."""
    n = min(len(p) for p in prompts) - 1
    for i in range(max(n, 0)):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return max(n, 0)


def greedy_answers(
    dpo: SlicedDPO,
    prompts: list[list[int]],
    eos_id: int,
    adapter: bool,
    base: PromptStates | None,
    max_new: int | list[int],
    merge: bool = False,
) -> Generator[SliceSpec, None, Answers]:
    """Greedy answers of the model (adapter on or off), up to `max_new` tokens (one
    bound, or one per prompt), to `prompts` (token ids). The prefix the prompts share is
    one slice, each prompt's own tokens over it a slice of their own (the largest slices,
    about as long as a short serving prefill); then the prompts decode together, one
    slice per position, over their caches joined and left-padded (masked). With `base`
    (the base model's PromptStates for these prompts), one more slice per answer runs the
    base model over the answer tokens after its cached prompt (teacher forcing) and the
    mean KL(model || base) per answer token comes back too.
    Answers end with `eos_id` unless they ran to `max_new` tokens; without `base`,
    `states` holds the model's own PromptStates (the base's when `adapter` is False).
    With `merge` (and `adapter`), the decode runs with the adapter merged into a copy of
    the weights it adapts (`SlicedDPO.merged_weights`, dropped at the end): each prefill
    slice merges its share of the LoRA modules, so no slice grows by the whole merge,
    and a module runs merged from the slice that merged it on."""
    from transformers import DynamicCache

    merged: dict[Any, torch.Tensor] = {}
    unmerged = list(dpo.lora_all) if merge and adapter else []
    share = math.ceil(len(unmerged) / (len(prompts) + 1))  # the prefill slices: at most n + 1

    def mode() -> Any:  # the model's slices: the adapter as asked, merged as far as done
        if unmerged:
            merged.update(dpo.merged_weights(unmerged[:share]))
            del unmerged[:share]
        return dpo._mode(adapter, grad=False, merged=merged)

    lm, dev = dpo.lm, dpo.device
    n = len(prompts)
    if base is not None and len(base.first) != n:
        raise ValueError(f"base states for {len(base.first)} prompts, {n} prompts given")
    limits = max_new if isinstance(max_new, list) else [max_new] * n
    shared = common_prefix(prompts)
    prefix: list[tuple[torch.Tensor, torch.Tensor]] = []
    if shared:
        yield SliceSpec("guard", shared)
        with mode():
            out = lm(
                input_ids=torch.tensor([prompts[0][:shared]], device=dev),
                use_cache=True,
                logits_to_keep=1,  # no token of the prefix is predicted
            )
        prefix = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    states = PromptStates([], [])
    for prompt in prompts:
        yield SliceSpec("guard", len(prompt) - shared)
        with mode():
            out = lm(
                input_ids=torch.tensor([prompt[shared:]], device=dev),
                past_key_values=DynamicCache(prefix) if shared else None,
                use_cache=True,
                logits_to_keep=1,
            )
        states.kv.append([(layer.keys, layer.values) for layer in out.past_key_values.layers])
        states.first.append(F.log_softmax(out.logits[0, -1].float(), dim=-1))
    del prefix, out
    logps = list(states.first)  # each prompt's next-token log-probs
    longest = max(len(p) for p in prompts)
    mask = torch.zeros(n, longest, dtype=torch.long, device=dev)
    for i, prompt in enumerate(prompts):
        mask[i, longest - len(prompt) :] = 1

    def left_padded(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.pad(t, (0, 0, longest - t.shape[-2], 0)) for t in ts])

    cache: Any = DynamicCache(
        [
            (
                left_padded([kv[j][0] for kv in states.kv]),
                left_padded([kv[j][1] for kv in states.kv]),
            )
            for j in range(len(states.kv[0]))
        ]
    )
    kept = states if base is None else None  # a candidate's own are not kept: free them
    del states
    answers: list[list[int]] = [[] for _ in prompts]
    mine: list[list[torch.Tensor]] = [[] for _ in prompts]  # log-probs behind each token
    done = [False] * n
    while True:
        for i in range(n):
            if done[i]:
                continue
            if base is not None:
                mine[i].append(logps[i])
            answers[i].append(int(logps[i].argmax()))
            done[i] = answers[i][-1] == eos_id or len(answers[i]) >= limits[i]
        if all(done):
            break
        yield SliceSpec("guard", n)  # one position of every answer
        # A finished answer is fed its last token again; what comes out is not read.
        tokens = torch.tensor([[a[-1]] for a in answers], device=dev)
        pos = torch.tensor(
            [[len(p) + len(a) - 1] for p, a in zip(prompts, answers, strict=True)], device=dev
        )
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        with mode():
            out = lm(
                input_ids=tokens,
                position_ids=pos,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        cache = out.past_key_values
        logps = list(F.log_softmax(out.logits[:, -1].float(), dim=-1))
    del cache
    merged.clear()
    by_answer: list[float] = []
    kl_total, tokens_total = 0.0, 0
    for i, (answer, own) in enumerate(zip(answers, mine, strict=True)) if base is not None else ():
        # position j of `theirs` is the base's log-probs for answer token j
        theirs = base.first[i][None]
        if len(answer) > 1:
            yield SliceSpec("guard", len(answer) - 1)
            with dpo._mode(False, grad=False):
                out = lm(
                    input_ids=torch.tensor([answer[:-1]], device=dev),
                    past_key_values=DynamicCache(base.kv[i]),
                    use_cache=True,
                )
            theirs = torch.cat([theirs, F.log_softmax(out.logits[0].float(), dim=-1)])
        ours = torch.stack(own)
        p = ours.exp()
        kl = torch.where(p > 0, p * (ours - theirs), 0.0).sum(-1)  # nats per token
        by_answer.append(float(kl.mean()))
        kl_total += float(kl.sum())
        tokens_total += len(answer)
    kl_mean = kl_total / tokens_total if tokens_total else 0.0
    return Answers(answers, kl_mean, by_answer, kept)
