"""The RLHFRun resource: spec, status and the pipeline each alignment method runs."""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal, get_args

from pydantic import ConfigDict, Field

from .base import ApiModel, Rule
from .methods import (
    FINAL_STAGES,
    FSDP_STAGES,
    INPUT_STAGES,
    LABELLING_METHODS,
    METHODS,
    MULTI_NODE_STAGES,
    PAIR_TRAINED,
    PIPELINES,
    REQUIRED_SECTIONS,
    REWARD_CONSUMERS,
    pipeline,
)
from .names import API_VERSION, KIND, ApiVersion, Kind
from .podtemplate import RunPodTemplate
from .publish import PublishStage
from .runtime import Runtime, Secrets, Storage, WandB
from .sources import DatasetSource, ModelSource
from .stages import (
    DPOStage,
    GRPOStage,
    InputsStage,
    MergeStage,
    PPOStage,
    ReSTStage,
    RewardStage,
    RLAIFStage,
    RLOOStage,
    SFTStage,
)
from .watch import EVALUATION_ROWS, EvaluationRow

MAX_RUN_NAME_LENGTH = 40  # leaves room for "-<stage>" suffixes in Job names and pod-name hashes

# The keys of methods.METHODS, spelled out because mypy accepts no computed Literal; the two are
# kept equal by tests/api/test_methods.py (a method added to the table must be added here too).
Method = Literal["PPO", "DPO", "ReST", "RLAIF", "GRPO", "RLOO"]


def _method_sections_rule(method: str) -> Rule:
    sections = REQUIRED_SECTIONS[method]
    present = " && ".join(f"has(self.{s})" for s in sections)
    return Rule(
        cel=f"self.method != '{method}' || ({present})",
        message=f"method {method} runs {' -> '.join(PIPELINES[method])}: "
        f"the spec needs sections {', '.join(sections)} (a stage can be turned off with enabled: false)",
        field_path=".method",
        check=lambda s: s.method != method or all(getattr(s, name) is not None for name in sections),
    )


# CEL: the run's method labels its own preference pairs (RLAIF): its reward and dpo stages read them.
_labelling_cel = " || ".join(f"self.method == '{m}'" for m in LABELLING_METHODS)
_not_labelling_cel = " && ".join(f"self.method != '{m}'" for m in LABELLING_METHODS)


def _trained_on_dataset_rule(section: str) -> Rule:
    """reward and dpo need a dataset when enabled, except under RLAIF (the rlaif stage's pairs)."""
    return Rule(
        cel=f"!has(self.{section}) || {_labelling_cel} "
        f"|| (has(self.{section}.enabled) && !self.{section}.enabled) || has(self.{section}.dataset)",
        message=f"an enabled {section} stage needs a dataset (or set enabled: false); "
        "only method RLAIF trains it on the pairs its rlaif stage labels",
        field_path=f".{section}.dataset",
        check=lambda s: (
            getattr(s, section) is None
            or s.method in LABELLING_METHODS
            or not getattr(s, section).enabled
            or getattr(s, section).dataset is not None
        ),
    )


def _rlaif_supplies_pairs_rule(section: str) -> Rule:
    return Rule(
        cel=f"{_not_labelling_cel} || !has(self.{section}) || !has(self.{section}.dataset)",
        message=f"method RLAIF: the {section} stage trains on the pairs the rlaif stage labels; "
        f"remove {section}.dataset (human preference data belongs to method PPO or DPO)",
        field_path=f".{section}.dataset",
        check=lambda s: (
            s.method not in LABELLING_METHODS or getattr(s, section) is None or getattr(s, section).dataset is None
        ),
    )


def _runs_stage_cel(section: str) -> str:
    """CEL: the run's pipeline contains ``section`` (mirrors ``RLHFRunSpec.pipeline``)."""
    methods = [m for m, stages in PIPELINES.items() if section in stages]
    runs = " || ".join(f"self.method == '{m}'" for m in methods if m != "RLAIF")
    if "RLAIF" in methods:
        runs += " || (self.method == 'RLAIF' && !(has(self.rlaif) && has(self.rlaif.then) && self.rlaif.then == 'DPO'))"
    return f"({runs})"


def _reward_source_rule(section: str) -> Rule:
    """A policy stage that scores with a reward model needs one: an enabled reward stage or its rewardModel."""
    return Rule(
        cel=f"!{_runs_stage_cel(section)} || !has(self.{section}) "
        f"|| (has(self.{section}.enabled) && !self.{section}.enabled) || has(self.{section}.rewardModel) "
        "|| (has(self.reward) && (!has(self.reward.enabled) || self.reward.enabled))",
        message=f"the {section} stage optimises against a reward model and this run has none: "
        f"enable the reward stage or set {section}.rewardModel",
        field_path=f".{section}.rewardModel",
        check=lambda s: (
            section not in s.pipeline()
            or getattr(s, section) is None
            or not getattr(s, section).enabled
            or getattr(s, section).reward_model is not None
            or (s.reward is not None and s.reward.enabled)
        ),
    )


# Every stage section (a stage may run in several methods' pipelines).
STAGE_SECTIONS: tuple[str, ...] = tuple(
    dict.fromkeys([*INPUT_STAGES, *(s for stages in PIPELINES.values() for s in stages), *FINAL_STAGES])
)


def _resources_cel(section: str, field: str) -> str:
    """CEL: ``section.resources.field`` is set (server-side defaulting fills only objects the user wrote)."""
    return f"has(self.{section}) && has(self.{section}.resources) && has(self.{section}.resources.{field})"


def _single_node_rule(section: str) -> Rule:
    """A stage the method table (StageKind.multi_node) keeps on one Pod refuses resources.nodes > 1."""
    return Rule(
        cel=f"!({_resources_cel(section, 'nodes')}) || self.{section}.resources.nodes == 1",
        message=f"the {section} stage runs on one Pod: remove {section}.resources.nodes (or set it to 1); "
        f"stages that run on several Pods: {', '.join(MULTI_NODE_STAGES)}",
        field_path=f".{section}.resources.nodes",
        check=lambda s: getattr(s, section) is None or getattr(s, section).resources.nodes == 1,
    )


def _no_fsdp_rule(section: str) -> Rule:
    """A stage the method table (StageKind.shardings) does not shard with FSDP refuses it."""
    return Rule(
        cel=f"!({_resources_cel(section, 'sharding')}) || self.{section}.resources.sharding != 'FSDP'",
        message=f"the {section} stage does not shard with FSDP: set {section}.resources.sharding: DDP "
        f"(or remove it); stages that do: {', '.join(FSDP_STAGES)}",
        field_path=f".{section}.resources.sharding",
        check=lambda s: getattr(s, section) is None or getattr(s, section).resources.sharding != "FSDP",
    )


def _fsdp_unquantized_rule(section: str) -> Rule:
    """FSDP flattens and shards float parameters; bitsandbytes' 8- and 4-bit weights are not."""
    return Rule(
        cel=f"!({_resources_cel(section, 'sharding')}) || self.{section}.resources.sharding != 'FSDP' "
        f"|| !has(self.{section}.quantization) || !has(self.{section}.quantization.mode) "
        f"|| self.{section}.quantization.mode == 'none'",
        message=f"{section}.resources.sharding FSDP shards float weights and cannot shard quantized ones "
        f"(8bit, 4bit/QLoRA): set {section}.quantization.mode: none, or sharding: DDP",
        field_path=f".{section}.resources.sharding",
        check=lambda s: (
            getattr(s, section) is None
            or getattr(s, section).resources.sharding != "FSDP"
            or getattr(s, section).quantization.mode == "none"
        ),
    )


def _gang_volume_rule() -> Rule:
    """A ReadWriteOncePod workspace mounts in one Pod only: a stage on several Pods could never start.

    ReadWriteOnce is let through (every Pod on one node can mount it, and admission cannot know how
    the scheduler will place them: the operator warns when it creates such a Job), and so is an
    existingClaim (its access modes are not in the spec)."""
    multi = " || ".join(f"({_resources_cel(s, 'nodes')} && self.{s}.resources.nodes > 1)" for s in MULTI_NODE_STAGES)
    return Rule(
        cel="(has(self.storage) && has(self.storage.existingClaim)) || !has(self.storage) "
        "|| !has(self.storage.accessModes) || !self.storage.accessModes.exists(m, m == 'ReadWriteOncePod') "
        f"|| self.storage.accessModes.exists(m, m == 'ReadWriteMany') || !({multi})",
        message="a stage with resources.nodes > 1 mounts the workspace in every Pod, and a ReadWriteOncePod "
        "volume mounts in one: set storage.accessModes: [ReadWriteMany] (or nodes: 1)",
        field_path=".storage.accessModes",
        check=lambda s: (
            s.storage.existing_claim is not None
            or "ReadWriteOncePod" not in s.storage.access_modes
            or "ReadWriteMany" in s.storage.access_modes
            or not any(getattr(s, n) is not None and getattr(s, n).resources.nodes > 1 for n in MULTI_NODE_STAGES)
        ),
    )


_PUBLISH_RULES = (
    Rule(
        cel="!has(self.publish) || !has(self.merge) || !has(self.merge.enabled) || self.merge.enabled",
        message="publish uploads the merged model: enable the merge stage (or remove publish)",
        field_path=".publish",
        check=lambda s: s.publish is None or s.merge.enabled,
    ),
    Rule(
        cel="!has(self.publish) || !has(self.publish.rewardModel) || !self.publish.rewardModel "
        f"|| ({_runs_stage_cel('reward')} && has(self.reward) && (!has(self.reward.enabled) || self.reward.enabled))",
        message="publish.rewardModel: this run trains no reward model (its method has no reward stage, "
        "or the stage is disabled): set rewardModel: false",
        field_path=".publish.rewardModel",
        check=lambda s: (
            s.publish is None
            or not s.publish.reward_model
            or ("reward" in s.pipeline() and s.reward is not None and s.reward.enabled)
        ),
    ),
    Rule(
        cel="!has(self.publish) || !has(self.publish.hub) || has(self.publish.hub.token) "
        "|| (has(self.secrets) && has(self.secrets.hfToken))",
        message="publish.hub needs a token with write access: set publish.hub.token or secrets.hfToken "
        "(a Secret reference)",
        field_path=".publish.hub.token",
        check=lambda s: (
            s.publish is None
            or s.publish.hub is None
            or s.publish.hub.token is not None
            or s.secrets.hf_token is not None
        ),
    ),
)


def _mounts_name_volumes_rule(section: str | None) -> Rule:
    """volumeMounts name a volume of the same podTemplate or, in a stage's, of spec.podTemplate."""
    where = f"{section}.podTemplate" if section else "podTemplate"
    own = f"self.{where}"
    guard = f"has(self.{section}) && has({own})" if section else f"has({own})"
    in_run = (
        "(has(self.podTemplate) && has(self.podTemplate.volumes) "
        "&& self.podTemplate.volumes.exists(v, v.name == m.name))"
    )
    in_own = f"(has({own}.volumes) && {own}.volumes.exists(v, v.name == m.name))"
    cel_found = f"{in_own} || {in_run}" if section else in_own
    also = " or in spec.podTemplate.volumes" if section else ""

    def check(s: Any) -> bool:
        template = s.pod_template if section is None else getattr(s, section) and getattr(s, section).pod_template
        if template is None:
            return True
        names = {v.name for v in template.volumes}
        if section is not None:
            names |= {v.name for v in s.pod_template.volumes}
        return all(m.name in names for m in template.volume_mounts)

    return Rule(
        cel=f"!({guard} && has({own}.volumeMounts)) || {own}.volumeMounts.all(m, {cel_found})",
        message=f"{where}.volumeMounts: every mount names a volume declared in {where}.volumes{also}: "
        "add the volume or fix the name",
        field_path=f".{where}.volumeMounts",
        check=check,
    )


@cache
def _source_fields(section: type[ApiModel]) -> tuple[tuple[tuple[str, ...], str], ...]:
    """(attribute path, spec path) of every field under a stage section that holds a model or dataset
    source, nested ones included (``watch.preferenceSet``), found once per class from the annotations:
    ``pipeline()`` asks on every planning pass."""
    found: list[tuple[tuple[str, ...], str]] = []
    for name, info in section.model_fields.items():
        alias = info.alias or name
        types = (info.annotation, *get_args(info.annotation))
        if any(t in (ModelSource, DatasetSource) for t in types):
            found.append(((name,), alias))
            continue
        for t in types:
            if isinstance(t, type) and issubclass(t, ApiModel):
                found += [((name, *path), f"{alias}.{spec}") for path, spec in _source_fields(t)]
    return tuple(found)


def _sources_in(section: ApiModel, prefix: str) -> list[tuple[str, ModelSource | DatasetSource]]:
    out: list[tuple[str, ModelSource | DatasetSource]] = []
    for path, spec_path in _source_fields(type(section)):
        value: Any = section
        for attr in path:  # None on the way: an unset optional part (or a section built without validation)
            value = getattr(value, attr, None)
            if value is None:
                break
        if value is not None:
            out.append((f"{prefix}.{spec_path}", value))
    return out


class RLHFRunSpec(ApiModel):
    """What to train and where. Stages run in the order the method defines, one Job each."""

    rules = (
        *(_method_sections_rule(m) for m in PIPELINES),
        Rule(
            cel="!has(self.wandb) || !has(self.wandb.mode) || self.wandb.mode != 'online' "
            "|| (has(self.secrets) && has(self.secrets.wandbApiKey))",
            message="online W&B reporting needs secrets.wandbApiKey (or set wandb.mode: offline)",
            field_path=".wandb",
            check=lambda s: s.wandb is None or s.wandb.mode != "online" or s.secrets.wandb_api_key is not None,
        ),
        *(_trained_on_dataset_rule(section) for section in PAIR_TRAINED),
        *(_rlaif_supplies_pairs_rule(section) for section in PAIR_TRAINED),
        Rule(
            cel="self.method != 'RLAIF' || !has(self.rlaif) || (has(self.rlaif.then) && self.rlaif.then == 'DPO') "
            "|| (has(self.reward) && has(self.ppo))",
            message="rlaif.then: PPO trains a reward model on the labelled pairs, then PPO: "
            "add reward and ppo sections",
            field_path=".method",
            check=lambda s: (
                s.method != "RLAIF"
                or s.rlaif is None
                or s.rlaif.then == "DPO"
                or (s.reward is not None and s.ppo is not None)
            ),
        ),
        Rule(
            cel="self.method != 'RLAIF' || !has(self.rlaif) || !has(self.rlaif.then) || self.rlaif.then != 'DPO' "
            "|| has(self.dpo)",
            message="rlaif.then: DPO trains with DPO on the labelled pairs: add a dpo section",
            field_path=".dpo",
            check=lambda s: s.method != "RLAIF" or s.rlaif is None or s.rlaif.then != "DPO" or s.dpo is not None,
        ),
        *(_reward_source_rule(section) for section in REWARD_CONSUMERS),
        _mounts_name_volumes_rule(None),
        *(_mounts_name_volumes_rule(section) for section in STAGE_SECTIONS),
        *_PUBLISH_RULES,
        *(_single_node_rule(section) for section in STAGE_SECTIONS if section not in MULTI_NODE_STAGES),
        *(_no_fsdp_rule(section) for section in STAGE_SECTIONS if section not in FSDP_STAGES),
        *(_fsdp_unquantized_rule(section) for section in FSDP_STAGES),
        _gang_volume_rule(),
    )

    method: Method = "PPO"
    """Alignment method. PPO: sft, reward, ppo, merge. DPO: sft, dpo, merge. ReST: sft, reward, rest, merge.
    RLAIF: sft, rlaif (AI labelling), reward, ppo (or dpo), merge. GRPO/RLOO: sft, reward, grpo/rloo, merge."""
    base_model: ModelSource
    """The pretrained model to align."""
    tokenizer: ModelSource | None = None
    """Tokenizer, when it is not saved with the base model."""
    inputs: InputsStage = Field(default_factory=InputsStage)
    """Input staging, the first stage of every method when the run reads a hub id or deeplake URL:
    fetches them at a pinned commit into the input cache, once; the later stages run with the hubs
    offline (docs/inputs.md)."""
    sft: SFTStage | None = None
    """Supervised fine-tuning stage."""
    reward: RewardStage | None = None
    """Reward-model stage."""
    ppo: PPOStage | None = None
    """PPO stage (method PPO, or RLAIF with then: PPO)."""
    dpo: DPOStage | None = None
    """DPO stage (method DPO, or RLAIF with then: DPO)."""
    rest: ReSTStage | None = None
    """ReST grow/improve stage (method ReST)."""
    rlaif: RLAIFStage | None = None
    """AI-feedback labelling stage (method RLAIF)."""
    grpo: GRPOStage | None = None
    """GRPO stage (method GRPO)."""
    rloo: RLOOStage | None = None
    """RLOO stage (method RLOO)."""
    merge: MergeStage = Field(default_factory=MergeStage)
    """LoRA merge stage; produces the standalone output model."""
    publish: PublishStage | None = None
    """Upload the merged model (and the reward model, if asked) with a model card, after merge
    (docs/publishing.md). Unset: the model stays on the shared volume."""
    runtime: Runtime = Field(default_factory=Runtime)
    """Image, scheduling and Job policy for every stage."""
    pod_template: RunPodTemplate = Field(default_factory=RunPodTemplate)
    """Typed additions to every stage's Pod: labels, annotations, env, envFrom, volumes and mounts,
    schedulerName, runtimeClassName, and the sizes of /dev/shm and /tmp. A stage's own podTemplate
    is merged over it."""
    storage: Storage = Field(default_factory=Storage)
    """The shared volume."""
    secrets: Secrets = Field(default_factory=Secrets)
    """Credentials, by Secret reference."""
    wandb: WandB | None = None
    """Weights & Biases reporting."""
    suspend: bool = False
    """Pause the run: the active stage's Job is suspended; unsuspending resumes it from its checkpoint."""

    def pipeline(self) -> tuple[str, ...]:
        """Stage names this run executes, in order (disabled ones included; they are skipped).

        The inputs stage comes first when it is enabled and the run reads a hub id or a deeplake URL
        (docs/inputs.md: a run whose inputs are all on the volume has nothing to fetch)."""
        stages = self._method_pipeline()
        return (*INPUT_STAGES, *stages) if self.stages_inputs() else stages

    def _method_pipeline(self) -> tuple[str, ...]:
        labeller = METHODS[self.method].pairs_from
        labelling = self.stage(labeller) if labeller is not None else None
        stages = pipeline(self.method, labelling.then if labelling is not None else None)
        return (*stages, *(s for s in FINAL_STAGES if self.stage(s) is not None))

    def input_sources(self) -> list[tuple[str, ModelSource | DatasetSource]]:
        """Every model and dataset the run reads, with the spec field that names it: ``baseModel``,
        ``tokenizer`` and those of every enabled stage (e.g. ``sft.dataset``, ``reward.model``)."""
        found: list[tuple[str, ModelSource | DatasetSource]] = [("baseModel", self.base_model)]
        if self.tokenizer is not None:
            found.append(("tokenizer", self.tokenizer))
        for name in self._method_pipeline():
            section = self.stage(name)
            if section is not None and section.enabled:
                found += _sources_in(section, name)
        return found

    def stages_inputs(self) -> bool:
        """Whether the inputs stage runs: enabled, and some input comes from a hub or deeplake."""
        return self.inputs.enabled and any(source.name is not None for _, source in self.input_sources())

    def stage(self, name: str) -> Any:
        """The configuration section of a stage by name."""
        return getattr(self, name)


ConditionStatus = Literal["True", "False", "Unknown"]
StagePhase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed", "Skipped"]
RunPhase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]


class Condition(ApiModel):
    """A condition following the Kubernetes API conventions (metav1.Condition)."""

    # Pydantic merges a subclass model_config into the parent's; spelling it as ConfigDict(...) lets the
    # pydantic mypy plugin see that these instances are mutable.
    model_config = ConfigDict(frozen=False)

    type: Annotated[str, Field(max_length=316)]
    """Condition type, e.g. Running, Succeeded, Failed, Suspended."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: Annotated[str, Field(max_length=1024)]
    """One CamelCase word naming why (a documented constant)."""
    message: Annotated[str, Field(max_length=32768)] = ""
    """Human-readable detail."""
    last_transition_time: str
    """When the status last changed (RFC 3339)."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The .metadata.generation this condition was computed from."""


class StageProgress(ApiModel):
    """How far a running stage is."""

    step: Annotated[int, Field(ge=0)] = 0
    """Steps done."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Steps planned, when known."""
    percent: Annotated[int, Field(ge=0, le=100)] | None = None
    """step / totalSteps as a percentage."""
    eta_seconds: Annotated[int, Field(ge=0)] | None = None
    """Estimated seconds left."""


class ResolvedInput(ApiModel):
    """Where one input of the run came from, as the inputs stage resolved it."""

    field: Annotated[str, Field(max_length=64)]
    """The spec field that names it, e.g. ``baseModel`` or ``sft.dataset``."""
    source: Annotated[str, Field(max_length=512)]
    """The hub id, deeplake URL or volume path."""
    revision: Annotated[str, Field(max_length=128)] | None = None
    """The commit it was read at (hub), the dataset version (deeplake) or a fingerprint of its files
    (``mtime:`` + hash of names, sizes and modification times: a volume path)."""
    requested: Annotated[str, Field(max_length=128)] | None = None
    """The revision the spec asked for (a branch, tag or commit), when it named one."""
    cache: Literal["hit", "miss", "local"] | None = None
    """hit: found in the input cache; miss: fetched now; local: read from the volume in place."""


class StageStatus(ApiModel):
    """What is known about one stage."""

    name: Annotated[str, Field(max_length=32)]
    """Stage name (sft, reward, ppo, merge, ...)."""
    phase: StagePhase = "Pending"
    """Pending, Running, Suspended, Succeeded, Failed or Skipped."""
    job_name: Annotated[str, Field(max_length=63)] | None = None
    """The stage's Job."""
    attempts: Annotated[int, Field(ge=0)] = 0
    """Pods started for this stage (retries included)."""
    start_time: str | None = None
    """When the stage's Job started (RFC 3339)."""
    completion_time: str | None = None
    """When the stage finished (RFC 3339)."""
    progress: StageProgress | None = None
    """Progress, reported by the stage."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Final (or latest) metrics reported by the stage, e.g. reward/mean, eval/accuracy."""
    artifact_path: str | None = None
    """Output directory of the stage on the shared volume."""
    reason: Annotated[str, Field(max_length=128)] | None = None
    """Kubernetes' reason while the stage's Pod cannot start (ImagePullBackOff, Unschedulable,
    CreateContainerConfigError, ...), or why it failed (ConfigError, StartTimeout, ...)."""
    message: Annotated[str, Field(max_length=4096)] | None = None
    """Why the stage is in this phase, for failures especially."""
    findings: list[Annotated[str, Field(max_length=300)]] = Field(default_factory=list, max_length=4)
    """Reward-hacking alarms the stage raised (docs/watch.md); also the RewardHackingSuspected condition."""
    selection: Annotated[str, Field(max_length=400)] | None = None
    """Which evaluated checkpoint became the stage's output, and why."""
    # None rather than empty: absent from every unwatched stage's status, and from statuses written
    # before the field existed, so an upgraded operator has nothing to rewrite.
    evaluations: Annotated[list[EvaluationRow], Field(max_length=EVALUATION_ROWS)] | None = None
    """The reward-hacking watch's held-out evaluations, in step order (at most 8: the baseline, the
    output, the first alarm, the latest and the most recent others; docs/watch.md)."""
    published: list[Annotated[str, Field(max_length=512)]] = Field(default_factory=list, max_length=4)
    """Where the stage uploaded its result (the publish stage: ``s3://...`` and hub URLs)."""
    inputs: list[ResolvedInput] = Field(default_factory=list, max_length=32)
    """The inputs stage only: each model and dataset of the run and the revision it was read at."""


class RLHFRunStatus(ApiModel):
    """Observed state, written only by the operator."""

    # Pydantic merges a subclass model_config into the parent's; spelling it as ConfigDict(...) lets the
    # pydantic mypy plugin see that these instances are mutable.
    model_config = ConfigDict(frozen=False)

    phase: RunPhase = "Pending"
    """Summary for humans and printer columns; conditions carry the detail."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The .metadata.generation last acted upon."""
    current_stage: str | None = None
    """The stage running now (or the one that failed)."""
    progress: Annotated[str, Field(max_length=64)] | None = None
    """Stages finished out of stages to run, and the running stage's percent, e.g. ``2/4 ppo 40%``."""
    reward: float | None = None
    """Latest mean reward reported by the policy-optimisation stage, for ``kubectl get``."""
    stages: list[StageStatus] = Field(default_factory=list)
    """One entry per pipeline stage, in order."""
    conditions: list[Condition] = Field(default_factory=list)
    """Running, Suspended, Succeeded, Failed."""
    output_model: str | None = None
    """The final standalone model on the shared volume, once the run succeeded."""
    published: list[Annotated[str, Field(max_length=512)]] = Field(default_factory=list, max_length=4)
    """Where the publish stage uploaded the result (``s3://bucket/prefix/model``, a hub URL), once it did."""
    start_time: str | None = None
    """When the first stage started."""
    completion_time: str | None = None
    """When the run succeeded or failed."""
    retry_token: Annotated[str, Field(max_length=253)] | None = None
    """The value of the ``rlhf-operator.io/retry`` annotation last acted upon (see docs/operator.md)."""


class RLHFRun(ApiModel):
    """An RLHF pipeline run: SFT, reward model, PPO (or another method) and LoRA merge, as Jobs."""

    rules = (
        Rule(
            cel=f"size(self.metadata.name) <= {MAX_RUN_NAME_LENGTH}",
            message=f"metadata.name must be at most {MAX_RUN_NAME_LENGTH} characters (stage Jobs append -<stage>)",
            check=lambda r: len(r.metadata.get("name", "")) <= MAX_RUN_NAME_LENGTH,
        ),
    )

    api_version: ApiVersion = API_VERSION
    """API version."""
    kind: Kind = KIND
    """Kind."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Standard object metadata."""
    spec: RLHFRunSpec
    """Desired run."""
    status: RLHFRunStatus | None = None
    """Observed state."""
