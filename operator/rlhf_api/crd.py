"""Generates the RLHFRun CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema (``$ref``, ``anyOf`` for optionals, ``additionalProperties: false``);
the API server wants a structural OpenAPI v3 schema. ``structural()`` bridges the two:
it inlines references, collapses optionals, turns free-form maps into
``x-kubernetes-preserve-unknown-fields`` and keeps descriptions, defaults, bounds and CEL rules.
"""

from __future__ import annotations

from typing import Any

from .names import (
    CRD_NAME,
    GROUP,
    KIND,
    LABEL_APP_NAME,
    LABEL_APP_PART_OF,
    MANAGER,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
)
from .run import RLHFRun, RLHFRunSpec, RLHFRunStatus

_KEPT_KEYWORDS = (
    "type",
    "description",
    "default",
    "enum",
    "format",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "pattern",
    "x-kubernetes-validations",
)

# Lists whose items are identified by a key, so server-side apply merges them per item.
_MAP_LISTS: dict[tuple[str, ...], list[str]] = {("status", "stages"): ["name"], ("status", "conditions"): ["type"]}


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**target, **extra}
    return schema


def structural(schema: dict[str, Any], defs: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Convert one pydantic JSON Schema node into a structural CRD schema node."""
    schema = _resolve(schema, defs)
    if "anyOf" in schema:
        branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"{'.'.join(path)}: unions other than Optional[X] cannot be structural")
        merged = {**_resolve(branches[0], defs), **{k: v for k, v in schema.items() if k != "anyOf"}}
        return structural(merged, defs, path)

    out: dict[str, Any] = {k: schema[k] for k in _KEPT_KEYWORDS if k in schema}
    if out.get("default", 0) is None:
        del out["default"]
    if "const" in schema:
        out["enum"] = [schema["const"]]
        out.setdefault("type", "string")
    # OpenAPI v3.0 (what CRDs use) spells exclusive bounds as booleans next to minimum/maximum.
    if "exclusiveMinimum" in schema:
        out["minimum"], out["exclusiveMinimum"] = schema["exclusiveMinimum"], True
    if "exclusiveMaximum" in schema:
        out["maximum"], out["exclusiveMaximum"] = schema["exclusiveMaximum"], True

    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        out["type"] = "object"
        props = schema.get("properties")
        if props:
            out["properties"] = {name: structural(sub, defs, (*path, name)) for name, sub in props.items()}
            if schema.get("required"):
                out["required"] = list(schema["required"])
        else:
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict) and extra:
                out["additionalProperties"] = structural(extra, defs, (*path, "*"))
            else:
                out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = structural(schema.get("items", {}), defs, (*path, "[]"))
        keys = _MAP_LISTS.get(path[-2:]) if len(path) >= 2 else None
        if keys:
            out["x-kubernetes-list-type"] = "map"
            out["x-kubernetes-list-map-keys"] = keys
    elif kind is None and "enum" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _schema_of(model: type[Any], path: tuple[str, ...]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}), path)


def openapi_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema."""
    spec = _schema_of(RLHFRunSpec, ("spec",))
    status = _schema_of(RLHFRunStatus, ("status",))
    root_rules = [r.as_validation() for r in RLHFRun.rules]
    return {
        "type": "object",
        "description": RLHFRun.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": root_rules,
    }


PRINTER_COLUMNS = [
    {"name": "Method", "type": "string", "jsonPath": ".spec.method"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress",
        "description": "Stages done out of stages to run, and the current stage's percent.",
    },
    {
        "name": "Reward",
        "type": "number",
        "jsonPath": ".status.reward",
        "description": "Latest mean reward reported by the policy-optimisation stage.",
    },
    {"name": "Output", "type": "string", "jsonPath": ".status.outputModel", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {LABEL_APP_NAME: MANAGER, LABEL_APP_PART_OF: MANAGER},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["ml", "rlhf"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }
