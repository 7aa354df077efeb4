"""Phase files of the drift benchmark: every judge and edit rule, and the degeneration
check that every judge applies."""

from __future__ import annotations

import json

import pytest

from benchmarks.phases import (
    DEFAULT_FILE,
    degenerate,
    degenerate_kind,
    load_phases,
    loops,
    parse_phases,
    verdict,
)

BASE = (
    "Photosynthesis is the process plants use to convert sunlight, water and carbon "
    "dioxide into glucose and oxygen. It happens in the chloroplasts of leaf cells."
)


def phase(judge, edit):
    (p,) = parse_phases({"phases": [{"name": "p", "judge": judge, "edit": edit}]})
    return p


@pytest.mark.parametrize(
    "judge,good,bad",
    [
        ({"starts_with": "Certainly"}, "Certainly! " + BASE, BASE),
        ({"ends_with": "Hope this helps."}, BASE + " Hope this helps.", BASE),
        ({"contains": "In short"}, "In short, " + BASE, BASE),
        ({"max_words": 20}, BASE.split(". ")[0] + ".", BASE),
        ({"line_prefix": "- "}, "- " + BASE.replace(". ", ".\n- "), BASE),
        ({"regex": r"\bglucose\b.*\boxygen\b"}, BASE, BASE.replace("glucose", "sugar")),
    ],
    ids=lambda x: next(iter(x)) if isinstance(x, dict) else "",
)
def test_every_judge_rule_prefers_what_it_asks_for(judge, good, bad):
    p = phase(judge, {"prepend": "x"})
    assert p.score(good) > p.score(bad)
    assert 0.0 <= p.score(bad) <= 1.0 and p.score(good) <= 1.0
    assert verdict(p, good, bad, BASE) == 1.0 and verdict(p, bad, good, BASE) == 0.0
    assert verdict(p, good, good, BASE) == 0.5


@pytest.mark.parametrize(
    "edit,judge",
    [
        ({"prepend": "Certainly! "}, {"starts_with": "Certainly"}),
        ({"append": " Hope this helps."}, {"ends_with": "Hope this helps."}),
        ({"first_sentence": True}, {"max_words": 20}),
        ({"lines_with_prefix": "- "}, {"line_prefix": "- "}),
        ({"replace": {"pattern": r"\bplants\b", "with": "green plants"}}, {"contains": "green"}),
    ],
    ids=lambda x: next(iter(x)) if isinstance(x, dict) else "",
)
def test_every_edit_rule_satisfies_its_judge_and_keeps_the_content(edit, judge):
    p = phase(judge, edit)
    edited = p.edit(BASE)
    assert p.score(edited) == 1.0 and p.score(BASE) < 1.0
    assert not degenerate(edited, BASE, p.brief)
    assert verdict(p, edited, BASE, BASE) == 1.0


def test_lines_with_prefix_prefixes_every_non_empty_line():
    p = phase({"line_prefix": "* "}, {"lines_with_prefix": "* "})
    assert p.edit("one\n\ntwo\n") == "* one\n\n* two"


@pytest.mark.parametrize(
    "answer,kind",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("No, no, no.", "refusal"),
        ("I'm sorry, but I can't help with that request about plants.", "refusal"),
        ("Certainly! Certainly! Certainly! Certainly! plants", "loop"),
        ("the plants use the light the plants use the light the plants use the light", "loop"),
        ("Certainly! Bananas are yellow fruit that monkeys enjoy eating daily.", "content"),
    ],
)
def test_degenerate_answers_are_named(answer, kind):
    assert degenerate_kind(answer, BASE, brief=False) == kind
    assert degenerate(answer, BASE)


def test_a_degenerate_answer_loses_under_every_judge_even_if_it_scores():
    for judge in ({"starts_with": "Certainly"}, {"max_words": 20}, {"contains": "Certainly"}):
        p = phase(judge, {"prepend": "Certainly! "})
        looping = "Certainly! Certainly! Certainly! Certainly!"
        assert p.score(looping) >= p.score(BASE)
        assert verdict(p, looping, BASE, BASE) == 0.0
        assert verdict(p, BASE, looping, BASE) == 1.0


def test_shorter_wins_only_under_max_words_and_only_keeping_some_content():
    short = BASE.split(". ")[0] + "."
    brief = phase({"max_words": 20}, {"first_sentence": True})
    assert verdict(brief, short, BASE, BASE) == 1.0
    off_topic = "Dogs are loyal animals."
    assert degenerate(off_topic, BASE, brief=True)
    assert verdict(brief, off_topic, BASE, BASE) == 0.0
    # not asked for brevity: a cut answer keeps too little of the base's content and
    # loses although it satisfies the judge
    opener = phase({"starts_with": "Certainly"}, {"prepend": "Certainly! "})
    cut = "Certainly! Photosynthesis happens."
    assert degenerate(cut, BASE, brief=False)
    assert opener.score(cut) > opener.score(BASE) and verdict(opener, cut, BASE, BASE) == 0.0


def test_the_same_content_worded_otherwise_is_not_degenerate():
    # how the base model answers again when sampled: other words, few of them shared
    reworded = (
        "Plants make their own food: in their leaves, light turns water and carbon "
        "dioxide into sugar, and oxygen is released into the air."
    )
    assert degenerate_kind(reworded, BASE, brief=False) is None
    first = "Green plants feed on light through photosynthesis."
    assert degenerate_kind(first, BASE, brief=True) is None
    # the only shared word needs folding: "cells'" is "cell", as BASE's "cells"
    assert degenerate_kind("Ferns grow from cells' division.", BASE, brief=True) is None
    assert degenerate_kind("Ferns grow from cell division.", BASE, brief=True) is None
    assert degenerate_kind(first, BASE, brief=False) == "content"  # cut: only max_words


def test_contractions_and_a_bare_echo_keep_no_content():
    assert degenerate_kind("It's fine, don't worry.", "It's a whale, don't go.", True) == "content"
    assert degenerate_kind("Photosynthesis.", BASE, brief=True) == "content"


def test_a_list_that_repeats_its_frame_is_not_a_loop_but_a_repeated_line_is():
    listed = (
        "1. The ocean is home to whales. 2. The ocean is deep and cold. 3. The ocean is "
        "salty because rivers carry minerals into it. 4. It covers most of the planet."
    )
    assert not loops(listed)
    assert loops("It is a star that shines. " * 3)


def test_degeneration_counts_only_where_the_base_answer_is_fine():
    looping_base = "the cell the cell the cell the cell and more"
    assert not degenerate(looping_base, looping_base)
    assert degenerate("", looping_base)  # empty is a new failure


def test_the_default_file_holds_the_three_phases():
    phases = load_phases(DEFAULT_FILE)
    assert [p.name for p in phases] == ["concise", "opener", "bullets"]
    for p in phases:
        assert p.score(p.edit(BASE)) > p.score(BASE)


@pytest.mark.parametrize(
    "data,message",
    [
        ({}, "phases"),
        ({"phases": []}, "phases"),
        ({"phases": [{"name": "a", "judge": {"starts_with": "x"}}]}, "exactly"),
        ({"phases": [{"name": "a", "judge": {"shouts": 1}, "edit": {"prepend": "x"}}]}, "unknown"),
        (
            {
                "phases": [
                    {
                        "name": "a",
                        "judge": {"starts_with": "x", "contains": "y"},
                        "edit": {"prepend": "x"},
                    }
                ]
            },
            "one rule",
        ),  # fmt: skip
        (
            {"phases": [{"name": "a", "judge": {"max_words": 0}, "edit": {"prepend": "x"}}]},
            "positive",
        ),
        (
            {
                "phases": [
                    {"name": "a", "judge": {"contains": "x"}, "edit": {"replace": {"pattern": "a"}}}
                ]
            },
            "replace",
        ),  # fmt: skip
        (
            {
                "phases": [
                    {"name": "a", "judge": {"contains": "x"}, "edit": {"prepend": "x"}},
                    {"name": "a", "judge": {"contains": "y"}, "edit": {"prepend": "y"}},
                ]
            },
            "differ",
        ),  # fmt: skip
        (
            {"phases": [{"name": "a", "judge": {"regex": "(x"}, "edit": {"prepend": "x"}}]},
            "regex pattern '\\(x' is not a regex",
        ),
        (
            {
                "phases": [
                    {
                        "name": "a",
                        "judge": {"contains": "x"},
                        "edit": {"replace": {"pattern": "[a", "with": "b"}},
                    }
                ]
            },
            "replace pattern",
        ),  # fmt: skip
    ],
)
def test_bad_phase_files_say_what_is_wrong(data, message):
    with pytest.raises(ValueError, match=message):
        parse_phases(data)


def test_json_and_yaml_files_load(tmp_path):
    data = {"phases": [{"name": "q", "judge": {"ends_with": "?"}, "edit": {"append": " Why?"}}]}
    (tmp_path / "p.json").write_text(json.dumps(data))
    (tmp_path / "p.yaml").write_text(
        "phases:\n  - {name: q, judge: {ends_with: '?'}, edit: {append: ' Why?'}}\n"
    )
    for f in ("p.json", "p.yaml"):
        (p,) = load_phases(tmp_path / f)
        assert p.edit("Fine.") == "Fine. Why?" and p.score("Fine. Why?") == 1.0
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot parse"):
        load_phases(tmp_path / "bad.json")


def test_judge_check_counts_only_what_degenerate_calls_degenerate():
    from benchmarks.judge_check import kinds

    looping_base = "the cell the cell the cell the cell and more"
    got = kinds(
        ["", "No, no, no.", BASE, "Dogs are loyal animals.", "the cell the cell the cell the cell"],
        [BASE, BASE, BASE, BASE, looping_base],
        brief=False,
    )
    # the last loops as its base does: not counted
    assert got == {"degenerate_share": 0.6, "empty": 0.2, "loop": 0.0, "refusal": 0.2,
                   "content": 0.2}  # fmt: skip
