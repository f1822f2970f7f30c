"""Metrics of the reward service (declared once; runtime/metrics.py records them locally and forwards to Ray).

Ray exports each as `ray_<name>`; docs/reward.md lists them with their labels. The throughput counters carry
`purpose` (the groups' protos.Purpose): `score` serves training, `predict` validation while training.
"""

from __future__ import annotations

from runtime.metrics import REWARD_BUCKETS, SECONDS_BUCKETS, counter, gauge, histogram

MASKS_SCORED = counter(
    "segr1_reward_masks_scored",
    "Completions segmented (one predicted mask each, OR of its prompts' masks; unparsable ones included): "
    "scored for training (purpose train), predicted for validation (purpose val).",
    labels=("worker", "purpose"),
)
GROUPS_SCORED = counter(
    "segr1_reward_groups_scored",
    "Rollout groups scored (purpose train) or predicted (purpose val).",
    labels=("worker", "purpose"),
)
PARSE_FAILURES = counter(
    "segr1_reward_parse_failures",
    "Completions that failed the format check, by reason (reward_service.parser.FAILURE_REASONS), plus "
    "corrupt_sample and segmenter_error.",
    labels=("worker", "reason"),
)
REWARD = histogram(
    "segr1_reward_value",
    "Reward of each completion, per term (format, iou, s_measure, segmentation, box_iou, box_l1, total).",
    boundaries=REWARD_BUCKETS,
    labels=("worker", "term"),
)
ENCODE_SECONDS = histogram(
    "segr1_reward_encode_seconds",
    "Image encoding time of one score call (all distinct images of the call, batched).",
    boundaries=SECONDS_BUCKETS,
    labels=("worker",),
)
DECODE_SECONDS = histogram(
    "segr1_reward_decode_seconds",
    "Prompt decoding time of one score call (every prompt of every group, batched).",
    boundaries=SECONDS_BUCKETS,
    labels=("worker",),
)
TOTAL_SECONDS = histogram(
    "segr1_reward_total_seconds",
    "Wall time of one score call: decode bytes, parse, encode, decode, rewards.",
    boundaries=SECONDS_BUCKETS,
    labels=("worker",),
)
QUEUE_DEPTH = gauge(
    "segr1_reward_queue_depth",
    "Groups accepted by a reward worker and not yet answered (0 when idle).",
    labels=("worker",),
)
