"""What each alignment method is: the one table the API rules, the operator, the stages and the report read.

Two tables, both declarative:

* :data:`STAGE_KINDS`: one entry per stage (its name is also its spec section and its output
  directory): the module that implements it and its role in a pipeline;
* :data:`METHODS`: one entry per ``spec.method``: its stages in order, the sections it cannot run
  without, where its preference pairs come from and, for RLAIF, the pipeline its ``then`` picks.

Everything else is derived here (``PIPELINES``, ``REQUIRED_SECTIONS``, ``POLICY_STAGES``,
``REWARD_CONSUMERS``, the stage modules the entrypoint imports, the order the report looks for the
aligned policy in). Adding a method means: an entry here, its stage module, and its config section
(``stages.py`` and the field on ``RLHFRunSpec``). See docs/stage-protocol.md.

Pure data: nothing here imports the stages (module paths are strings the entrypoint imports).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

Role = Literal["inputs", "policy", "reward", "labels", "merge", "publish"]

Sharding = Literal["DDP", "FSDP"]
"""How the ranks of a stage split the model (``resources.sharding``). DDP: every rank holds the whole
model and the gradients are averaged. FSDP: parameters, gradients and optimiser state are fully
sharded over all ranks (ZeRO-3-like), through transformers' Trainer and accelerate."""
"""``inputs``: stages the base model, tokenizer and datasets onto the volume before any other stage
(first in every method's pipeline when the run reads a remote input, so the entries leave it out);
``policy``: trains the policy (an adapter or all weights on the current policy); ``reward``: trains
the reward model; ``labels``: labels preference pairs for later stages; ``merge``: folds the last
policy stage's adapter into a standalone model; ``publish``: uploads the result (in no method's
table: it runs after merge when the spec has a ``publish`` section, see ``FINAL_STAGES``)."""


@dataclass(frozen=True)
class StageKind:
    module: str
    """The module ``python -m rlhf_stages <stage>`` runs (``validate`` and ``run``)."""
    role: Role
    uses_reward_model: bool = False
    """Optimises against a reward model: its own ``rewardModel`` or this run's reward stage output."""
    trains_on_pairs: bool = False
    """Trains on preference pairs: its ``dataset``, or the labelling stage's pairs (``Method.pairs_from``)."""
    multi_node: bool = False
    """Accepts ``resources.nodes`` > 1: its ranks train one model together over several Pods (one
    Indexed Job and a rendezvous Service, docs/operator.md "Multi-node stages"). Left out: inputs
    (downloads once, no GPU), rlaif and rest (sampling and judging loops that run on one Pod's
    ranks), merge (one process folding an adapter, no GPU) and publish (an upload)."""
    shardings: tuple[Sharding, ...] = ("DDP",)
    """The ``resources.sharding`` values it accepts. FSDP only where the stage trains through
    transformers' Trainer (sft, reward, dpo), which wraps the model in FSDP through accelerate; the
    on-policy loops (ppo, grpo, rloo) hold a policy, a reference and a reward model at once and
    generate between updates, which FSDP's sharded parameters would gather on every token."""


@dataclass(frozen=True)
class Method:
    stages: tuple[str, ...]
    """The stages it runs, in order (a disabled stage is skipped, not removed)."""
    required: tuple[str, ...]
    """Sections the spec must have (merge has usable defaults)."""
    pairs_from: str | None = None
    """A labelling stage whose pairs the ``trains_on_pairs`` stages read instead of their own dataset."""
    then: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Other pipelines, picked by the labelling stage's ``then`` field (RLAIF: ``then: DPO``)."""


_TRAINER: Final[tuple[Sharding, ...]] = ("DDP", "FSDP")
"""What a stage training through transformers' Trainer accepts."""

STAGE_KINDS: Final[dict[str, StageKind]] = {
    "inputs": StageKind("rlhf_stages.methods.inputs", "inputs"),
    "sft": StageKind("rlhf_stages.methods.sft", "policy", multi_node=True, shardings=_TRAINER),
    "rlaif": StageKind("rlhf_stages.methods.rlaif", "labels"),
    "reward": StageKind(
        "rlhf_stages.methods.reward", "reward", trains_on_pairs=True, multi_node=True, shardings=_TRAINER
    ),
    "ppo": StageKind("rlhf_stages.methods.ppo.stage", "policy", uses_reward_model=True, multi_node=True),
    "grpo": StageKind("rlhf_stages.methods.grpo", "policy", uses_reward_model=True, multi_node=True),
    "rloo": StageKind("rlhf_stages.methods.rloo", "policy", uses_reward_model=True, multi_node=True),
    "rest": StageKind("rlhf_stages.methods.rest", "policy", uses_reward_model=True),
    "dpo": StageKind("rlhf_stages.methods.dpo", "policy", trains_on_pairs=True, multi_node=True, shardings=_TRAINER),
    "merge": StageKind("rlhf_stages.methods.merge", "merge"),
    "publish": StageKind("rlhf_stages.methods.publish", "publish"),
}

FINAL_STAGES: Final = ("publish",)
"""Stages any method runs after its last one, when the spec has their section (``RLHFRunSpec.pipeline``)."""

METHODS: Final[dict[str, Method]] = {
    "PPO": Method(("sft", "reward", "ppo", "merge"), ("sft", "reward", "ppo")),
    "DPO": Method(("sft", "dpo", "merge"), ("sft", "dpo")),
    "ReST": Method(("sft", "reward", "rest", "merge"), ("sft", "reward", "rest")),
    # RLAIF's second half depends on rlaif.then and is checked by its own rules (run.py).
    "RLAIF": Method(
        ("sft", "rlaif", "reward", "ppo", "merge"),
        ("sft", "rlaif"),
        pairs_from="rlaif",
        then={"DPO": ("sft", "rlaif", "dpo", "merge")},
    ),
    "GRPO": Method(("sft", "reward", "grpo", "merge"), ("sft", "reward", "grpo")),
    "RLOO": Method(("sft", "reward", "rloo", "merge"), ("sft", "reward", "rloo")),
}

# ---------------------------------------------------------------- derived

INPUT_STAGES: Final = tuple(name for name, kind in STAGE_KINDS.items() if kind.role == "inputs")
"""Stages a pipeline starts with, whatever the method, when the run reads a remote input
(``RLHFRunSpec.pipeline``); the methods' entries and ``PIPELINES`` leave them out."""

PIPELINES: Final[dict[str, tuple[str, ...]]] = {name: m.stages for name, m in METHODS.items()}
"""The default pipeline of each method (RLAIF with ``then: PPO``)."""
REQUIRED_SECTIONS: Final[dict[str, tuple[str, ...]]] = {name: m.required for name, m in METHODS.items()}
STAGE_MODULES: Final[dict[str, str]] = {name: kind.module for name, kind in STAGE_KINDS.items()}
POLICY_STAGES: Final = frozenset(name for name, kind in STAGE_KINDS.items() if kind.role == "policy")
"""Stages that train an adapter (or full weights) on top of the current policy."""
REWARD_CONSUMERS: Final = tuple(name for name, kind in STAGE_KINDS.items() if kind.uses_reward_model)
PAIR_TRAINED: Final = tuple(name for name, kind in STAGE_KINDS.items() if kind.trains_on_pairs)
MULTI_NODE_STAGES: Final = tuple(name for name, kind in STAGE_KINDS.items() if kind.multi_node)
"""Stages that accept ``resources.nodes`` > 1."""
FSDP_STAGES: Final = tuple(name for name, kind in STAGE_KINDS.items() if "FSDP" in kind.shardings)
"""Stages that accept ``resources.sharding: FSDP``."""
LABELLING_METHODS: Final = tuple(name for name, m in METHODS.items() if m.pairs_from is not None)
"""Methods whose preference-trained stages read a labelling stage's pairs, never a dataset of their own."""
ALIGNED_POLICY_STAGES: Final = tuple(
    dict.fromkeys(
        stage
        for m in METHODS.values()
        for stages in (m.stages, *m.then.values())
        for stage in [s for s in stages if s in POLICY_STAGES][1:]
    )
)
"""Policy stages that start from another one (SFT), in table order: the aligned policy of a run."""


def pipeline(method: str, then: str | None = None) -> tuple[str, ...]:
    """The stages ``method`` runs, in order, with the labelling stage's ``then`` choice applied."""
    entry = METHODS[method]
    return entry.then.get(then, entry.stages) if then is not None else entry.stages


def pairs_from(method: str) -> str | None:
    """The labelling stage whose pairs the reward and dpo stages train on under ``method`` (None: their dataset)."""
    return METHODS[method].pairs_from
