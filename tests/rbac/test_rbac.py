"""Least privilege, proven against the real API server: `kubectl auth can-i --as=<operator>` over a
table of what the operator must and must not be able to do, for the chart's RBAC as installed."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from .conftest import CLUSTER_WIDE, OTHER, SCOPED, WATCHED, Installed

pytestmark = pytest.mark.controlplane

# What the operator does (docs/install.md "What the operator may do"), per namespace it watches.
# The chart must grant exactly these: test_chart_grants_exactly_what_the_operator_needs.
NEEDED = {
    ("rlhf-operator.io", "rlhfruns"): {"get", "list", "watch"},
    ("rlhf-operator.io", "rlhfruns/status"): {"get", "update", "patch"},
    ("rlhf-operator.io", "rlhfruns/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/log"): {"get"},  # live progress: the stage prints it on stdout
    ("", "services"): {"create"},  # a multi-node stage's rendezvous Service; the run's deletion removes it
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create"},  # watched: the workspace cache
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
# (verb, resource[.group][/subresource]) rows, checked in a namespace or cluster-wide.


def _row_resource(group: str, resource: str) -> str:
    """ "rlhfruns/status" in group "rlhf-operator.io" -> "rlhfruns.rlhf-operator.io/status"."""
    base, _, sub = resource.partition("/")
    return (f"{base}.{group}" if group else base) + (f"/{sub}" if sub else "")


NAMESPACED_ALLOWED = [
    (verb, _row_resource(group, resource))
    for (group, resource), verbs in sorted(NEEDED.items())
    for verb in sorted(verbs)
]
NAMESPACED_FORBIDDEN = [
    ("get", "secrets"),
    ("list", "secrets"),
    ("watch", "secrets"),
    ("create", "secrets"),
    ("create", "pods"),
    ("delete", "pods"),
    ("create", "pods/exec"),
    ("create", "pods/attach"),
    ("create", "pods/portforward"),
    ("create", "pods/ephemeralcontainers"),
    ("create", "rlhfruns.rlhf-operator.io"),
    ("update", "rlhfruns.rlhf-operator.io"),
    ("patch", "rlhfruns.rlhf-operator.io"),
    ("delete", "rlhfruns.rlhf-operator.io"),
    ("get", "configmaps"),
    ("list", "configmaps"),
    ("create", "configmaps"),  # a stage's config rides on its Job (issue 14): no ConfigMap to write
    ("patch", "configmaps"),
    ("delete", "configmaps"),
    ("delete", "persistentvolumeclaims"),
    ("update", "persistentvolumeclaims"),
    ("update", "jobs.batch"),  # patch suffices (suspend/resume)
    ("create", "deployments.apps"),
    ("create", "statefulsets.apps"),
    ("create", "cronjobs.batch"),
    ("get", "services"),
    ("delete", "services"),
    ("update", "services"),
    ("patch", "services"),
    ("create", "serviceaccounts"),
    ("create", "serviceaccounts/token"),
    ("create", "roles.rbac.authorization.k8s.io"),
    ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("create", "leases.coordination.k8s.io"),
]
CLUSTER_FORBIDDEN = [
    ("list", "secrets"),
    ("list", "namespaces"),
    ("get", "nodes"),
    ("create", "namespaces"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("update", "customresourcedefinitions.apiextensions.k8s.io"),
    ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("bind", "clusterroles.rbac.authorization.k8s.io"),
    ("impersonate", "users"),
    ("impersonate", "serviceaccounts"),
    ("create", "persistentvolumes"),
    ("create", "validatingwebhookconfigurations.admissionregistration.k8s.io"),
]


def _groups(user: str) -> list[str]:
    """The groups the API server's authenticator gives a ServiceAccount (kubectl --as alone gives none)."""
    namespace = user.split(":")[2]
    return ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]


def _attributes(verb: str, resource: str, namespace: str | None, name: str | None) -> dict[str, Any]:
    resource, _, subresource = resource.partition("/")
    resource, _, group = resource.partition(".")
    attrs = {
        "verb": verb,
        "group": group,
        "resource": resource,
        "subresource": subresource,
        "namespace": namespace or "",
        "name": name or "",
    }
    return {k: v for k, v in attrs.items() if v}


def table(installed: Installed, user: str, rows: list[tuple[str, str]], namespace: str | None) -> dict[str, bool]:
    """SubjectAccessReviews for every row, in one request: {"<verb> <resource> in <ns>": allowed}."""
    reviews = [
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": _groups(user),
                "resourceAttributes": _attributes(verb, res, namespace, None),
            },
        }
        for verb, res in rows
    ]
    out = installed.plane.kubectl(
        "create", "-o", "json", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": reviews})
    )
    items, decoder, at = [], json.JSONDecoder(), 0  # one JSON document per created review
    while at < len(out.strip()):
        item, at = decoder.raw_decode(out, at)
        items.append(item)
        while at < len(out) and out[at].isspace():
            at += 1
    return {
        f"{verb} {res} in {namespace or 'the cluster'}": bool(item["status"].get("allowed"))
        for (verb, res), item in zip(rows, items, strict=True)
    }


def can(installed: Installed, user: str, verb: str, resource: str, namespace: str | None) -> bool:
    """`kubectl auth can-i --as=<user>` itself, as a person would check it."""
    resource, _, subresource = resource.partition("/")
    args = ["auth", "can-i", verb, resource, f"--as={user}", *(f"--as-group={g}" for g in _groups(user))]
    args += [f"--subresource={subresource}"] if subresource else []
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    out = installed.plane.kubectl(*args, check=False).strip().splitlines()
    assert out and out[0] in ("yes", "no"), out
    return out[0] == "yes"


def _grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert not rule.get("resourceNames"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                found.setdefault((group, resource), set()).update(rule["verbs"])
    return found


def test_chart_grants_exactly_what_the_operator_needs(installed: Installed) -> None:
    """The table above is the chart's RBAC as installed, no more: a new right must be added to
    NEEDED (and docs/install.md) deliberately, not slip in."""
    assert _grants(_rules(installed, "clusterrole", "rlhf-operator")) == NEEDED
    for namespace in WATCHED:
        assert _grants(_rules(installed, "role", "scoped-rlhf-operator", namespace)) == NEEDED
    for name in ("rlhf-operator-crd-reader", "scoped-rlhf-operator-crd-reader"):
        assert _grants(_rules(installed, "clusterrole", name)) == {
            ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"}
        }
    assert "*" not in str(_rules(installed, "clusterrole", "rlhf-operator"))


@pytest.mark.parametrize("namespace", [*WATCHED, OTHER, "rlhf-system"])
def test_cluster_wide_operator(installed: Installed, namespace: str) -> None:
    allowed = table(installed, CLUSTER_WIDE, NAMESPACED_ALLOWED, namespace)
    rows = [r for r in NAMESPACED_FORBIDDEN if namespace != "rlhf-system" or "leases" not in r[1]]  # its Lease's home
    forbidden = table(installed, CLUSTER_WIDE, rows, namespace)
    assert [k for k, v in allowed.items() if not v] == []
    assert [k for k, v in forbidden.items() if v] == []


@pytest.mark.parametrize("namespace", WATCHED)
def test_scoped_operator_in_its_namespaces(installed: Installed, namespace: str) -> None:
    allowed = table(installed, SCOPED, NAMESPACED_ALLOWED, namespace)
    forbidden = table(installed, SCOPED, NAMESPACED_FORBIDDEN, namespace)
    assert [k for k, v in allowed.items() if not v] == []
    assert [k for k, v in forbidden.items() if v] == []


@pytest.mark.parametrize("namespace", [OTHER, "rlhf-system", "default", None])
def test_scoped_operator_cannot_touch_other_namespaces(installed: Installed, namespace: str | None) -> None:
    granted = table(installed, SCOPED, NAMESPACED_ALLOWED + NAMESPACED_FORBIDDEN, namespace)
    assert [k for k, v in granted.items() if v] == []


@pytest.mark.parametrize("user", [CLUSTER_WIDE, SCOPED])
def test_nothing_cluster_wide_but_reading_the_crd(installed: Installed, user: str) -> None:
    forbidden = table(installed, user, CLUSTER_FORBIDDEN, None)
    assert [k for k, v in forbidden.items() if v] == []
    crd = [(verb, "customresourcedefinitions.apiextensions.k8s.io") for verb in ("get", "list", "watch")]
    assert all(table(installed, user, crd, None).values())


@pytest.mark.parametrize(("user", "home"), [(CLUSTER_WIDE, "rlhf-system"), (SCOPED, "rlhf-scoped")])
def test_leader_election_touches_only_its_own_lease(installed: Installed, user: str, home: str) -> None:
    lease = user.rsplit(":", 1)[1]  # the Lease is named after the release, as the ServiceAccount is

    def allowed(verb: str, namespace: str, name: str | None = None) -> bool:
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": _groups(user),
                "resourceAttributes": _attributes(verb, "leases.coordination.k8s.io", namespace, name),
            },
        }
        out = installed.plane.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review))
        return bool(json.loads(out)["status"].get("allowed"))

    assert allowed("create", home)
    assert allowed("get", home, lease) and allowed("update", home, lease)
    assert not allowed("get", home, "kube-scheduler") and not allowed("update", home, "kube-scheduler")
    assert not allowed("delete", home, lease) and not allowed("list", home) and not allowed("watch", home)
    assert not allowed("create", "kube-system")


def test_kubectl_auth_can_i_agrees(installed: Installed) -> None:
    """The headline checks, as an administrator would type them."""
    assert can(installed, CLUSTER_WIDE, "create", "jobs.batch", "team-a")
    assert can(installed, CLUSTER_WIDE, "update", "rlhfruns.rlhf-operator.io/status", "team-a")
    assert not can(installed, CLUSTER_WIDE, "get", "secrets", "team-a")
    assert not can(installed, CLUSTER_WIDE, "list", "secrets", None)
    assert not can(installed, CLUSTER_WIDE, "create", "pods", "team-a")
    assert not can(installed, CLUSTER_WIDE, "create", "pods/exec", "team-a")
    assert can(installed, SCOPED, "create", "jobs.batch", "team-b")
    assert not can(installed, SCOPED, "create", "jobs.batch", OTHER)
    assert not can(installed, SCOPED, "list", "rlhfruns.rlhf-operator.io", None)


def _rules(installed: Installed, kind: str, name: str, namespace: str | None = None) -> list[dict[str, Any]]:
    args = ["get", kind, name, "-o", "yaml"] + (["-n", namespace] if namespace else [])
    return yaml.safe_load(installed.plane.kubectl(*args))["rules"]
