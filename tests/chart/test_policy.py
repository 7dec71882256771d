"""The chart's run policy (templates/admission-policy.yaml, docs/policy.md), enforced by the real
API server: a ValidatingAdmissionPolicy limits the images, ServiceAccounts, PriorityClasses,
tolerations, RuntimeClasses, schedulers and Secret references a run's stage Pods may get, for every
user (system:masters included, as here).

A private control plane: the policy is cluster-scoped and would otherwise judge every other test's
runs. Each test installs its own release scoped to a fresh namespace (watchNamespaces), so value
sets never meet; the cluster-wide binding of the defaults is checked on the rendered objects."""

from __future__ import annotations

import copy
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from rlhf_api.run import STAGE_SECTIONS
from rlhf_api.runtime import DEFAULT_STAGE_IMAGE
from rlhf_operator.dev import controlplane
from rlhf_operator.dev.controlplane import ControlPlane

from .tools import REPO, Helm, by_kind, stop_quickly, wait_established

pytestmark = pytest.mark.controlplane

POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
PROBE_IMAGE = "probe.invalid/never-allowed:1"  # no prefix list in these tests allows it

CUSTOM: dict[str, Any] = {
    "stageDefaults": {"image": {"repository": "registry.example.com/mirror/rlhf-stages"}},
    "runPolicy": {
        "allowedImagePrefixes": ["registry.example.com/ml/"],
        "allowedServiceAccounts": ["trainer", "POLICY_NS/hf-reader"],
        "allowedPriorityClasses": ["ml-training"],
        "allowedTolerationKeys": ["nvidia.com/gpu", "example.com/spot"],
    },
}


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, helm: Helm) -> Iterator[ControlPlane]:
    cluster = controlplane.start(tmp_path_factory.mktemp("run-policy"))
    try:
        (crd,) = by_kind(helm.template({}), "CustomResourceDefinition")
        cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(crd))
        wait_established(cluster)
        yield cluster
    finally:
        stop_quickly(cluster)


def _run(name: str, runtime: dict[str, Any] | None = None, example: str = "minimal.yaml") -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "examples" / example).read_text())
    doc["metadata"] = {"name": name}
    if runtime is not None:
        doc["spec"]["runtime"] = {**doc["spec"].get("runtime", {}), **runtime}
    return doc


def _submit(plane: ControlPlane, namespace: str, doc: dict[str, Any], *verb: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(plane.bin_dir / "kubectl"), "--kubeconfig", str(plane.kubeconfig()), "-n", namespace]
    cmd += [*(verb or ("create", "--dry-run=server")), "-f", "-"]
    return subprocess.run(cmd, input=json.dumps(doc), capture_output=True, text=True, timeout=60, check=False)


def _install(plane: ControlPlane, helm: Helm, namespace: str, values: dict[str, Any]) -> str:
    """Apply the policy objects of a release scoped to ``namespace``; returns the policy's name once
    the API server enforces this version of it."""
    values = json.loads(json.dumps(values).replace("POLICY_NS", namespace))
    values = {**values, "watchNamespaces": [namespace], "crds": {"enabled": False}}
    release = f"p{uuid.uuid5(uuid.NAMESPACE_DNS, namespace).hex[:8]}"
    docs = [d for d in helm.template(values, release=release, namespace=namespace) if d["kind"] in POLICY_KINDS]
    assert len(docs) == 2, [d["kind"] for d in docs]
    plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(docs))
    (policy,) = by_kind(docs, "ValidatingAdmissionPolicy")
    name = str(policy["metadata"]["name"])
    # The admission plugin picks policies up from an informer: wait for it to deny with this version
    # (its message lists the allowed images, so a stale version is told apart).
    allowed = policy["spec"]["validations"][0]["message"].split("must start with ")[1]
    deadline = time.monotonic() + 60
    while True:
        proc = _submit(plane, namespace, _run("probe", {"image": PROBE_IMAGE}))
        if proc.returncode != 0 and name in proc.stderr and allowed in proc.stderr:
            return name
        assert time.monotonic() < deadline, f"policy {name} never took effect: {proc.stdout}{proc.stderr}"
        time.sleep(0.5)


@pytest.fixture
def policy_ns(plane: ControlPlane, request: pytest.FixtureRequest) -> str:
    prefix = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:30].strip("-")
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    plane.kubectl("create", "namespace", name)
    return name


def _refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0, f"admitted: {proc.stdout}"
    assert "denied request" in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def _admitted(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr


# --- the defaults ---------------------------------------------------------------------------------


def test_default_binding_covers_every_namespace_and_the_api_default_image_is_allowed(helm: Helm) -> None:
    docs = helm.template({})
    (policy,) = by_kind(docs, "ValidatingAdmissionPolicy")
    (binding,) = by_kind(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["operations"] == ["CREATE", "UPDATE"]
    # The helper the template names the CRD's default image with is the API's constant.
    assert json.dumps(DEFAULT_STAGE_IMAGE) in policy["spec"]["validations"][0]["expression"]
    assert by_kind(helm.template({"runPolicy": {"enabled": False}}), "ValidatingAdmissionPolicy") == []


@pytest.mark.parametrize("example", ["tiny.yaml", "minimal.yaml"])
def test_defaults_admit_the_examples(plane: ControlPlane, helm: Helm, policy_ns: str, example: str) -> None:
    _install(plane, helm, policy_ns, {})
    _admitted(_submit(plane, policy_ns, _run("example", example=example), "create"))


COMPLIANT_UNDER_DEFAULTS = {
    "chart stage image by tag": {"image": "ghcr.io/rlhf-operator/rlhf-stages:0.2.0"},
    "chart stage image by digest": {"image": "ghcr.io/rlhf-operator/rlhf-stages@sha256:" + "a" * 64},
    "the API's default image": {"image": DEFAULT_STAGE_IMAGE},
    "the default ServiceAccount by name": {"serviceAccountName": "default"},
    "a GPU toleration": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
}

REFUSED_UNDER_DEFAULTS = {
    "another image": ({"image": "docker.io/someone/miner:latest"}, "spec.runtime.image docker.io/someone/miner:latest"),
    "a look-alike repository": (
        {"image": "ghcr.io/rlhf-operator/rlhf-stages-evil:1"},
        "spec.runtime.image ghcr.io/rlhf-operator/rlhf-stages-evil:1",
    ),
    "another ServiceAccount": ({"serviceAccountName": "deployer"}, "spec.runtime.serviceAccountName deployer"),
    "a PriorityClass": ({"priorityClassName": "high"}, "spec.runtime.priorityClassName high"),
    "a control-plane toleration": (
        {"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]},
        "spec.runtime.tolerations",
    ),
    "a toleration of every taint": ({"tolerations": [{"operator": "Exists"}]}, "spec.runtime.tolerations"),
}

FIXES = {
    "spec.runtime.image": "runPolicy.allowedImagePrefixes",
    "spec.runtime.serviceAccountName": "runPolicy.allowedServiceAccounts",
    "spec.runtime.priorityClassName": "runPolicy.allowedPriorityClasses",
    "spec.runtime.tolerations": "runPolicy.allowedTolerationKeys",
}


def test_defaults_admit_compliant_runs_and_refuse_the_rest_naming_field_and_fix(
    plane: ControlPlane, helm: Helm, policy_ns: str
) -> None:
    policy = _install(plane, helm, policy_ns, {})
    for case, runtime in COMPLIANT_UNDER_DEFAULTS.items():
        proc = _submit(plane, policy_ns, _run("ok", runtime))
        assert proc.returncode == 0, f"{case}: {proc.stderr}"
    for case, (runtime, message) in REFUSED_UNDER_DEFAULTS.items():
        proc = _submit(plane, policy_ns, _run("bad", runtime))
        field = message.split()[0]
        assert proc.returncode != 0, f"{case} admitted"
        _refused(proc, policy, message, FIXES[field])
    # The production example names a PriorityClass the defaults do not allow.
    _refused(_submit(plane, policy_ns, _run("seed", example="seed-opt-1.3b.yaml")), "priorityClassName ml-training")


# --- values a platform team sets --------------------------------------------------------------------


def test_custom_lists(plane: ControlPlane, helm: Helm, policy_ns: str) -> None:
    _install(plane, helm, policy_ns, CUSTOM)
    for runtime in (
        {"image": "registry.example.com/ml/custom-stages:3"},
        {"image": "registry.example.com/mirror/rlhf-stages:0.1.0"},  # stageDefaults.image.repository
        {"image": DEFAULT_STAGE_IMAGE},  # the operator replaces it with stageDefaults.image
        {"serviceAccountName": "trainer"},
        {"serviceAccountName": "hf-reader"},  # allowed as POLICY_NS/hf-reader
        {"tolerations": [{"key": "example.com/spot", "operator": "Exists"}, {"key": "nvidia.com/gpu"}]},
        {"priorityClassName": "ml-training"},
    ):
        _admitted(_submit(plane, policy_ns, _run("ok", runtime)))
    _admitted(_submit(plane, policy_ns, _run("seed", example="seed-opt-1.3b.yaml")))
    # The upstream repository is no longer the stage image once stageDefaults names a mirror.
    _refused(
        _submit(plane, policy_ns, _run("bad", {"image": "ghcr.io/rlhf-operator/rlhf-stages:0.2.0"})),
        "[registry.example.com/mirror/rlhf-stages:, registry.example.com/mirror/rlhf-stages@, "
        "registry.example.com/ml/]",
    )
    _refused(_submit(plane, policy_ns, _run("bad", {"priorityClassName": "other"})), "one of [ml-training]")

    # A namespace/name entry allows that ServiceAccount in that namespace only.
    other = f"{policy_ns}-other"
    plane.kubectl("create", "namespace", other)
    accounts = {"allowedServiceAccounts": ["trainer", f"{policy_ns}/hf-reader"]}
    _install(plane, helm, other, {**CUSTOM, "runPolicy": {**CUSTOM["runPolicy"], **accounts}})
    _admitted(_submit(plane, other, _run("ok", {"serviceAccountName": "trainer"})))
    _refused(_submit(plane, other, _run("bad", {"serviceAccountName": "hf-reader"})), "serviceAccountName hf-reader")


def test_an_update_keeps_what_was_admitted_but_cannot_add_more(plane: ControlPlane, helm: Helm, policy_ns: str) -> None:
    """Tightening the lists does not strand runs admitted before (they can still be suspended), but
    an update may not move a run to a value outside the lists."""
    _install(plane, helm, policy_ns, CUSTOM)
    run = _run("admitted-before", {"priorityClassName": "ml-training", "serviceAccountName": "trainer"})
    _admitted(_submit(plane, policy_ns, run, "create"))
    _install(plane, helm, policy_ns, {})  # the same release, now with the default (empty) lists
    _refused(_submit(plane, policy_ns, _run("new", {"priorityClassName": "ml-training"})), "priorityClassName")

    suspended = copy.deepcopy(run)
    suspended["spec"]["suspend"] = True
    _admitted(_submit(plane, policy_ns, suspended, "replace"))
    moved = copy.deepcopy(suspended)
    moved["spec"]["runtime"]["priorityClassName"] = "ml-training-urgent"
    _refused(_submit(plane, policy_ns, moved, "replace"), "priorityClassName ml-training-urgent")
    tolerating = copy.deepcopy(suspended)
    tolerating["spec"]["runtime"]["tolerations"] = [{"operator": "Exists"}]
    _refused(_submit(plane, policy_ns, tolerating, "replace"), "spec.runtime.tolerations")


def test_warn_admits_with_a_warning(plane: ControlPlane, helm: Helm, policy_ns: str) -> None:
    values = {"runPolicy": {"validationActions": ["Warn"]}, "watchNamespaces": [policy_ns], "crds": {"enabled": False}}
    docs = [d for d in helm.template(values, release="warn", namespace=policy_ns) if d["kind"] in POLICY_KINDS]
    plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
    deadline = time.monotonic() + 60
    while True:
        proc = _submit(plane, policy_ns, _run("warned", {"image": PROBE_IMAGE}))
        _admitted(proc)
        if f"spec.runtime.image {PROBE_IMAGE} is not allowed" in proc.stderr:
            break
        assert time.monotonic() < deadline, f"no warning: {proc.stderr}"
        time.sleep(0.5)
    assert "Warning" in proc.stderr


def test_deny_and_warn_together_fail_to_render(helm: Helm) -> None:
    proc = helm.template_text({"runPolicy": {"validationActions": ["Deny", "Warn"]}}, check=False)
    assert proc.returncode != 0 and "Deny and Warn" in proc.stderr
    proc = helm.template_text({"runPolicy": {"allowedPriorityClasses": ["Not A Name"]}}, check=False)
    assert proc.returncode != 0 and "allowedPriorityClasses" in proc.stderr


# --- the Pod-template overlay: RuntimeClasses, schedulers, Secret references ---------------------------


def _overlay_run(name: str, where: str, overlay: dict[str, Any]) -> dict[str, Any]:
    """minimal.yaml with ``overlay`` as spec.podTemplate (where == "") or as a stage's podTemplate."""
    doc = _run(name)
    if where:
        doc["spec"].setdefault(where, {})["podTemplate"] = overlay
    else:
        doc["spec"]["podTemplate"] = overlay
    return doc


SECRET_REFERENCES = {
    "env secretKeyRef": {"env": [{"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db-creds", "key": "pw"}}}]},
    "envFrom secretRef": {"envFrom": [{"secretRef": {"name": "db-creds"}}]},
    "secret volume": {"volumes": [{"name": "certs", "secret": {"secretName": "db-creds"}}]},
}
CONFIG_MAP_REFERENCES = {
    "env": [{"name": "REGION", "valueFrom": {"configMapKeyRef": {"name": "site", "key": "region"}}}],
    "envFrom": [{"configMapRef": {"name": "site"}}],
    "volumes": [{"name": "site", "configMap": {"name": "site"}}],
    "volumeMounts": [{"name": "site", "mountPath": "/etc/site"}],
}


def test_the_template_covers_every_pod_overlay(helm: Helm) -> None:
    """The policy gathers spec.podTemplate and every stage's podTemplate (the API's STAGE_SECTIONS)."""
    (policy,) = by_kind(helm.template({}), "ValidatingAdmissionPolicy")
    variables = {v["name"]: v["expression"] for v in policy["spec"]["variables"]}
    assert "has(object.spec.podTemplate.env)" in variables["secretNames"]
    for name in ("runtimeClassNames", "schedulerNames", "secretNames"):
        for section in STAGE_SECTIONS:
            assert f"has(object.spec.{section}.podTemplate)" in variables[name], (name, section)
    allowing = helm.template({"runPolicy": {"allowSecretReferences": True}})
    (policy,) = by_kind(allowing, "ValidatingAdmissionPolicy")
    assert "secretNames" not in {v["name"] for v in policy["spec"]["variables"]}


def test_defaults_refuse_runtime_classes_other_schedulers_and_secret_references(
    plane: ControlPlane, helm: Helm, policy_ns: str
) -> None:
    policy = _install(plane, helm, policy_ns, {})
    for where in ("", "ppo", "merge"):
        _refused(
            _submit(plane, policy_ns, _overlay_run("rc", where, {"runtimeClassName": "gvisor"})),
            policy,
            "podTemplate.runtimeClassName gvisor is not allowed",
            "runPolicy.allowedRuntimeClassNames",
        )
        _refused(
            _submit(plane, policy_ns, _overlay_run("sched", where, {"schedulerName": "volcano"})),
            "podTemplate.schedulerName volcano is not allowed",
            "[default-scheduler]",
            "runPolicy.allowedSchedulerNames",
        )
        for case, overlay in SECRET_REFERENCES.items():
            proc = _submit(plane, policy_ns, _overlay_run("secret", where, overlay))
            assert proc.returncode != 0, f"{where or 'spec'} {case} admitted"
            _refused(proc, "podTemplate references Secret db-creds", "runPolicy.allowSecretReferences")
    # What needs no right beyond the run's: ConfigMaps, the default scheduler, no RuntimeClass.
    overlay = {**CONFIG_MAP_REFERENCES, "schedulerName": "default-scheduler", "labels": {"team": "nlp"}}
    _admitted(_submit(plane, policy_ns, _overlay_run("ok", "", overlay)))
    _admitted(_submit(plane, policy_ns, _overlay_run("ok", "sft", overlay)))


def test_listed_runtime_classes_schedulers_and_secret_references(
    plane: ControlPlane, helm: Helm, policy_ns: str
) -> None:
    listed = {
        "runPolicy": {
            "allowedRuntimeClassNames": ["nvidia"],
            "allowedSchedulerNames": ["volcano"],
            "allowSecretReferences": True,
        }
    }
    _install(plane, helm, policy_ns, listed)
    allowed = {"runtimeClassName": "nvidia", "schedulerName": "volcano", **SECRET_REFERENCES["envFrom secretRef"]}
    run = _overlay_run("listed", "ppo", allowed)
    _admitted(_submit(plane, policy_ns, run, "create"))
    _refused(
        _submit(plane, policy_ns, _overlay_run("bad", "", {"runtimeClassName": "kata"})),
        "runtimeClassName kata is not allowed: it must be unset or one of [nvidia]",
    )

    # Tightened again: the admitted run keeps its values (it can be suspended), but gains none.
    _install(plane, helm, policy_ns, {})
    # _install waits for the image list of the new version, which is the same here: wait for this change.
    deadline = time.monotonic() + 60
    while _submit(plane, policy_ns, _overlay_run("probe", "", SECRET_REFERENCES["secret volume"])).returncode == 0:
        assert time.monotonic() < deadline, "the tightened policy never took effect"
        time.sleep(0.5)
    suspended = copy.deepcopy(run)
    suspended["spec"]["suspend"] = True
    _admitted(_submit(plane, policy_ns, suspended, "replace"))
    more = copy.deepcopy(suspended)
    more["spec"]["ppo"]["podTemplate"]["envFrom"].append({"secretRef": {"name": "other"}})
    _refused(_submit(plane, policy_ns, more, "replace"), "podTemplate references Secret other")
    moved = copy.deepcopy(suspended)
    moved["spec"]["merge"] = {"podTemplate": {"runtimeClassName": "kata"}}
    _refused(_submit(plane, policy_ns, moved, "replace"), "runtimeClassName kata")


# --- publishing: a Secret sent where the run says -----------------------------------------------


def _grant(plane: ControlPlane, namespace: str, user: str, name: str, rules: list[dict[str, Any]]) -> None:
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": name}, "rules": rules}
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }
    plane.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump_all([role, binding]))


def test_publish_needs_an_author_who_may_read_the_secret_it_sends(
    plane: ControlPlane, helm: Helm, policy_ns: str
) -> None:
    """The publish stage sends its credentials to the endpoint the run names, which could be the
    author's own server: a run author who may not read a Secret must not be able to publish with it."""
    _install(plane, helm, policy_ns, {})
    _grant(
        plane,
        policy_ns,
        "alice",
        "run-author",
        [{"apiGroups": ["rlhf-operator.io"], "resources": ["rlhfruns"], "verbs": ["create", "get", "update"]}],
    )
    run = _run("pub")
    run["spec"]["publish"] = {
        "s3": {"endpoint": "http://alice.example:9000", "bucket": "models", "credentials": {"secretName": "team-s3"}}
    }
    as_alice = ("--as=alice", "create", "--dry-run=server")
    _refused(
        _submit(plane, policy_ns, run, *as_alice), "spec.publish names Secret team-s3", "ask for get on this Secret"
    )
    hub = _run("pub-hub")
    hub["spec"]["secrets"] = {"hfToken": {"name": "org-token", "key": "token"}}
    hub["spec"]["publish"] = {"hub": {"repoId": "alice/tiny"}}
    _refused(_submit(plane, policy_ns, hub, *as_alice), "spec.publish names Secret org-token")
    # The cluster admin who wrote the test may read every Secret: admitted as it was.
    _admitted(_submit(plane, policy_ns, run))
    # Granted get on that one Secret (and no other), alice may publish with it, and only with it.
    _grant(
        plane,
        policy_ns,
        "alice",
        "read-team-s3",
        [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["team-s3"], "verbs": ["get"]}],
    )
    deadline = time.monotonic() + 30  # RBAC reaches the authorizer through an informer
    while _submit(plane, policy_ns, run, *as_alice).returncode != 0:
        assert time.monotonic() < deadline, _submit(plane, policy_ns, run, *as_alice).stderr
        time.sleep(0.5)
    _refused(_submit(plane, policy_ns, hub, *as_alice), "spec.publish names Secret org-token")
