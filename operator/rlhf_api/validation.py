"""Offline validation with the API server's verdicts: the same schema bounds and the same rules.

Used by ``rlhfctl validate``, the operator (defence in depth) and the stages.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from .base import RULE_ERROR
from .run import RLHFRun


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def field_errors(error: ValidationError) -> list[str]:
    """``field.path: message`` lines, with camelCase paths as written in manifests."""
    lines = []
    for err in error.errors():
        loc = tuple(err["loc"])
        if err["type"] == RULE_ERROR and err.get("ctx", {}).get("field"):
            loc = (*loc, *str(err["ctx"]["field"]).split("."))
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against docs/reference.md"
        elif err["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        elif err["type"] == "missing":
            message = "required field is missing"
        lines.append(f"{_path(loc) or '<root>'}: {message}")
    return lines


def validate_manifest(doc: Any) -> tuple[RLHFRun | None, list[str]]:
    """Parse an RLHFRun manifest; returns the model or the list of field errors."""
    if not isinstance(doc, dict):
        return None, ["<root>: expected a mapping (an RLHFRun manifest)"]
    try:
        return RLHFRun.model_validate(doc), []
    except ValidationError as exc:
        return None, field_errors(exc)
