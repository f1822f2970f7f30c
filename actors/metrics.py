"""Metrics of the rollout actors (declared once; runtime/metrics.py records them locally and forwards to Ray).

Ray exports each as `ray_<name>` (counters with `_total`); docs/rollout.md lists them with their labels.
The throughput counters carry `purpose` (train | val | eval, protos.Purpose): the dashboard's training throughput
reads purpose="train" only, so validation (eval.every) never moves it.
"""

from __future__ import annotations

from runtime.metrics import SECONDS_BUCKETS, counter, gauge, histogram

TOKENS = counter(
    "segr1_rollout_tokens",
    "Completion tokens generated (stop tokens included), summed over the G completions of every group.",
    labels=("worker", "purpose"),
)
PROMPT_TOKENS = counter(
    "segr1_rollout_prompt_tokens",
    "Prompt tokens (image tokens included) of the requests generated, counted once per request.",
    labels=("worker", "purpose"),
)
GROUPS = counter("segr1_rollout_groups", "Rollout groups (requests) answered.", labels=("worker", "purpose"))
TOKENS_PER_SECOND = gauge(
    "segr1_rollout_tokens_per_second",
    "Completion tokens per second of the worker's last generate call.",
    labels=("worker",),
)
REQUESTS_IN_FLIGHT = gauge(
    "segr1_rollout_requests_in_flight",
    "Requests (groups) the worker is generating right now (0 when idle).",
    labels=("worker",),
)
GENERATE_SECONDS = histogram(
    "segr1_rollout_generate_seconds",
    "Wall time of one generate call (one batch of requests, image decoding included).",
    boundaries=SECONDS_BUCKETS,
    labels=("worker",),
)
POLICY_VERSION = gauge(
    "segr1_rollout_policy_version", "Policy version the worker's engine holds.", labels=("worker",)
)
WEIGHT_LOAD_SECONDS = histogram(
    "segr1_rollout_weight_load_seconds",
    "Time to apply one weight update to the engine (after the transfer).",
    boundaries=SECONDS_BUCKETS,
    labels=("worker",),
)
WEIGHT_DECODE_SECONDS = histogram(
    "segr1_rollout_weight_decode_seconds",
    "Time to apply one version's weight_sync.delta payloads to the worker's copy of the policy (0 without delta).",
    boundaries=SECONDS_BUCKETS,
    labels=("worker",),
)
STALE_REQUESTS = counter(
    "segr1_rollout_stale_requests",
    "Requests refused because they need a newer policy than the worker holds (StaleWeightsError).",
    labels=("worker",),
)
