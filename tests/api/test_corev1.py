"""The core/v1 values of spec.runtime (tolerations, affinity, nodeSelector, image, resources) are refused at
admission, by the real API server, as strictly as the API server refuses them in a Pod; the offline
validator agrees; and what is admitted becomes a Job the API server accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rlhf_api import RLHFRunSpec
from rlhf_api.corev1 import Affinity, Toleration
from rlhf_api.layout import RunRef
from rlhf_api.validation import validate_manifest
from rlhf_operator.children import build_job

from .builders import kubectl_create, minimal_run, patched

pytestmark = pytest.mark.controlplane

SHA = "sha256:" + "0123456789abcdef" * 4
LONG_PREFIX_KEY = ".".join(["a" * 63] * 4) + "/gpu"  # a 255-character DNS subdomain as the prefix


def _node_terms(*expressions: dict[str, Any], fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    term: dict[str, Any] = {"matchExpressions": list(expressions)}
    if fields is not None:
        term = {"matchFields": fields}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def _pod_term(**term: Any) -> dict[str, Any]:
    return {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"topologyKey": "zone", **term}]}}


# (case id, spec.runtime, the field the error must name, the rule's message (None: a schema error),
#  whether a Pod with the same value is refused by the API server too (False: stricter than a Pod))
INVALID: list[tuple[str, dict[str, Any], str, str | None, bool]] = [
    # Tolerations (ValidateTolerations)
    (
        "toleration without key or Exists",
        {"tolerations": [{"operator": "Equal", "value": "x"}]},
        "tolerations[0].operator",
        "needs operator: Exists",
        True,
    ),
    ("toleration with neither key nor operator", {"tolerations": [{}]}, "tolerations[0].operator", "Exists", True),
    (
        "Exists toleration with a value",
        {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "yes"}]},
        "tolerations[0].value",
        "remove value",
        True,
    ),
    (
        "tolerationSeconds with NoSchedule",
        {"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}]},
        "tolerations[0].tolerationSeconds",
        "effect: NoExecute",
        True,
    ),
    (
        "tolerationSeconds without effect",
        {"tolerations": [{"key": "gpu", "operator": "Exists", "tolerationSeconds": 60}]},
        "tolerations[0].tolerationSeconds",
        "effect: NoExecute",
        True,
    ),
    (
        "unknown toleration operator",
        {"tolerations": [{"key": "gpu", "operator": "In"}]},
        "tolerations[0].operator",
        None,
        True,
    ),
    (
        "unknown taint effect",
        {"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoScheduling"}]},
        "tolerations[0].effect",
        None,
        True,
    ),
    (
        "toleration key with a space",
        {"tolerations": [{"key": "gpu type", "operator": "Exists"}]},
        "tolerations[0].key",
        None,
        True,
    ),
    (
        "toleration key with two slashes",
        {"tolerations": [{"key": "a/b/c", "operator": "Exists"}]},
        "tolerations[0].key",
        None,
        True,
    ),
    (
        "toleration key name over 63 characters",
        {"tolerations": [{"key": "example.com/" + "g" * 64, "operator": "Exists"}]},
        "tolerations[0].key",
        None,
        True,
    ),
    (
        "toleration key prefix over 253 characters",
        {"tolerations": [{"key": LONG_PREFIX_KEY, "operator": "Exists"}]},
        "tolerations[0].key",
        "at most 253 characters",
        True,
    ),
    (
        "toleration value with a space",
        {"tolerations": [{"key": "gpu", "value": "a b"}]},
        "tolerations[0].value",
        None,
        True,
    ),
    (
        "toleration value over 63 characters",
        {"tolerations": [{"key": "gpu", "value": "v" * 64}]},
        "tolerations[0].value",
        None,
        True,
    ),
    (
        "misspelled toleration field",
        {"tolerations": [{"key": "gpu", "operator": "Exists", "tolerationSecond": 5}]},
        "tolerationSecond",
        None,
        True,
    ),
    # nodeSelector (label keys and values)
    ("nodeSelector key with a space", {"nodeSelector": {"gpu type": "a100"}}, "nodeSelector", "label key", True),
    (
        "nodeSelector key prefix over 253 characters",
        {"nodeSelector": {LONG_PREFIX_KEY: "x"}},
        "nodeSelector",
        "label key",
        True,
    ),
    ("nodeSelector value with a space", {"nodeSelector": {"gpu": "A100 80GB"}}, "nodeSelector", None, True),
    # Node affinity (ValidateNodeSelector, ValidatePreferredSchedulingTerms)
    (
        "required node affinity without terms",
        {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}},
        "nodeSelectorTerms",
        None,
        True,
    ),
    (
        "node requirement In without values",
        {"affinity": _node_terms({"key": "gpu", "operator": "In"})},
        "matchExpressions[0].values",
        "at least one value",
        True,
    ),
    (
        "node requirement Exists with values",
        {"affinity": _node_terms({"key": "gpu", "operator": "Exists", "values": ["a"]})},
        "matchExpressions[0].values",
        "take no values",
        True,
    ),
    (
        "node requirement Gt with two values",
        {"affinity": _node_terms({"key": "gpu-count", "operator": "Gt", "values": ["1", "2"]})},
        "matchExpressions[0].values",
        "exactly one value",
        True,
    ),
    (
        "node requirement Lt with a word",
        {"affinity": _node_terms({"key": "gpu-count", "operator": "Lt", "values": ["four"]})},
        "matchExpressions[0].values",
        "an integer",
        False,  # the scheduler cannot compare it; a Pod is admitted and never schedules
    ),
    (
        "unknown node selector operator",
        {"affinity": _node_terms({"key": "gpu", "operator": "Equals", "values": ["a"]})},
        "matchExpressions[0].operator",
        None,
        True,
    ),
    (
        "node requirement key with a space",
        {"affinity": _node_terms({"key": "gpu type", "operator": "Exists"})},
        "matchExpressions[0].key",
        None,
        True,
    ),
    (
        "node requirement value that is no label value",
        {"affinity": _node_terms({"key": "gpu", "operator": "In", "values": ["A100 80GB"]})},
        "matchExpressions[0].values[0]",
        None,
        True,
    ),
    (
        "preferred node value that is no label value",
        {
            "affinity": {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 1,
                            "preference": {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["A 1"]}]},
                        }
                    ]
                }
            }
        },
        "matchExpressions[0].values[0]",
        None,
        False,  # a Pod takes any string there, though no node label can ever equal it
    ),
    (
        "node field other than metadata.name",
        {"affinity": _node_terms(fields=[{"key": "metadata.labels", "operator": "In", "values": ["n"]}])},
        "matchFields[0].key",
        None,
        True,
    ),
    (
        "node field with two names",
        {"affinity": _node_terms(fields=[{"key": "metadata.name", "operator": "In", "values": ["a", "b"]}])},
        "matchFields[0].values",
        None,
        True,
    ),
    (
        "preferred node term of weight 0",
        {
            "affinity": {
                "nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 0, "preference": {}}]}
            }
        },
        "weight",
        None,
        True,
    ),
    (
        "preferred node term of weight 101",
        {
            "affinity": {
                "nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 101, "preference": {}}]}
            }
        },
        "weight",
        None,
        True,
    ),
    ("misspelled affinity field", {"affinity": {"nodeAfinity": {}}}, "nodeAfinity", None, True),
    # Pod (anti-)affinity (validatePodAffinityTerm, label selectors)
    (
        "pod affinity term without topologyKey",
        {"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]}}},
        "topologyKey",
        None,
        True,
    ),
    ("pod affinity term with an empty topologyKey", {"affinity": _pod_term(topologyKey="")}, "topologyKey", None, True),
    (
        "label selector In without values",
        {"affinity": _pod_term(labelSelector={"matchExpressions": [{"key": "app", "operator": "In"}]})},
        "matchExpressions[0].values",
        "at least one value",
        True,
    ),
    (
        "label selector DoesNotExist with values",
        {
            "affinity": _pod_term(
                labelSelector={"matchExpressions": [{"key": "app", "operator": "DoesNotExist", "values": ["a"]}]}
            )
        },
        "matchExpressions[0].values",
        "take no values",
        True,
    ),
    (
        "label selector with Gt",
        {
            "affinity": _pod_term(
                labelSelector={"matchExpressions": [{"key": "app", "operator": "Gt", "values": ["1"]}]}
            )
        },
        "matchExpressions[0].operator",
        None,
        True,
    ),
    (
        "matchLabels key with a space",
        {"affinity": _pod_term(labelSelector={"matchLabels": {"my app": "x"}})},
        "labelSelector.matchLabels",
        "label key",
        True,
    ),
    (
        "namespace selector value with a slash",
        {"affinity": _pod_term(namespaceSelector={"matchLabels": {"team": "a/b"}})},
        "namespaceSelector.matchLabels",
        None,
        True,
    ),
    ("namespace that is no DNS label", {"affinity": _pod_term(namespaces=["Team_A"])}, "namespaces[0]", None, True),
    (
        "matchLabelKeys without labelSelector",
        {"affinity": _pod_term(matchLabelKeys=["app"])},
        "matchLabelKeys",
        "set labelSelector",
        True,
    ),
    (
        "mismatchLabelKeys without labelSelector",
        {"affinity": _pod_term(mismatchLabelKeys=["app"])},
        "mismatchLabelKeys",
        "set labelSelector",
        True,
    ),
    (
        "key in matchLabelKeys and mismatchLabelKeys",
        {"affinity": _pod_term(labelSelector={}, matchLabelKeys=["app"], mismatchLabelKeys=["app"])},
        "matchLabelKeys",
        "both matchLabelKeys and mismatchLabelKeys",
        True,
    ),
    (
        "key in matchLabelKeys and labelSelector",
        {"affinity": _pod_term(labelSelector={"matchLabels": {"app": "x"}}, matchLabelKeys=["app"])},
        "matchLabelKeys",
        "also be in labelSelector",
        # Refused when the Pod is created with the key among its labels (its value joins the
        # selector); a Job's template is not checked that way, so its Pods would never be created.
        False,
    ),
    (
        "pod anti-affinity preferred term of weight 0",
        {
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 0, "podAffinityTerm": {"topologyKey": "zone"}}
                    ]
                }
            }
        },
        "weight",
        None,
        True,
    ),
    # Image references
    ("image with a leading space", {"image": " ghcr.io/org/stages:1"}, "image", "image reference", True),
    ("image with a trailing newline", {"image": "ghcr.io/org/stages:1\n"}, "image", "image reference", True),
    ("empty image", {"image": ""}, "image", None, True),
    ("image with an uppercase path", {"image": "ghcr.io/Org/stages:1"}, "image", "image reference", False),
    ("image tag with a plus", {"image": "ghcr.io/org/stages:1.0+cu121"}, "image", "image reference", False),
    ("image with an empty tag", {"image": "ghcr.io/org/stages:"}, "image", "image reference", False),
    ("image digest too short", {"image": "ghcr.io/org/stages@sha256:abc"}, "image", "image reference", False),
    ("image with a space inside", {"image": "ghcr.io/org/my stages:1"}, "image", "image reference", False),
    # Resources (quantities non-negative, GPUs whole)
    ("negative CPU", {"_resources": {"cpu": "-1"}}, "cpu", None, True),
    ("negative memory", {"_resources": {"memory": "-16Gi"}}, "memory", None, True),
    ("fractional exponent", {"_resources": {"memory": "1e1.5"}}, "memory", None, True),
    ("fractional GPUs", {"_resources": {"gpus": 1.5}}, "gpus", None, True),
]

# Every core/v1 value these types know, in the forms users copy from Pod specs: all admitted.
VALID_RUNTIME: dict[str, Any] = {
    "image": f"registry.example.com:5000/team/rlhf-stages:0.1.0-rc_1@{SHA}",
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "kubernetes.io/os": "linux", "spot": ""},
    "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"operator": "Exists"},
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": ""},
        {"key": "dedicated", "value": "ml"},
        {
            "key": "node.kubernetes.io/unreachable",
            "operator": "Exists",
            "effect": "NoExecute",
            "tolerationSeconds": 300,
        },
        {"key": "example.com/spot", "operator": "", "effect": "PreferNoSchedule"},
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]},
                            {"key": "nvidia.com/gpu.count", "operator": "Gt", "values": ["3"]},
                            {"key": "example.com/retired", "operator": "DoesNotExist"},
                        ]
                    },
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-node-1"]}]},
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "preference": {"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]},
                },
                {"weight": 1, "preference": {}},
            ],
        },
        "podAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 50,
                    "podAffinityTerm": {
                        "topologyKey": "topology.kubernetes.io/zone",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "dataset-cache"}},
                        "namespaceSelector": {},
                    },
                }
            ]
        },
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchExpressions": [{"key": "rlhf-operator.io/run", "operator": "Exists"}]},
                    "namespaces": ["team-a", "team-b"],
                    "matchLabelKeys": ["rlhf-operator.io/stage"],
                    "mismatchLabelKeys": ["tenant"],
                }
            ]
        },
    },
}

VALID_IMAGES = [
    "ubuntu",
    "ubuntu:24.04",
    "localhost:5000/stages",
    "ghcr.io/rlhf-operator/rlhf-stages:0.1.0",
    f"ghcr.io/org/stages@{SHA}",
    "[::1]:5000/a/b__c.d-e:TAG_1.x",
    "my-registry.local/team/sub/stages:v1-cu121",
]

VALID_RESOURCES = [{"cpu": "500m", "memory": "16Gi"}, {"cpu": "+1", "memory": "1e9"}, {"cpu": ".5", "memory": "0"}]


def _run(runtime: dict[str, Any], name: str = "corev1") -> dict[str, Any]:
    doc = minimal_run(name)
    if "_resources" in runtime:
        return patched(doc, "spec.ppo.resources", runtime["_resources"])
    return patched(doc, "spec.runtime", runtime)


def _pod(runtime: dict[str, Any]) -> dict[str, Any]:
    """A Pod carrying the same core/v1 values, to ask the API server what it makes of them in a Pod."""
    container: dict[str, Any] = {"name": "c", "image": runtime.get("image", "busybox")}
    if "_resources" in runtime:
        res = dict(runtime["_resources"])
        amounts = {k: res[k] for k in ("cpu", "memory") if k in res}
        if "gpus" in res:
            amounts["nvidia.com/gpu"] = res["gpus"]
        container["resources"] = {"requests": amounts, "limits": amounts}
    spec: dict[str, Any] = {"containers": [container]}
    for key in ("tolerations", "affinity", "nodeSelector"):
        if key in runtime:
            spec[key] = runtime[key]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"}, "spec": spec}


@pytest.mark.parametrize(
    ("runtime", "field", "message", "pod_refuses"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_bad_core_value_is_refused_naming_the_field(control_plane, namespace, runtime, field, message, pod_refuses):
    doc = _run(runtime)
    proc = kubectl_create(control_plane, namespace, doc)
    assert proc.returncode != 0, f"server accepted: {proc.stdout}"
    assert field in proc.stderr, proc.stderr
    if message:
        assert message in proc.stderr, proc.stderr

    _, errors = validate_manifest(doc)
    assert errors, "offline validation accepted what the server refused"
    assert any(field in line for line in errors), errors
    if message:
        assert any(message in line for line in errors), errors

    # The same value in a Pod: refused there too, unless the case is marked stricter than a Pod.
    pod = kubectl_create(control_plane, namespace, _pod(runtime), "--dry-run=server")
    assert (pod.returncode != 0) == pod_refuses, pod.stderr or pod.stdout


def test_table_covers_every_value():
    assert len(INVALID) >= 50
    ids = " ".join(c[0] for c in INVALID)
    for word in ("toleration", "nodeSelector", "node requirement", "pod affinity", "label selector", "image", "CPU"):
        assert word in ids


def test_valid_core_values_are_admitted_and_become_an_accepted_job(control_plane, namespace):
    doc = _run(VALID_RUNTIME, "corev1-ok")
    model, errors = validate_manifest(doc)
    assert errors == [] and model is not None
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(doc))
    stored = json.loads(control_plane.kubectl("get", "rlhfrun", "corev1-ok", "-n", namespace, "-o", "json"))
    # What the server stored parses back to the same spec, and the wire form is what was written.
    assert RLHFRunSpec.model_validate(stored["spec"]) == model.spec
    assert stored["spec"]["runtime"]["tolerations"] == VALID_RUNTIME["tolerations"]
    assert stored["spec"]["runtime"]["affinity"] == VALID_RUNTIME["affinity"]

    # The stage Job the operator builds from it carries the values unchanged, and the API server
    # (which validates a Job's Pod template like a Pod) accepts it.
    job = build_job(RunRef(name="corev1-ok", namespace=namespace, uid="0000-uid"), model.spec, "sft")
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["tolerations"] == VALID_RUNTIME["tolerations"]
    assert pod_spec["affinity"] == VALID_RUNTIME["affinity"]
    assert pod_spec["nodeSelector"] == VALID_RUNTIME["nodeSelector"]
    control_plane.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(job))


@pytest.mark.parametrize("image", VALID_IMAGES)
def test_valid_image_references_are_admitted(control_plane, namespace, image):
    doc = _run({"image": image}, "image-ok")
    assert validate_manifest(doc)[1] == []
    proc = kubectl_create(control_plane, namespace, doc)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("resources", VALID_RESOURCES, ids=[json.dumps(r) for r in VALID_RESOURCES])
def test_valid_quantities_are_admitted(control_plane, namespace, resources):
    doc = _run({"_resources": resources}, "quantity-ok")
    assert validate_manifest(doc)[1] == []
    proc = kubectl_create(control_plane, namespace, doc)
    assert proc.returncode == 0, proc.stderr


def test_models_keep_the_core_v1_wire_names():
    wire = VALID_RUNTIME["affinity"]
    assert Affinity.model_validate(wire).to_wire() == wire
    for toleration in VALID_RUNTIME["tolerations"]:
        assert Toleration.model_validate(toleration).to_wire() == toleration
