"""cluster/grafana: the dashboard imports as is, reads top to bottom as documented, its PromQL parses, and every
metric it queries is one the code registers (runtime.metrics.REGISTRY), under the name Ray exports it as."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from cluster.grafana import dashboard as dash

ROWS = [
    "Reward throughput (training)",
    "Reward quality",
    "Rollout",
    "Validation",
    "Learner",
    "Weight sync",
    "Per-worker health",
    "Pool scaling",
]
# Labels that Ray, Prometheus or our PodMonitor add to every series (not declared by the code).
INFRA_LABELS = {
    "ray_io_cluster", "ray_group", "pod", "le", "instance", "job",
    "SessionName", "NodeAddress", "WorkerId", "Component", "Version",
}  # fmt: skip
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or"}
PROMQL_WORDS |= {"unless", "atan2"}


def _panels() -> list[dict]:
    return dash.build()["panels"]


def _exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression reads (functions, keywords, labels and numbers left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][\w:]*", s):
        if m.group() in PROMQL_WORDS or s[m.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation call
        names.add(m.group())
    return names


def labels_used(expr: str) -> list[tuple[str, set[str]]]:
    """(series, labels) for every `series{matchers}` and every `agg by (labels) ([rate(]series...`."""
    out = []
    for m in re.finditer(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr):
        out.append((m.group(1), set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(2)))))
    for m in re.finditer(r"\bby \(([^)]*)\) \((?:rate\(|increase\()?([a-zA-Z_:][\w:]*)", expr):
        out.append((m.group(2), {x.strip() for x in m.group(1).split(",") if x.strip()}))
    return out


def _exported() -> dict:
    """Exported series name -> the registered metric behind it."""
    from runtime.metrics import load_all

    return {n: m for m in load_all().values() for n in dash.exported_names(m.name, m.kind)}


# ----------------------------------------------------------------------------------------------------------------


def test_json_is_what_the_generator_writes():
    assert dash.DASHBOARD_PATH.read_text() == dash.render(), "run `python -m cluster.grafana.dashboard`"
    assert dash.main(["--check"]) == 0


def test_importable_as_is_datasource_variable_no_uids():
    model = json.loads(dash.DASHBOARD_PATH.read_text())
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    uids = set()

    def walk(node):
        if isinstance(node, dict):
            if "datasource" in node and isinstance(node["datasource"], dict):
                uids.add(node["datasource"].get("uid"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(model)
    assert uids == {"${datasource}"}, f"data sources must go through the variable, found {uids}"
    for panel in model["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == dash.DATASOURCE and panel["targets"]


def test_rows_in_order_with_reward_throughput_on_top():
    panels = _panels()
    assert [p["title"] for p in panels if p["type"] == "row"] == ROWS
    assert panels[0]["type"] == "row" and panels[0]["gridPos"]["y"] == 0
    first_row = []
    for p in panels[1:]:
        if p["type"] == "row":
            break
        first_row.append(p)
    top = " ".join(t["expr"] for p in first_row for t in p["targets"])
    from reward_service.metrics import GROUPS_SCORED, MASKS_SCORED  # masks/s and groups/s lead the dashboard

    for metric in (MASKS_SCORED, GROUPS_SCORED):
        (series,) = dash.exported_names(metric.name, metric.kind)
        assert f"rate({series}{{" in top, f"the top row shows no rate of {metric.name}"


def _rows_with_exprs() -> dict[str, list[str]]:
    """Row title -> the PromQL of every panel under it."""
    out: dict[str, list[str]] = {}
    row = ""
    for p in _panels():
        if p["type"] == "row":
            row = p["title"]
            continue
        out.setdefault(row, []).extend(t["expr"] for t in p["targets"])
    return out


def test_training_panels_count_training_work_only_and_validation_has_its_own():
    """Every series with a `purpose` label (the pools' throughput counters) is filtered to purpose="train" outside
    the Validation row, and to purpose="val" inside it: the training throughput panels do not move with
    eval.every, and validation throughput is visible on its own."""
    exported = _exported()
    with_purpose = {n for n, m in exported.items() if "purpose" in m.labels}
    assert {"ray_segr1_rollout_groups_total", "ray_segr1_reward_masks_scored_total"} <= with_purpose
    seen = {"train": 0, "val": 0}
    for row, exprs in _rows_with_exprs().items():
        want = "val" if row == "Validation" else "train"
        for expr in exprs:
            for m in re.finditer(r"([a-zA-Z_:][\w:]*)\{([^}]*)\}", expr):
                if m.group(1) in with_purpose:
                    assert f'purpose="{want}"' in m.group(2), f"{row}: {m.group(0)} lacks purpose={want}"
                    seen[want] += 1
    assert seen["train"] >= 5 and seen["val"] >= 3, seen


def test_grid_has_no_overlaps():
    taken = set()
    for p in _panels():
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"panel {p['title']!r} overlaps another"
        taken |= cells
    assert len({p["id"] for p in _panels()}) == len(_panels())


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool missing (`make test` installs prometheus)"
)
def test_every_query_parses_with_promtool(tmp_path):
    rules = []
    for i, expr in enumerate(_exprs()):
        concrete = expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$cluster", ".*")
        rules.append({"record": f"segr1:dashboard:{i}", "expr": concrete})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_metric_name_parser():
    expr = 'sum by (le, stage) (rate(ray_a_bucket{x="y{z}"}[5m])) / ignoring(reason) group_left() max (ray_b) * 1e-3'
    assert metric_names(expr) == {"ray_a_bucket", "ray_b"}
    assert ("ray_a_bucket", {"x"}) in labels_used(expr)


def test_export_rule_is_rays():
    """exported_names() against Ray 2.60's own exporter (run in a subprocess: it installs global providers)."""
    code = textwrap.dedent(
        """
        from ray._private.telemetry.open_telemetry_metric_recorder import OpenTelemetryMetricRecorder
        import json
        from prometheus_client import REGISTRY, generate_latest
        r = OpenTelemetryMetricRecorder(gauge_metric_ttl_seconds=60)
        r.register_gauge_metric("segr1_t_gauge", "")
        r.register_counter_metric("segr1_t_plain", "")
        r.register_counter_metric("segr1_t_suffixed_total", "")
        r.register_histogram_metric("segr1_t_hist", "", [0.1, 1.0])
        for name in ("segr1_t_gauge", "segr1_t_plain", "segr1_t_suffixed_total", "segr1_t_hist"):
            r.set_metric_value(name, {"worker": "w0"}, 0.5)
        text = generate_latest(REGISTRY).decode()
        print(json.dumps(sorted({l.split("{")[0] for l in text.splitlines() if "segr1_t" in l and l[0] != "#"})))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = set(json.loads(out.stdout.strip().splitlines()[-1]))
    expected = set(dash.exported_names("segr1_t_gauge", "gauge"))
    expected |= set(dash.exported_names("segr1_t_plain", "counter"))
    expected |= set(dash.exported_names("segr1_t_suffixed_total", "counter"))
    expected |= set(dash.exported_names("segr1_t_hist", "histogram"))
    assert seen == expected


def test_builtin_ray_metrics_exist():
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    for name in dash.RAY_BUILTIN_METRICS:
        assert name.removeprefix("ray_") in METRICS_GAUGES, f"{name} is not a Ray node metric"


def test_every_dashboard_metric_is_registered_by_the_code():
    exported = _exported()
    used = {n for e in _exprs() for n in metric_names(e)}
    unknown = sorted(used - set(exported) - set(dash.RAY_BUILTIN_METRICS))
    declared = sorted(f"{m.kind} {m.name}" for m in {id(m): m for m in exported.values()}.values())
    assert not unknown, (
        f"the dashboard queries {len(unknown)} series no code registers: {unknown}\n"
        f"registered: {declared or 'nothing (no metrics module imported)'}"
    )


def test_labels_the_dashboard_uses_are_declared():
    exported = _exported()
    problems = []
    for expr in _exprs():
        for series, labels in labels_used(expr):
            metric = exported.get(series)
            if metric is None:
                continue  # unregistered names are reported by the test above; Ray's builtins are not ours
            missing = labels - set(metric.labels) - INFRA_LABELS
            if missing:
                problems.append(f"{series}: labels {sorted(missing)} not in {metric.name}'s {metric.labels}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_metric_reference_lists_every_declared_metric():
    doc = (dash.DASHBOARD_PATH.parents[2] / "docs" / "kubernetes.md").read_text()
    assert dash.metrics_table() in doc, (
        "docs/kubernetes.md's metric reference is out of date: paste `python -m cluster.grafana.dashboard "
        "--metrics-table` under 'Metric reference'"
    )
