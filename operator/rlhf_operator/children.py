"""Pure builders of the objects a run owns: the workspace PVC, and per stage a Job (and a multi-node
stage's rendezvous Service). The stage's config rides on its Job (:func:`stage_config`).

Everything here is a function of the run (name, namespace, uid, spec) and nothing else, so the
same run always yields byte-identical manifests: names are deterministic (which is what makes
creation idempotent across operator restarts) and there is no clock or randomness. No kopf, no
Kubernetes client: manifests are plain dicts in wire form.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from rlhf_api.base import ApiModel
from rlhf_api.layout import (
    CONFIG_FILE_NAME,
    CONSTITUTION_KEY,
    INPUT_CACHE_ENV,
    INPUTS_STAGE,
    NON_RETRYABLE_EXIT_CODES,
    POD_IP_ENV,
    RENDEZVOUS_PORT,
    RENDEZVOUS_PORT_ENV,
    RENDEZVOUS_SERVICE_ENV,
    RunRef,
    StageInvocation,
    run_dir,
)
from rlhf_api.names import (
    API_VERSION,
    JOB_COMPLETION_INDEX_LABEL,
    KIND,
    KUEUE_QUEUE_LABEL,
    LABEL_APP_COMPONENT,
    LABEL_APP_INSTANCE,
    LABEL_APP_NAME,
    LABEL_APP_PART_OF,
    LABEL_MANAGED_BY,
    LABEL_RUN,
    LABEL_STAGE,
    MANAGER,
    STAGE_CONFIG_ANNOTATION,
)
from rlhf_api.podtemplate import (
    CONFIG_MOUNT_PATH,
    CONSTITUTION_MOUNT_PATH,
    SHM_MOUNT_PATH,
    TMP_MOUNT_PATH,
    VOLUME_CONFIG,
    VOLUME_CONSTITUTION,
    VOLUME_INPUT_CACHE,
    VOLUME_SHM,
    VOLUME_TMP,
    VOLUME_WORKSPACE,
    RunPodTemplate,
    merged,
)
from rlhf_api.publish import HUB_TOKEN_ENV, OPERATOR_VERSION_ENV, S3_ACCESS_KEY_ID_ENV, S3_SECRET_ACCESS_KEY_ENV
from rlhf_api.run import RLHFRunSpec
from rlhf_api.runtime import INPUT_CACHE_MOUNT_PATH, WORKSPACE_INPUT_CACHE, WORKSPACE_MOUNT_PATH
from rlhf_operator import __version__, wire_json

CONTAINER_NAME = "stage"
DEFAULT_PVC_SIZE = "100Gi"
# The stage image runs as this unprivileged user; fsGroup makes the shared volume writable by it.
STAGE_UID = 1000
# What a stage Pod requests when neither its spec nor the operator's defaults (the chart's
# stageDefaults) say: requests only, no limits, so that the Pod is never BestEffort (the first
# evicted under node pressure, and scheduled as if it needed nothing) and yet is not capped.
FALLBACK_REQUESTS = {"cpu": "100m", "memory": "256Mi"}


def job_name(run: str, stage: str) -> str:
    """One Job per stage, always the same name: creating it twice is an AlreadyExists, not a duplicate."""
    return f"{run}-{stage}"


def rendezvous_service_name(run: str, stage: str) -> str:
    """``<job name>-rdzv``, the rendezvous Service of a multi-node stage. A Service's name must be a
    DNS-1035 label while a run's may be a DNS subdomain: dots become dashes and a leading digit gets
    an ``r`` (the stages read the name from RLHF_RENDEZVOUS_SERVICE, never rebuild it)."""
    name = re.sub(r"[^a-z0-9-]", "-", f"{job_name(run, stage)}-rdzv")
    return name if name[0].isalpha() else f"r{name}"


def pvc_name(run: str) -> str:
    return f"{run}-workspace"


def workspace_claim(run: str, spec: RLHFRunSpec) -> str:
    return spec.storage.existing_claim or pvc_name(run)


def labels(run: str, stage: str | None = None) -> dict[str, str]:
    out = {
        LABEL_APP_NAME: "rlhf-stage" if stage else "rlhf-run",
        LABEL_APP_INSTANCE: run,
        LABEL_APP_PART_OF: MANAGER,
        LABEL_MANAGED_BY: MANAGER,
        LABEL_RUN: run,
    }
    if stage:
        out[LABEL_APP_COMPONENT] = stage
        out[LABEL_STAGE] = stage
    return out


def owner_reference(run: RunRef) -> dict[str, Any]:
    # controller=true marks the run as the one manager; blockOwnerDeletion lets foreground deletion
    # of the run wait for its children.
    if run.uid is None:  # only a run outside a cluster (rlhfctl local) has none, and it owns no objects
        raise ValueError(f"run {run.namespace}/{run.name}: an owner reference needs the run's uid")
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": run.name,
        "uid": run.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(run: RunRef, name: str, stage: str | None, owned: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": run.namespace, "labels": labels(run.name, stage)}
    if owned:
        meta["ownerReferences"] = [owner_reference(run)]
    return meta


def build_pvc(run: RunRef, spec: RLHFRunSpec) -> dict[str, Any]:
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


def build_invocation(run: RunRef, spec: RLHFRunSpec, stage: str) -> StageInvocation:
    return StageInvocation(
        stage=stage,
        run=run,
        workspace=WORKSPACE_MOUNT_PATH,
        spec=spec,
    )


# Kubernetes caps an object's annotations at 256 KiB in all; the stage config takes at most half, so
# that the run's podTemplate annotations keep room (a typical config is 3-6 KiB).
STAGE_CONFIG_LIMIT = 128 * 1024


def stage_config(run: RunRef, spec: RLHFRunSpec, stage: str) -> str:
    """The stage's invocation: a snapshot of the spec taken when the stage's Job is created, as JSON
    that YAML readers read the same (:mod:`wire_json`), or as YAML where it cannot be.

    It rides on the Job's Pod template as the STAGE_CONFIG_ANNOTATION, which a downwardAPI volume
    projects as the container's config file: no ConfigMap, so creating the Job is the stage's one
    write (issue 14), and the config can never disagree with the Job it was made for. The spec holds
    Secret references only (spec.secrets, publish credentials), never a Secret's value, so nothing
    secret reaches the annotation.
    """
    wire = build_invocation(run, spec, stage).to_wire()
    text = wire_json.dumps(wire)
    return text if text is not None else yaml.dump(wire, Dumper=_YAML_DUMPER, sort_keys=True)


# JSON is written because rendering the config with libyaml was 12.7 % of the operator's GIL samples in a
# burst of transitions (docs/benchmarks.md); json.dumps takes about a fifth of its time. Stage images from
# before the entrypoint read JSON parse it with PyYAML, which reads this JSON as the same value. libyaml's
# emitter for the rare config JSON cannot carry: the pure-Python one's text at a fifth of its CPU.
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def config_too_large(job: dict[str, Any], stage: str) -> str | None:
    """Why the stage's config cannot ride on its Job (:func:`build_job`'s, above STAGE_CONFIG_LIMIT),
    or None when it can. Measured on the Job made, so the config is rendered once per Job."""
    size = len(job["spec"]["template"]["metadata"]["annotations"][STAGE_CONFIG_ANNOTATION].encode())
    if size <= STAGE_CONFIG_LIMIT:
        return None
    return (
        f"stage {stage}: its configuration is {size // 1024} KiB, above the {STAGE_CONFIG_LIMIT // 1024} KiB a "
        "stage Job's annotation may carry; shorten the run's spec (long inline lists or strings)"
    )


def config_item() -> dict[str, Any]:
    """The downwardAPI item that writes the config annotation as the config volume's one file."""
    field = f"metadata.annotations['{STAGE_CONFIG_ANNOTATION}']"
    return {"path": CONFIG_FILE_NAME, "fieldRef": {"fieldPath": field}}


def stage_command(stage: str) -> list[str]:
    """The stage entrypoint, whatever the GPU count: with resources.gpus > 1 it launches one process
    per GPU itself (torch.distributed.run) and relays rank 0's StageResult and exit code. Launching
    torchrun here instead would turn a config error (exit 2) into torchrun's exit 1, which the
    podFailurePolicy retries on every GPU, and leave no termination message."""
    return ["python", "-m", "rlhf_stages", stage, "--config", f"{CONFIG_MOUNT_PATH}/{CONFIG_FILE_NAME}"]


def _env(run: RunRef, spec: RLHFRunSpec, stage: str) -> list[dict[str, Any]]:
    home = f"{WORKSPACE_MOUNT_PATH}/{run_dir(run.namespace, run.name)}"
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
        # Hub downloads are cached on the shared volume, so a retry or a later stage reuses them.
        {"name": "HF_HOME", "value": f"{WORKSPACE_MOUNT_PATH}/.cache/huggingface"},
        {"name": "RLHF_RUN", "value": run.name},
        {"name": "RLHF_STAGE", "value": stage},
    ]
    env += _input_env(spec, stage)
    secrets = spec.secrets
    for var, ref in (
        ("HF_TOKEN", secrets.hf_token),
        ("ACTIVELOOP_TOKEN", secrets.activeloop_token),
        ("WANDB_API_KEY", secrets.wandb_api_key),
    ):
        if ref is not None:
            env.append(_secret_env(var, ref.name, ref.key))
    if stage == "publish":
        env += _publish_env(spec)
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
    if nodes(spec, stage) > 1:
        env += _rendezvous_env(run, stage)
    return env


def nodes(spec: RLHFRunSpec, stage: str) -> int:
    """How many Pods the stage runs on (resources.nodes; admission allows > 1 only where the method
    table does)."""
    return int(spec.stage(stage).resources.nodes)


def _rendezvous_env(run: RunRef, stage: str) -> list[dict[str, Any]]:
    """Where a multi-node stage's Pods meet: node 0 listens at its own address, the others reach it
    through the Service (its ClusterIP in the env var the kubelet derives from its name)."""
    return [
        {"name": RENDEZVOUS_SERVICE_ENV, "value": rendezvous_service_name(run.name, stage)},
        {"name": RENDEZVOUS_PORT_ENV, "value": str(RENDEZVOUS_PORT)},
        {"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]


def build_rendezvous_service(run: RunRef, spec: RLHFRunSpec, stage: str) -> dict[str, Any] | None:
    """The Service a multi-node stage's Pods rendezvous through; None for a stage on one Pod.

    It selects the stage's Pod of completion index 0 (node rank 0, which runs the rendezvous store).
    Created before the Job, so that the kubelet puts its address into every Pod's environment
    (clusters without DNS); publishNotReadyAddresses because the stage Pods have no readiness probe
    and must reach node 0 as soon as it runs. Owned by the run: it outlives a gang restart's Job
    (same name, same selector) and goes with the run.
    """
    if nodes(spec, stage) <= 1:
        return None
    selector = {**labels(run.name, stage), JOB_COMPLETION_INDEX_LABEL: "0"}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(run, rendezvous_service_name(run.name, stage), stage),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}
            ],
            "publishNotReadyAddresses": True,
        },
    }


def _secret_env(var: str, name: str, key: str) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}


def _publish_env(spec: RLHFRunSpec) -> list[dict[str, Any]]:
    """The publish stage's credentials, by reference to the Secrets spec.publish names (only that
    stage's Pod gets them), and the operator's version for the model card."""
    publish = spec.publish
    env: list[dict[str, Any]] = [{"name": OPERATOR_VERSION_ENV, "value": __version__}]
    if publish is None:
        return env
    if publish.s3 is not None:
        creds = publish.s3.credentials
        env.append(_secret_env(S3_ACCESS_KEY_ID_ENV, creds.secret_name, creds.access_key_id_key))
        env.append(_secret_env(S3_SECRET_ACCESS_KEY_ENV, creds.secret_name, creds.secret_access_key_key))
    if publish.hub is not None:
        token = publish.hub.token or spec.secrets.hf_token
        if token is not None:  # admission refuses a hub target without one
            env.append(_secret_env(HUB_TOKEN_ENV, token.name, token.key))
    return env


def _input_env(spec: RLHFRunSpec, stage: str) -> list[dict[str, Any]]:
    """Where the input cache is; and, after an enabled inputs stage, the hubs offline: every stage
    then reads the copies it staged, and a source it did not stage fails loudly instead of downloading."""
    root = INPUT_CACHE_MOUNT_PATH if spec.storage.input_cache else f"{WORKSPACE_MOUNT_PATH}/{WORKSPACE_INPUT_CACHE}"
    env = [{"name": INPUT_CACHE_ENV, "value": root}]
    if stage != INPUTS_STAGE and spec.stages_inputs():
        env += [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "HF_DATASETS_OFFLINE", "value": "1"}]
    return env


def _input_cache_volume(spec: RLHFRunSpec, stage: str, container: dict[str, Any]) -> list[dict[str, Any]]:
    """storage.inputCache: written by the inputs stage only, read-only everywhere else."""
    cache = spec.storage.input_cache
    if cache is None:
        return []
    mount = {"name": VOLUME_INPUT_CACHE, "mountPath": INPUT_CACHE_MOUNT_PATH, "readOnly": stage != INPUTS_STAGE}
    container["volumeMounts"].append(mount)
    return [{"name": VOLUME_INPUT_CACHE, "persistentVolumeClaim": {"claimName": cache.claim_name}}]


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
    out = {"requests": dict(amounts), "limits": dict(amounts)}
    if not res.cpu and not res.memory:
        # GPUs alone do not count for the QoS class: without CPU or memory the Pod is BestEffort.
        out["requests"].update(FALLBACK_REQUESTS)
    return out


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
    mount = {"name": VOLUME_CONSTITUTION, "mountPath": CONSTITUTION_MOUNT_PATH, "readOnly": True}
    container["volumeMounts"].append(mount)
    items = [{"key": CONSTITUTION_KEY, "path": CONSTITUTION_KEY}]
    source = {"name": spec.rlaif.constitution_config_map, "items": items}
    return [{"name": VOLUME_CONSTITUTION, "configMap": source}]


def _wire(model: ApiModel) -> dict[str, Any]:
    """An overlay entry in core/v1 wire form: what the run set, without the API's defaults."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)


def pod_template(spec: RLHFRunSpec, stage: str) -> RunPodTemplate:
    """The Pod overlay of a stage: its own podTemplate merged over spec.podTemplate."""
    return merged(spec.pod_template, spec.stage(stage).pod_template)


def build_job(run: RunRef, spec: RLHFRunSpec, stage: str) -> dict[str, Any]:
    """The stage's Job. Created suspended when the run is suspended or Kueue is to admit it."""
    runtime = spec.runtime
    overlay = pod_template(spec, stage)
    meta = _metadata(run, job_name(run.name, stage), stage)
    # The overlay's keys never clash with the operator's (admission refuses them); the operator's win anyway.
    pod_labels = {**overlay.labels, **labels(run.name, stage)}
    # The overlay's annotations cannot use the operator's domain (admission), so cannot clash with the config's.
    annotations = {**overlay.annotations, STAGE_CONFIG_ANNOTATION: stage_config(run, spec, stage)}
    pod_meta: dict[str, Any] = {"labels": pod_labels, "annotations": annotations}
    if runtime.queue_name:
        meta["labels"][KUEUE_QUEUE_LABEL] = runtime.queue_name
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": runtime.image,
        "imagePullPolicy": runtime.image_pull_policy,
        "command": stage_command(stage),
        "env": _env(run, spec, stage) + [_wire(e) for e in overlay.env],
        "volumeMounts": [
            {"name": VOLUME_WORKSPACE, "mountPath": WORKSPACE_MOUNT_PATH},
            {"name": VOLUME_CONFIG, "mountPath": CONFIG_MOUNT_PATH, "readOnly": True},
            {"name": VOLUME_TMP, "mountPath": TMP_MOUNT_PATH},
            {"name": VOLUME_SHM, "mountPath": SHM_MOUNT_PATH},
            *(_wire(m) for m in overlay.volume_mounts),
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
    if overlay.env_from:
        container["envFrom"] = [_wire(e) for e in overlay.env_from]
    container["resources"] = _resources(spec, stage)
    extra_volumes = _constitution_volume(spec, stage, container) + _input_cache_volume(spec, stage, container)
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
            # Change the ownership of a volume's files only when its root does not already match:
            # a recursive chown of a workspace full of checkpoints delays every stage's start.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": VOLUME_WORKSPACE, "persistentVolumeClaim": {"claimName": workspace_claim(run.name, spec)}},
            {"name": VOLUME_CONFIG, "downwardAPI": {"items": [config_item()]}},
            {"name": VOLUME_TMP, "emptyDir": {"sizeLimit": overlay.tmp_size_limit}},
            # NCCL and DataLoader workers need shm; a tmpfs counts against the container's memory limit.
            {"name": VOLUME_SHM, "emptyDir": {"medium": "Memory", "sizeLimit": overlay.shm_size_limit}},
            *extra_volumes,
            *(_wire(v) for v in overlay.volumes),
        ],
    }
    optional = {
        "serviceAccountName": runtime.service_account_name,
        "nodeSelector": dict(runtime.node_selector) or None,
        "tolerations": [t.to_wire() for t in runtime.tolerations] or None,
        "affinity": runtime.affinity.to_wire() if runtime.affinity else None,
        "priorityClassName": runtime.priority_class_name,
        "imagePullSecrets": [{"name": n} for n in runtime.image_pull_secrets] or None,
        "schedulerName": overlay.scheduler_name,
        "runtimeClassName": overlay.runtime_class_name,
    }
    pod_spec.update({k: v for k, v in optional.items() if v is not None})
    gang = nodes(spec, stage)
    job_spec: dict[str, Any] = {
        # A gang (several Pods) fails as a whole at its first failed Pod: the operator, not the Job
        # controller, restarts it (all Pods together), counting against runtime.backoffLimit.
        "backoffLimit": runtime.backoff_limit if gang == 1 else 0,
        "completions": gang,
        "parallelism": gang,
        "suspend": bool(spec.suspend or runtime.queue_name),
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": pod_meta, "spec": pod_spec},
    }
    if gang > 1:
        # Each Pod gets its node rank: JOB_COMPLETION_INDEX and the completion-index label.
        job_spec["completionMode"] = "Indexed"
    if runtime.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = runtime.active_deadline_seconds
    if runtime.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = runtime.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}
