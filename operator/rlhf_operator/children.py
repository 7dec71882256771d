"""Pure builders of the objects a run owns: the workspace PVC, and per stage a ConfigMap and a Job.

Everything here is a function of the run (name, namespace, uid, spec) and nothing else, so the
same run always yields byte-identical manifests: names are deterministic (which is what makes
creation idempotent across operator restarts) and there is no clock or randomness. No kopf, no
Kubernetes client: manifests are plain dicts in wire form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from .api.layout import (
    CONFIG_FILE_NAME,
    CONFIG_MOUNT_PATH,
    CONSTITUTION_KEY,
    CONSTITUTION_MOUNT_PATH,
    NON_RETRYABLE_EXIT_CODES,
    RunRef,
    StageInvocation,
    run_dir,
)
from .api.run import API_VERSION, KIND, RLHFRunSpec
from .api.runtime import WORKSPACE_MOUNT_PATH

DOMAIN = "rlhf-operator.io"
LABEL_RUN = f"{DOMAIN}/run"
LABEL_STAGE = f"{DOMAIN}/stage"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "rlhf-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONTAINER_NAME = "stage"
DEFAULT_PVC_SIZE = "100Gi"
# The stage image runs as this unprivileged user; fsGroup makes the shared volume writable by it.
STAGE_UID = 1000


@dataclass(frozen=True)
class RunIdentity:
    """The parts of a run's metadata children depend on."""

    name: str
    namespace: str
    uid: str


def job_name(run: str, stage: str) -> str:
    """One Job per stage, always the same name: creating it twice is an AlreadyExists, not a duplicate."""
    return f"{run}-{stage}"


def config_map_name(run: str, stage: str) -> str:
    return f"{run}-{stage}"


def pvc_name(run: str) -> str:
    return f"{run}-workspace"


def workspace_claim(run: str, spec: RLHFRunSpec) -> str:
    return spec.storage.existing_claim or pvc_name(run)


def labels(run: str, stage: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "rlhf-stage" if stage else "rlhf-run",
        "app.kubernetes.io/instance": run,
        "app.kubernetes.io/part-of": "rlhf-operator",
        LABEL_MANAGED_BY: MANAGER,
        LABEL_RUN: run,
    }
    if stage:
        out["app.kubernetes.io/component"] = stage
        out[LABEL_STAGE] = stage
    return out


def owner_reference(run: RunIdentity) -> dict[str, Any]:
    # controller=true marks the run as the one manager; blockOwnerDeletion lets foreground deletion
    # of the run wait for its children.
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": run.name,
        "uid": run.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(run: RunIdentity, name: str, stage: str | None, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": run.namespace, "labels": labels(run.name, stage)}
    if owned:
        meta["ownerReferences"] = [owner_reference(run)]
    return meta


def build_pvc(run: RunIdentity, spec: RLHFRunSpec) -> dict[str, Any]:
    """The workspace PVC the operator creates when no existingClaim is given.

    With keepOnDelete the PVC carries no owner reference, so the garbage collector leaves it (and the
    models on it) behind when the run is deleted.
    """
    storage = spec.storage
    pvc_spec: dict[str, Any] = {
        "accessModes": list(storage.access_modes),
        "resources": {"requests": {"storage": storage.size or DEFAULT_PVC_SIZE}},
    }
    if storage.storage_class_name:
        pvc_spec["storageClassName"] = storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(run, pvc_name(run.name), None, owned=not storage.keep_on_delete),
        "spec": pvc_spec,
    }


def build_invocation(run: RunIdentity, spec: RLHFRunSpec, stage: str) -> StageInvocation:
    return StageInvocation(
        stage=stage,
        run=RunRef(namespace=run.namespace, name=run.name, uid=run.uid),
        workspace=WORKSPACE_MOUNT_PATH,
        spec=spec,
    )


def build_config_map(run: RunIdentity, spec: RLHFRunSpec, stage: str) -> dict[str, Any]:
    """The stage's invocation: a snapshot of the spec taken when the stage's Job is created."""
    text = yaml.safe_dump(build_invocation(run, spec, stage).to_wire(), sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(run, config_map_name(run.name, stage), stage),
        "data": {CONFIG_FILE_NAME: text},
    }


def stage_command(stage: str) -> list[str]:
    """The stage entrypoint, whatever the GPU count: with resources.gpus > 1 it launches one process
    per GPU itself (torch.distributed.run) and relays rank 0's StageResult and exit code. Launching
    torchrun here instead would turn a config error (exit 2) into torchrun's exit 1, which the
    podFailurePolicy retries on every GPU, and leave no termination message."""
    return ["python", "-m", "rlhf_stages", stage, "--config", f"{CONFIG_MOUNT_PATH}/{CONFIG_FILE_NAME}"]


def _env(run: RunIdentity, spec: RLHFRunSpec, stage: str) -> list[dict[str, Any]]:
    home = f"{WORKSPACE_MOUNT_PATH}/{run_dir(run.namespace, run.name)}"
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
        # Hub downloads are cached on the shared volume, so a retry or a later stage reuses them.
        {"name": "HF_HOME", "value": f"{WORKSPACE_MOUNT_PATH}/.cache/huggingface"},
        {"name": "RLHF_RUN", "value": run.name},
        {"name": "RLHF_STAGE", "value": stage},
    ]
    secrets = spec.secrets
    for var, ref in (("HF_TOKEN", secrets.hf_token), ("WANDB_API_KEY", secrets.wandb_api_key)):
        if ref is not None:
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    if spec.wandb is not None:
        env += [
            {"name": "WANDB_PROJECT", "value": spec.wandb.project},
            {"name": "WANDB_MODE", "value": spec.wandb.mode},
            {"name": "WANDB_DIR", "value": home},
            {"name": "WANDB_RUN_GROUP", "value": f"{run.namespace}-{run.name}"},
            {"name": "WANDB_NAME", "value": f"{run.name}-{stage}"},
        ]
        if spec.wandb.entity:
            env.append({"name": "WANDB_ENTITY", "value": spec.wandb.entity})
    else:
        env.append({"name": "WANDB_MODE", "value": "disabled"})
    return env


def _resources(spec: RLHFRunSpec, stage: str) -> dict[str, Any]:
    res = spec.stage(stage).resources
    amounts: dict[str, Any] = {}
    if res.cpu:
        amounts["cpu"] = res.cpu
    if res.memory:
        amounts["memory"] = res.memory
    if res.gpus:
        amounts["nvidia.com/gpu"] = str(res.gpus)
    # Requests equal limits: a training pod should never be throttled or evicted for bursting.
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def pod_failure_policy() -> dict[str, Any]:
    """Config and input errors fail the Job at once; disruptions (preemption, eviction) are not failures."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER_NAME,
                    "operator": "In",
                    "values": list(NON_RETRYABLE_EXIT_CODES),
                },
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def _constitution_volume(spec: RLHFRunSpec, stage: str, container: dict[str, Any]) -> list[dict[str, Any]]:
    """rlaif.constitutionConfigMap, mounted read-only where the rlaif stage reads its principles."""
    if stage != "rlaif" or spec.rlaif is None or spec.rlaif.constitution_config_map is None:
        return []
    container["volumeMounts"].append({"name": "constitution", "mountPath": CONSTITUTION_MOUNT_PATH, "readOnly": True})
    items = [{"key": CONSTITUTION_KEY, "path": CONSTITUTION_KEY}]
    source = {"name": spec.rlaif.constitution_config_map, "items": items}
    return [{"name": "constitution", "configMap": source}]


def build_job(run: RunIdentity, spec: RLHFRunSpec, stage: str) -> dict[str, Any]:
    """The stage's Job. Created suspended when the run is suspended or Kueue is to admit it."""
    runtime = spec.runtime
    meta = _metadata(run, job_name(run.name, stage), stage)
    pod_labels = labels(run.name, stage)
    if runtime.queue_name:
        meta["labels"][KUEUE_QUEUE_LABEL] = runtime.queue_name
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": runtime.image,
        "imagePullPolicy": runtime.image_pull_policy,
        "command": stage_command(stage),
        "env": _env(run, spec, stage),
        "volumeMounts": [
            {"name": "workspace", "mountPath": WORKSPACE_MOUNT_PATH},
            {"name": "config", "mountPath": CONFIG_MOUNT_PATH, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        # The stage writes a StageResult to /dev/termination-log; a crash before that still leaves
        # the tail of its log as the message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    resources = _resources(spec, stage)
    if resources:
        container["resources"] = resources
    extra_volumes = _constitution_volume(spec, stage, container)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # retries are the Job's (backoffLimit), so each one is a new, counted pod
        # Kubernetes' 30 s default kills a stage while it still writes the checkpoint it started on SIGTERM.
        "terminationGracePeriodSeconds": runtime.termination_grace_period_seconds,
        "automountServiceAccountToken": False,  # stages never talk to the API server
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": STAGE_UID,
            "runAsGroup": STAGE_UID,
            "fsGroup": STAGE_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": workspace_claim(run.name, spec)}},
            {"name": "config", "configMap": {"name": config_map_name(run.name, stage)}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL and DataLoader workers need shm
            *extra_volumes,
        ],
    }
    optional = {
        "serviceAccountName": runtime.service_account_name,
        "nodeSelector": dict(runtime.node_selector) or None,
        "tolerations": [t.to_wire() for t in runtime.tolerations] or None,
        "affinity": runtime.affinity.to_wire() if runtime.affinity else None,
        "priorityClassName": runtime.priority_class_name,
        "imagePullSecrets": [{"name": n} for n in runtime.image_pull_secrets] or None,
    }
    pod_spec.update({k: v for k, v in optional.items() if v is not None})
    job_spec: dict[str, Any] = {
        "backoffLimit": runtime.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "suspend": bool(spec.suspend or runtime.queue_name),
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
    }
    if runtime.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = runtime.active_deadline_seconds
    if runtime.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = runtime.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
