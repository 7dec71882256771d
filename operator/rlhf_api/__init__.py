"""The RLHFRun API, declared once. The CRD, the chart's CRD and docs/reference.md are generated from it."""

from .base import ApiModel, Rule
from .methods import METHODS, PIPELINES, STAGE_KINDS
from .names import API_VERSION, GROUP, KIND, PLURAL, VERSION
from .run import (
    Condition,
    RLHFRun,
    RLHFRunSpec,
    RLHFRunStatus,
    StageProgress,
    StageStatus,
)
from .runtime import WORKSPACE_MOUNT_PATH
from .sources import DatasetSource, ModelSource
from .stages import (
    DPOStage,
    GRPOStage,
    MergeStage,
    PPOStage,
    ReSTStage,
    RewardStage,
    RLAIFStage,
    RLOOStage,
    SFTStage,
)
from .training import LoRA, Quantization, TrainingSettings

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "METHODS",
    "PIPELINES",
    "PLURAL",
    "STAGE_KINDS",
    "VERSION",
    "WORKSPACE_MOUNT_PATH",
    "ApiModel",
    "Condition",
    "DPOStage",
    "DatasetSource",
    "GRPOStage",
    "LoRA",
    "MergeStage",
    "ModelSource",
    "PPOStage",
    "Quantization",
    "RLAIFStage",
    "RLHFRun",
    "RLHFRunSpec",
    "RLHFRunStatus",
    "RLOOStage",
    "ReSTStage",
    "RewardStage",
    "Rule",
    "SFTStage",
    "StageProgress",
    "StageStatus",
    "TrainingSettings",
]
