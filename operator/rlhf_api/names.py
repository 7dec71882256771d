"""The operator's names on the wire, each written once: the API group and version, the resource's
names, and every label and annotation key the operator, the stages and the tests read or write.

It lives in the API package because everything that speaks to a run needs these names: the operator,
the CRD and chart generation, the Pod-overlay rules that refuse the operator's keys (podtemplate),
and the stages (which may import only the API).
"""

from __future__ import annotations

from typing import Final, Literal, get_args

# --- the resource ------------------------------------------------------------------------------------

ApiVersion = Literal["rlhf-operator.io/v1alpha1"]
"""The one spelling of the group and version. A Literal, so that models can pin their apiVersion to
it (mypy accepts no computed value inside Literal[...]); everything else derives from it."""
API_VERSION: Final[ApiVersion] = get_args(ApiVersion)[0]
GROUP: Final[str] = API_VERSION.split("/")[0]
VERSION: Final[str] = API_VERSION.split("/")[1]

Kind = Literal["RLHFRun"]
KIND: Final[Kind] = get_args(Kind)[0]
PLURAL: Final = "rlhfruns"
SINGULAR: Final = "rlhfrun"
SHORT_NAMES: Final = ("rlhf",)
CRD_NAME: Final = f"{PLURAL}.{GROUP}"
"""The CustomResourceDefinition's name (also the file name of crds/<name>.yaml)."""

MANAGER: Final = "rlhf-operator"
"""Who manages a run's children (app.kubernetes.io/managed-by) and what they are part of."""

# --- label and annotation keys -------------------------------------------------------------------------

DOMAIN: Final = GROUP
"""Label and annotation keys in this domain (or a subdomain of it) belong to the operator."""
LABEL_RUN: Final = f"{DOMAIN}/run"
LABEL_STAGE: Final = f"{DOMAIN}/stage"
RETRY_ANNOTATION: Final = f"{DOMAIN}/retry"
"""On a run: a new value restarts a failed run from its failed stage (docs/operator.md)."""
STAGE_CONFIG_ANNOTATION: Final = f"{DOMAIN}/invocation"
"""On a stage Job's Pod template: the stage's StageInvocation (YAML), projected into the container as
its config file by a downwardAPI volume (no ConfigMap: the Job's creation is the stage's one write)."""
PROGRESS_ANNOTATION: Final = f"{DOMAIN}/progress"
"""On a stage Pod, written only by the local kubelet (dev), which has no Pod logs to carry progress."""
TEST_VOLUME_LABEL: Final = f"{DOMAIN}/test-volume"
"""On the PersistentVolumes the dev cluster creates for tests."""

# The app.kubernetes.io labels the operator puts on every stage Pod (children.labels).
LABEL_APP_NAME: Final = "app.kubernetes.io/name"
LABEL_APP_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_APP_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_APP_COMPONENT: Final = "app.kubernetes.io/component"
OPERATOR_APP_LABELS: Final = (
    LABEL_APP_NAME,
    LABEL_APP_INSTANCE,
    LABEL_APP_PART_OF,
    LABEL_MANAGED_BY,
    LABEL_APP_COMPONENT,
)

KUEUE_DOMAIN: Final = "kueue.x-k8s.io"
KUEUE_QUEUE_LABEL: Final = f"{KUEUE_DOMAIN}/queue-name"
"""Set from spec.runtime.queueName only: a run may not pick a Kueue queue behind the API's back."""

# Kubernetes' own: the Job controller labels a Job's Pods with these (and the unprefixed legacy pair).
CONTROLLER_UID_LABEL: Final = "batch.kubernetes.io/controller-uid"
JOB_NAME_LABEL: Final = "batch.kubernetes.io/job-name"
LEGACY_CONTROLLER_UID_LABEL: Final = "controller-uid"
LEGACY_JOB_NAME_LABEL: Final = "job-name"
# An Indexed Job's Pods (a multi-node stage): the Job controller labels each with its index, 0..N-1,
# and sets the same number in the env var JOB_COMPLETION_INDEX.
JOB_COMPLETION_INDEX_LABEL: Final = "batch.kubernetes.io/job-completion-index"
