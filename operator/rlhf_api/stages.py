"""Per-stage configuration. The stage entrypoints load these same models from their config file."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from .base import ApiModel, Rule
from .judging import (
    DEFAULT_JUDGE_TEMPLATE,
    MAX_PRINCIPLES,
    JudgeDtype,
    JudgeTemplate,
    Principle,
    judge_template_rule,
)
from .podtemplate import PodTemplate
from .runtime import Resources
from .sources import DatasetSource, ModelSource
from .training import LoRA, Quantization, TrainingSettings
from .watch import ReSTWatch, Watch

DEFAULT_PROMPT_TEMPLATE = "Question: {question}\n\nAnswer: {response}"


def _quantization_needs_lora() -> Rule:
    # Server-side defaulting only fills objects the user wrote, hence the has() guards.
    return Rule(
        cel="!has(self.quantization) || !has(self.quantization.mode) || self.quantization.mode == 'none'"
        " || !has(self.lora) || !has(self.lora.enabled) || self.lora.enabled",
        message="quantization (8bit/4bit) trains through a LoRA adapter: "
        "set lora.enabled: true or quantization.mode: none",
        field_path=".quantization",
        check=lambda s: s.quantization.mode == "none" or s.lora.enabled,
    )


def _enabled_needs_dataset() -> Rule:
    return Rule(
        cel="(has(self.enabled) && !self.enabled) || has(self.dataset)",
        message="an enabled stage needs a dataset (or set enabled: false)",
        field_path=".dataset",
        check=lambda s: not s.enabled or s.dataset is not None,
    )


def _template_rule(*required: str) -> Rule:
    cel = " && ".join(f"self.promptTemplate.contains('{{{name}}}')" for name in required)
    return Rule(
        cel=f"!has(self.promptTemplate) || ({cel})",
        message="promptTemplate must contain " + ", ".join(f"{{{name}}}" for name in required),
        field_path=".promptTemplate",
        check=lambda s: all(f"{{{name}}}" in s.prompt_template for name in required),
    )


PromptTemplate = Annotated[str, Field(min_length=1, max_length=4096)]


class StageBase(ApiModel):
    """Fields every stage has."""

    enabled: bool = True
    """Run this stage. A disabled stage is reported as Skipped; later stages use its input instead."""
    resources: Resources = Field(default_factory=Resources)
    """Compute for this stage's pod."""
    pod_template: PodTemplate | None = None
    """Additions to this stage's Pod, merged over spec.podTemplate (see PodTemplate)."""


class TrainedStage(StageBase):
    """A stage that trains weights on a dataset."""

    dataset: DatasetSource | None = None
    """Training data. Required when the stage is enabled, except for reward and dpo under method RLAIF,
    which train on the pairs the rlaif stage labelled (and must not set one)."""
    lora: LoRA = Field(default_factory=LoRA)
    """LoRA adapter settings."""
    quantization: Quantization = Field(default_factory=Quantization)
    """Base-model quantization (QLoRA with 4bit)."""
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    """Optimisation settings."""


class SFTStage(TrainedStage):
    """Supervised fine-tuning of the base model on demonstrations."""

    rules = (_enabled_needs_dataset(), _quantization_needs_lora(), _template_rule("response"))

    prompt_template: PromptTemplate = DEFAULT_PROMPT_TEMPLATE
    """Python format string over the dataset's columns. Everything before ``{response}`` is the prompt."""
    system_column: Annotated[str, Field(max_length=128)] | None = None
    """Column with a system prompt (e.g. OpenOrca's ``system_prompt``), prepended to the prompt when set."""
    messages_column: Annotated[str, Field(max_length=128)] | None = None
    """Column of chat messages (``[{role, content}]``); when set, the tokenizer's chat template is used
    instead of promptTemplate."""
    completion_only_loss: bool = True
    """Compute the loss on the response tokens only, not the prompt."""


class RewardStage(TrainedStage):
    """Pairwise reward model: learns to score the chosen answer above the rejected one."""

    # Whether it needs a dataset depends on the method (RLAIF supplies the pairs): a spec-level rule.
    rules = (_quantization_needs_lora(),)

    model: ModelSource | None = None
    """Base of the reward model, e.g. ``OpenAssistant/reward-model-deberta-v3-large-v2``. Unset: the SFT model."""
    prompt_template: PromptTemplate = "Question: {prompt}\n\nAnswer: "
    """How a ``prompt`` column is rendered before the answer; unused when the dataset holds whole
    transcripts in ``chosen``/``rejected`` (hh-rlhf)."""
    max_length: Annotated[int, Field(ge=8, le=131072)] = 512
    """Maximum tokens of prompt plus answer scored by the reward model."""


class ResponseLength(ApiModel):
    """Range of generated response lengths, in tokens."""

    rules = (
        Rule(
            cel="!has(self.min) || !has(self.max) || self.min <= self.max",
            message="min must not exceed max",
            field_path=".min",
            check=lambda r: r.min <= r.max,
        ),
    )

    min: Annotated[int, Field(ge=1, le=8192)] = 4
    """Fewest new tokens sampled per response."""
    max: Annotated[int, Field(ge=1, le=8192)] = 32
    """Most new tokens sampled per response."""


class Generation(ApiModel):
    """Sampling settings for rollouts."""

    temperature: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    """Softmax temperature."""
    top_k: Annotated[int, Field(ge=0)] = 0
    """Sample from the k most likely tokens; 0 disables."""
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """Nucleus sampling mass; 1 disables."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Further ``generate()`` keyword arguments, passed through as given (e.g. ``repetition_penalty``)."""


class PolicyOptimisationBase(StageBase):
    """What the on-policy methods (PPO, GRPO, RLOO) share: prompts, rollouts and the KL anchor."""

    dataset: DatasetSource | None = None
    """Prompts to roll out on (a ``prompt`` column, or columns filling promptTemplate)."""
    prompt_template: PromptTemplate = "Question: {prompt}\n\nAnswer:"
    """Python format string over the dataset's columns producing the prompt."""
    lora: LoRA = Field(default_factory=LoRA)
    """LoRA adapter on the policy; the reference model is the same weights with the adapter disabled."""
    quantization: Quantization = Field(default_factory=Quantization)
    """Base-model quantization."""
    reward_model: ModelSource | None = None
    """Reward model to optimise against. Unset: the output of this run's reward stage."""
    generation: Generation = Field(default_factory=Generation)
    """Sampling settings."""
    response_length: ResponseLength = Field(default_factory=ResponseLength)
    """Lengths of sampled responses."""
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 1.4e-5
    """Policy learning rate."""
    total_steps: Annotated[int, Field(ge=1)] = 100
    """Optimisation steps (one batch of rollouts each)."""
    save_freq: Annotated[int, Field(ge=1)] = 20
    """Write a resumable checkpoint every N steps."""
    missing_eos_penalty: Annotated[float, Field(ge=0.0)] | None = 1.0
    """Subtracted from the reward of a response that did not end with EOS; unset disables."""
    seed: Annotated[int, Field(ge=0)] = 42
    """Random seed."""


class PPOStage(PolicyOptimisationBase):
    """Proximal policy optimisation against the reward model, with a KL penalty to the reference."""

    rules = (
        _enabled_needs_dataset(),
        _quantization_needs_lora(),
        Rule(
            cel="!has(self.batchSize) || !has(self.miniBatchSize) || self.batchSize % self.miniBatchSize == 0",
            message="miniBatchSize must divide batchSize",
            field_path=".miniBatchSize",
            check=lambda p: p.batch_size % p.mini_batch_size == 0,
        ),
        Rule(
            cel="!has(self.miniBatchSize) || !has(self.batchSize) || self.miniBatchSize <= self.batchSize",
            message="miniBatchSize must not exceed batchSize",
            field_path=".miniBatchSize",
            check=lambda p: p.mini_batch_size <= p.batch_size,
        ),
    )

    batch_size: Annotated[int, Field(ge=1, le=65536)] = 64
    """Prompts rolled out per step."""
    mini_batch_size: Annotated[int, Field(ge=1, le=65536)] = 16
    """Rollouts per gradient update; must divide batchSize."""
    ppo_epochs: Annotated[int, Field(ge=1, le=100)] = 4
    """Optimisation passes over each batch of rollouts."""
    init_kl_coef: Annotated[float, Field(ge=0.0, le=100.0)] = 0.2
    """Initial coefficient of the per-token KL penalty to the reference model."""
    adaptive_kl: bool = True
    """Adapt the KL coefficient towards klTarget (Ziegler et al. 2019)."""
    kl_target: Annotated[float, Field(gt=0.0)] = 6.0
    """Target KL per sequence for the adaptive controller."""
    kl_horizon: Annotated[int, Field(ge=1)] = 10000
    """Horizon of the adaptive controller, in rollouts."""
    clip_range: Annotated[float, Field(gt=0.0, le=10.0)] = 0.2
    """Policy ratio clip range."""
    clip_range_value: Annotated[float, Field(gt=0.0, le=100.0)] = 0.2
    """Value prediction clip range."""
    value_loss_coef: Annotated[float, Field(ge=0.0, le=100.0)] = 0.1
    """Weight of the value loss."""
    gamma: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    """Discount factor."""
    lam: Annotated[float, Field(ge=0.0, le=1.0)] = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages per batch."""
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0
    """Gradient clipping norm."""
    watch: Watch = Field(default_factory=Watch)
    """Held-out evaluation during training, reward-hacking detectors and checkpoint selection (docs/watch.md)."""


def _no_rollback() -> Rule:
    return Rule(
        cel="!has(self.watch) || !has(self.watch.action) || self.watch.action != 'rollback'",
        message="watch.action rollback is implemented for ppo, grpo and rloo: use stop (the default) or warn",
        field_path=".watch.action",
        check=lambda s: s.watch.action != "rollback",
    )


def _rollback_needs_beta() -> Rule:
    # A rollback strengthens the KL penalty; with beta 0 there is none (and TRL keeps no reference), so
    # the restored policy would walk the same path to the same alarm.
    return Rule(
        cel="!has(self.watch) || !has(self.watch.action) || self.watch.action != 'rollback' || "
        "!has(self.beta) || self.beta > 0.0",
        message="watch.action rollback strengthens the KL penalty beta, which is 0: set beta > 0 or use stop",
        field_path=".watch.action",
        check=lambda s: s.watch.action != "rollback" or s.beta > 0.0,
    )


class GRPOStage(PolicyOptimisationBase):
    """Group relative policy optimisation (TRL GRPOTrainer) with this run's reward model."""

    rules = (_enabled_needs_dataset(), _quantization_needs_lora(), _rollback_needs_beta())

    num_generations: Annotated[int, Field(ge=2, le=256)] = 4
    """Completions sampled per prompt; advantages are relative within the group."""
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 8
    """Prompts per step."""
    beta: Annotated[float, Field(ge=0.0, le=100.0)] = 0.04
    """KL coefficient to the reference model."""
    watch: Watch = Field(default_factory=Watch)
    """Held-out evaluation during training, reward-hacking detectors and checkpoint selection (docs/watch.md)."""


class RLOOStage(GRPOStage):
    """REINFORCE leave-one-out (TRL RLOOTrainer) with this run's reward model."""

    rules = (_enabled_needs_dataset(), _quantization_needs_lora(), _rollback_needs_beta())


class DPOStage(TrainedStage):
    """Direct preference optimisation on chosen/rejected pairs (TRL DPOTrainer)."""

    # Whether it needs a dataset depends on the method (RLAIF supplies the pairs): a spec-level rule.
    rules = (
        _quantization_needs_lora(),
        Rule(
            cel="!has(self.lossType) || self.lossType != 'exo_pair' "
            "|| (has(self.labelSmoothing) && self.labelSmoothing > 0.0)",
            message="lossType exo_pair needs labelSmoothing > 0 (the EXO paper uses 1e-3)",
            field_path=".labelSmoothing",
            check=lambda d: d.loss_type != "exo_pair" or d.label_smoothing > 0.0,
        ),
        Rule(
            cel="!has(self.labelSmoothing) || self.labelSmoothing == 0.0 || !has(self.lossType) "
            "|| self.lossType in ['sigmoid', 'robust', 'exo_pair', 'bco_pair']",
            message="labelSmoothing (assumed label-noise rate) applies to "
            "lossType sigmoid, robust, exo_pair or bco_pair",
            field_path=".labelSmoothing",
            check=lambda d: d.label_smoothing == 0.0 or d.loss_type in ("sigmoid", "robust", "exo_pair", "bco_pair"),
        ),
    )

    beta: Annotated[float, Field(gt=0.0, le=100.0)] = 0.1
    """Strength of the implicit KL constraint to the reference."""
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "exo_pair", "bco_pair", "sppo_hard", "nca_pair"] = "sigmoid"
    """DPO loss variant: sigmoid (DPO), hinge (SLiC), ipo, robust, exo_pair, bco_pair, sppo_hard, nca_pair."""
    label_smoothing: Annotated[float, Field(ge=0.0, le=0.49)] = 0.0
    """Assumed rate of flipped preference labels (conservative DPO, robust, exo_pair, bco_pair); 0 disables.
    Below 0.5 (at 0.5 the labels carry no information); the bound is inclusive 0.49 because the API
    server rejects an exclusive fractional maximum next to the integral default 0."""
    prompt_template: PromptTemplate = "Question: {prompt}\n\nAnswer:"
    """How a ``prompt`` column is rendered."""


class ReSTStage(StageBase):
    """ReST (Gulcehre et al. 2023): Grow (sample and score) then Improve (filter and fine-tune), repeated."""

    rules = (
        _enabled_needs_dataset(),
        _no_rollback(),
        Rule(
            cel="!has(self.thresholds) || self.thresholds.all(t, t >= 0.0 && t < 1.0)",
            message="thresholds are reward quantiles in [0, 1)",
            field_path=".thresholds",
            check=lambda r: all(0.0 <= t < 1.0 for t in r.thresholds),
        ),
        Rule(
            cel="!has(self.thresholds) || self.thresholds.isSorted()",
            message="thresholds must not decrease: each Improve step filters at least as strictly as the one before",
            field_path=".thresholds",
            check=lambda r: list(r.thresholds) == sorted(r.thresholds),
        ),
    )

    dataset: DatasetSource | None = None
    """Prompts for the Grow step."""
    prompt_template: PromptTemplate = "Question: {prompt}\n\nAnswer:"
    """How a ``prompt`` column is rendered."""
    grow_steps: Annotated[int, Field(ge=1, le=100)] = 2
    """Grow iterations; each samples a fresh dataset from the current policy."""
    samples_per_prompt: Annotated[int, Field(ge=1, le=256)] = 4
    """Completions sampled per prompt in a Grow step."""
    thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.9], min_length=1, max_length=32)
    """Rising reward-quantile thresholds, one per Improve step within a Grow step: Improve step i keeps the
    completions of the Grow set scoring at or above its thresholds[i]-quantile."""
    reward_model: ModelSource | None = None
    """Reward model that scores the Grow samples. Unset: the output of this run's reward stage."""
    lora: LoRA = Field(default_factory=LoRA)
    """LoRA adapter settings."""
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    """Optimisation settings of each Improve step."""
    generation: Generation = Field(default_factory=Generation)
    """Sampling settings of the Grow step."""
    response_length: ResponseLength = Field(default_factory=ResponseLength)
    """Lengths of sampled responses."""
    watch: ReSTWatch = Field(default_factory=ReSTWatch)
    """Held-out evaluation after Improve steps, reward-hacking detectors and checkpoint selection (docs/watch.md)."""


class RLAIFStage(StageBase):
    """AI feedback: a judge model labels pairs of the SFT policy's answers under a written constitution.

    For every prompt the SFT policy samples two answers per pair; the judge sees the constitution, the
    prompt and both answers (A and B) and its next-token probabilities of `` A`` and `` B`` decide.
    The labelled pairs (``rlaif/pairs.jsonl``) train the reward model (then PPO) or DPO."""

    rules = (
        _enabled_needs_dataset(),
        Rule(
            cel="has(self.constitution) != has(self.constitutionConfigMap)",
            message="set exactly one of constitution (a list of principles) or constitutionConfigMap",
            field_path=".constitution",
            check=lambda r: (r.constitution is None) != (r.constitution_config_map is None),
        ),
        judge_template_rule("judgeTemplate", "judge_template"),
    )

    judge: ModelSource
    """The judge: a causal LM (hub id or a directory on the volume) that compares two answers."""
    judge_dtype: JudgeDtype = "bfloat16"
    """Dtype the judge is loaded in (it is only run forward)."""
    constitution: list[Principle] | None = Field(default=None, min_length=1, max_length=MAX_PRINCIPLES)
    """Principles the judge applies, e.g. ``Prefer the answer that is kind and on topic.``"""
    constitution_config_map: Annotated[str, Field(max_length=253)] | None = None
    """ConfigMap in the run's namespace (key ``constitution``, one principle per line) holding the principles
    instead; mounted into the stage's pod."""
    judge_template: JudgeTemplate = DEFAULT_JUDGE_TEMPLATE
    """The judge's prompt: ``{constitution}`` (the principles as a ``- `` list), ``{prompt}`` (the rendered
    question), ``{a}`` and ``{b}`` (the answers). It must end where the judge's next words are `` A``
    or `` B``."""
    dataset: DatasetSource | None = None
    """Prompts whose answers are labelled."""
    prompt_template: PromptTemplate = "Question: {prompt}\n\nAnswer:"
    """How a ``prompt`` column is rendered."""
    pairs_per_prompt: Annotated[int, Field(ge=1, le=64)] = 1
    """Pairs of answers sampled per prompt (two answers each)."""
    both_orders: bool = True
    """Ask the judge with both answer orders and keep agreeing verdicts (mitigates position bias)."""
    then: Literal["PPO", "DPO"] = "PPO"
    """What consumes the labelled pairs: a reward model then PPO, or DPO directly."""
    eval_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    """Fraction of the labelled pairs the next stage (reward or dpo) holds out for its metrics."""
    generation: Generation = Field(default_factory=Generation)
    """Sampling settings for the answers to be judged."""
    response_length: ResponseLength = Field(default_factory=ResponseLength)
    """Lengths of sampled answers."""
    seed: Annotated[int, Field(ge=0)] = 42
    """Random seed of the sampling."""


class InputsStage(StageBase):
    """Stages the base model, tokenizer, reward models and datasets the run names onto the volume, once.

    Hub models and datasets are fetched at a commit (a branch or tag is resolved to its commit, which
    the run's status records) into the input cache, and deeplake URLs are copied there at their
    current version; files on the volume stay where they are and are fingerprinted. The stages after
    it run with the hubs offline and read the staged copies. Disabled: every stage reads its inputs
    from the hubs itself, as before (docs/inputs.md)."""

    resources: Resources = Field(default_factory=lambda: Resources(gpus=0, cpu="2", memory="4Gi"))
    """Fetching needs no GPU; memory for the download buffers only."""


class MergeStage(StageBase):
    """Folds the LoRA adapter into the base weights: a standalone model and tokenizer."""

    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the merged weights."""
    resources: Resources = Field(default_factory=lambda: Resources(gpus=0, cpu="4", memory="32Gi"))
    """Merging needs no GPU, only memory for the full weights."""
