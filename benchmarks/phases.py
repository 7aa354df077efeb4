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

Every judge also refuses degenerate answers (`degenerate`): empty, a repetition loop, a
refusal, or one that keeps too little of the base answer's content (content words of
four letters or more: an answer judged by max_words must draw at least half of its
content words from the base answer and keep at least 15% of the base's; under any other
rule it must keep at least 30% of the base's). An answer counts as degenerate only
where the base model's own answer to the same prompt is not: the small base model loops
now and then by itself. `verdict` compares an answer with the base answer: a degenerate
answer loses, otherwise the higher score wins (1), equal scores tie (0.5). So a shorter
answer wins only under max_words, and only while it keeps the base answer's content.

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
MIN_RECALL = 0.30  # share of the base answer's content words kept, other rules
BRIEF_MIN_RECALL = 0.15  # the same under max_words
BRIEF_MIN_PRECISION = 0.5  # share of the answer's content words found in the base answer
LOOP_NGRAM, LOOP_REPEATS = 3, 3  # a word 3-gram seen 3 times or more is a loop
REFUSAL = re.compile(
    r"^\W*(no[,.! ]+no\b|i\s*(?:'m| am)\s+(?:sorry|unable|not able)|i\s+(?:can(?:'|no)t|cannot|"
    r"won't|will not|refuse)|as an ai\b|sorry\b)",
    re.IGNORECASE,
)


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def content_words(text: str) -> set[str]:
    return {w for w in words(text) if len(w) >= 4}


def loops(text: str) -> bool:
    """A word 3-gram repeated LOOP_REPEATS times, or one word 4 times in a row."""
    ws = words(text)
    if any(len(set(ws[i : i + 4])) == 1 for i in range(len(ws) - 3)):
        return True
    seen: dict[tuple[str, ...], int] = {}
    for i in range(len(ws) - LOOP_NGRAM + 1):
        gram = tuple(ws[i : i + LOOP_NGRAM])
        seen[gram] = seen.get(gram, 0) + 1
        if seen[gram] >= LOOP_REPEATS:
            return True
    return False


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
        recall = len(base_words & mine) / len(base_words)
        if brief:
            precision = len(base_words & mine) / len(mine) if mine else 0.0
            if recall < BRIEF_MIN_RECALL or precision < BRIEF_MIN_PRECISION:
                return "content"
        elif recall < MIN_RECALL:
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


def _judge(key: str, value: Any, name: str) -> Callable[[str], float]:
    if key == "max_words":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"phase {name!r}: max_words must be a positive integer")
        return lambda t: 1.0 if len(words(t)) <= value else value / len(words(t))
    if key == "regex":
        pattern = re.compile(str(value))
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
        pattern, repl = re.compile(str(value["pattern"])), str(value["with"])
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
