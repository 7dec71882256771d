"""What a judge model is given, shared by the RLAIF stage (``rlaif``) and the watch's judge
(``<stage>.watch.judge``): the prompt template and its required fields, the dtype, the principles.
One owner, so both refuse the same bad template with the same message (rlhf_stages.methods.judge
renders it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import Rule

DEFAULT_JUDGE_TEMPLATE = "Principles:\n{constitution}\n\n{prompt}\nA:{a}\nB:{b}\nBetter answer:"
JUDGE_TEMPLATE_FIELDS = ("constitution", "prompt", "a", "b")

JudgeTemplate = Annotated[str, Field(min_length=1, max_length=4096)]
JudgeDtype = Literal["float32", "bfloat16", "float16"]
Principle = Annotated[str, Field(min_length=1, max_length=2048)]
MAX_PRINCIPLES = 64


def judge_template_rule(field: str, attribute: str) -> Rule:
    """The template named ``field`` (camelCase; ``attribute`` in Python) holds every field the judge's
    prompt is rendered from."""
    return Rule(
        cel=f"!has(self.{field}) || ("
        + " && ".join(f"self.{field}.contains('{{{f}}}')" for f in JUDGE_TEMPLATE_FIELDS)
        + ")",
        message=f"{field} must contain " + ", ".join(f"{{{f}}}" for f in JUDGE_TEMPLATE_FIELDS),
        field_path=f".{field}",
        check=lambda r: all(f"{{{f}}}" in getattr(r, attribute) for f in JUDGE_TEMPLATE_FIELDS),
    )
