"""The RLAIF judge's pure parts: prompt rendering, constitution parsing, combining both orders."""

from __future__ import annotations

import pytest

from rlhf_api.judging import DEFAULT_JUDGE_TEMPLATE
from rlhf_stages.methods.judge import (
    Verdict,
    missing_template_fields,
    parse_constitution,
    probability_first,
    render_constitution,
    render_judge_prompt,
    summarise,
)


def test_prompt_holds_principles_question_and_both_answers_in_order() -> None:
    text = render_judge_prompt(DEFAULT_JUDGE_TEMPLATE, ["Be kind.", "Be brief."], "Q: hi?", " yes.", " no.")
    assert text == "Principles:\n- Be kind.\n- Be brief.\n\nQ: hi?\nA: yes.\nB: no.\nBetter answer:"


def test_answers_are_not_substituted_again() -> None:
    """An answer that contains a placeholder or braces stays as written."""
    text = render_judge_prompt("{constitution}|{prompt}|{a}|{b}", ["p"], "q", " {b} {prompt}", " {x}")
    assert text == "- p|q| {b} {prompt}| {x}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Be kind.\nBe brief.\n", ["Be kind.", "Be brief."]),
        ("# house rules\n\n- Be kind.\n  - Be brief.  \n", ["Be kind.", "Be brief."]),
        ("", []),
    ],
)
def test_constitution_config_map_text(text: str, expected: list[str]) -> None:
    assert parse_constitution(text) == expected


def test_rendered_constitution_reads_back() -> None:
    principles = ["Prefer the honest answer.", "Avoid repetition."]
    assert parse_constitution(render_constitution(principles)) == principles


def test_template_fields() -> None:
    assert missing_template_fields(DEFAULT_JUDGE_TEMPLATE) == []
    assert missing_template_fields("{prompt} A:{a} Better:") == ["constitution", "b"]


def test_probability_first_is_a_two_way_softmax() -> None:
    assert probability_first(-1.0, -1.0) == pytest.approx(0.5)
    assert probability_first(0.0, -2.0) == pytest.approx(1 / (1 + 2.718281828**-2))
    assert probability_first(-1000.0, 0.0) == pytest.approx(0.0)  # no overflow


# (name, P(A) with x first, P(B) with x second, agreed, x wins, votes for the first position)
VERDICTS = [
    ("both orders pick x", 0.9, 0.8, True, True, [True, False]),
    ("both orders pick y", 0.2, 0.3, True, False, [False, True]),
    ("always the first answer", 0.9, 0.2, False, True, [True, True]),
    ("always the second answer", 0.3, 0.6, False, False, [False, False]),
    ("one order only", 0.7, None, True, True, [True]),
]


@pytest.mark.parametrize(
    ("first", "second", "agreed", "x_wins", "votes"), [v[1:] for v in VERDICTS], ids=[v[0] for v in VERDICTS]
)
def test_verdict(first: float, second: float | None, agreed: bool, x_wins: bool, votes: list[bool]) -> None:
    verdict = Verdict(first, second)
    assert verdict.agreed is agreed
    assert verdict.x_wins is x_wins
    assert verdict.first_position_votes() == votes


def test_summary_exposes_position_bias() -> None:
    biased = [Verdict(0.9, 0.1), Verdict(0.8, 0.3)]  # picks A whatever is shown there
    summary = summarise(biased)
    assert summary["agreement_rate"] == 0.0
    assert summary["first_position_rate"] == 1.0
    fair = summarise([Verdict(0.9, 0.9), Verdict(0.1, 0.1)])
    assert fair["agreement_rate"] == 1.0 and fair["first_position_rate"] == 0.5
    assert fair["judge_confidence"] == pytest.approx(0.8)
    assert summarise([]) == {}
