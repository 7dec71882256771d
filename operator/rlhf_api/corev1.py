"""The core/v1 values a run embeds in its stage Pods, typed and checked as the API server checks a Pod.

Tolerations, affinity, node selectors and the image reference are copied into every stage Job's Pod
template. Left free-form, a bad value passes ``kubectl apply`` and only fails when the operator creates
the Job (or, worse, when the Job controller creates the Pod), long after its author has gone. These
models carry the rules of ``k8s.io/kubernetes`` ``pkg/apis/core/validation`` (``ValidateTolerations``,
``validateAffinity``, ``ValidateNodeSelector``, label selectors, label keys and values), written here as
schema bounds where the OpenAPI schema can say them and as :class:`~.base.Rule` (CEL at admission, the same
predicate in Python) where it cannot. Wire names are the core/v1 camelCase ones, so a toleration or an
affinity copied from a Pod spec is accepted unchanged.

Where this is stricter than a Pod: node-affinity values of preferred terms must be label values (a Pod
tolerates any string there, though no node label can ever equal it), a ``Gt``/``Lt`` value must be an
integer (the scheduler fails to parse anything else), the image must follow the reference grammar
``name[:tag][@digest]`` (the API server only rejects an empty image or surrounding whitespace), and every
list is bounded (``maxItems``) to keep the CRD's CEL cost within the API server's budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

from .base import RULE_ERROR, ApiModel, Rule


@dataclass(frozen=True)
class ValueRule:
    """A :class:`~.base.Rule` on a single value (a string or a map) instead of a model.

    ``Annotated[str, ValueRule(rule)]`` puts the CEL rule on that value's schema node, where ``self`` is
    the value, and runs ``rule.check`` on the value after pydantic's own validation.
    """

    rule: Rule

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._validate, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        out = handler(schema)
        target = handler.resolve_ref_schema(out)
        target["x-kubernetes-validations"] = [*target.get("x-kubernetes-validations", []), self.rule.as_validation()]
        return out

    def _validate(self, value: Any) -> Any:
        if not self.rule.check(value):
            raise PydanticCustomError(RULE_ERROR, "{message}", {"field": "", "message": self.rule.message})
        return value


@dataclass(frozen=True)
class Syntax:
    """A regular expression the whole string must match, said once for both sides.

    The API server gets it as the schema's ``pattern`` (no CEL cost); Python matches the same expression
    and, on a mismatch, says what was expected instead of printing the expression.
    """

    regex: str
    expected: str
    """What a matching value is, in words, for the error: ``must be <expected>``."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._validate, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        out = handler(schema)
        handler.resolve_ref_schema(out)["pattern"] = f"^{self.regex}$"
        return out

    def _validate(self, value: str) -> str:
        if re.fullmatch(self.regex, value) is None:
            raise PydanticCustomError(RULE_ERROR, "{message}", {"field": "", "message": f"must be {self.expected}"})
        return value


# --- Label keys and values (apimachinery IsQualifiedName / IsValidLabelValue) -------------------------

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
"""The name part of a label key, and a non-empty label value: at most 63 characters."""
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = rf"{_DNS_LABEL}(\.{_DNS_LABEL})*"
_QUALIFIED_NAME = rf"({_DNS_SUBDOMAIN}/)?{_NAME}"
_LONG_PREFIX = r"[^/]{254}"
"""254 characters before any '/': a key whose prefix is longer than a DNS subdomain may be."""

LABEL_KEY_MAX = 253 + 1 + 63

_PREFIX_RULE = Rule(
    cel=f"!self.matches('^{_LONG_PREFIX}')",
    message="the prefix of a label key (before '/') is a DNS subdomain of at most 253 characters",
    check=lambda key: re.match(_LONG_PREFIX, key) is None,
)

_LABEL_KEY_TEXT = (
    "a label key: an optional DNS-subdomain prefix (lowercase, at most 253 characters) and '/', then a name "
    "of at most 63 letters, digits, '-', '_' and '.' that starts and ends with a letter or digit, "
    "e.g. nvidia.com/gpu.product"
)
_LABEL_VALUE_TEXT = (
    "a label value: empty, or at most 63 letters, digits, '-', '_' and '.' that starts and ends with a "
    "letter or digit, e.g. NVIDIA-A100-SXM4-80GB"
)

LabelKey = Annotated[
    str,
    Field(min_length=1, max_length=LABEL_KEY_MAX),
    Syntax(_QUALIFIED_NAME, _LABEL_KEY_TEXT),
    ValueRule(_PREFIX_RULE),
]
"""A label key, e.g. ``nvidia.com/gpu``."""

LabelValue = Annotated[str, Field(max_length=63), Syntax(f"({_NAME})?", _LABEL_VALUE_TEXT)]
"""A label value: empty, or a name such as ``NVIDIA-A100-SXM4-80GB``."""

DNSLabel = Annotated[
    str,
    Field(min_length=1, max_length=63),
    Syntax(_DNS_LABEL, "a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit"),
]
DNSSubdomain = Annotated[
    str,
    Field(min_length=1, max_length=253),
    Syntax(_DNS_SUBDOMAIN, "a DNS subdomain: dot-separated lowercase DNS labels, e.g. gpu-node-1.example.com"),
]


def _is_label_key(key: str) -> bool:
    return len(key) <= LABEL_KEY_MAX and re.fullmatch(_QUALIFIED_NAME, key) is not None and _PREFIX_RULE.check(key)


LABEL_MAP_KEYS = Rule(
    # The schema cannot constrain a map's keys, so CEL checks them; every key is checked alike.
    cel=f"self.all(k, k.size() <= {LABEL_KEY_MAX} && k.matches(r'^{_QUALIFIED_NAME}$') "
    f"&& !k.matches('^{_LONG_PREFIX}'))",
    message=f"every key must be {_LABEL_KEY_TEXT}",
    check=lambda labels: all(_is_label_key(k) for k in labels),
)

LabelMap = Annotated[dict[str, LabelValue], Field(max_length=32), ValueRule(LABEL_MAP_KEYS)]
"""Labels, ``{key: value}``, as a Pod's nodeSelector or a selector's matchLabels; at most 32."""


# --- Tolerations (ValidateTolerations) ---------------------------------------------------------------


class Toleration(ApiModel):
    """A core/v1 Toleration: the stage Pods tolerate taints matching ``<key, value, effect>``."""

    rules = (
        Rule(
            cel="(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            message="a toleration without a key tolerates every taint and needs operator: Exists; "
            "set the taint's key, or operator: Exists",
            field_path=".operator",
            check=lambda t: bool(t.key) or t.operator == "Exists",
        ),
        Rule(
            cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="operator: Exists matches every value of the key: remove value, or use operator: Equal",
            field_path=".value",
            check=lambda t: t.operator != "Exists" or not t.value,
        ),
        Rule(
            cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message="tolerationSeconds only applies to effect: NoExecute (how long a Pod stays on a node "
            "after the taint appears): set effect: NoExecute, or remove tolerationSeconds",
            field_path=".tolerationSeconds",
            check=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
        ),
    )

    key: (
        Annotated[
            str,
            Field(max_length=LABEL_KEY_MAX),
            Syntax(f"({_QUALIFIED_NAME})?", f"empty or {_LABEL_KEY_TEXT}"),
            ValueRule(_PREFIX_RULE),
        ]
        | None
    ) = None
    """Taint key (a label key, e.g. ``nvidia.com/gpu``). Empty matches every key and needs ``operator: Exists``."""
    operator: Literal["Exists", "Equal", ""] | None = None
    """``Equal`` (the default) matches ``value``; ``Exists`` matches any value of the key."""
    value: LabelValue | None = None
    """Taint value (a label value) for ``operator: Equal``; empty with ``Exists``."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""] | None = None
    """Taint effect to match; empty matches every effect."""
    toleration_seconds: int | None = None
    """With ``effect: NoExecute``: how long the Pod stays bound after the taint appears; unset: for ever."""


# --- Node affinity (ValidateNodeSelector, ValidatePreferredSchedulingTerms) ---------------------------

Values = Annotated[list[LabelValue], Field(max_length=32)]


# The API server's rules for the set-based operators, shared by node and label selector requirements.
SET_OPERATOR_RULES = (
    Rule(
        cel="!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)",
        message="operator In and NotIn need at least one value in values",
        field_path=".values",
        check=lambda r: r.operator not in ("In", "NotIn") or bool(r.values),
    ),
    Rule(
        cel="!(self.operator in ['Exists', 'DoesNotExist']) || !has(self.values) || size(self.values) == 0",
        message="operator Exists and DoesNotExist take no values: remove values",
        field_path=".values",
        check=lambda r: r.operator not in ("Exists", "DoesNotExist") or not r.values,
    ),
)


class NodeSelectorRequirement(ApiModel):
    """A node label requirement: ``key operator values``."""

    rules = (
        *SET_OPERATOR_RULES,
        Rule(
            cel="!(self.operator in ['Gt', 'Lt']) || (has(self.values) && size(self.values) == 1 "
            "&& self.values[0].matches('^[0-9]{1,18}$'))",
            message="operator Gt and Lt compare the node label as an integer: give exactly one value, "
            "an integer such as '4'",
            field_path=".values",
            check=lambda r: (
                r.operator not in ("Gt", "Lt")
                or (
                    r.values is not None
                    and len(r.values) == 1
                    and re.fullmatch(r"[0-9]{1,18}", r.values[0]) is not None
                )
            ),
        ),
    )

    key: LabelKey
    """Node label key, e.g. ``nvidia.com/gpu.product``."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    """How the label relates to ``values``."""
    values: Values | None = None
    """Label values: one or more for ``In``/``NotIn``, none for ``Exists``/``DoesNotExist``, a single
    integer for ``Gt``/``Lt``."""


class NodeSelectorFieldRequirement(ApiModel):
    """A node field requirement; Kubernetes supports only the node's name (``metadata.name``)."""

    key: Literal["metadata.name"]
    """The node field; only ``metadata.name``."""
    operator: Literal["In", "NotIn"]
    """``In`` or ``NotIn``."""
    values: Annotated[list[DNSSubdomain], Field(min_length=1, max_length=1)]
    """Exactly one node name."""


class NodeSelectorTerm(ApiModel):
    """Requirements that all hold for a node to match the term."""

    match_expressions: Annotated[list[NodeSelectorRequirement], Field(max_length=16)] | None = None
    """Requirements on the node's labels."""
    match_fields: Annotated[list[NodeSelectorFieldRequirement], Field(max_length=4)] | None = None
    """Requirements on the node's fields."""


class NodeSelector(ApiModel):
    """Node selector terms; a node matches when any one term matches."""

    node_selector_terms: Annotated[list[NodeSelectorTerm], Field(min_length=1, max_length=8)]
    """The terms, at least one (ORed)."""


Weight = Annotated[int, Field(ge=1, le=100)]


class PreferredSchedulingTerm(ApiModel):
    """A node preference with its weight."""

    weight: Weight
    """Weight (1-100) added to a node's score when it matches ``preference``."""
    preference: NodeSelectorTerm
    """The node selector term."""


class NodeAffinity(ApiModel):
    """Which nodes the stage Pods may run on, or prefer."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    """Nodes the Pods must run on."""
    preferred_during_scheduling_ignored_during_execution: (
        Annotated[list[PreferredSchedulingTerm], Field(max_length=16)] | None
    ) = None
    """Nodes the Pods prefer, by weight."""


# --- Pod (anti-)affinity (validatePodAffinityTerm, ValidateLabelSelector) ------------------------------


class LabelSelectorRequirement(ApiModel):
    """A label requirement: ``key operator values``."""

    rules = (*SET_OPERATOR_RULES,)

    key: LabelKey
    """Label key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the label relates to ``values``."""
    values: Values | None = None
    """Label values: one or more for ``In``/``NotIn``, none for ``Exists``/``DoesNotExist``."""


class LabelSelector(ApiModel):
    """A label selector; all of its labels and requirements must match."""

    match_labels: LabelMap | None = None
    """Labels that must be present with these values."""
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=16)] | None = None
    """Label requirements."""


LabelKeys = Annotated[list[LabelKey], Field(max_length=8)]


def _selector_keys(selector: LabelSelector | None) -> set[str]:
    if selector is None:
        return set()
    return set(selector.match_labels or {}) | {e.key for e in selector.match_expressions or []}


class PodAffinityTerm(ApiModel):
    """Pods (by label, in some namespaces) whose nodes' ``topologyKey`` domain this Pod joins or avoids."""

    rules = (
        Rule(
            cel="!has(self.matchLabelKeys) || size(self.matchLabelKeys) == 0 || has(self.labelSelector)",
            message="matchLabelKeys narrows labelSelector: set labelSelector too, or remove matchLabelKeys",
            field_path=".matchLabelKeys",
            check=lambda t: not t.match_label_keys or t.label_selector is not None,
        ),
        Rule(
            cel="!has(self.mismatchLabelKeys) || size(self.mismatchLabelKeys) == 0 || has(self.labelSelector)",
            message="mismatchLabelKeys narrows labelSelector: set labelSelector too, or remove mismatchLabelKeys",
            field_path=".mismatchLabelKeys",
            check=lambda t: not t.mismatch_label_keys or t.label_selector is not None,
        ),
        Rule(
            cel="!has(self.matchLabelKeys) || !has(self.mismatchLabelKeys) "
            "|| self.matchLabelKeys.all(k, !(k in self.mismatchLabelKeys))",
            message="a key cannot be in both matchLabelKeys and mismatchLabelKeys: remove it from one",
            field_path=".matchLabelKeys",
            check=lambda t: not set(t.match_label_keys or ()) & set(t.mismatch_label_keys or ()),
        ),
        Rule(
            cel="!has(self.matchLabelKeys) || !has(self.labelSelector) || self.matchLabelKeys.all(k, "
            "!(has(self.labelSelector.matchLabels) && k in self.labelSelector.matchLabels) "
            "&& !(has(self.labelSelector.matchExpressions) "
            "&& self.labelSelector.matchExpressions.exists(e, e.key == k)))",
            message="a key in matchLabelKeys cannot also be in labelSelector (the Pod's own value of the key "
            "is added to the selector): remove it from one",
            field_path=".matchLabelKeys",
            check=lambda t: not set(t.match_label_keys or ()) & _selector_keys(t.label_selector),
        ),
    )

    label_selector: LabelSelector | None = None
    """The Pods this term is about; unset matches no Pods."""
    namespace_selector: LabelSelector | None = None
    """Namespaces (by label) to look for those Pods in; ``{}`` is every namespace."""
    namespaces: Annotated[list[DNSLabel], Field(max_length=16)] | None = None
    """Namespaces (by name) to look for those Pods in; with no namespaceSelector either, the run's own."""
    topology_key: LabelKey
    """Node label whose value defines the domain, e.g. ``kubernetes.io/hostname`` or
    ``topology.kubernetes.io/zone``."""
    match_label_keys: LabelKeys | None = None
    """Label keys whose values on the stage Pod are added to labelSelector (``key In [value]``)."""
    mismatch_label_keys: LabelKeys | None = None
    """Label keys whose values on the stage Pod are added to labelSelector (``key NotIn [value]``)."""


class WeightedPodAffinityTerm(ApiModel):
    """A Pod affinity term with its weight."""

    weight: Weight
    """Weight (1-100) added to a node's score when it matches ``podAffinityTerm``."""
    pod_affinity_term: PodAffinityTerm
    """The term."""


PodAffinityTerms = Annotated[list[PodAffinityTerm], Field(max_length=16)]
WeightedPodAffinityTerms = Annotated[list[WeightedPodAffinityTerm], Field(max_length=16)]


class PodAffinity(ApiModel):
    """Run the stage Pods in the same topology domain as other Pods."""

    required_during_scheduling_ignored_during_execution: PodAffinityTerms | None = None
    """Terms that must all hold."""
    preferred_during_scheduling_ignored_during_execution: WeightedPodAffinityTerms | None = None
    """Terms preferred, by weight."""


class PodAntiAffinity(ApiModel):
    """Keep the stage Pods out of topology domains of other Pods."""

    required_during_scheduling_ignored_during_execution: PodAffinityTerms | None = None
    """Terms that must all hold."""
    preferred_during_scheduling_ignored_during_execution: WeightedPodAffinityTerms | None = None
    """Terms preferred, by weight."""


class Affinity(ApiModel):
    """A core/v1 Affinity for the stage Pods."""

    node_affinity: NodeAffinity | None = None
    """Node affinity."""
    pod_affinity: PodAffinity | None = None
    """Pod affinity."""
    pod_anti_affinity: PodAntiAffinity | None = None
    """Pod anti-affinity."""


# --- Image references (distribution/reference grammar) ---------------------------------------------

_ALNUM = r"[a-z0-9]+"
_PATH_COMPONENT = rf"{_ALNUM}(?:(?:[._]|__|-+){_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REFERENCE = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?"
"""``name[:tag][@digest]``: what a container runtime can pull."""

IMAGE_RULE = Rule(
    cel=f"self.matches(r'^{IMAGE_REFERENCE}$')",
    message="must be an image reference name[:tag][@digest] with no spaces, e.g. "
    "ghcr.io/rlhf-operator/rlhf-stages:0.1.0 or registry.example.com:5000/team/stages@sha256:<64 hex>; "
    "the repository path is lowercase letters, digits and '.', '_', '-' separators",
    check=lambda image: re.fullmatch(IMAGE_REFERENCE, image) is not None,
)

ImageReference = Annotated[str, Field(min_length=1, max_length=512), ValueRule(IMAGE_RULE)]
"""A container image reference, checked against the reference grammar."""
