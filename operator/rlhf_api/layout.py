"""The contract between the operator and the stages: invocation, volume layout, results.

Everything a stage reads or writes on the shared volume is named here, once, so the operator
(which reports artifact paths) and the stages (which write them) cannot disagree. See
docs/stage-protocol.md for the prose version.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Annotated, Any, Final, Literal

from pydantic import Field

from .base import ApiModel
from .methods import POLICY_STAGES
from .names import API_VERSION, ApiVersion

# Mount paths are declared with the Pod's other reserved names (podtemplate) and re-exported here.
from .podtemplate import CONFIG_MOUNT_PATH, CONSTITUTION_MOUNT_PATH, TERMINATION_LOG_PATH  # noqa: F401
from .run import ResolvedInput, RLHFRunSpec
from .watch import EVALUATION_ROWS, EvaluationRow

INVOCATION_KIND: Final = "StageInvocation"
CONFIG_FILE_NAME = "invocation.yaml"
TERMINATION_LOG_ENV = "RLHF_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = TERMINATION_LOG_PATH
TERMINATION_MESSAGE_LIMIT = 4096  # bytes the kubelet keeps of a termination message
MANIFEST_FILE = "manifest.json"

# Live progress: besides rewriting its progress file, rank 0 prints each report on its stdout as one
# line, this marker, a space, then the same JSON object (step, totalSteps, metrics, ...). The
# operator reads the tail of the stage container's log through the API server and takes the last
# such line (docs/operator.md, "Live progress").
PROGRESS_LOG_MARKER: Final = "rlhf-progress"
# A progress report carries at most this many of the watch's findings, each cut to this length: the
# operator raises RewardHackingSuspected from them while the stage runs (docs/watch.md).
MAX_PROGRESS_FINDINGS: Final = 2
MAX_FINDING_CHARS: Final = 300

# Exit codes with a meaning to the Job's podFailurePolicy: configuration and input errors are
# never retried (retrying cannot fix them); anything else is retried up to backoffLimit.
EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_INPUT_MISSING = 3
NON_RETRYABLE_EXIT_CODES = (EXIT_CONFIG_ERROR, EXIT_INPUT_MISSING)

# RLAIF: the labelled pairs the reward or dpo stage trains on, and where a constitution ConfigMap is
# mounted in the rlaif stage's pod (CONSTITUTION_MOUNT_PATH; RLHF_CONSTITUTION_FILE overrides it
# outside a cluster).
RLAIF_PAIRS_FILE = "pairs.jsonl"
CONSTITUTION_KEY = "constitution"
CONSTITUTION_FILE_ENV = "RLHF_CONSTITUTION_FILE"


class RunRef(ApiModel):
    """Which run: the one type that names a run, carried by the objects the operator builds for it
    and by the stage invocation (the planner's ``RunView`` adds the run's observed state to one)."""

    namespace: Annotated[str, Field(max_length=63)] = "default"
    """Namespace of the RLHFRun."""
    name: Annotated[str, Field(max_length=63)]
    """Name of the RLHFRun."""
    uid: str | None = None
    """UID of the RLHFRun, recorded in manifests (absent only outside a cluster: ``rlhfctl local``)."""


class StageInvocation(ApiModel):
    """What a stage container is given: the whole run spec plus where it lives on the volume."""

    api_version: ApiVersion = API_VERSION
    """API version."""
    kind: Literal["StageInvocation"] = INVOCATION_KIND
    """Kind."""
    stage: Annotated[str, Field(max_length=32)]
    """The stage to run (a name from the method's pipeline)."""
    run: RunRef
    """The run this stage belongs to."""
    workspace: str = "/workspace"
    """Mount path of the shared volume; every spec path is relative to it."""
    spec: RLHFRunSpec
    """The run's spec, as admitted."""

    @property
    def run_dir(self) -> PurePosixPath:
        return run_dir(self.run.namespace, self.run.name)


# The inputs stage: what it resolved (``inputs.json`` in its output: field, source, revision and the
# staged copy's place in the input cache), read by every later stage; the cache's root is given to
# the stages in RLHF_INPUT_CACHE (the mount path of storage.inputCache, or a directory on the workspace).
INPUTS_STAGE: Final = "inputs"
INPUTS_FILE: Final = "inputs.json"
INPUT_CACHE_ENV: Final = "RLHF_INPUT_CACHE"


# A multi-node stage (resources.nodes > 1): one Indexed Job of N Pods and a rendezvous Service that
# selects its Pod of index 0 (docs/operator.md "Multi-node stages"). Pod i reads its node rank from
# JOB_COMPLETION_INDEX (set by the Job controller); node 0 listens on the rendezvous port at its own
# address (RLHF_POD_IP), the others reach it through the Service: the env var the kubelet derives from
# the Service's name (``service_host_env``), else the name itself (cluster DNS).
JOB_COMPLETION_INDEX_ENV: Final = "JOB_COMPLETION_INDEX"
RENDEZVOUS_SERVICE_ENV: Final = "RLHF_RENDEZVOUS_SERVICE"
RENDEZVOUS_PORT_ENV: Final = "RLHF_RENDEZVOUS_PORT"
POD_IP_ENV: Final = "RLHF_POD_IP"
RENDEZVOUS_PORT: Final = 29400


def service_host_env(service: str) -> str:
    """The env var in which the kubelet gives every Pod created after the Service its ClusterIP."""
    return service.upper().replace("-", "_") + "_SERVICE_HOST"


def staged_inputs(run: PurePosixPath) -> PurePosixPath:
    """The inputs stage's record of what it staged, relative to the volume."""
    return stage_output(run, INPUTS_STAGE) / INPUTS_FILE


class StageResult(ApiModel):
    """What a stage reports when it exits: written as JSON to its termination log (at most 4 KiB)."""

    stage: str
    """Stage name."""
    succeeded: bool
    """Whether the stage finished its work."""
    step: int = 0
    """Last completed step."""
    total_steps: int | None = None
    """Planned steps."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Final metrics (a few headline numbers; the full history is in the manifest)."""
    artifact_path: str | None = None
    """Output directory, relative to the volume root."""
    message: str | None = None
    """Error or summary for humans."""
    exit_code: int = 0
    """The process exit code."""
    findings: list[Annotated[str, Field(max_length=300)]] = Field(default_factory=list, max_length=4)
    """Reward-hacking alarms the stage raised (``<detector> at step N: <evidence>``), first ones first."""
    selected_step: int | None = None
    """The training step whose weights are the output, when the stage chose among evaluated checkpoints."""
    selection: Annotated[str, Field(max_length=300)] | None = None
    """Why that checkpoint (the criterion and what it saw)."""
    evaluations: list[EvaluationRow] = Field(default_factory=list, max_length=EVALUATION_ROWS)
    """The watch's held-out evaluations (the baseline, the selected one, the first alarm and the latest
    first, then the most recent others), for status."""
    published: list[Annotated[str, Field(max_length=512)]] = Field(default_factory=list, max_length=4)
    """Where the result was uploaded (the publish stage): ``s3://bucket/prefix/model``, hub URLs."""
    inputs: list[ResolvedInput] = Field(default_factory=list, max_length=32)
    """The inputs stage: the revision each input was read at (the run's status shows them)."""

    def selection_line(self) -> str | None:
        """Which evaluated checkpoint is the output and why, as status and ``rlhfctl`` show it."""
        return f"step {self.selected_step}: {self.selection}" if self.selection else None


def run_dir(namespace: str, name: str) -> PurePosixPath:
    """Directory of a run on the volume, relative to its root."""
    return PurePosixPath("runs") / namespace / name


def stage_output(run: PurePosixPath, stage: str) -> PurePosixPath:
    """A stage's final output directory (appears atomically, complete with its manifest)."""
    return run / stage


def rlaif_pairs(run: PurePosixPath) -> PurePosixPath:
    """The preference pairs the rlaif stage labelled (prompt, chosen, rejected), relative to the volume."""
    return stage_output(run, "rlaif") / RLAIF_PAIRS_FILE


def stage_checkpoints(run: PurePosixPath, stage: str) -> PurePosixPath:
    """Where a stage keeps resumable checkpoints while it runs."""
    return run / f"{stage}.checkpoints"


def stage_progress_file(run: PurePosixPath, stage: str) -> PurePosixPath:
    """Progress of a running stage (JSON), rewritten as it goes."""
    return run / f"{stage}.progress.json"


def progress_log_line(body: dict[str, Any]) -> str:
    """A progress report as the stage prints it on stdout: the marker, a space, compact JSON, one line."""
    return f"{PROGRESS_LOG_MARKER} {json.dumps(body, separators=(',', ':'), sort_keys=True)}"


def enabled_before(spec: RLHFRunSpec, stage: str) -> list[str]:
    """Enabled stages that run before ``stage`` in this run's pipeline."""
    pipeline = spec.pipeline()
    earlier = pipeline[: pipeline.index(stage)]
    return [s for s in earlier if spec.stage(s) is not None and spec.stage(s).enabled]


def policy_base(spec: RLHFRunSpec, stage: str, run: PurePosixPath) -> PurePosixPath | None:
    """The standalone model a policy stage starts from: SFT's output if SFT ran, else None (the base).

    SFT always leaves a standalone model (its LoRA merged), so preference and RL stages train a
    fresh adapter on it and use it, adapter disabled, as their reference.
    """
    if "sft" in enabled_before(spec, stage) and stage != "sft":
        return stage_output(run, "sft") / "model"
    return None


def last_policy_stage(spec: RLHFRunSpec) -> str | None:
    """The last enabled stage before merge that changes the policy."""
    stages = [s for s in enabled_before(spec, "merge") if s in POLICY_STAGES]
    return stages[-1] if stages else None


def describe(spec: RLHFRunSpec) -> dict[str, Any]:
    """Stage-by-stage plan for humans (used by `rlhfctl render` and docs)."""
    return {s: bool(spec.stage(s) is not None and spec.stage(s).enabled) for s in spec.pipeline()}
