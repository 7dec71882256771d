"""The Pod-template overlay: typed Pod settings platform teams add to every stage's Pod, or to one stage's.

``spec.podTemplate`` applies to every stage; ``spec.<stage>.podTemplate`` to that stage only, merged
over it (see ``merged``). Only a safe, typed subset of core/v1 is offered: no free-form YAML, no
hostPath, nothing that changes the image, the user, the ServiceAccount or the security context.

The names the operator itself gives a stage's Pod (environment variables, volumes, mount paths) are
declared here, once, and its label and annotation keys in ``names``: the Job builder (``children``)
uses them, and the overlay's rules refuse them, at admission (CEL) and offline (Python) alike.
"""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal, TypeVar

from pydantic import Field

from .base import ApiModel, Rule
from .names import DOMAIN, KUEUE_DOMAIN, OPERATOR_APP_LABELS
from .runtime import INPUT_CACHE_MOUNT_PATH, WORKSPACE_MOUNT_PATH, DNSName, Quantity

# --- what the operator owns in a stage's Pod ---------------------------------------------------------

# Label and annotation keys are named in .names; these are the ones a Pod overlay may not set.
RESERVED_LABEL_KEYS: Final = OPERATOR_APP_LABELS
# Keys in these domains (or their subdomains) are refused whole: the operator's own, and Kueue's
# (its queue and priority labels are chosen with spec.runtime.queueName and priorityClassName).
RESERVED_KEY_DOMAINS: Final = (DOMAIN, KUEUE_DOMAIN)

# Environment: the operator sets these (children._env); the stages read RLHF_* and the W&B client WANDB_*.
RESERVED_ENV_NAMES: Final = (
    "HOME",
    "HF_HOME",
    "HF_TOKEN",
    "ACTIVELOOP_TOKEN",
    "HF_HUB_OFFLINE",  # after the inputs stage (children._input_env)
    "HF_DATASETS_OFFLINE",
)
RESERVED_ENV_PREFIXES: Final = ("RLHF_", "WANDB_")

# Volumes and where they are mounted.
VOLUME_WORKSPACE: Final = "workspace"
VOLUME_CONFIG: Final = "config"
VOLUME_TMP: Final = "tmp"
VOLUME_SHM: Final = "dshm"
VOLUME_CONSTITUTION: Final = "constitution"
VOLUME_INPUT_CACHE: Final = "input-cache"
RESERVED_VOLUME_NAMES: Final = (
    VOLUME_WORKSPACE,
    VOLUME_CONFIG,
    VOLUME_TMP,
    VOLUME_SHM,
    VOLUME_CONSTITUTION,
    VOLUME_INPUT_CACHE,
)
CONFIG_MOUNT_PATH: Final = "/etc/rlhf"
CONSTITUTION_MOUNT_PATH: Final = "/etc/rlhf-constitution"
TMP_MOUNT_PATH: Final = "/tmp"
SHM_MOUNT_PATH: Final = "/dev/shm"
TERMINATION_LOG_PATH: Final = "/dev/termination-log"
RESERVED_MOUNT_PATHS: Final = (
    WORKSPACE_MOUNT_PATH,
    INPUT_CACHE_MOUNT_PATH,
    CONFIG_MOUNT_PATH,
    CONSTITUTION_MOUNT_PATH,
    TMP_MOUNT_PATH,
    SHM_MOUNT_PATH,
    TERMINATION_LOG_PATH,
)

DEFAULT_SHM_SIZE_LIMIT: Final = "2Gi"
DEFAULT_TMP_SIZE_LIMIT: Final = "8Gi"

MAX_ENTRIES = 32
"""Bound on every list and map of the overlay (it keeps the CEL rules' cost estimate small)."""


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


# --- field types -----------------------------------------------------------------------------------

_QUALIFIED_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
# "[.]", not a backslash escape: the pattern also goes into CEL string literals.
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
LABEL_KEY_PATTERN: Final = f"^({_DNS_SUBDOMAIN}/)?{_QUALIFIED_NAME}$"
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)

LabelValue = Annotated[str, Field(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")]
AnnotationValue = Annotated[str, Field(max_length=4096)]
EnvName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")]
KeyName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
VolumeName = Annotated[str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]

# A path segment that is neither "." nor "..": patterns, not CEL rules, so they cost nothing of the
# CRD's CEL budget (they sit in lists of lists, in every stage's podTemplate).
_SEGMENT = r"([^/.][^/]*|[.][^/.][^/]*|[.][.][^/]+)"

RelativePath = Annotated[str, Field(min_length=1, max_length=253, pattern=f"^{_SEGMENT}(/{_SEGMENT})*$")]
"""A path relative to a volume's root, without "." or ".." segments, e.g. a key's file name or a subPath."""

MountPath = Annotated[str, Field(min_length=2, max_length=253, pattern=f"^(/{_SEGMENT})+$")]
"""An absolute path in the stage container, without ".", ".." or empty segments."""

FieldPath = Annotated[
    str,
    Field(
        max_length=320,
        pattern=r"^(metadata\.(name|namespace|uid)|metadata\.(labels|annotations)\['[-._/a-zA-Z0-9]+'\]"
        r"|spec\.(nodeName|serviceAccountName)|status\.(hostIP|hostIPs|podIP|podIPs))$",
    ),
]
"""A Pod field the downward API can expose as an environment variable."""


# --- environment ---------------------------------------------------------------------------------


class KeyRef(ApiModel):
    """A key of a Secret or ConfigMap in the run's namespace."""

    name: DNSName
    """Secret or ConfigMap name."""
    key: KeyName
    """Key within it."""
    optional: bool = False
    """Start the stage even when the object or key is missing (the variable is then unset)."""


class FieldRef(ApiModel):
    """A field of the stage's own Pod (the downward API)."""

    field_path: FieldPath
    """e.g. ``metadata.name``, ``metadata.labels['team']``, ``spec.nodeName`` or ``status.podIP``."""


class EnvVarSource(ApiModel):
    """Where a variable's value comes from. Set exactly one."""

    rules = (
        Rule(
            cel="[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef)].filter(x, x).size() == 1",
            message="valueFrom: set exactly one of secretKeyRef, configMapKeyRef and fieldRef",
            field_path=".secretKeyRef",
            check=lambda s: [s.secret_key_ref, s.config_map_key_ref, s.field_ref].count(None) == 2,
        ),
    )

    secret_key_ref: KeyRef | None = None
    """A key of a Secret (the run policy may forbid Secret references: docs/policy.md)."""
    config_map_key_ref: KeyRef | None = None
    """A key of a ConfigMap."""
    field_ref: FieldRef | None = None
    """A field of the stage's Pod."""


class EnvVar(ApiModel):
    """An environment variable of the stage container: a value, or a reference."""

    rules = (
        Rule(
            cel="!(has(self.value) && has(self.valueFrom))",
            message="set value or valueFrom, not both",
            field_path=".valueFrom",
            check=lambda e: e.value is None or e.value_from is None,
        ),
    )

    name: EnvName
    """Variable name. Not HOME, HF_HOME, HF_TOKEN, ACTIVELOOP_TOKEN, RLHF_* or WANDB_* (the operator sets those)."""
    value: Annotated[str, Field(max_length=32768)] | None = None
    """The value. Unset with no valueFrom: the empty string."""
    value_from: EnvVarSource | None = None
    """A Secret key, ConfigMap key or Pod field."""


class LocalObjectRef(ApiModel):
    """A Secret or ConfigMap in the run's namespace."""

    name: DNSName
    """Its name."""
    optional: bool = False
    """Start the stage even when it is missing."""


class EnvFromSource(ApiModel):
    """Every key of a Secret or ConfigMap as a variable. Variables in env (and the operator's own)
    take precedence over these, so a key named like one of the operator's variables has no effect."""

    rules = (
        Rule(
            cel="has(self.secretRef) != has(self.configMapRef)",
            message="envFrom: set exactly one of secretRef and configMapRef",
            field_path=".secretRef",
            check=lambda s: (s.secret_ref is None) != (s.config_map_ref is None),
        ),
        Rule(
            cel="!has(self.prefix) || !("
            + " || ".join(f"self.prefix.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES)
            + ")",
            message="envFrom.prefix: "
            + " and ".join(RESERVED_ENV_PREFIXES)
            + " belong to the operator's variables: choose another prefix",
            field_path=".prefix",
            check=lambda s: s.prefix is None or not s.prefix.startswith(RESERVED_ENV_PREFIXES),
        ),
    )

    prefix: EnvName | None = None
    """Prepended to every key, e.g. ``TEAM_``."""
    secret_ref: LocalObjectRef | None = None
    """A Secret (the run policy may forbid Secret references: docs/policy.md)."""
    config_map_ref: LocalObjectRef | None = None
    """A ConfigMap."""


# --- volumes -------------------------------------------------------------------------------------


class KeyToPath(ApiModel):
    """One key of a ConfigMap or Secret, projected as a file."""

    key: KeyName
    """The key."""
    path: RelativePath
    """File name under the mount path."""


class ConfigMapVolume(ApiModel):
    """A ConfigMap's keys as files."""

    name: DNSName
    """ConfigMap name."""
    items: list[KeyToPath] = Field(default_factory=list, max_length=MAX_ENTRIES)
    """Only these keys, at these paths; empty: every key, named after it."""
    optional: bool = False
    """Start the stage even when the ConfigMap is missing."""


class SecretVolume(ApiModel):
    """A Secret's keys as files (the run policy may forbid Secret references: docs/policy.md)."""

    secret_name: DNSName
    """Secret name."""
    items: list[KeyToPath] = Field(default_factory=list, max_length=MAX_ENTRIES)
    """Only these keys, at these paths; empty: every key, named after it."""
    optional: bool = False
    """Start the stage even when the Secret is missing."""


class EmptyDirVolume(ApiModel):
    """Scratch space that lives as long as the Pod."""

    medium: Literal["", "Memory"] = ""
    """``Memory``: a tmpfs, which counts against the container's memory limit."""
    size_limit: Quantity | None = None
    """Most it may hold; the Pod is evicted beyond it."""


class PersistentVolumeClaimVolume(ApiModel):
    """An existing PersistentVolumeClaim of the run's namespace (besides the shared workspace)."""

    claim_name: DNSName
    """Claim name."""
    read_only: bool = False
    """Mount it read-only."""


class Volume(ApiModel):
    """An extra volume of the stage's Pod. Set exactly one source; hostPath and other node-level
    sources are not offered."""

    rules = (
        Rule(
            cel="[has(self.configMap), has(self.secret), has(self.emptyDir), has(self.persistentVolumeClaim)]"
            ".filter(x, x).size() == 1",
            message="a volume needs exactly one of configMap, secret, emptyDir and persistentVolumeClaim",
            field_path=".name",
            check=lambda v: [v.config_map, v.secret, v.empty_dir, v.persistent_volume_claim].count(None) == 3,
        ),
    )

    name: VolumeName
    """Volume name, referenced by volumeMounts. Not one of the operator's (workspace, config, tmp, dshm,
    constitution)."""
    config_map: ConfigMapVolume | None = None
    """A ConfigMap."""
    secret: SecretVolume | None = None
    """A Secret."""
    empty_dir: EmptyDirVolume | None = None
    """An empty directory."""
    persistent_volume_claim: PersistentVolumeClaimVolume | None = None
    """A PersistentVolumeClaim."""


class VolumeMount(ApiModel):
    """Where the stage container mounts a volume of the overlay."""

    name: VolumeName
    """A volume of this podTemplate, or (in a stage's podTemplate) of spec.podTemplate."""
    mount_path: MountPath
    """Absolute path in the container; not at, under or above the operator's mounts."""
    read_only: bool = False
    """Mount it read-only."""
    sub_path: RelativePath | None = None
    """Mount only this path of the volume."""


# --- the overlay ---------------------------------------------------------------------------------


def _reserved_env(name: str) -> bool:
    return name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)


def _operator_key(key: str) -> bool:
    prefix = key.split("/", 1)[0] if "/" in key else ""
    return key in RESERVED_LABEL_KEYS or any(prefix == d or prefix.endswith("." + d) for d in RESERVED_KEY_DOMAINS)


def _clashes_with_operator_mount(path: str) -> bool:
    return any(path == r or path.startswith(r + "/") or r.startswith(path + "/") for r in RESERVED_MOUNT_PATHS)


def _unique(values: list[str]) -> bool:
    return len(values) == len(set(values))


_ENV_CEL = f"!(e.name in {_cel_list(RESERVED_ENV_NAMES)})" + "".join(
    f" && !e.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES
)
_KEY_CEL = f"size(k) <= 317 && k.matches('{LABEL_KEY_PATTERN}') && !(k in {_cel_list(RESERVED_LABEL_KEYS)})" + "".join(
    f" && !k.startsWith('{d}/') && !(k.contains('/') && k.split('/')[0].endsWith('.{d}'))" for d in RESERVED_KEY_DOMAINS
)
_MOUNT_CEL = " && ".join(
    f"m.mountPath != '{r}' && !m.mountPath.startsWith('{r}/') && !'{r}'.startsWith(m.mountPath + '/')"
    for r in RESERVED_MOUNT_PATHS
)


def _keys_rule(field: str, attr: str) -> Rule:
    return Rule(
        cel=f"!has(self.{field}) || self.{field}.all(k, {_KEY_CEL})",
        message=f"{field}: keys must be qualified names ([prefix/]name) and not the operator's: "
        f"{', '.join(d + '/*' for d in RESERVED_KEY_DOMAINS)} (and subdomains), {', '.join(RESERVED_LABEL_KEYS)}; "
        "rename the key (a Kueue queue is chosen with spec.runtime.queueName)",
        field_path=f".{field}",
        check=lambda t: all(_LABEL_KEY.match(k) and len(k) <= 317 and not _operator_key(k) for k in getattr(t, attr)),
    )


class PodTemplate(ApiModel):
    """Typed additions to a stage's Pod (like Kubeflow Trainer's podTemplateOverrides, never free-form
    YAML). spec.podTemplate applies to every stage; a stage's own podTemplate is merged over it: its
    labels, annotations and env entries replace those of the same key or name, its volumes and
    volumeMounts those of the same name and mountPath, and its scalar fields (schedulerName,
    runtimeClassName, size limits) win when set; envFrom lists are concatenated (the stage's last).
    The operator's own variables, volumes, mounts and labels always win, and the overlay may not name
    them (refused at admission). terminationGracePeriodSeconds is spec.runtime's."""

    rules = (
        _keys_rule("labels", "labels"),
        _keys_rule("annotations", "annotations"),
        Rule(
            cel=f"!has(self.env) || self.env.all(e, {_ENV_CEL})",
            message="env: "
            + ", ".join(RESERVED_ENV_NAMES)
            + " and names starting with "
            + " or ".join(RESERVED_ENV_PREFIXES)
            + " are set by the operator (secrets.hfToken, secrets.activeloopToken, secrets.wandbApiKey, wandb):"
            + " rename the variable",
            field_path=".env",
            check=lambda t: not any(_reserved_env(e.name) for e in t.env),
        ),
        Rule(
            cel="!has(self.env) || self.env.all(e, self.env.exists_one(f, f.name == e.name))",
            message="env: each variable may appear once: remove the duplicate name",
            field_path=".env",
            check=lambda t: _unique([e.name for e in t.env]),
        ),
        Rule(
            cel=f"!has(self.volumes) || self.volumes.all(v, !(v.name in {_cel_list(RESERVED_VOLUME_NAMES)}))",
            message="volumes: "
            + ", ".join(RESERVED_VOLUME_NAMES)
            + " are the operator's volume names: rename the volume",
            field_path=".volumes",
            check=lambda t: not any(v.name in RESERVED_VOLUME_NAMES for v in t.volumes),
        ),
        Rule(
            cel="!has(self.volumes) || self.volumes.all(v, self.volumes.exists_one(w, w.name == v.name))",
            message="volumes: each volume name may appear once: rename or remove the duplicate",
            field_path=".volumes",
            check=lambda t: _unique([v.name for v in t.volumes]),
        ),
        Rule(
            cel=f"!has(self.volumeMounts) || self.volumeMounts.all(m, {_MOUNT_CEL})",
            message="volumeMounts: mountPath may not be at, under or above the operator's mounts ("
            + ", ".join(RESERVED_MOUNT_PATHS)
            + "): choose another path, e.g. /etc/team or /data",
            field_path=".volumeMounts",
            check=lambda t: not any(_clashes_with_operator_mount(m.mount_path) for m in t.volume_mounts),
        ),
        Rule(
            cel="!has(self.volumeMounts) || self.volumeMounts.all(m, "
            "self.volumeMounts.exists_one(n, n.mountPath == m.mountPath))",
            message="volumeMounts: each mountPath may appear once: remove the duplicate",
            field_path=".volumeMounts",
            check=lambda t: _unique([m.mount_path for m in t.volume_mounts]),
        ),
    )

    labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    """Labels of the stage Pods (not of the Jobs), e.g. for cost allocation."""
    annotations: dict[str, AnnotationValue] = Field(default_factory=dict, max_length=MAX_ENTRIES)
    """Annotations of the stage Pods, e.g. for a service mesh or a log shipper."""
    env: list[EnvVar] = Field(default_factory=list, max_length=MAX_ENTRIES)
    """Extra environment variables of the stage container."""
    env_from: list[EnvFromSource] = Field(default_factory=list, max_length=MAX_ENTRIES)
    """Every key of a Secret or ConfigMap as variables."""
    volumes: list[Volume] = Field(default_factory=list, max_length=MAX_ENTRIES)
    """Extra volumes: configMap, secret, emptyDir or persistentVolumeClaim."""
    volume_mounts: list[VolumeMount] = Field(default_factory=list, max_length=MAX_ENTRIES)
    """Where the stage container mounts them."""
    scheduler_name: DNSName | None = None
    """The scheduler of the stage Pods; unset: the cluster's default (the run policy lists allowed ones)."""
    runtime_class_name: DNSName | None = None
    """RuntimeClass of the stage Pods, e.g. ``nvidia`` or a sandbox (the run policy lists allowed ones)."""
    shm_size_limit: Quantity | None = None
    """Size of /dev/shm (memory-backed, used by NCCL and DataLoader workers). It counts against the
    container's memory limit. Unset: spec.podTemplate's (default 2Gi)."""
    tmp_size_limit: Quantity | None = None
    """Size of /tmp (node disk; HOME, so also the caches of torch and triton). The Pod is evicted
    beyond it. Unset: spec.podTemplate's (default 8Gi)."""


class RunPodTemplate(PodTemplate):
    """Typed additions to every stage's Pod; see PodTemplate. A stage's own podTemplate is merged over it."""

    rules = PodTemplate.rules

    shm_size_limit: Quantity = DEFAULT_SHM_SIZE_LIMIT
    """Size of /dev/shm (memory-backed, used by NCCL and DataLoader workers). It counts against the
    container's memory limit, so keep it well below the stage's memory."""
    tmp_size_limit: Quantity = DEFAULT_TMP_SIZE_LIMIT
    """Size of /tmp (node disk; HOME, so also the caches of torch and triton). The Pod is evicted
    beyond it."""


_Keyed = TypeVar("_Keyed", EnvVar, Volume, VolumeMount)


def merged(run: RunPodTemplate, stage: PodTemplate | None) -> RunPodTemplate:
    """The overlay a stage's Pod gets: the stage's podTemplate over the run's (see PodTemplate)."""
    if stage is None:
        return run

    def by(key: str, first: list[_Keyed], second: list[_Keyed]) -> list[_Keyed]:
        out = {getattr(x, key): x for x in first}
        out.update({getattr(x, key): x for x in second})
        return list(out.values())

    # Validated again: the merge keeps names and mount paths unique, so the rules still hold.
    return RunPodTemplate(
        labels={**run.labels, **stage.labels},
        annotations={**run.annotations, **stage.annotations},
        env=by("name", run.env, stage.env),
        env_from=[*run.env_from, *stage.env_from],
        volumes=by("name", run.volumes, stage.volumes),
        volume_mounts=by("mount_path", run.volume_mounts, stage.volume_mounts),
        scheduler_name=stage.scheduler_name or run.scheduler_name,
        runtime_class_name=stage.runtime_class_name or run.runtime_class_name,
        shm_size_limit=stage.shm_size_limit or run.shm_size_limit,
        tmp_size_limit=stage.tmp_size_limit or run.tmp_size_limit,
    )
