"""The base every API type derives from, and the cross-field rules they carry.

Each type is declared once here, in Python. The CRD's OpenAPI schema is generated from
these models (see ``crd.py``), so field docs become ``kubectl explain`` descriptions.
A cross-field rule is written twice on purpose, as a CEL expression that the API server
evaluates at admission and as a Python predicate that ``rlhfctl validate`` and the stages
evaluate offline; ``tests/api`` runs every invalid spec through both so they cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

RULE_ERROR = "rlhf_rule"
"""Pydantic error type of a failed cross-field rule; its context names the offending field."""


@dataclass(frozen=True)
class Rule:
    """A cross-field check, evaluated by the API server (CEL) and by Python alike."""

    cel: str
    """CEL expression over ``self`` (the object the rule is attached to); true means valid."""
    message: str
    """What is wrong and how to fix it; shown by the API server and by the CLI."""
    check: Callable[[Any], bool]
    """The same rule over the validated pydantic instance; true means valid."""
    field_path: str | None = None
    """The camelCase field the error is reported against, e.g. ``.miniBatchSize``."""

    def as_validation(self) -> dict[str, str]:
        rule: dict[str, str] = {"rule": self.cel, "message": self.message}
        if self.field_path:
            rule["fieldPath"] = self.field_path
        return rule


class ApiModel(BaseModel):
    """Common configuration: camelCase on the wire, unknown keys rejected, docs from docstrings."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=True,
        frozen=True,
        # Strict, like the API server: "yes" is not a boolean and "3" is not an integer.
        strict=True,
    )

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> ApiModel:
        for rule in type(self).rules:
            if not rule.check(self):
                where = (rule.field_path or "").lstrip(".")
                raise PydanticCustomError(RULE_ERROR, "{message}", {"field": where, "message": rule.message})
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> Any:
        schema = handler(core_schema)
        own_rules = cls.__dict__.get("rules", ())
        if own_rules:
            target = handler.resolve_ref_schema(schema)
            target["x-kubernetes-validations"] = [r.as_validation() for r in own_rules]
        return schema

    def to_wire(self) -> dict[str, Any]:
        """The camelCase JSON-compatible form, omitting unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
