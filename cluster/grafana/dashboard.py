"""The Grafana dashboard of a training job, generated from one table of panels into cluster/grafana/segr1.json.

    python -m cluster.grafana.dashboard            # rewrite segr1.json
    python -m cluster.grafana.dashboard --check    # exit 1 when segr1.json is not what this file generates
    python -m cluster.grafana.dashboard --metrics-table   # the metric reference of docs/kubernetes.md

Every query goes through the `${datasource}` template variable (no data source UID is written anywhere), so the
JSON imports as is into any Grafana with a Prometheus data source. The `$cluster` variable filters on the
`ray_io_cluster` label that cluster/k8s/podmonitor.yaml adds; series without it (a local run) always match.

How Ray 2.60 exports a metric declared through runtime/metrics.py (ray.util.metrics -> the node's metrics agent
-> OpenTelemetry's Prometheus exporter with namespace "ray" and unit "1", which adds no unit suffix; read in Ray's
_private/telemetry/open_telemetry_metric_recorder.py and checked against a live metrics agent):
  gauge     segr1_x                        -> ray_segr1_x
  counter   segr1_x or segr1_x_total       -> ray_segr1_x_total
  histogram segr1_x                        -> ray_segr1_x_bucket{le=...}, ray_segr1_x_sum, ray_segr1_x_count
Each series carries the metric's own labels (pool, worker, term, reason, ...) plus Ray's (Component, NodeAddress,
SessionName, Version, WorkerId) and, on Kubernetes, the PodMonitor's (ray_io_cluster, ray_group, pod).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cluster.grafana.grafana_json import DATASOURCE, layout, templating  # noqa: F401  (DATASOURCE: for callers)
from cluster.grafana.promql import RATE, hist_mean, hist_quantile, increase, last, rate, sel  # noqa: F401

DASHBOARD_PATH = Path(__file__).with_name("segr1.json")
DASHBOARD_UID = "segr1-training"
RAY_PREFIX = "ray_"

# Ray's own node metrics used by the health row (ray.dashboard.modules.reporter.reporter_agent.METRICS_GAUGES).
RAY_BUILTIN_METRICS: tuple[str, ...] = ("ray_node_gpus_utilization", "ray_node_gram_used")


def exported_names(name: str, kind: str) -> tuple[str, ...]:
    """The Prometheus series names under which Ray 2.60 exports a metric of this name and kind."""
    base = RAY_PREFIX + name
    if kind == "gauge":
        return (base,)
    if kind == "counter":
        return (base.removesuffix("_total") + "_total",)
    if kind == "histogram":
        return (base + "_bucket", base + "_sum", base + "_count")
    raise ValueError(f"unknown metric kind {kind!r} of {name}; expected counter, gauge or histogram")


# --------------------------------------------------------------------------------------------------------------
# The panels


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat
    width: int = 8
    height: int = 8
    description: str = ""


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def _stat(title: str, expr: str, unit: str, description: str = "") -> Panel:
    return Panel(title, [(expr, title)], unit, "stat", 6, 4, description)


def _workers(metric: str) -> str:
    """Live workers of a pool: one series per worker of a per-worker gauge."""
    return f"count (count by (worker) ({metric}{sel()}))"


# The pools' throughput counters carry `purpose`: training panels read "train" only, the Validation row "val".
TRAIN, VAL = {"purpose": "train"}, {"purpose": "val"}


def reward_throughput_row() -> Row:
    masks, groups = "ray_segr1_reward_masks_scored_total", "ray_segr1_reward_groups_scored_total"
    return Row(
        "Reward throughput (training)",
        [
            _stat(
                "Masks / s",
                rate(masks, **TRAIN),
                "cps",
                "Training completions scored per second (one mask each), whole reward pool; validation apart.",
            ),
            _stat(
                "Groups / s",
                rate(groups, **TRAIN),
                "cps",
                "Training groups (G completions of one image) scored per second.",
            ),
            _stat(
                "Mean total reward",
                hist_mean("ray_segr1_reward_value", term="total"),
                "short",
                "format + segmentation, 0..2.",
            ),
            _stat("Reward workers", _workers("ray_segr1_reward_queue_depth"), "short", "Live reward actors."),
            Panel(
                "Masks / s and groups / s",
                [(rate(masks, **TRAIN), "masks/s"), (rate(groups, **TRAIN), "groups/s")],
                "cps",
                width=12,
            ),
            Panel(
                "Masks / s per reward worker",
                [(rate(masks, "worker", **TRAIN), "{{worker}}")],
                "cps",
                width=12,
            ),
        ],
    )


def reward_quality_row() -> Row:
    failures = rate("ray_segr1_reward_parse_failures_total", "reason")
    scored = rate("ray_segr1_reward_masks_scored_total", **TRAIN)  # parse failures: the score path only
    stages = [(stage, f"ray_segr1_reward_{stage}_seconds") for stage in ("encode", "decode", "total")]
    return Row(
        "Reward quality",
        [
            Panel(
                "Mean reward per term",
                [(hist_mean("ray_segr1_reward_value", "term"), "{{term}}")],
                description="format, iou, s_measure, segmentation, total (SEG-R1: total = format + segmentation).",
            ),
            Panel(
                "Parse failures per completion, by reason",
                [(f"{failures} / ignoring(reason) group_left() {scored}", "{{reason}}")],
                "percentunit",
                description="Completions that scored 0 because the answer did not parse, by the parser's reason.",
            ),
            Panel(
                "Reward call time p50 / p95: encode, decode, total",
                [
                    (hist_quantile(q, metric), f"p{int(q * 100)} {stage}")
                    for stage, metric in stages
                    for q in (0.5, 0.95)
                ],
                "s",
                description="One score call: image encodes (once per distinct image), prompt decodes, whole call.",
            ),
            Panel(
                "Refinement: turns, stops, IoU gained",
                [
                    (last("ray_segr1_driver_episode_turns"), "turns per episode"),
                    (last("ray_segr1_driver_stop_rate"), "stop rate"),
                    (last("ray_segr1_driver_iou_gain"), "IoU last - first turn"),
                ],
                description="rollout.max_turns > 1: the latest step's episodes (1, 0 and 0 with one turn).",
            ),
        ],
    )


def rollout_row() -> Row:
    return Row(
        "Rollout",
        [
            Panel(
                "Tokens / s",
                [
                    (rate("ray_segr1_rollout_tokens_total", **TRAIN), "all workers"),
                    (rate("ray_segr1_rollout_tokens_total", "worker", **TRAIN), "{{worker}}"),
                ],
                description="Completion tokens of training rollouts per second (validation apart).",
            ),
            Panel(
                "Requests in flight per worker",
                [(last("ray_segr1_rollout_requests_in_flight", "sum", "worker"), "{{worker}}")],
            ),
            Panel(
                "Policy version: learner and each rollout worker",
                [
                    (last("ray_segr1_learner_policy_version"), "learner"),
                    (last("ray_segr1_rollout_policy_version", "max", "worker"), "{{worker}}"),
                ],
                description="A rollout worker below the learner is generating with older weights (async mode).",
            ),
            Panel(
                "Generate time per batch p50 / p95",
                [
                    (hist_quantile(0.5, "ray_segr1_rollout_generate_seconds"), "p50"),
                    (hist_quantile(0.95, "ray_segr1_rollout_generate_seconds"), "p95"),
                ],
                "s",
            ),
            Panel(
                "Staleness of trained groups",
                [
                    (hist_mean("ray_segr1_driver_staleness"), "mean"),
                    (hist_quantile(0.95, "ray_segr1_driver_staleness"), "p95"),
                ],
                description="Policy versions between generating a group and training on it (<= grpo.max_staleness).",
            ),
            Panel(
                "Groups / s: generated, trained, dropped stale, filtered",
                [
                    (rate("ray_segr1_driver_groups_generated_total"), "generated"),
                    (rate("ray_segr1_driver_groups_trained_total"), "trained"),
                    (rate("ray_segr1_driver_groups_dropped_stale_total"), "dropped stale"),
                    (rate("ray_segr1_driver_groups_filtered_total"), "filtered (zero variance)"),
                ],
                "cps",
            ),
        ],
    )


def validation_row() -> Row:
    """Validation while training (eval.every): its own throughput (purpose="val") and its latest results."""
    return Row(
        "Validation",
        [
            Panel(
                "Validation throughput",
                [
                    (rate("ray_segr1_rollout_groups_total", **VAL), "rollout groups/s"),
                    (rate("ray_segr1_rollout_tokens_total", **VAL), "rollout tokens/s"),
                    (rate("ray_segr1_reward_masks_scored_total", **VAL), "masks/s"),
                ],
                "cps",
                description="Greedy validation rollouts and their masks, in the same pools as training.",
            ),
            Panel(
                "Latest validation",
                [
                    (last("ray_segr1_driver_val_mean_iou"), "mean IoU"),
                    (last("ray_segr1_driver_val_s_measure"), "S-measure"),
                    (last("ray_segr1_driver_val_parse_rate"), "parse rate"),
                ],
                description="Results of the latest validation on the data.eval subset.",
            ),
            Panel(
                "Validation seconds",
                [(last("ray_segr1_driver_val_seconds"), "seconds")],
                "s",
                description="Wall time of the latest validation (interleaved with training work).",
            ),
        ],
    )


def learner_row() -> Row:
    return Row(
        "Learner",
        [
            Panel(
                "Step time",
                [
                    (hist_mean("ray_segr1_learner_step_seconds"), "mean"),
                    (hist_quantile(0.95, "ray_segr1_learner_step_seconds"), "p95"),
                ],
                "s",
                width=6,
            ),
            Panel("Loss", [(last("ray_segr1_learner_loss"), "loss")], width=6),
            Panel("KL to the reference (k3)", [(last("ray_segr1_learner_kl"), "kl")], width=6),
            Panel(
                "Clip fraction",
                [(last("ray_segr1_learner_clip_fraction", "max", "side"), "{{side}}")],
                "percentunit",
                width=6,
            ),
            Panel(
                "Rollout / learner mismatch",
                [
                    (last("ray_segr1_learner_mismatch_logp_abs"), "mean |logp behaviour - logp old|"),
                    (last("ray_segr1_learner_mismatch_outside_fraction"), "ratios outside [0.9, 1.1]"),
                ],
                width=12,
            ),
            Panel(
                "Behaviour importance weights",
                [
                    (last("ray_segr1_learner_is_weight_mean"), "mean weight"),
                    (last("ray_segr1_learner_is_capped_fraction", "max", "mode"), "over tis_cap ({{mode}})"),
                ],
                width=12,
            ),
        ],
    )


def weight_sync_row() -> Row:
    seconds, sent = "ray_segr1_weight_sync_seconds", "ray_segr1_weight_sync_bytes_total"
    return Row(
        "Weight sync",
        [
            Panel(
                "Seconds per sync", [(hist_mean(seconds), "mean"), (hist_quantile(0.95, seconds), "p95")], "s"
            ),
            Panel("Bytes per sync", [(f"{rate(sent)} / {rate(seconds + '_count')}", "bytes/sync")], "bytes"),
            Panel("Bytes / s sent", [(rate(sent), "bytes/s")], "Bps"),
            Panel(
                "Versions sent, delta vs full",
                [(rate("ray_segr1_weight_sync_versions_total", "kind"), "{{kind}}")],
                "ops",
                description="weight_sync.delta: versions sent as only their changed values, and whole ones "
                "(the first of a group, every full_every-th, after a large change).",
            ),
            Panel(
                "Changed fraction",
                [(last("ray_segr1_weight_sync_changed_fraction"), "changed")],
                "percentunit",
                description="Of the values compared in the last delta version: what changed since its base.",
            ),
            Panel(
                "Delta decode per worker (p95)",
                [(hist_quantile(0.95, "ray_segr1_rollout_weight_decode_seconds", "worker"), "{{worker}}")],
                "s",
                description="Receiver side: applying a version's delta payloads to the worker's copy.",
            ),
            Panel(
                "Weight load into each rollout engine (p95)",
                [(hist_quantile(0.95, "ray_segr1_rollout_weight_load_seconds", "worker"), "{{worker}}")],
                "s",
                width=24,
                description="Receiver side: applying a complete new version to the engine, after the transfer.",
            ),
        ],
    )


def health_row() -> Row:
    return Row(
        "Per-worker health",
        [
            Panel(
                "Queue depth per worker",
                [
                    (last("ray_segr1_reward_queue_depth", "max", "worker"), "{{worker}}"),
                    (last("ray_segr1_rollout_requests_in_flight", "max", "worker"), "{{worker}}"),
                ],
                description="Groups a reward worker holds unanswered; requests a rollout worker is generating.",
            ),
            Panel(
                "Actor restarts",
                [
                    (increase("ray_segr1_driver_actor_restarts_total", "pool"), "{{pool}}"),
                ],
                description="Dead actors the pools replaced during the time range (their work was re-issued).",
            ),
            Panel(
                "Workers per pool",
                [
                    (_workers("ray_segr1_rollout_policy_version"), "rollout"),
                    (_workers("ray_segr1_reward_queue_depth"), "reward"),
                ],
            ),
            Panel(
                "GPU utilisation per worker group",
                [(last("ray_node_gpus_utilization", "avg", "ray_group"), "{{ray_group}}")],
                "percent",
                width=12,
                description="Ray's node metric; ray_group comes from the PodMonitor (KubeRay's ray.io/group).",
            ),
            Panel(
                "GPU memory used per worker group",
                [(last("ray_node_gram_used", "sum", "ray_group"), "{{ray_group}}")],
                "decmbytes",
                width=12,
            ),
        ],
    )


def scaling_row() -> Row:
    """Pool sizes, capacity, what the learner waits on and the autoscaler's decisions (docs/scaling.md)."""
    decisions = "ray_segr1_driver_scale_decisions_total"
    return Row(
        "Pool scaling",
        [
            Panel(
                "Pool size and capacity",
                [
                    (last("ray_segr1_driver_pool_size", "max", "pool"), "{{pool}} workers"),
                    (last("ray_segr1_driver_pool_capacity", "max", "pool"), "{{pool}} capacity"),
                    (last("ray_segr1_driver_autoscale_requested", "max", "pool"), "{{pool}} requested"),
                ],
                description="Actors per pool; what the alive nodes can hold (disaggregated); what the driver asks "
                "Ray's autoscaler for (placement.autoscale).",
            ),
            Panel(
                "Share of step time the learner waits on each pool",
                [(last("ray_segr1_driver_wait_share", "max", "pool"), "{{pool}}")],
                "percentunit",
                description="rollout: waiting for generation; reward: groups waiting to be scored. Above "
                "placement.autoscale.wait_share over a window, one more unit of that pool is requested.",
            ),
            Panel(
                "Scaling decisions",
                [
                    (increase(decisions, "pool, direction"), "{{pool}} {{direction}}"),
                ],
                description="Autoscaling decisions in the time range: up = one more unit requested, down = released.",
            ),
        ],
    )


def rows() -> list[Row]:
    """Top to bottom: reward throughput, quality, rollout, validation, learner, weight sync, health, scaling."""
    return [
        reward_throughput_row(),
        reward_quality_row(),
        rollout_row(),
        validation_row(),
        learner_row(),
        weight_sync_row(),
        health_row(),
        scaling_row(),
    ]


def build() -> dict:
    """The dashboard as Grafana's JSON model (schema 39, Grafana 10+)."""
    return {
        "title": "Seg-R1 training",
        "uid": DASHBOARD_UID,
        "description": "Seg-R1 GRPO on Ray: reward throughput, reward quality, rollout, learner, weight sync, health.",
        "tags": ["segr1", "ray", "grpo"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": templating(),
        "panels": layout(rows()),
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def metrics_table() -> str:
    """The metric reference (docs/kubernetes.md) as a Markdown table, from every metric the code declares."""
    from runtime.metrics import load_all

    lines = ["| Prometheus series | Kind | Labels | Meaning |", "|---|---|---|---|"]
    for name, metric in sorted(load_all().items()):
        names = exported_names(name, metric.kind)
        series = f"`{names[0]}`" if len(names) == 1 else f"`{RAY_PREFIX}{name}_{{bucket,sum,count}}`"
        labels = ", ".join(metric.labels) or "-"
        lines.append(f"| {series} | {metric.kind} | {labels} | {metric.doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if segr1.json differs from the generator")
    parser.add_argument("--out", type=Path, default=DASHBOARD_PATH)
    parser.add_argument("--metrics-table", action="store_true", help="print the metric reference as Markdown")
    args = parser.parse_args(argv)
    if args.metrics_table:
        print(metrics_table(), end="")
        return 0
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date: run `python -m cluster.grafana.dashboard`", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
