"""Grafana's JSON model of the dashboard's parts (cluster/grafana/dashboard.py holds the panels): one panel,
the grid layout of rows of panels, the template variables. Every query goes through the `${datasource}`
variable, so no data source UID is written anywhere."""

from __future__ import annotations

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def panel_json(panel, pid: int, x: int, y: int) -> dict:
    """One panel (a dashboard.Panel) at grid position (x, y) with id pid."""
    targets = [
        {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
        for i, (expr, legend) in enumerate(panel.targets)
    ]
    out = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }
    if panel.kind == "stat":
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        }
    else:
        out["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return out


def layout(all_rows: list) -> list[dict]:
    """Rows (dashboard.Row) top to bottom, each a row header then its panels left to right, wrapping at 24."""
    panels: list[dict] = []
    pid, y = 1, 0
    for row in all_rows:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        x, line_height = 0, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y, line_height = 0, y + line_height, 0
            panels.append(panel_json(panel, pid, x, y))
            pid, x, line_height = pid + 1, x + panel.width, max(line_height, panel.height)
        y += line_height
    return panels


def templating() -> dict:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
                "options": [],
            },
            {
                "name": "cluster",
                "label": "Ray cluster",
                "type": "query",
                "datasource": DATASOURCE,
                "query": {"query": "label_values(ray_io_cluster)", "refId": "cluster"},
                "definition": "label_values(ray_io_cluster)",
                "includeAll": True,
                "allValue": ".*",
                "multi": True,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "hide": 0,
                "refresh": 2,
                "sort": 1,
                "options": [],
            },
        ]
    }
