"""Preference phases for benchmarks.drift, read from a file, and the degeneration check.

A phase file (YAML or JSON) is shaped

    {"phases": [{"name": "opener",
                 "judge": {"starts_with": "Certainly"},
                 "edit": {"prepend": "Certainly! "}}, ...]}

Each `judge` holds exactly one rule; its score of an answer is in [0, 1]:
- starts_with: S / ends_with: S / contains: S   1 if the stripped answer starts with,
  ends with or contains S, else 0;
- max_words: N                                  1 at N words or fewer, else N / words
                                                (shorter is better, up to N);
- line_prefix: P                                share of non-empty lines that start with P
                                                (1 when every one does);
- regex: R                                      1 if re.search(R, answer), else 0.
Each `edit` holds exactly one rule, and turns an answer into one the judge prefers:
- prepend: S / append: S                        S + answer / answer + S;
- first_sentence: true                          the answer's first sentence;
- lines_with_prefix: P                          P before every non-empty line;
- replace: {"pattern": R, "with": S}            re.sub(R, S, answer).

Every judge also refuses degenerate answers (`degenerate`): empty, a repetition loop
(a fifth or more of the answer's word 4-grams are repeats, seq-rep-4 as in Welleck et al.
2019, or one word four times in a row), a refusal, or one that keeps too little of the
base answer's content. Content words are words of three letters or more outside a stop
list, contractions left out, a plural or possessive "s" folded. An answer keeps too
little when it shares none of the base answer's content words, when it has fewer than
two content words (a bare echo of the topic), or, under any rule but max_words, when it
has fewer than 40% as many content words as the base answer (a cut answer). Under
max_words that is all that is asked of a short answer's content: a short answer on the
topic that shares a word with the base answer passes, even if the rest differs. An
answer counts as degenerate only where the base model's own answer to the same prompt
is not: the small base model loops now and then by itself. Where the base answer is
degenerate, an answer degenerate in the same way (a loop where the base loops) is not
counted, and one degenerate in another way is (an empty answer where the base loops):
otherwise an empty answer would beat a looping base under max_words. `verdict` compares
an answer with the base answer: a degenerate answer loses, otherwise the higher score
wins (1), equal scores tie (0.5). So a shorter answer wins only under max_words, and only while it
keeps some of the base answer's content.

The bounds are set so that the base model's own answers pass: an answer sampled again
from the base model (temperature 0.7) words the same content differently and keeps a
median of a quarter of the greedy answer's content words (four letters or more, no stop
list), none in 5% of them. The bounds before 2026-12-06 (30% of the base's content words
of four letters or more kept; under max_words 15% and half of the answer's own from the
base; a word 3-gram three times is a loop) called 56% of those answers degenerate, and
85% of their first sentences under max_words: a learned style that changed the wording
lost however fluent it was. `python -m benchmarks.judge_check` measures how often the
judge calls the base model's own answers degenerate, how often it passes answers to
other prompts (a negative control), and each phase's ceiling (its edit applied to
resampled base answers).

The shipped default, benchmarks/phases/default.yaml, holds the three phases the drift
benchmark always had: concise (max_words), opener (starts_with) and bullets
(line_prefix).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_FILE = Path(__file__).with_name("phases") / "default.yaml"

JUDGES = ("starts_with", "ends_with", "contains", "max_words", "line_prefix", "regex")
EDITS = ("prepend", "append", "first_sentence", "lines_with_prefix", "replace")

# Degeneration bounds (see the module docstring).
MIN_CONTENT_WORDS = 2  # a bare echo of the topic ("Rivers.") keeps no content
MIN_LENGTH_SHARE = 0.4  # content words against the base answer's, rules but max_words
LOOP_NGRAM, LOOP_SHARE = 4, 0.2  # a fifth of the word 4-grams repeated is a loop
STOP_WORDS = frozenset(
    """the and for are was but not you its can has had one all any how our out who why
    may own too yet nor via per get got let see way use did does able about above after
    again against also although among another anything around because been before being
    below between both could doing down during each either even ever every from further
    have having here however into itself just like made make makes many more most much
    must never only other others over same should since some something such than that
    their theirs them themselves then there these they this those through under until
    upon very were what when where whether which while will with within without would
    your yours""".split()
)
REFUSAL = re.compile(
    r"^\W*(no[,.! ]+no\b|i\s*(?:'m| am)\s+(?:sorry|unable|not able)|i\s+(?:can(?:'|no)t|cannot|"
    r"won't|will not|refuse)|as an ai\b|sorry\b)",
    re.IGNORECASE,
)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _fold(word: str) -> str:
    """Possessive and plural "s" folded: "moon's", "moons'" and "moons" are "moon" (not
    "-es" or "-ies" plurals)."""
    word = word.removesuffix("'s").strip("'")
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def content_words(text: str) -> set[str]:
    """Folded words of three letters or more outside STOP_WORDS; contractions ("don't",
    "it's" folds to "it") are not content."""
    folded = map(_fold, words(text))
    return {w for w in folded if len(w) >= 3 and w not in STOP_WORDS and "'" not in w}


def loops(text: str) -> bool:
    """A fifth or more of the word 4-grams are repeats, or one word 4 times in a row."""
    ws = words(text)
    if any(len(set(ws[i : i + 4])) == 1 for i in range(len(ws) - 3)):
        return True
    grams = [tuple(ws[i : i + LOOP_NGRAM]) for i in range(len(ws) - LOOP_NGRAM + 1)]
    return bool(grams) and 1 - len(set(grams)) / len(grams) >= LOOP_SHARE


def degenerate_kind(answer: str, base: str, brief: bool) -> str | None:
    """Why `answer` is degenerate against the base answer to the same prompt ("empty",
    "loop", "refusal", "content"), or None. `brief`: judged by max_words."""
    if not answer.strip():
        return "empty"
    if loops(answer):
        return "loop"
    if REFUSAL.search(answer):
        return "refusal"
    base_words, mine = content_words(base), content_words(answer)
    if base_words:
        if not base_words & mine or len(mine) < MIN_CONTENT_WORDS:
            return "content"
        if not brief and len(mine) < MIN_LENGTH_SHARE * len(base_words):
            return "content"
    return None


def degenerate(answer: str, base: str, brief: bool = False) -> bool:
    """Degenerate where the base answer to the same prompt is not."""
    if degenerate_kind(base, base, brief) is not None:
        # the base itself is empty, loops or refuses: judge only what the base avoids
        kind = degenerate_kind(answer, base, brief)
        return kind is not None and kind != degenerate_kind(base, base, brief)
    return degenerate_kind(answer, base, brief) is not None


@dataclass(frozen=True)
class Phase:
    """A preference: a judge (score in [0, 1]) and the edit that satisfies it."""

    name: str
    judge_rule: dict[str, Any]
    edit_rule: dict[str, Any]
    score: Callable[[str], float]
    edit: Callable[[str], str]

    @property
    def brief(self) -> bool:
        """The judge asks for brevity (max_words): shorter answers may win."""
        return "max_words" in self.judge_rule


def verdict(phase: Phase, answer: str, other: str, base: str) -> float:
    """1 if `answer` beats `other` under the phase (0.5 tie, 0 loss); `base` is the base
    model's answer to the same prompt, against which degeneration is judged."""
    bad_a = degenerate(answer, base, phase.brief)
    bad_o = degenerate(other, base, phase.brief)
    if bad_a or bad_o:
        return 0.5 if bad_a and bad_o else 0.0 if bad_a else 1.0
    sa, so = phase.score(answer), phase.score(other)
    return 1.0 if sa > so else 0.5 if sa == so else 0.0


def judged(phase: Phase, answers: list[str], base: list[str]) -> tuple[list[float], list[bool]]:
    """Each answer's verdict against the base model's answer to the same prompt, and
    whether it is degenerate: how drift and benchmarks.recipe judge an evaluation."""
    pairs = list(zip(answers, base, strict=True))
    return [verdict(phase, a, b, b) for a, b in pairs], [
        degenerate(a, b, phase.brief) for a, b in pairs
    ]


def _one(rule: Any, known: tuple[str, ...], what: str, name: str) -> tuple[str, Any]:
    if not isinstance(rule, dict) or len(rule) != 1:
        raise ValueError(f"phase {name!r}: {what} must be one rule out of {', '.join(known)}")
    (key, value), = rule.items()  # fmt: skip
    if key not in known:
        raise ValueError(f"phase {name!r}: unknown {what} rule {key!r}; known: {', '.join(known)}")
    return key, value


def _compiled(value: Any, name: str, rule: str) -> re.Pattern[str]:
    try:
        return re.compile(str(value))
    except re.error as e:
        raise ValueError(f"phase {name!r}: {rule} pattern {value!r} is not a regex: {e}") from e


def _judge(key: str, value: Any, name: str) -> Callable[[str], float]:
    if key == "max_words":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"phase {name!r}: max_words must be a positive integer")
        return lambda t: 1.0 if len(words(t)) <= value else value / len(words(t))
    if key == "regex":
        pattern = _compiled(value, name, "regex")
        return lambda t: float(bool(pattern.search(t)))
    if not isinstance(value, str) or not value:
        raise ValueError(f"phase {name!r}: {key} needs a non-empty string")
    if key == "starts_with":
        return lambda t: float(t.strip().startswith(value))
    if key == "ends_with":
        return lambda t: float(t.strip().endswith(value))
    if key == "contains":
        return lambda t: float(value in t)

    def share(t: str) -> float:  # line_prefix
        lines = [x.strip() for x in t.splitlines() if x.strip()]
        return sum(x.startswith(value) for x in lines) / len(lines) if lines else 0.0

    return share


def _edit(key: str, value: Any, name: str) -> Callable[[str], str]:
    if key == "first_sentence":
        if value is not True:
            raise ValueError(f"phase {name!r}: first_sentence takes true")
        return lambda t: (sentences(t) or [t.strip()])[0]
    if key == "replace":
        if not isinstance(value, dict) or set(value) != {"pattern", "with"}:
            raise ValueError(f"phase {name!r}: replace takes {{pattern: .., with: ..}}")
        pattern, repl = _compiled(value["pattern"], name, "replace"), str(value["with"])
        return lambda t: pattern.sub(repl, t)
    if not isinstance(value, str) or not value:
        raise ValueError(f"phase {name!r}: {key} needs a non-empty string")
    if key == "prepend":
        return lambda t: value + t.strip()
    if key == "append":
        return lambda t: t.rstrip() + value
    return lambda t: "\n".join(
        value + x.strip() if x.strip() else x for x in t.strip().splitlines()
    )


def parse_phases(data: Any) -> list[Phase]:
    """Phases from the parsed file; ValueError saying what is wrong."""
    if not isinstance(data, dict) or not isinstance(data.get("phases"), list) or not data["phases"]:
        raise ValueError('a phase file holds {"phases": [{"name", "judge", "edit"}, ...]}')
    phases = []
    for i, p in enumerate(data["phases"]):
        if not isinstance(p, dict) or set(p) != {"name", "judge", "edit"}:
            raise ValueError(f"phase {i} must have exactly name, judge and edit")
        name = str(p["name"])
        jk, jv = _one(p["judge"], JUDGES, "judge", name)
        ek, ev = _one(p["edit"], EDITS, "edit", name)
        phases.append(Phase(name, {jk: jv}, {ek: ev}, _judge(jk, jv, name), _edit(ek, ev, name)))
    if len({p.name for p in phases}) != len(phases):
        raise ValueError("phase names must differ")
    return phases


def load_phases(path: str | Path = DEFAULT_FILE) -> list[Phase]:
    """Phases from a YAML or JSON file (JSON is YAML too, but its errors read better)."""
    text = Path(path).read_text()
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"cannot parse {path}: {e}") from e
    return parse_phases(data)
