"""Prometheus metrics of the pools: their sizes and capacity, the share of a step each was waited on, the
autoscaler's requests and decisions (elastic.py), and which node every actor runs on (placement.py). The names
keep the `segr1_driver_` prefix the dashboard reads: the driver process exports them."""

from __future__ import annotations

from runtime.metrics import counter, gauge

ACTOR_INFO = gauge(  # placement.py
    "segr1_actor_info",
    "1 for every actor of the job (driver, learner-0, rollout-i, reward-i) on the node it runs on; 0 for a node "
    "it left.",
    ("actor", "pool", "node_id", "node_ip"),
)
POOL_SIZE = gauge("segr1_driver_pool_size", "Actors of the pool taking work (rollout, reward).", ("pool",))
POOL_CAPACITY = gauge(
    "segr1_driver_pool_capacity",
    "Disaggregated: actors of the pool the alive nodes can hold (segr1_rollout / segr1_reward units).",
    ("pool",),
)
WAIT_SHARE = gauge(
    "segr1_driver_wait_share",
    "Share of the last step's time the learner waited on the pool (rollout: generating, reward: scoring).",
    ("pool",),
)
SCALE_DECISIONS = counter(
    "segr1_driver_scale_decisions_total",
    "Autoscaling decisions (placement.autoscale): one more unit of the pool requested (up) or released (down).",
    ("pool", "direction"),
)
AUTOSCALE_REQUESTED = gauge(
    "segr1_driver_autoscale_requested",
    "Units of the pool the driver asks Ray's autoscaler to hold (placement.autoscale).",
    ("pool",),
)
