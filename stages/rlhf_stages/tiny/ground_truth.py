"""The tiny task's ground truth: a program that knows the target behaviour (see ``assets``).

A completion meets the target when it is a short, complete, on-topic, non-repetitive sentence with
more positive than negative words (:func:`check_target`, :func:`meets_target`); its graded form is
:func:`ground_truth_score`. Unlike a learned reward model it cannot be gamed, so a policy that raises
the reward but not the target rate has found a hole in the reward model.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

from rlhf_stages.tiny.assets import ALL_TOPICS, NEGATIVE_WORDS, POSITIVE_WORDS

_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")
_POSITIVE = frozenset(POSITIVE_WORDS)
_NEGATIVE = frozenset(NEGATIVE_WORDS)
_TOPIC_PAIRS = frozenset((t.split()[0], t.split()[1]) for t in ALL_TOPICS)

MIN_WORDS = 3
MAX_WORDS = 24
# A word used this often in one short answer means a loop ("good good good",
# "the lake is nice. the lake is nice. the lake is nice.").  No well-formed
# answer of the grammar repeats a word more than twice.
MAX_WORD_REPEATS = 2


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation dropped)."""
    return _WORD_RE.findall(text.lower())


def topics_in(text: str) -> list[str]:
    """Known topics ("old lake") mentioned in ``text``, in order."""
    ws = words(text)
    return [f"{a} {b}" for a, b in itertools.pairwise(ws) if (a, b) in _TOPIC_PAIRS]


def prompt_topic(prompt: str) -> str | None:
    """The topic a prompt asks about: the last known topic in it."""
    found = topics_in(prompt)
    return found[-1] if found else None


@dataclass(frozen=True)
class TargetCheck:
    """Why a completion does or does not meet the target."""

    num_words: int
    positive: int
    negative: int
    non_empty: bool
    complete: bool  # ends like a sentence, i.e. was not cut off
    on_topic: bool
    not_repetitive: bool
    length_ok: bool

    @property
    def well_formed(self) -> bool:
        return self.non_empty and self.complete and self.on_topic and self.not_repetitive and self.length_ok

    @property
    def meets_target(self) -> bool:
        return self.well_formed and self.positive > self.negative

    def failures(self) -> list[str]:
        """Names of the failed criteria (empty list when the target is met)."""
        criteria = {
            "empty": self.non_empty,
            "incomplete": self.complete,
            "off_topic": self.on_topic,
            "repetitive": self.not_repetitive,
            "bad_length": self.length_ok,
            "not_positive": self.positive > self.negative,
        }
        return [name for name, ok in criteria.items() if not ok]


def check_target(text: str, prompt: str | None = None) -> TargetCheck:
    """Check a completion against the target behaviour.

    ``text`` is the completion (the answer only; a leading copy of ``prompt``
    is stripped).  With a ``prompt`` naming a known topic the answer must
    mention that exact topic (both words, adjacent); without one any known
    topic counts.
    """
    if prompt is not None and text.startswith(prompt):
        text = text[len(prompt) :]
    stripped = text.strip()
    ws = words(stripped)
    counts = Counter(ws)
    topic = prompt_topic(prompt) if prompt is not None else None
    mentioned = topics_in(stripped)
    on_topic = (topic in mentioned) if topic is not None else bool(mentioned)
    immediate_repeat = any(a == b for a, b in itertools.pairwise(ws))
    return TargetCheck(
        num_words=len(ws),
        positive=sum(1 for w in ws if w in _POSITIVE),
        negative=sum(1 for w in ws if w in _NEGATIVE),
        non_empty=bool(ws),
        complete=stripped.endswith((".", "!", "?")),
        on_topic=on_topic,
        not_repetitive=bool(ws) and max(counts.values()) <= MAX_WORD_REPEATS and not immediate_repeat,
        length_ok=MIN_WORDS <= len(ws) <= MAX_WORDS,
    )


def meets_target(text: str, prompt: str | None = None) -> bool:
    """True when ``text`` shows the target behaviour (see :func:`check_target`)."""
    return check_target(text, prompt).meets_target


def ground_truth_score(text: str, prompt: str | None = None) -> float:
    """Graded ground truth in [-1, 1], positive exactly when :func:`meets_target`.

    With ``s = (pos - neg) / (pos + neg)`` over sentiment words (0 without
    any): a malformed answer (empty, cut off, off-topic, repetitive, bad
    length) scores -1, a well-formed one ``s`` when ``s > 0`` and ``s / 2``
    otherwise, so a fluent negative answer (-0.5) still ranks above garbage.
    """
    check = check_target(text, prompt)
    if not check.well_formed:
        return -1.0
    s = (check.positive - check.negative) / max(1, check.positive + check.negative)
    return s if s > 0 else s / 2
