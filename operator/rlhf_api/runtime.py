"""The Kubernetes side of a run: image, scheduling, storage, secrets and Job policy."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from .base import ApiModel, Rule
from .corev1 import Affinity, ImageReference, LabelMap, Toleration
from .methods import Sharding

DEFAULT_STAGE_IMAGE = "ghcr.io/rlhf-operator/rlhf-stages:0.1.0"
WORKSPACE_MOUNT_PATH = "/workspace"
INPUT_CACHE_MOUNT_PATH = "/input-cache"
"""Where ``storage.inputCache`` is mounted (read-write in the inputs stage, read-only in the others)."""
WORKSPACE_INPUT_CACHE = ".cache/inputs"
"""The input cache on the workspace volume (relative to it) when no shared cache volume is named."""

Quantity = Annotated[
    str,
    Field(
        max_length=32,
        # Kubernetes' quantity grammar without the minus sign: a Pod's requests and limits may not be
        # negative. The exponent of 1e3 is an integer (the API server cannot parse 1e1.5).
        pattern=r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]+))?$",
    ),
]
"""A non-negative Kubernetes resource quantity such as ``4``, ``500m`` or ``16Gi``."""

DNSName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]


MAX_NODES = 16


class Resources(ApiModel):
    """Compute for one stage: ``nodes`` Pods, each with these GPUs, CPU and memory."""

    # Which stages accept nodes > 1 and FSDP is the method table's (methods.StageKind): spec-level rules.
    rules = (
        Rule(
            cel="!has(self.sharding) || self.sharding != 'FSDP' || !has(self.gpus) || self.gpus > 0",
            message="sharding FSDP runs through the Trainer, which has no FSDP on CPUs (it trains plain DDP "
            "instead, without saying so): set gpus to 1 or more, or sharding: DDP",
            field_path=".sharding",
            check=lambda r: r.sharding != "FSDP" or r.gpus > 0,
        ),
    )

    gpus: Annotated[int, Field(ge=0, le=64)] = 1
    """NVIDIA GPUs (``nvidia.com/gpu``) per Pod; the stage runs one training process per GPU in each
    Pod (0: one CPU process per Pod)."""
    cpu: Quantity | None = None
    """CPU request and limit of each Pod, e.g. ``8``."""
    memory: Quantity | None = None
    """Memory request and limit of each Pod, e.g. ``64Gi``."""
    nodes: Annotated[int, Field(ge=1, le=MAX_NODES)] = 1
    """Pods the stage runs on, started and restarted together (a gang): the stage trains with
    nodes x max(gpus, 1) processes. Above 1 only for sft, reward, dpo, ppo, grpo and rloo. Every Pod
    mounts the workspace volume, so Pods on different nodes need a ReadWriteMany volume
    (storage.accessModes or an existing claim). A failed Pod restarts the whole gang, counted against
    runtime.backoffLimit (docs/operator.md "Multi-node stages")."""
    sharding: Sharding = "DDP"
    """How the processes split the model. DDP: each holds the whole model and gradients are
    averaged. FSDP: parameters, gradients and optimiser state fully sharded over all processes
    (ZeRO-3-like), for a model one GPU cannot hold; only sft, reward and dpo, only with GPUs and
    without quantization. DeepSpeed is not offered (docs/operator.md "Multi-node stages")."""


class SecretKeyRef(ApiModel):
    """A key in a Secret in the run's namespace. Secret values never appear in specs, events or logs."""

    name: DNSName
    """Secret name."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
    """Key within the Secret."""


class Secrets(ApiModel):
    """Credentials, by reference only."""

    hf_token: SecretKeyRef | None = None
    """Hugging Face token, exposed to stages as ``HF_TOKEN`` (gated or private hub models and datasets)."""
    activeloop_token: SecretKeyRef | None = None
    """Activeloop token, exposed to stages as ``ACTIVELOOP_TOKEN`` (``deeplake`` datasets at ``hub://`` URLs
    that are not public)."""
    wandb_api_key: SecretKeyRef | None = None
    """Weights & Biases API key, exposed to stages as ``WANDB_API_KEY``."""


class WandB(ApiModel):
    """Weights & Biases reporting. Unset: stages report nowhere but the run's status."""

    project: Annotated[str, Field(min_length=1, max_length=128)]
    """W&B project."""
    entity: Annotated[str, Field(max_length=128)] | None = None
    """W&B team or user."""
    mode: Literal["online", "offline"] = "online"
    """``offline`` writes runs to the volume for a later ``wandb sync`` and needs no key."""


AccessMode = Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]


def _read_write_once() -> list[AccessMode]:
    return ["ReadWriteOnce"]


class InputCache(ApiModel):
    """A volume that several runs share for the models and datasets the inputs stage fetches."""

    claim_name: DNSName
    """An existing PersistentVolumeClaim in the run's namespace, ReadWriteMany when runs may share it
    at the same time. Sizing and cleanup: docs/inputs.md."""


class Storage(ApiModel):
    """The shared volume, mounted at /workspace in every stage; checkpoints pass through it."""

    rules = (
        Rule(
            cel="!has(self.existingClaim) || (!has(self.size) && !has(self.storageClassName))",
            message="existingClaim uses a PVC you made; "
            "size and storageClassName only apply to one the operator creates",
            field_path=".existingClaim",
            check=lambda s: s.existing_claim is None or (s.size is None and s.storage_class_name is None),
        ),
    )

    existing_claim: DNSName | None = None
    """Use this existing PersistentVolumeClaim. Unset: the operator creates ``<run>-workspace``."""
    size: Quantity | None = None
    """Size of the PVC the operator creates (default 100Gi)."""
    storage_class_name: DNSName | None = None
    """StorageClass of the PVC the operator creates; unset uses the cluster default."""
    access_modes: list[AccessMode] = Field(default_factory=_read_write_once, min_length=1, max_length=3)
    """Access modes of the PVC the operator creates. Stages run one at a time, so RWO suffices."""
    keep_on_delete: bool = False
    """Keep an operator-created PVC (and the models on it) when the run is deleted."""
    input_cache: InputCache | None = None
    """The shared input cache (hub models and datasets, keyed by id and commit). Unset: the operator's
    default (the chart's ``stageDefaults.inputCacheClaim``), else ``.cache/inputs`` on the workspace volume."""


class Runtime(ApiModel):
    """Pod and Job settings applied to every stage's Job."""

    image: ImageReference = DEFAULT_STAGE_IMAGE
    """The stage image (``images/stages``): a reference ``name[:tag][@digest]``."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Image pull policy."""
    image_pull_secrets: list[DNSName] = Field(default_factory=list, max_length=16)
    """Names of Secrets used to pull the image."""
    service_account_name: DNSName | None = None
    """ServiceAccount the stage pods run as; unset uses the namespace default."""
    node_selector: LabelMap = Field(default_factory=dict)
    """Node labels the stage pods must match (label keys and values), e.g.
    ``{nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB}``."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Pod tolerations (core/v1 Toleration), e.g. for tainted GPU nodes."""
    affinity: Affinity | None = None
    """Pod affinity (core/v1 Affinity: nodeAffinity, podAffinity, podAntiAffinity)."""
    priority_class_name: DNSName | None = None
    """PriorityClass of the stage pods."""
    queue_name: DNSName | None = None
    """Kueue LocalQueue; the Jobs are created suspended and labelled for Kueue to admit."""
    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 2
    """Retries of a stage's pod before the stage, and the run, fail. Config errors are never retried."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Time limit for each stage's Job."""
    start_timeout_seconds: Annotated[int, Field(ge=1)] | None = 900
    """How long a stage's Pod may wait to start (image pull errors, missing Secrets or ConfigMaps, no node
    that fits, an unbound volume) before the stage and the run fail and the Job is suspended, which frees
    what the Pod holds. null waits for ever (e.g. for GPUs to free up on a cluster without Kueue; with
    Kueue, queueing happens before the Job is unsuspended and does not count)."""
    termination_grace_period_seconds: Annotated[int, Field(ge=1, le=86400)] = 600
    """Time a stage's Pod has after SIGTERM (eviction, preemption, suspend, deletion) to save a checkpoint
    and exit before it is killed. PPO, GRPO, RLOO and ReST abandon a sampling phase within one forward pass
    (PPO finishes a step's remaining updates), then save the last completed step. 600 s covers any LoRA
    stage and full-weight 7B ReST/GRPO/RLOO on storage writing >= 135 MB/s; full-weight 7B PPO (~162 GB with
    Adam state) needs about 1800 s at 178 MB/s (docs/benchmarks.md, "Checkpoint save time and the grace period")."""
    max_interruptions: Annotated[int, Field(ge=0, le=1000)] = 10
    """How many times a stage's Pod may be stopped from outside (eviction, preemption, node drain, a deleted
    Pod) and started again from its checkpoint before the stage, and the run, fail. Kubernetes does not
    count these against backoffLimit, so without a bound a stage on a cluster that keeps preempting it
    would retry for ever."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete each finished stage Job after this many seconds (the run's status keeps the results)."""
