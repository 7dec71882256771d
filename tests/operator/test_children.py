"""The pure builders: every Job setting the issue asks for, deterministic output, and layering."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

from rlhf_api.layout import RunRef
from rlhf_api.names import STAGE_CONFIG_ANNOTATION
from rlhf_api.run import RLHFRunSpec
from rlhf_operator.children import (
    STAGE_CONFIG_LIMIT,
    build_job,
    build_pvc,
    build_rendezvous_service,
    labels,
    rendezvous_service_name,
    stage_command,
    stage_config,
)
from tests.api.builders import load_example
from tests.pythonpath import python_env

from .harness import tiny_run

RUN = RunRef(name="tiny", namespace="ns", uid="uid-1")


def spec(**changes: object) -> RLHFRunSpec:
    return RLHFRunSpec.model_validate(tiny_run(**changes)["spec"], strict=False)


def full_spec() -> RLHFRunSpec:
    doc = tiny_run(
        runtime={
            "image": "registry/stages:1",
            "imagePullSecrets": ["pull"],
            "serviceAccountName": "trainer",
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "gpu", "operator": "Exists"}],
            "affinity": {"nodeAffinity": {}},
            "priorityClassName": "high",
            "queueName": "team-a",
            "backoffLimit": 4,
            "activeDeadlineSeconds": 3600,
            "ttlSecondsAfterFinished": 600,
        },
        secrets={
            "hfToken": {"name": "hf", "key": "token"},
            "activeloopToken": {"name": "al", "key": "token"},
            "wandbApiKey": {"name": "wb", "key": "key"},
        },
        wandb={"project": "rlhf", "entity": "me"},
    )
    doc["spec"]["ppo"]["resources"] = {"gpus": 4, "cpu": "16", "memory": "64Gi"}
    return RLHFRunSpec.model_validate(doc["spec"], strict=False)


def test_job_carries_every_setting() -> None:
    job = build_job(RUN, full_spec(), "ppo")
    meta, jspec = job["metadata"], job["spec"]
    pod = jspec["template"]["spec"]
    container = pod["containers"][0]
    assert meta["name"] == "tiny-ppo" and meta["namespace"] == "ns"
    assert (
        meta["ownerReferences"][0] | {"uid": "uid-1", "controller": True, "kind": "RLHFRun"}
        == meta["ownerReferences"][0]
    )
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert meta["labels"]["rlhf-operator.io/stage"] == "ppo" and meta["labels"]["app.kubernetes.io/instance"] == "tiny"
    assert jspec["suspend"] is True  # created suspended for Kueue to admit
    assert (jspec["backoffLimit"], jspec["activeDeadlineSeconds"], jspec["ttlSecondsAfterFinished"]) == (4, 3600, 600)
    rules = jspec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and rules[0]["onExitCodes"]["values"] == [2, 3]
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "trainer"
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["priorityClassName"] == "high"
    assert pod["tolerations"] and pod["affinity"] == {"nodeAffinity": {}}
    assert pod["imagePullSecrets"] == [{"name": "pull"}]
    assert (
        pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["limits"] == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4"}
    # 4 GPUs: still the entrypoint, which launches the 4 processes itself and keeps exit codes 2/3.
    assert container["command"] == ["python", "-m", "rlhf_stages", "ppo", "--config", "/etc/rlhf/invocation.yaml"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    # deeplake reads its hub:// token from ACTIVELOOP_TOKEN; by reference only, never a value.
    assert env["ACTIVELOOP_TOKEN"] == {
        "name": "ACTIVELOOP_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "al", "key": "token"}},
    }
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "wb"
    assert env["WANDB_PROJECT"]["value"] == "rlhf" and env["WANDB_ENTITY"]["value"] == "me"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/workspace"] == "workspace" and mounts["/etc/rlhf"] == "config"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "tiny-workspace"
    # The config rides on the Pod template, projected as the config file: no ConfigMap to write.
    item = {"path": "invocation.yaml", "fieldRef": {"fieldPath": "metadata.annotations['rlhf-operator.io/invocation']"}}
    assert volumes["config"] == {"name": "config", "downwardAPI": {"items": [item]}}
    assert jspec["template"]["metadata"]["annotations"]["rlhf-operator.io/invocation"] == stage_config(
        RUN, full_spec(), "ppo"
    )


def _read_by_every_reader(text: str) -> list[object]:
    """The config as the stage images read it: today's entrypoint (JSON when it starts with ``{``,
    else YAML) and the older ones (PyYAML, with or without libyaml)."""
    import json

    import yaml

    readers = [yaml.load(text, Loader=yaml.SafeLoader), yaml.load(text, Loader=yaml.CSafeLoader)]
    return [*readers, json.loads(text)] if text.startswith("{") else readers


def test_the_config_reads_back_as_the_invocation_in_every_stage_image() -> None:
    """The config is written as JSON (a seventh of libyaml's CPU, which was a third of the operator's in
    a burst of transitions); images from before the entrypoint read JSON parse it with PyYAML, so both
    must read the invocation itself: small floats, long, quoted, non-ASCII and line-separator strings."""
    from rlhf_operator.children import build_invocation

    odd = ["Be kind. " * 30, "Quote: 'single' and \"double\": # not a comment", "Répondre — ✓ 😀", "a\u2028b\x85c"]
    doc = tiny_run()["spec"]
    doc["ppo"].update(learningRate=1e-05, initKlCoef=2e-06)  # JSON's 1e-05 is a string to YAML 1.1
    small = RLHFRunSpec.model_validate(doc, strict=False)
    cases = [
        (full_spec(), ("sft", "reward", "ppo", "merge")),
        (small, ("ppo",)),
        (rlaif_spec(constitution=odd), ("rlaif",)),
    ]
    for spec_, stages in cases:
        for stage in stages:
            text = stage_config(RUN, spec_, stage)
            assert text.startswith("{") and "\n" not in text, stage
            wire = build_invocation(RUN, spec_, stage).to_wire()
            assert all(read == wire for read in _read_by_every_reader(text)), stage


def test_a_config_yaml_cannot_read_as_json_is_written_as_yaml() -> None:
    """A YAML reader takes a flow mapping's key only within 1,024 characters: a free-form map with a
    longer key (generation.extra) is written as YAML, which every stage image reads."""
    from rlhf_operator.children import build_invocation

    doc = tiny_run()["spec"]
    doc["ppo"]["generation"] = {"extra": {"k" * 1500: 1, "repetition_penalty": 1e-05}}
    long_key = RLHFRunSpec.model_validate(doc, strict=False)
    text = stage_config(RUN, long_key, "ppo")
    assert not text.startswith("{")
    wire = build_invocation(RUN, long_key, "ppo").to_wire()
    assert all(read == wire for read in _read_by_every_reader(text))


def test_the_entrypoint_is_the_command() -> None:
    assert stage_command("sft") == ["python", "-m", "rlhf_stages", "sft", "--config", "/etc/rlhf/invocation.yaml"]


def test_builders_are_deterministic() -> None:
    s = full_spec()
    assert build_job(RUN, s, "sft") == build_job(RUN, s, "sft")


def test_the_stage_config_holds_the_invocation_and_no_secret_value() -> None:
    import json

    text = stage_config(RUN, full_spec(), "reward")
    config = json.loads(text)
    assert (config["kind"], config["stage"], config["run"]["uid"]) == ("StageInvocation", "reward", "uid-1")
    # Secrets by reference only: the annotation names the Secret and key, as the env does.
    assert config["spec"]["secrets"]["hfToken"] == {"name": "hf", "key": "token"}
    assert len(text.encode()) < STAGE_CONFIG_LIMIT // 10  # far from the limit the planner enforces


def test_pvc_owned_unless_kept() -> None:
    assert build_pvc(RUN, spec())["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert build_pvc(RUN, spec())["spec"]["resources"]["requests"]["storage"] == "1Gi"
    kept = build_pvc(RUN, spec(storage={"size": "1Gi", "keepOnDelete": True}))
    assert "ownerReferences" not in kept["metadata"]
    assert labels("tiny")["app.kubernetes.io/managed-by"] == "rlhf-operator"


def test_pure_modules_import_neither_kopf_nor_kubernetes() -> None:
    code = (
        "import sys, rlhf_operator.planner, rlhf_operator.children, rlhf_operator.observe;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('kopf', 'kubernetes')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=python_env(inherit=False))


def rlaif_spec(**rlaif: object) -> RLHFRunSpec:
    doc = tiny_run()["spec"]
    doc.update(
        method="RLAIF",
        rlaif={"judge": {"path": "judge"}, "dataset": {"format": "jsonl", "path": "p.jsonl"}, "then": "DPO", **rlaif},
        dpo={},
    )
    doc.pop("reward", None)
    return RLHFRunSpec.model_validate(doc, strict=False)


def test_constitution_config_map_is_mounted_into_the_rlaif_job_only() -> None:
    s = rlaif_spec(constitutionConfigMap="house-rules")
    pod = build_job(RUN, s, "rlaif")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "constitution")
    assert volume["configMap"] == {"name": "house-rules", "items": [{"key": "constitution", "path": "constitution"}]}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "constitution")
    assert mount == {"name": "constitution", "mountPath": "/etc/rlhf-constitution", "readOnly": True}
    for stage in ("sft", "dpo", "merge"):
        other = build_job(RUN, s, stage)["spec"]["template"]["spec"]
        assert all(v["name"] != "constitution" for v in other["volumes"]), stage


def test_inline_constitution_needs_no_volume() -> None:
    pod = build_job(RUN, rlaif_spec(constitution=["Be kind."]), "rlaif")["spec"]["template"]["spec"]
    assert all(v["name"] != "constitution" for v in pod["volumes"])


# --- the Pod-template overlay and safe Pod defaults ------------------------------------------------

OVERLAY = {
    "labels": {"team": "nlp", "tier": "run"},
    "annotations": {"example.com/owner": "nlp"},
    "env": [
        {"name": "TEAM", "value": "nlp"},
        {"name": "REGION", "valueFrom": {"configMapKeyRef": {"name": "site", "key": "region"}}},
    ],
    "envFrom": [{"prefix": "SITE_", "configMapRef": {"name": "site"}}],
    "volumes": [
        {"name": "datasets", "persistentVolumeClaim": {"claimName": "shared", "readOnly": True}},
        {"name": "site", "configMap": {"name": "site"}},
    ],
    "volumeMounts": [{"name": "datasets", "mountPath": "/data", "readOnly": True}],
    "schedulerName": "volcano",
    "runtimeClassName": "nvidia",
}
STAGE_OVERLAY = {
    "labels": {"tier": "ppo"},
    "env": [
        {"name": "TEAM", "value": "rl"},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ],
    "envFrom": [{"secretRef": {"name": "s3", "optional": True}}],
    "volumes": [{"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}],
    "volumeMounts": [
        {"name": "site", "mountPath": "/data", "subPath": "ppo"},  # replaces the run's mount at /data
        {"name": "scratch", "mountPath": "/scratch"},
    ],
    "runtimeClassName": "kata",
    "shmSizeLimit": "16Gi",
}


def overlay_spec() -> RLHFRunSpec:
    doc = tiny_run(podTemplate=OVERLAY)
    doc["spec"]["ppo"]["podTemplate"] = STAGE_OVERLAY
    return RLHFRunSpec.model_validate(doc["spec"], strict=False)


def pod_of(s: RLHFRunSpec, stage: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    template = build_job(RUN, s, stage)["spec"]["template"]
    return template["metadata"], template["spec"], template["spec"]["containers"][0]


def test_the_run_overlay_reaches_every_stage_pod() -> None:
    s = overlay_spec()
    for stage in ("sft", "reward", "merge"):
        meta, pod, container = pod_of(s, stage)
        assert meta["labels"]["team"] == "nlp" and meta["labels"]["tier"] == "run"
        assert meta["labels"]["rlhf-operator.io/stage"] == stage  # the operator's labels stay
        assert meta["annotations"] == {"example.com/owner": "nlp", STAGE_CONFIG_ANNOTATION: stage_config(RUN, s, stage)}
        env = {e["name"]: e for e in container["env"]}
        assert env["TEAM"] == {"name": "TEAM", "value": "nlp"}
        assert env["REGION"]["valueFrom"] == {"configMapKeyRef": {"name": "site", "key": "region"}}
        assert env["HOME"]["value"] == "/tmp" and env["RLHF_STAGE"]["value"] == stage
        assert container["envFrom"] == [{"prefix": "SITE_", "configMapRef": {"name": "site"}}]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["datasets"] == {
            "name": "datasets",
            "persistentVolumeClaim": {"claimName": "shared", "readOnly": True},
        }
        assert volumes["site"] == {"name": "site", "configMap": {"name": "site"}}
        assert {"name": "datasets", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]
        assert (pod["schedulerName"], pod["runtimeClassName"]) == ("volcano", "nvidia")
    # The Job's own labels are the operator's only: the overlay is for the Pods.
    assert "team" not in build_job(RUN, s, "sft")["metadata"]["labels"]


def test_a_stage_overlay_is_merged_over_the_run_overlay() -> None:
    meta, pod, container = pod_of(overlay_spec(), "ppo")
    assert meta["labels"]["team"] == "nlp" and meta["labels"]["tier"] == "ppo"  # the stage's wins per key
    env = [e for e in container["env"] if e["name"] in ("TEAM", "REGION", "POD")]
    assert [e["name"] for e in env] == ["TEAM", "REGION", "POD"]
    assert env[0]["value"] == "rl"
    # envFrom lists are concatenated, the stage's last (Kubernetes: a later source wins).
    assert container["envFrom"] == [
        {"prefix": "SITE_", "configMapRef": {"name": "site"}},
        {"secretRef": {"name": "s3", "optional": True}},
    ]
    names = [v["name"] for v in pod["volumes"]]
    assert names[:4] == ["workspace", "config", "tmp", "dshm"] and set(names[4:]) == {"datasets", "site", "scratch"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/data"] == {"name": "site", "mountPath": "/data", "subPath": "ppo"}
    assert mounts["/scratch"]["name"] == "scratch" and mounts["/workspace"]["name"] == "workspace"
    assert (pod["schedulerName"], pod["runtimeClassName"]) == ("volcano", "kata")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "8Gi"}


def test_no_overlay_adds_nothing_but_the_safe_defaults() -> None:
    meta, pod, container = pod_of(spec(), "sft")
    assert list(meta["annotations"]) == [STAGE_CONFIG_ANNOTATION] and "envFrom" not in container
    # No spec.secrets: no token variables at all (an empty one would make the hub clients try it).
    assert {"HF_TOKEN", "ACTIVELOOP_TOKEN", "WANDB_API_KEY"}.isdisjoint(e["name"] for e in container["env"])
    assert "schedulerName" not in pod and "runtimeClassName" not in pod
    assert [v["name"] for v in pod["volumes"]] == ["workspace", "config", "tmp", "dshm"]
    # Memory-backed /dev/shm and the /tmp emptyDir are bounded (shm counts against the memory limit).
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "8Gi"}
    # A workspace full of checkpoints is not chowned again on every stage's start.
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert pod["securityContext"]["fsGroup"] == 1000


def qos_class(container: dict[str, Any]) -> str:
    """Kubernetes' QoS class of a one-container Pod (only CPU and memory count)."""
    res = container.get("resources", {})
    requests, limits = res.get("requests", {}), res.get("limits", {})
    if not any(k in requests or k in limits for k in ("cpu", "memory")):
        return "BestEffort"
    if all(k in limits and requests.get(k, limits[k]) == limits[k] for k in ("cpu", "memory")):
        return "Guaranteed"
    return "Burstable"


def test_a_stage_that_sets_no_cpu_or_memory_still_requests_some() -> None:
    doc = tiny_run()
    doc["spec"]["ppo"]["resources"] = {"gpus": 1}  # GPUs alone leave a Pod BestEffort
    container = build_job(RUN, RLHFRunSpec.model_validate(doc["spec"], strict=False), "ppo")["spec"]["template"][
        "spec"
    ]["containers"][0]
    assert container["resources"] == {
        "requests": {"nvidia.com/gpu": "1", "cpu": "100m", "memory": "256Mi"},
        "limits": {"nvidia.com/gpu": "1"},
    }
    assert qos_class(container) == "Burstable"


def test_tiny_runs_keep_their_memory_only_resources() -> None:
    """examples/tiny.yaml (the node tier) asks for memory only: no CPU request or limit is added."""
    s = RLHFRunSpec.model_validate(load_example("tiny.yaml")["spec"], strict=False)
    for stage in s.pipeline():
        container = pod_of(s, stage)[2]
        assert container["resources"] == {"requests": {"memory": "4Gi"}, "limits": {"memory": "4Gi"}}, stage
        assert qos_class(container) == "Burstable"
    assert qos_class(pod_of(full_spec(), "ppo")[2]) == "Guaranteed"


def multi_node_spec(nodes: int) -> RLHFRunSpec:
    doc = tiny_run()
    doc["spec"]["sft"]["resources"] = {"nodes": nodes, "gpus": 2, "memory": "8Gi"}
    return RLHFRunSpec.model_validate(doc["spec"], strict=False)


def test_a_multi_node_stage_is_an_indexed_job_and_a_service_that_selects_its_pod_0() -> None:
    spec = multi_node_spec(3)
    job = build_job(RUN, spec, "sft")
    service = build_rendezvous_service(RUN, spec, "sft")
    assert service is not None
    jspec = job["spec"]
    # One failed Pod fails the gang (backoffLimit 0): the operator restarts it whole.
    assert (jspec["completionMode"], jspec["completions"], jspec["parallelism"], jspec["backoffLimit"]) == (
        "Indexed",
        3,
        3,
        0,
    )
    container = jspec["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["RLHF_RENDEZVOUS_SERVICE"]["value"] == service["metadata"]["name"] == "tiny-sft-rdzv"
    assert env["RLHF_RENDEZVOUS_PORT"]["value"] == "29400"
    assert env["RLHF_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"  # GPUs per Pod
    # The Service reaches the Pod of index 0 of this stage's Job only, as soon as it runs.
    selector = dict(service["spec"]["selector"])
    assert selector.pop("batch.kubernetes.io/job-completion-index") == "0"
    assert selector.items() <= jspec["template"]["metadata"]["labels"].items()
    assert selector["rlhf-operator.io/stage"] == "sft"
    assert service["spec"]["ports"] == [{"name": "rendezvous", "port": 29400, "targetPort": 29400, "protocol": "TCP"}]
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["publishNotReadyAddresses"] is True
    # Owned by the run like the Job: deleting the run deletes it.
    assert service["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"]


def test_a_stage_on_one_pod_has_no_service_and_the_same_job_as_before() -> None:
    one = multi_node_spec(1)
    assert build_rendezvous_service(RUN, one, "sft") is None
    job = build_job(RUN, one, "sft")
    assert "completionMode" not in job["spec"]
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)
    assert job["spec"]["backoffLimit"] == one.runtime.backoff_limit  # the Job controller retries a lone Pod
    names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not names & {"RLHF_RENDEZVOUS_SERVICE", "RLHF_RENDEZVOUS_PORT", "RLHF_POD_IP"}
    # nodes: 1 written out or left to its default: the same manifest.
    doc = tiny_run()
    doc["spec"]["sft"]["resources"] = {"gpus": 2, "memory": "8Gi"}
    assert build_job(RUN, RLHFRunSpec.model_validate(doc["spec"], strict=False), "sft") == job


def test_the_service_name_is_a_dns_label_whatever_the_run_name() -> None:
    for run, expected in (("tiny", "tiny-sft-rdzv"), ("team.a", "team-a-sft-rdzv"), ("7b", "r7b-sft-rdzv")):
        name = rendezvous_service_name(run, "sft")
        assert name == expected
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63
    assert len(rendezvous_service_name("r" * 40, "publish")) <= 63
