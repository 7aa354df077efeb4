"""The publish guard on the tiny model: it refuses versions driven into empty answers or
loops, and publishes one that learned a benign preference."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mace_sgl.templating import encode_pair
from mace_sgl.trainer.guard import Answers, Guard, content_words, loops
from mace_sgl.trainer.sliced import Pair, SlicedDPO, run_to_end

CANARY = [
    [{"role": "user", "content": "The capital of France is"}],
    [{"role": "user", "content": "A scheduler batches prefill"}],
    [{"role": "user", "content": "Once upon a time"}],
]
TRAIN = [[{"role": "user", "content": f"Question {i}: say something"}] for i in range(4)]
OPEN = [
    [{"role": "user", "content": "Describe a forest"}],
    [{"role": "user", "content": "Explain a river"}],
    [{"role": "user", "content": "Talk about cities"}],
]


def setup(
    model_dir: Path, lr: float, max_kl: float = 0.5, min_keep: float = 0.5, open_keep: float = 0.0
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    dpo = SlicedDPO(model, beta=0.1, lr=lr)
    prompts = [encode_pair(tok, m, "")[0] for m in CANARY]
    guard = Guard(
        dpo, prompts, tok.eos_token_id, tok.decode, max_kl=max_kl, max_new_tokens=12,
        min_keep=min_keep, open_prompts=[(encode_pair(tok, m, "")[0], m[0]["content"])
                                         for m in OPEN], open_keep=open_keep,
    )  # fmt: skip
    return tok, dpo, guard


def pairs(tok, chosen: str, rejected_of) -> list[Pair]:
    out = []
    for i, messages in enumerate(TRAIN):
        prompt, c = encode_pair(tok, messages, chosen)
        _, r = encode_pair(tok, messages, rejected_of(i))
        out.append(Pair(i, prompt, c, r))
    return out


def train(dpo: SlicedDPO, batch: list[Pair], steps: int) -> list[float]:
    margins = []
    for s in range(steps):
        result = run_to_end(dpo.step_slices([batch[s % len(batch)]]))
        assert result.ok, result.error
        margins.append(result.margins[batch[s % len(batch)].sample_id])
    return margins


def test_loop_detector():
    assert loops([5, 6, 7, 8] * 3)
    assert not loops(list(range(30)))
    assert not loops([1, 2, 3, 4, 1, 2, 3, 4, 9])  # twice is not a loop


def test_base_model_passes_its_own_guard(tiny_model_dir: Path):
    _, _, guard = setup(tiny_model_dir, lr=1e-3)
    reading = run_to_end(guard.check(1))
    assert reading.published and reading.kl_per_token == pytest.approx(0.0, abs=1e-5)
    assert guard.status()["checked"] == 1 and guard.status()["refused"] == 0


def test_guard_refuses_a_version_driven_into_empty_answers(tiny_model_dir: Path):
    tok, dpo, guard = setup(tiny_model_dir, lr=3e-2, max_kl=1e9, min_keep=0.0)  # only empty
    # chosen: the end token at once (an empty answer); rejected: a real answer
    train(dpo, pairs(tok, "", lambda i: f"The capital of France is Paris {i}."), 12)
    reading = run_to_end(guard.check(1))
    assert not reading.published and reading.empty > 0, reading
    status = guard.status()
    assert status["refused_by"]["empty"] == 1 and status["last"]["why"] == reading.why
    # the KL bound alone refuses it too: collapse moves every token's distribution
    assert reading.kl_per_token > 0.5


def test_guard_refuses_a_version_driven_into_a_loop(tiny_model_dir: Path):
    tok, dpo, guard = setup(tiny_model_dir, lr=3e-2, max_kl=1e9, min_keep=0.0)  # only loops
    loop = " ".join(["Paris Rome"] * 12)
    train(dpo, pairs(tok, loop, lambda i: "Large language models answer questions."), 12)
    reading = run_to_end(guard.check(1))
    assert not reading.published and reading.loops > 0, reading
    assert guard.status()["refused_by"]["loop"] == 1


def test_guard_publishes_a_benign_preference_that_was_learned(tiny_model_dir: Path):
    tok, dpo, guard = setup(tiny_model_dir, lr=1e-3)
    margins = train(dpo, pairs(tok, "Certainly! Here it is.", lambda i: f"no {i}"), 8)
    assert margins[-1] > margins[0]  # the preference is being learned
    reading = run_to_end(guard.check(1))
    assert reading.published, reading
    assert 0.0 < reading.kl_per_token < guard.max_kl


@pytest.mark.parametrize("kl,published", [(0.003, True), (0.2, False)])
def test_a_loop_counts_only_where_the_adapter_made_it(tiny_model_dir: Path, kl, published):
    """A near tie flipped by a tiny change can open an answer that the base model itself
    continues into a loop (seen on SmolLM2 at KL 0.003): not the adapter's doing."""
    _, _, guard = setup(tiny_model_dir, lr=1e-3, min_keep=0.0)  # only loops
    n = len(guard.prompts)
    looping = [[7, 8, 9, 10] * 3] + [list(t) for t in guard.base_tokens[1:]]
    by_answer = [kl] + [0.0] * (n - 1)

    def fake(adapter: bool, base: object, scale: float):
        yield from ()
        return Answers(looping, kl / n, by_answer)

    guard.answer_slices = fake
    reading = run_to_end(guard.check(1))
    assert reading.published is published and reading.loops == (0 if published else 1)


def test_content_words():
    base = content_words("The capital of France is Paris.")
    assert base == {"capital", "france", "paris"}
    assert base <= content_words("Certainly! The capital of France is Paris.")
    assert not base & content_words("No, no, no, no.")
    assert content_words("A week has 7 days; bien sûr!") == {"week", "7", "days", "bien", "sûr"}
    assert content_words("It's 1 day") == {"1", "day"}  # no lone letters, digits stay


@pytest.mark.parametrize(
    "answer,kl,why",
    [
        ("Completely unrelated words instead", 0.2, "keep"),  # the content is gone
        ("Completely unrelated words instead", 0.003, ""),  # not the adapter's doing
        ("Certainly! {base}", 0.2, ""),  # an opener keeps every content word
    ],
)
def test_guard_refuses_an_answer_that_lost_the_base_content(tiny_model_dir, answer, kl, why):
    tok, _, guard = setup(tiny_model_dir, lr=1e-3, max_kl=1e9)  # only keep (and empty/loop)
    assert guard.base_words[0], "the test needs a base answer with content words"
    n = len(guard.prompts)
    text = answer.format(base=tok.decode(guard.base_tokens[0], skip_special_tokens=True))
    tokens = [tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]]
    tokens += [list(t) for t in guard.base_tokens[1:]]

    def fake(adapter: bool, base: object, scale: float):
        yield from ()
        return Answers(tokens, kl / n, [kl] + [0.0] * (n - 1))

    guard.answer_slices = fake
    reading = run_to_end(guard.check(1))
    assert reading.published is (why == ""), reading
    assert guard.status()["refused_by"]["keep"] == (1 if why == "keep" else 0)
    assert reading.keep_by_answer[0] == (0.0 if why else 1.0)


def _open_answer(tok, guard: Guard, i: int, kind: str) -> list[int]:
    """A candidate's answer (tokens) to open canary i (index into guard.prompts)."""
    base = list(guard.base_tokens[i])  # the random model's bytes: kept as tokens
    if kind == "base":
        return base
    if kind == "opener":
        return tok.encode("Certainly! ", add_special_tokens=False) + base
    if kind == "vacuous":  # fluent, and none of the base answer's content
        text = "Certainly! The answer to this question is:"
    elif kind == "brief":  # about half of the base's content words and nothing else
        words = sorted(guard.base_words[i])
        text = " ".join(words[: math.ceil(0.45 * len(words))])
    else:
        raise ValueError(kind)
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


@pytest.mark.parametrize(
    "kinds,kl,why",
    [
        (("vacuous", "vacuous", "vacuous"), 0.2, "content"),
        (("vacuous", "vacuous", "base"), 0.2, "content"),  # half or more lost it
        (("vacuous", "base", "opener"), 0.2, ""),  # one open answer may miss
        (("brief", "brief", "brief"), 0.2, ""),  # short and on topic
        (("opener", "opener", "opener"), 0.2, ""),  # a style keeps the content
        (("vacuous", "vacuous", "vacuous"), 0.003, ""),  # not the adapter's doing
    ],
)
def test_open_answers_must_keep_content_or_be_short_and_on_topic(tiny_model_dir, kinds, kl, why):
    tok, _, guard = setup(tiny_model_dir, lr=1e-3, max_kl=1e9, min_keep=0.0, open_keep=0.3)
    first = guard.factual
    assert len(guard.prompts) == first + len(OPEN)
    for i in range(first, len(guard.prompts)):
        assert len(guard.base_words[i]) >= 2, "the test needs base answers with content"
        assert not guard.base_loops[i] and not guard.base_empty[i]
    # A high bound, so that "brief" (just under the bound, at least half of it, on the
    # tiny model's short answers) is decided by the on-topic rule.
    guard.open_keep = 0.9
    for i in range(first, len(guard.prompts)):
        brief = guard._text(_open_answer(tok, guard, i, "brief"))
        share = len(content_words(brief)) / len(guard.base_words[i])
        assert guard.open_keep / 2 <= share < guard.open_keep
    tokens = [list(t) for t in guard.base_tokens[:first]]
    tokens += [_open_answer(tok, guard, first + j, k) for j, k in enumerate(kinds)]
    by_answer = [0.0] * first + [kl] * len(OPEN)

    def fake(adapter: bool, base: object, scale: float):
        yield from ()
        return Answers(tokens, kl / 2, by_answer)

    guard.answer_slices = fake
    reading = run_to_end(guard.check(1))
    seen = (reading.why, reading.keep_by_answer, reading.on_topic_by_answer)
    assert reading.published is (why == ""), seen
    assert guard.status()["refused_by"]["content"] == (1 if why else 0)
    assert guard.status()["open_keep"] == guard.open_keep
    assert len(reading.on_topic_by_answer) == len(OPEN)
    if kinds[0] == "brief" and kl > 0.1:
        assert all(t >= 0.5 for t in reading.on_topic_by_answer)
        assert all(k < guard.open_keep for k in reading.keep_by_answer[first:])


def test_open_prompts_are_skipped_when_their_check_is_off(tiny_model_dir: Path):
    _, _, off = setup(tiny_model_dir, lr=1e-3, open_keep=0.0)
    assert len(off.prompts) == off.factual == len(CANARY)
    reading = run_to_end(off.check(1))
    assert reading.published and reading.on_topic_by_answer == []


def test_batched_answers_equal_one_prompt_at_a_time(tiny_model_dir: Path):
    # The guard prefills its canary prompts over their shared prefix, decodes them
    # together over left-padded, joined caches, and scores the answers with the base model
    # over its cached prompts: the answers and KLs must be what each prompt gets alone,
    # without caches.
    import torch.nn.functional as F

    from mace_sgl.trainer.guard import common_prefix, greedy_answers

    tok, dpo, guard = setup(tiny_model_dir, lr=1e-2)
    train(dpo, pairs(tok, "Sure, fine.", lambda i: f"No {i}."), steps=3)
    prompts = guard.prompts + [encode_pair(tok, TRAIN[0], "")[0]]  # lengths differ
    assert len({len(p) for p in prompts}) > 1
    assert common_prefix(prompts) > 0  # the shared-prefix slice runs
    limits = [12, 5, 12, 1][: len(prompts)]  # each prompt's own bound; one answer of 1
    base = run_to_end(greedy_answers(dpo, prompts, tok.eos_token_id, False, None, 1)).states
    got = run_to_end(greedy_answers(dpo, prompts, tok.eos_token_id, True, base, max_new=limits))
    assert any(len(a) == 1 for a in got.tokens)  # its KL needs no teacher-forced pass
    # the base states are read, never changed: a second check over them reads the same
    again = run_to_end(greedy_answers(dpo, prompts, tok.eos_token_id, True, base, limits))
    assert again.kl_by_answer == got.kl_by_answer and again.tokens == got.tokens
    kls = []
    for prompt, answer, limit in zip(prompts, got.tokens, limits, strict=True):
        ids = list(prompt)
        with dpo._mode(True, grad=False):
            for _ in range(limit):  # no cache, no padding: the plain definition
                nxt = int(dpo.lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        assert answer == ids[len(prompt) :]
        full = torch.tensor([ids])
        n = len(answer)
        with dpo._mode(True, grad=False):
            ours = F.log_softmax(dpo.lm(input_ids=full).logits[0, -n - 1 : -1].float(), -1)
        with dpo._mode(False, grad=False):
            base = F.log_softmax(dpo.lm(input_ids=full).logits[0, -n - 1 : -1].float(), -1)
        kls.append(float((ours.exp() * (ours - base)).sum(-1).mean()))
    assert max(kls) > 1e-4  # the adapter moved the model, so the KLs are a real check
    assert got.kl_by_answer == pytest.approx(kls, rel=1e-3, abs=1e-5)


def test_merged_decode_answers_as_the_unmerged_adapter(tiny_model_dir: Path, monkeypatch):
    # --mace-guard-merge: the candidate answers with its adapter merged into a copy of the
    # adapted weights. Same answers and KLs as peft's own LoRA layers, the base weights
    # (SGLang's, shared) untouched, and every module back to its own forward after.
    from mace_sgl.trainer.guard import common_prefix, guard_merges

    tok, dpo, guard = setup(tiny_model_dir, lr=1e-2)
    train(dpo, pairs(tok, "Sure, fine.", lambda i: f"No {i}."), steps=3)
    assert dpo.mergeable() and guard_merges("auto", dpo)  # the tiny model runs on the CPU
    assert not guard_merges("off", dpo) and guard_merges("on", dpo)
    from peft.tuners.lora import Linear as LoraLinear

    adapted = []  # peft's own LoRA forwards run with the adapter on
    own = LoraLinear.forward

    def counted(self, x, *args, **kwargs):
        adapted.append(not self.disable_adapters)
        return own(self, x, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "forward", counted)
    before = {n: p.clone() for n, p in dpo.lm.named_parameters()}
    base = guard.base_states
    plain = run_to_end(guard.answer_slices(adapter=True, base=base, scale=1.5))
    assert any(adapted)
    adapted.clear()
    guard.merge = True
    gen = guard.answer_slices(adapter=True, base=base, scale=1.5)
    n = len(guard.prompts)
    assert common_prefix(guard.prompts) > 0  # n + 1 prefill slices, each merges a share
    for _ in range(n + 2):  # up to the first decode slice: the prefill has run
        next(gen)
    # the prefill slices ran peft's layers only where their module was not merged yet
    assert 0 < sum(adapted) < len(dpo.lora_all) * (n + 1)
    adapted.clear()
    merged = run_to_end(gen)
    assert adapted and not any(adapted)  # decoding: only the base's teacher forcing ran peft's
    assert max(plain.kl_by_answer) > 1e-4  # the adapter moved the model: a real comparison
    assert merged.tokens == plain.tokens
    assert merged.kl_by_answer == pytest.approx(plain.kl_by_answer, rel=1e-3, abs=1e-5)
    for n, p in dpo.lm.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all("forward" not in vars(m) for m in dpo.lora_all)
    # the merged weights are the adapter's: with it switched off they equal the base's
    for m, w in dpo.merged_weights().items():
        assert not torch.equal(w, m.get_base_layer().weight)
    with torch.no_grad():
        for b in dpo.lora_b:
            b.zero_()
    for m, w in dpo.merged_weights().items():
        assert torch.equal(w, m.get_base_layer().weight)
    reading = run_to_end(guard.check(1))
    assert reading.published and reading.kl_per_token == pytest.approx(0.0, abs=1e-5)
    assert guard.status()["merged_decode"] is True


def test_common_prefix_leaves_each_prompt_a_token_of_its_own():
    from mace_sgl.trainer.guard import common_prefix

    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2  # identical: the last token is its own
    assert common_prefix([[1, 2], [1]]) == 0
    assert common_prefix([[7, 1], [8, 1]]) == 0
