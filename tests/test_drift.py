"""benchmarks.drift over several seeds: means and 95% intervals of every metric."""

from __future__ import annotations

import pytest

from benchmarks.stats import aggregate, mean_ci95


def test_mean_ci95_uses_student_t():
    m, (lo, hi) = mean_ci95([1.0, 2.0, 3.0])
    assert m == 2.0
    assert hi - m == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert m - lo == pytest.approx(hi - m)
    assert mean_ci95([0.5]) == (0.5, [0.5, 0.5])


def test_aggregate_keeps_every_metric_a_number():
    rows = [
        {"win_rate": 0.5, "clpd": 1.0, "guard_refusals": 2, "timeline": [1], "ok": True,
         "late": None, "never": None, "tail": float("nan")},
        {"win_rate": 0.7, "clpd": None, "guard_refusals": 4, "timeline": [2], "ok": True,
         "late": 3.0, "never": None, "tail": 2.0},
        {"win_rate": 0.6, "clpd": 3.0, "guard_refusals": 3, "timeline": [3], "ok": True,
         "late": 5.0, "never": None, "tail": 4.0},
    ]  # fmt: skip
    out = aggregate(rows)
    assert out["win_rate"] == pytest.approx(0.6)
    assert out["guard_refusals"] == 3.0
    # a seed without a figure: the mean of the seeds that have one, and how many
    assert out["clpd"] == 2.0 and out["late"] == 4.0 and out["tail"] == 3.0
    assert out["partial"] == {"clpd": 2, "late": 2, "tail": 2}
    assert set(out["ci95"]) == {"win_rate", "guard_refusals", "clpd", "late", "tail"}
    lo, hi = out["ci95"]["win_rate"]
    assert lo < 0.6 < hi
    assert "never" not in out  # no seed has one: not a metric of this baseline
    assert "timeline" not in out and "ok" not in out and out["seeds"] == rows


# an answer every default phase's edit improves (more than 20 words: concise wins too)
ANSWER = "The sea is big. It is deep and old, and it covers most of the planet, with more life in it than on all the land."


class _Response:
    def __init__(self, body: dict) -> None:
        self.body, self.status_code, self.ok = body, 200, True

    def json(self) -> dict:
        return self.body

    def raise_for_status(self) -> None:
        pass


def test_an_answer_cut_off_at_the_bound_is_told_apart_from_a_finished_one():
    from benchmarks import drift

    class Server:
        def post(self, path: str, body: dict) -> _Response:
            ending = "length" if body["max_tokens"] < 8 else "stop"
            choice = {"message": {"content": "an answer"}, "finish_reason": ending}
            return _Response({"choices": [choice]})

    client = drift.Client(Server(), "tokenizer", 16)
    assert client.answer_ending("q", None, 4) == ("an answer", True)
    assert client.answer_ending("q", None, 16) == ("an answer", False)
    assert client.answer("q", None, 4) == "an answer"


def test_the_client_scores_margins_through_its_own_server(monkeypatch):
    """evaluate's CLPD calls client.logprob: the scoring call of the client's server and
    tokenizer (evaluate's tests use stand-in clients, so they do not see it missing)."""
    from benchmarks import drift

    seen = []
    monkeypatch.setattr(drift, "completion_logprob", lambda *a: seen.append(a) or -1.5)
    client = drift.Client("server", "tokenizer", 16)
    assert client.logprob("q", "a", "live") == -1.5
    assert seen == [("server", "tokenizer", "q", "a", "live")]


def test_run_baseline_counts_serving_windows_and_pauses_training_to_evaluate(tmp_path, monkeypatch):
    """run_baseline without a server: evaluations run between windows of load with
    training paused, every phase gets its own windows and feedback, and the clock counts
    the windows only (an evaluation on 2 cores outlasted the whole load before). Each
    phase's pairs are counted as posted and, from the server's store, as trained; steps
    and pairs handed back come from /mace/status."""
    import argparse
    import time
    from pathlib import Path

    from benchmarks import drift
    from benchmarks.loadgen import RequestResult
    from benchmarks.phases import load_phases
    from sidecar import store

    events: list[tuple] = []

    class Server:
        url = "http://127.0.0.1:1"

        def __init__(self, flags, log, timeout_s) -> None:
            self.paused, self.busy = False, 0.0
            state = Path(flags[flags.index("--mace-state-dir") + 1])
            state.mkdir(parents=True)
            self.store = store.connect(state / "feedback.sqlite3")
            self.steps = self.handed_back = 0

        def get(self, path: str) -> _Response:
            training = {"paused": self.paused, "serving_seconds": self.busy,
                        "train_seconds": 0.0, "trained_tokens": 0,
                        "rejected_versions": 0, "adapter_version": 0,
                        "train_steps": self.steps,
                        "pairs_handed_back": self.handed_back,
                        "pairs_superseded": 2 * self.handed_back,
                        "train_seconds_by_work": {"step": 0.0},
                        "starvation": {"total_s": 0.0, "reason": None}}  # fmt: skip
            return _Response({"model_path": "m", "training": training})

        def post(self, path: str, body: dict) -> _Response:
            if path in ("/mace/train/pause", "/mace/train/resume"):
                self.paused = path.endswith("pause")
            elif path == "/mace/feedback":
                events.append(("feedback", body["chosen"]))
                pair = {"prompt": body["prompt"][0]["content"], "chosen": body["chosen"],
                        "rejected": body["rejected"], "adapter": "default", "weight": 1.0}  # fmt: skip
                ids = store.add_feedback(self.store, [pair])
                # every third pair trains (a step each), the one after it is handed back
                if ids[0] % 3 == 0:
                    self.store.execute(
                        "UPDATE feedback SET train_count = 1, last_loss = 0.5 WHERE id = ?", ids
                    )
                    self.steps += 1
                elif ids[0] == 2:  # its step rolled back: a Result without a loss
                    self.store.execute("UPDATE feedback SET train_count = 1 WHERE id = ?", ids)
                elif ids[0] % 3 == 1:
                    self.handed_back += 1
                return _Response({"ids": ids, "count": 1})
            return _Response({})

        def stop(self) -> None:
            pass

    server: list[Server] = []
    monkeypatch.setattr(
        drift, "Server", lambda *a, **k: server.append(Server(*a, **k)) or server[0]
    )

    held = drift.eval_pool()[5:9]  # the held-out prompts the base answers name
    served: list[str] = []  # every prompt sent as load

    def poisson_load(url, rate, duration_s, make_body, seed=0, on_result=None, drain_s=None):
        assert not server[0].paused  # the load runs with training on
        server[0].busy += 1.0
        time.sleep(0.2)  # the window's own seconds (the timeline rounds to 0.1 s)
        out = []
        for i in range(2):
            body = make_body(i)
            served.append(body["messages"][0]["content"])
            r = RequestResult(sent=0.0, ttft=0.1, e2e=1.0, tokens=10, text=ANSWER)
            on_result(i, body, r)
            out.append(r)
        events.append(("load", seed, body["messages"][0]["content"], duration_s))
        return out

    def evaluate(client, phase, held_out, base, max_tokens, version, memo):
        assert server[0].paused  # an evaluation runs with training paused
        assert held_out == held  # the base answers' prompts, in their order
        events.append(("eval", phase.name))
        return {"win_rate": 0.5, "degenerate_share": 0.0, "clpd": 1.0, "example": "",
                "degenerate_examples": []}  # fmt: skip

    monkeypatch.setattr(drift, "poisson_load", poisson_load)
    monkeypatch.setattr(drift, "evaluate", evaluate)
    phases = load_phases()
    args = argparse.Namespace(
        phase_list=phases, eval_prompts=4, max_tokens=8, lr=1e-4, guard_max_kl=1.0,
        guard_min_keep=0.5, guard_open_keep=0.3, rpo_alpha=0.0, anchor_alpha=1.0,
        adapter_decay=0.0, dpo_span="whole", adapter_decay_per="step",
        publish_every=1, max_train_count=3, pick_order="newest", guard_merge="auto",
        slo_ttft_ms=2000.0,
        slo_tbt_ms=200.0,
        model_path=None,
        profile=None,
        eval_max_tokens=16, rate=1.0, feedback_every=1, phase_s=30.0, eval_every_s=10.0,
        drain_s=5.0, recover_at=0.75, period_s=10.0,
    )  # fmt: skip
    base = drift.BaseAnswers({p: "base answer" for p in held}, [])
    row, _ = drift.run_baseline("mace", args, None, tmp_path, base, seed=2)
    assert len(served) == 18 and not set(served) & set(drift.eval_pool())  # none as load

    kinds = [e[0] for e in events if e[0] != "feedback"]
    assert kinds == ["load", "eval"] * 9  # 3 phases x 3 windows, each then evaluated
    loads = [e for e in events if e[0] == "load"]
    assert len({e[1] for e in loads}) == 9 and all(e[3] == 10.0 for e in loads)
    assert len({e[2] for e in loads}) == 9  # the prompts go on across windows
    assert [e[1] for e in events if e[0] == "eval"] == [p.name for p in phases for _ in range(3)]
    chosen = [e[1] for e in events if e[0] == "feedback"]
    assert len(chosen) == 18
    assert chosen[0] == "The sea is big."  # the first phase's edit (concise)
    assert all(c.startswith("Certainly") for c in chosen[6:12])  # the second phase's edit
    assert all(c.startswith("- ") for c in chosen[12:])
    since = [e["since_drift"] for e in row["timeline"]]
    assert since[0] < since[1] < since[2] and since[3] < since[2]  # a phase's own clock
    assert row["timeline"][-1]["t"] < 5.0  # the windows' seconds, not the evaluations'
    assert row["device_utilisation"] > 1.0  # 9 busy seconds in well under 9 s of windows
    assert row["feedback_posted"] == 18 and row["requests"] == 18
    # ids 1-6 concise, 7-12 opener, 13-18 bullets: 3, 6 | 9, 12 | 15, 18 trained (not 2)
    assert [row[f"pairs_posted.{p.name}"] for p in phases] == [6, 6, 6]
    assert [row[f"pairs_trained.{p.name}"] for p in phases] == [2, 2, 2]
    assert row["train_steps"] == 6 and row["pairs_handed_back"] == 6
    assert row["pairs_superseded"] == 12
    assert [e["train_steps"] for e in row["timeline"]][:3] == [0, 1, 2]  # after ids 2, 4, 6
    server[0].store.close()


def test_the_held_out_prompts_are_the_first_whose_base_answers_finish_within_the_bound():
    """read_base_answers asks the pool in waves of n concurrent prompts until n base
    answers finished within the bound: those, in pool order, are evaluation's prompts, and
    the cut ones are named as left out. Where the pool runs out first, its first cut ones
    fill the set and are named as cut (judged as they stand)."""
    from benchmarks import drift

    pool = [f"p{i}" for i in range(10)]
    long = {"p0", "p2", "p3", "p5", "p8"}  # base answers that run past the bound
    asked: list[str] = []

    def ask(wave: list[str]) -> list[tuple[str, bool]]:
        assert len(wave) <= 3  # waves of n
        asked.extend(wave)
        return [(f"answer to {p}", p in long) for p in wave]

    got = drift.read_base_answers(ask, pool, 3)
    assert got.prompts == ["p1", "p4", "p6"]
    assert got.text["p4"] == "answer to p4" and got.cut == []
    assert got.skipped == ["p0", "p2", "p3", "p5", "p8"]  # every cut one asked
    assert asked == pool[:9]  # three waves of three: the third found the last one
    assert got.summary()["skipped"] == 5 and got.summary()["cut"] == 0

    asked.clear()
    short = drift.read_base_answers(ask, pool[:4], 3)  # one finished in the whole pool
    assert asked == pool[:4]
    assert short.prompts == ["p0", "p1", "p2"]  # pool order: p1, then the first cut ones
    assert short.cut == ["p0", "p2"] and short.skipped == ["p3"]

    shipped = drift.eval_pool()
    assert len(shipped) == len(set(shipped)) == 60


def test_an_evaluation_asks_each_served_version_once_and_judges_it_under_every_phase():
    """evaluate reuses a version's answers (and, in the same phase, its margins): greedy
    answers of the same weights are the same, and each evaluation costs 20-60 s on 2
    cores. A new version, or a new adapter name, is asked again."""
    from benchmarks import drift
    from benchmarks.phases import load_phases

    asked: list[tuple] = []

    class Client:
        adapter = "live"

        def answer(self, prompt, adapter, max_tokens):
            asked.append(("answer", prompt))
            return "Certainly! " + prompt

        def logprob(self, prompt, completion, adapter):
            asked.append(("logprob", prompt))
            return -1.0

    concise, opener, _ = load_phases()
    held = ["The sea is big and blue and deep.", "Sand is made of small grains of rock."]
    base = {p: p for p in held}
    memo: dict = {}
    first = drift.evaluate(Client(), opener, held, base, 16, ("live", 3), memo)
    assert not first["reused"] and first["win_rate"] == 1.0  # the opener phase's judge
    n = len(asked)
    assert sum(a[0] == "answer" for a in asked) == 2 and n > 2
    again = drift.evaluate(Client(), opener, held, base, 16, ("live", 3), memo)
    assert again["reused"] and len(asked) == n  # nothing asked again
    assert again["win_rate"] == first["win_rate"] and again["clpd"] == first["clpd"]
    other = drift.evaluate(Client(), concise, held, base, 16, ("live", 3), memo)
    assert other["reused"] and other["win_rate"] != first["win_rate"]  # judged anew
    assert {a[0] for a in asked[n:]} <= {"logprob"}  # only the new phase's margins
    m = len(asked)
    drift.evaluate(Client(), concise, held, base, 16, ("live", 4), memo)
    assert sum(a[0] == "answer" for a in asked[m:]) == 2  # a new version is asked


def test_an_evaluation_says_why_its_degenerate_answers_are_degenerate():
    """degenerate_kinds counts the evaluation's degenerate answers by kind: a short
    answer carried from a brevity phase into one that asks for an opener keeps too
    little of the base answer's content; a loop is a loop."""
    from benchmarks import drift
    from benchmarks.phases import load_phases

    base = {
        "Tell me about the sea.": "The sea covers most of the planet, holds salt water, "
        "moves with tides and currents, shapes coastal weather and feeds countless fish.",
        "Tell me about sand.": "Sand forms when rocks break down into small grains over "
        "thousands of years, carried by rivers, wind and waves onto beaches and deserts.",
        "Tell me about rain.": "Rain falls when droplets in clouds grow heavy.",
    }
    answers = {
        "Tell me about the sea.": "Certainly! The sea is salty.",
        "Tell me about sand.": "Certainly! " + "sand sand grains " * 12,
        "Tell me about rain.": "Certainly! Rain falls when droplets in clouds grow heavy.",
    }

    class Client:
        adapter = "live"

        def answer(self, prompt, adapter, max_tokens):
            return answers[prompt]

        def logprob(self, prompt, completion, adapter):
            return -1.0

    concise, opener, _ = load_phases()
    ev = drift.evaluate(Client(), opener, list(base), base, 16, ("live", 1), {})
    assert ev["degenerate_kinds"] == {"content": 1, "loop": 1}
    assert ev["degenerate_share"] == 2 / 3
    # Under the brevity phase, the short answer keeps enough: only the loop is degenerate.
    ev = drift.evaluate(Client(), concise, list(base), base, 16, ("live", 1), {})
    assert ev["degenerate_kinds"] == {"loop": 1}


def test_derived_slo_targets_are_inference_onlys_own_tails_with_headroom():
    """drift's targets: inference-only's p99 TTFT and p99 time per output token (what
    attainment counts), x headroom."""
    from benchmarks.loadgen import RequestResult, tail_targets

    results = [
        RequestResult(sent=0.0, ttft=0.1 * (i + 1), e2e=0.19 * (i + 1), tokens=10)
        for i in range(100)  # time per output token 0.01 * (i + 1) s
    ]
    results.append(RequestResult(sent=0.0, error="timeout"))  # a failure sets no target
    ttft, tpot = tail_targets(results, 1.1)
    assert ttft == pytest.approx(9.9 * 1000 * 1.1)  # p99 of 0.1..10 s
    assert tpot == pytest.approx(0.99 * 1000 * 1.1)
    with pytest.raises(RuntimeError, match="no SLO targets"):
        tail_targets([RequestResult(sent=0.0, error="x")], 1.1)


def test_main_derives_each_seeds_targets_from_inference_only_and_counts_every_baseline_against_them(
    tmp_path, monkeypatch, tiny_model_dir
):
    """drift.main without servers: inference-only runs first in every seed whatever the
    order asked, the later baselines' servers get its p99s x headroom as targets, and
    every baseline's slo_attainment is counted against them (results.json)."""
    import json
    import sys

    from benchmarks import drift
    from benchmarks.loadgen import RequestResult

    ran: list[tuple[int, str, float, float]] = []

    def run_baseline(name, args, tokenizer, out, base_answers, seed=1):
        ran.append((seed, name, args.slo_ttft_ms, args.slo_tbt_ms))
        # TTFT 0.1..1.0 s (inference-only) or 0.2..2.0 s, and 10 x seed ms per token
        slow = 1.0 if name == "inference-only" else 2.0
        results = [
            RequestResult(
                sent=0.0,
                ttft=0.1 * (i + 1) * slow,
                e2e=0.1 * (i + 1) * slow + 0.09 * seed,
                tokens=10,
            )  # fmt: skip
            for i in range(10)
        ]
        row = {"win_rate": 0.5, "slo_attainment": -1.0, "timeline": [], "gaps": [],
               "ttfts": [], "_results": results, "_wall": 10.0}  # fmt: skip
        return row, drift.BaseAnswers({}, [])

    monkeypatch.setattr(drift, "run_baseline", run_baseline)
    monkeypatch.setattr(drift, "plot", lambda *a: None)
    monkeypatch.setattr(sys, "argv", [
        "drift", "--quick", "--seeds", "2", "--baselines", "mace,inference-only",
        "--model-path", str(tiny_model_dir), "--out", str(tmp_path),
    ])  # fmt: skip
    drift.main()
    assert [(s, n) for s, n, _, _ in ran] == [
        (1, "inference-only"),
        (1, "mace"),
        (2, "inference-only"),
        (2, "mace"),
    ]
    # seed s: TTFT p99 1.0 s, time per token 0.01 * s s, x 1.1
    assert ran[1][2:] == (pytest.approx(1100.0), pytest.approx(11.0))
    assert ran[3][2:] == (pytest.approx(1100.0), pytest.approx(22.0))
    result = json.loads((tmp_path / "results.json").read_text())
    assert [t["from"] for t in result["slo_targets"]] == ["inference-only"] * 2
    base, mace = result["baselines"]["inference-only"], result["baselines"]["mace"]
    assert base["slo_attainment"] == pytest.approx(1.0)  # its own p99 x 1.1: every request
    assert mace["slo_attainment"] == pytest.approx(0.5)  # TTFT 0.2..1.0 s of 0.2..2.0 met


def test_a_run_finished_in_pieces_and_merged_equals_the_run_in_one_go(
    tmp_path, monkeypatch, tiny_model_dir
):
    """--first-seed K runs load seeds K..K+N-1, and --merge joins the pieces' results into
    the results.json of one --seeds run (means, ci95, per-seed targets); pieces of other
    settings are refused."""
    import json
    import sys

    from benchmarks import drift
    from benchmarks.loadgen import RequestResult

    ran: list[int] = []

    def run_baseline(name, args, tokenizer, out, base_answers, seed=1):
        ran.append(seed)
        results = [RequestResult(sent=0.0, ttft=0.1 * (i + 1), e2e=0.2 * (i + 1) * seed,
                                 tokens=10) for i in range(10)]  # fmt: skip
        row = {"win_rate": 0.4 + 0.1 * seed, "slo_attainment": -1.0, "timeline": [],
               "gaps": [], "ttfts": [], "_results": results, "_wall": 10.0}  # fmt: skip
        # the base answers are read once a seed: that seed's cut one is named
        return row, base_answers or drift.BaseAnswers({"p": "a"}, [f"cut in seed {seed}"])

    monkeypatch.setattr(drift, "run_baseline", run_baseline)
    monkeypatch.setattr(drift, "plot", lambda *a: None)

    def main(*flags: str) -> None:
        monkeypatch.setattr(sys, "argv", ["drift", "--quick", "--baselines", "inference-only",
                                          "--model-path", str(tiny_model_dir), *flags])  # fmt: skip
        drift.main()

    main("--seeds", "3", "--out", str(tmp_path / "whole"))
    main("--seeds", "1", "--out", str(tmp_path / "a"))
    main("--seeds", "2", "--first-seed", "2", "--out", str(tmp_path / "b"))
    assert ran == [1, 2, 3, 1, 2, 3]
    assert (tmp_path / "b" / "seed-3").is_dir()  # each seed's files under its own number
    main("--merge", str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json"),
         "--out", str(tmp_path / "merged"))  # fmt: skip
    assert ran == [1, 2, 3, 1, 2, 3]  # merging runs nothing
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["seeds_done"] == whole["seeds_done"] == 3
    assert merged["slo_targets"] == whole["slo_targets"]
    assert merged["base_answers"] == whole["base_answers"]
    assert [b["cut_prompts"] for b in whole["base_answers"]] == [
        ["cut in seed 1"],
        ["cut in seed 2"],
        ["cut in seed 3"],
    ]
    ours, theirs = merged["baselines"]["inference-only"], whole["baselines"]["inference-only"]
    for key in ("win_rate", "slo_attainment"):
        assert ours[key] == pytest.approx(theirs[key]), key
        assert ours["ci95"][key] == pytest.approx(theirs["ci95"][key]), key
    assert merged["baselines"]["inference-only"]["win_rate"] == pytest.approx(0.6)
    other = json.loads((tmp_path / "b" / "results.json").read_text())
    other["settings"]["lr"] = 1.0
    (tmp_path / "c.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="lr"):
        drift.merge([merged, json.loads((tmp_path / "c.json").read_text())])


def test_time_spent_splits_a_windows_time_and_sums_windows():
    """Where a window's time went, from two /mace/status `training` reads (training by
    work, starvation and its reason), and the windows summed for the run."""
    from benchmarks.drift import time_spent, time_spent_total

    def status(serve, train, by_work, starved, why):
        return {"serving_seconds": serve, "train_seconds": train,
                "train_seconds_by_work": by_work,
                "starvation": {"total_s": starved, "reason": why}}  # fmt: skip

    before = status(10.0, 4.0, {"ref": 1.0, "step": 2.0, "guard": 1.0, "publish": 0.0}, 3.0, None)
    after = status(18.0, 9.0, {"ref": 1.5, "step": 4.0, "guard": 3.5, "publish": 0.0}, 5.0, "SLO")
    w = time_spent(before, after, 20.0)
    assert w == {"wall_s": 20.0, "serve_s": 8.0, "train_s": 5.0,
                 "train_s_by_work": {"ref": 0.5, "step": 2.0, "guard": 2.5, "publish": 0.0},
                 "starved_s": 2.0, "starved_why": "SLO"}  # fmt: skip
    total = time_spent_total([w, w])
    assert total == {"wall_s": 40.0, "serve_s": 16.0, "train_s": 10.0, "starved_s": 4.0,
                     "train_s_by_work": {"guard": 5.0, "publish": 0.0, "ref": 1.0,
                                         "step": 4.0}}  # fmt: skip


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eval-prompts", "0"], "--eval-prompts must be 1..60"),
        (["--eval-prompts", "61"], "--eval-prompts must be 1..60"),
        (["--evals-per-phase", "0"], "--evals-per-phase must be >= 1"),
        (["--phases", "/nonexistent.yaml"], "--phases /nonexistent.yaml"),
    ],
)
def test_bad_evaluation_flags_are_refused_before_any_server_starts(
    flags, message, monkeypatch, capsys
):
    import sys

    from benchmarks import drift

    monkeypatch.setattr(drift, "run_baseline", lambda *a, **k: pytest.fail("a run started"))
    monkeypatch.setattr(sys, "argv", ["drift", "--quick", "--slo-ttft-ms", "500",
                                      "--slo-tbt-ms", "100", *flags])  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        drift.main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err
