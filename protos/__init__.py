"""Messages between the components of Seg-R1, and the Arrow schemas of its Parquet files.

Pure: importing this package imports no third-party package but pydantic and pyarrow (tests/unit/protos/test_protos.py,
the `protos-pure` import-linter contract in pyproject.toml).
Every hop has exactly one message type, named for what it carries; its docstring gives the direction.
"""

from protos.dataset import DATASET_SCHEMA, ROLLOUT_LOG_SCHEMA, Sample, TaskKind
from protos.messages import (
    REWARD_TERMS,
    ZERO_VARIANCE_TOL,
    Completion,
    CompletionReward,
    GroupScores,
    MaskPrompt,
    ParsedAnswer,
    Purpose,
    RewardComponents,
    RewardRequest,
    RolloutGroup,
    RolloutRequest,
    SamplingConfig,
    ScoredGroup,
    check_pairs,
)
from protos.routing import BatchPick, GroupHeader, TrainBatch
from protos.stats import StepStats
from protos.weights import TensorSpec, WeightsManifest

__all__ = [
    "BatchPick",
    "GroupHeader",
    "TrainBatch",
    "DATASET_SCHEMA",
    "ROLLOUT_LOG_SCHEMA",
    "Completion",
    "CompletionReward",
    "GroupScores",
    "MaskPrompt",
    "ParsedAnswer",
    "Purpose",
    "RewardComponents",
    "RewardRequest",
    "RolloutGroup",
    "RolloutRequest",
    "Sample",
    "SamplingConfig",
    "ScoredGroup",
    "StepStats",
    "TaskKind",
    "TensorSpec",
    "WeightsManifest",
    "REWARD_TERMS",
    "ZERO_VARIANCE_TOL",
    "check_pairs",
]
