"""benchmarks.recipe: recipe specs, the judge, the loop's pairs, one seed on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import recipe
from benchmarks.phases import load_phases, parse_phases
from benchmarks.recipe import judge, parse_recipe, run_recipe
from mace_sgl.config import MaceConfig


def test_recipe_specs_parse_and_bad_ones_say_why():
    assert parse_recipe("server") == ("server", {})
    assert parse_recipe("d:adapter_decay=0.3,rpo_alpha=1") == (
        "d",
        {"adapter_decay": 0.3, "rpo_alpha": 1.0},
    )
    assert parse_recipe("e:dpo_span=edit,lr=1e-3") == ("e", {"dpo_span": "edit", "lr": 1e-3})
    for spec, why in [
        (":lr=1e-4", "name"),
        ("x:decay=0.3", "key=value"),  # not a recipe key
        ("x:max_train_count=1.5", "whole number"),
        ("x:max_train_count=0", "max_train_count"),
        ("x:lr", "key=value"),
        ("x:lr=fast", "not a number"),
        ("x:lr=0", "> 0"),
        ("x:rpo_alpha=nan", "finite"),
        ("x:anchor_alpha=-1", ">= 0"),
        ("x:adapter_decay=1", "adapter_decay"),  # MaceConfig's own bound
        ("x:dpo_span=tokens", "dpo_span"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_recipe(spec)


def test_judge_counts_wins_and_degenerate_answers_by_drift_rules():
    concise, opener, _ = load_phases()
    base = ["Paris is the capital of France, a country in western Europe with many cities."]
    assert judge(opener, base, base)["win_rate"] == 0.5  # the base ties itself
    got = judge(opener, ["Certainly! " + base[0]], base)
    assert got == {"win_rate": 1.0, "degenerate_share": 0.0, "words": 15}
    got = judge(concise, ["No, no, no."], base)  # a refusal loses and is degenerate
    assert got["win_rate"] == 0.0 and got["degenerate_share"] == 1.0


class FakeLearner:
    """Answers from a script, steps recorded: the loop without a model."""

    def __init__(self, model_path, cfg, seed, dtype) -> None:
        self.served = iter(["Certainly! Done.", "", "Plain answer.", "Plain answer."])
        self.pairs: list[tuple[str, str]] = []
        FakeLearner.last = self

    def answers(self, prompts, max_new, adapter=True):
        if len(prompts) > 1 or not adapter:  # held-out evaluation or base answers
            return ["Plain answer." for _ in prompts]
        return [next(self.served)]

    def step(self, kept):
        self.pairs.append((kept.chosen, kept.rejected))
        return 1.0

    def b_norm(self):
        return float(len(self.pairs))


def test_loop_skips_the_pairs_drift_skips(monkeypatch: pytest.MonkeyPatch):
    """An answer that already satisfies the judge, or an empty one, gives no pair (drift
    posts no feedback for them); the others train one step each."""
    monkeypatch.setattr(recipe, "Learner", FakeLearner)
    phases = parse_phases(
        {
            "phases": [
                {
                    "name": "opener",
                    "judge": {"starts_with": "Certainly"},
                    "edit": {"prepend": "Certainly! "},
                }
            ]
        }  # fmt: skip
    )
    row = run_recipe("m", MaceConfig(), phases, 1, 4, ["a", "b"], ["h1", "h2"], 8, 8)
    assert row["steps"] == 2 and row["skipped"] == 2 and row["failed_steps"] == 0
    assert FakeLearner.last.pairs == [("Certainly! Plain answer.", "Plain answer.")] * 2
    assert row["b_norm.opener"] == 2.0


class LossLearner(FakeLearner):
    """Every answer plain (each gives a pair); a pair's loss is fixed by its prompt."""

    losses: dict[str, float] = {}

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.served = iter(["Plain answer."] * 10)
        self.trained: list[str] = []

    def step(self, kept):
        self.trained.append(kept.prompt)
        return self.losses[kept.prompt]


@pytest.mark.parametrize(
    "losses, mtc, replay, want",
    [
        ((1.0, 2.0, 0.5), 3, 1, [0, 0, 1, 1, 2, 1]),  # the highest last loss with a turn left
        ((1.0, 1.0, 1.0), 3, 1, [0, 0, 1, 0, 2, 1]),  # the oldest on ties
        ((1.0, 2.0, 0.5), 2, 9, [0, 0, 1, 1, 2, 2]),  # each pair max_train_count times
        ((1.0, 2.0, 0.5), 3, 0, [0, 1, 2]),  # no replay: each pair once
    ],
)
def test_replay_follows_the_servers_pick_order(
    monkeypatch: pytest.MonkeyPatch, losses, mtc, replay, want
):
    """--replay N: after each new pair, up to N steps on kept pairs in the server's order
    (sidecar/store.py::pick_next): the highest last loss, the oldest on ties, each pair
    at most max_train_count times."""
    import random

    monkeypatch.setattr(recipe, "Learner", LossLearner)
    phases = parse_phases(
        {"phases": [{"name": "o", "judge": {"starts_with": "Zq"}, "edit": {"prepend": "Zq "}}]}
    )
    train = ["p1", "p2", "p3"]
    arrived = list(train)
    random.Random(1).shuffle(arrived)  # run_recipe's order for seed 1
    LossLearner.losses = dict(zip(arrived, losses, strict=True))
    cfg = MaceConfig(max_train_count=mtc)
    row = run_recipe("m", cfg, phases, 1, 3, train, ["h"], 8, 8, replay=replay)
    assert LossLearner.last.trained == [arrived[i] for i in want]
    assert row["steps"] == 3 and row["replays"] == len(want) - 3 and row["failed_steps"] == 0


def test_one_seed_trains_every_phase_and_reports_each(tiny_model_dir: Path):
    phases = parse_phases(
        {"phases": [{"name": "a", "judge": {"starts_with": "Zq"}, "edit": {"prepend": "Zq "}},
                    {"name": "b", "judge": {"ends_with": "Qz"}, "edit": {"append": " Qz"}}]}
    )  # fmt: skip
    cfg = MaceConfig(lr=1e-3, adapter_decay=0.3, anchor_alpha=0.0)
    row = run_recipe(
        str(tiny_model_dir), cfg, phases, seed=1, steps=2, train=["Tell me about cats."],
        held_out=["Tell me about dogs.", "Tell me about owls."], max_tokens=4,
        eval_max_tokens=6, dtype=torch.float32,
    )  # fmt: skip
    assert row["steps"] + row["skipped"] == 4 and row["failed_steps"] == 0
    assert row["steps"] >= 1 and row[f"b_norm.{phases[-1].name}"] > 0  # it trained
    for p in phases:
        assert f"last_win_rate.{p.name}" in row and f"degenerate.{p.name}" in row
    wins = [row[f"last_win_rate.{p.name}"] for p in phases]
    assert row["win_rate"] == pytest.approx(sum(wins) / len(wins))


def test_guard_kl_takes_every_recipe_flag_it_has():
    from benchmarks.guard_kl import parse_args, recipe

    cfg = recipe(parse_args(["--out", "x", "--lr", "1e-3", "--adapter-decay", "0.3",
                             "--adapter-decay-per", "pair", "--dpo-span", "whole"]))  # fmt: skip
    assert (cfg.lr, cfg.adapter_decay, cfg.adapter_decay_per, cfg.dpo_span) == (
        1e-3,
        0.3,
        "pair",
        "whole",
    )
    assert recipe(parse_args(["--out", "x"])).max_train_count == MaceConfig().max_train_count


def test_an_answer_without_an_end_token_is_cut_and_drifts_held_out_prompts_follow_it(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """Learner.answers_ending calls an answer cut when no end token came within the
    bound, and drift_held_out takes drift's pool prompts whose base answers finished,
    in pool order (benchmarks.drift read_base_answers)."""
    from benchmarks import drift, recipe

    learner = recipe.Learner(str(tiny_model_dir), MaceConfig(), seed=1, dtype=torch.float32)
    end = learner.tok.eos_token_id
    word = next(i for i in range(10, 100) if i != end and i != learner.tok.pad_token_id)

    def generate(input_ids, **kw):  # every second prompt ends after one word
        n = input_ids.shape[1]
        rows = []
        for i in range(input_ids.shape[0]):
            new = [word, end, end] if i % 2 else [word, word, word]
            rows.append(torch.cat([input_ids[i], torch.tensor(new)]))
        assert kw["max_new_tokens"] == 3
        return torch.stack(rows)[:, : n + 3]

    monkeypatch.setattr(learner.model, "generate", generate)
    got = learner.answers_ending(["a", "b", "c", "d"], 3, adapter=False)
    assert [cut for _, cut in got] == [True, False, True, False]
    assert learner.answers(["a", "b"], 3) == [t for t, _ in got[:2]]
    pool = drift.eval_pool()
    assert recipe.drift_held_out(learner, 3, 3) == [pool[1], pool[4], pool[7]]  # waves of 3
