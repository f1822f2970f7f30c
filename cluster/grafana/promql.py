"""PromQL helpers of the dashboard (cluster/grafana/dashboard.py): every series is filtered by the $cluster
variable; `metric` is the exported name (dashboard.exported_names)."""

from __future__ import annotations

RATE = "[$__rate_interval]"


def sel(**matchers: str) -> str:
    """Label selector: the $cluster filter plus exact matchers."""
    parts = ['ray_io_cluster=~"$cluster"'] + [f'{k}="{v}"' for k, v in matchers.items()]
    return "{" + ", ".join(parts) + "}"


def _by(labels: str) -> str:
    return f" by ({labels})" if labels else ""


def rate(metric: str, by: str = "", **matchers: str) -> str:
    """sum [by (labels)] (rate(metric{...}[interval])): per-second rate of a counter."""
    return f"sum{_by(by)} (rate({metric}{sel(**matchers)}{RATE}))"


def hist_mean(metric: str, by: str = "", **matchers: str) -> str:
    """Mean of a histogram's observations over the interval (`metric` without the _sum/_count suffix)."""
    return f"{rate(metric + '_sum', by, **matchers)} / {rate(metric + '_count', by, **matchers)}"


def hist_quantile(q: float, metric: str, by: str = "") -> str:
    keep = f"le, {by}" if by else "le"
    return f"histogram_quantile({q}, sum by ({keep}) (rate({metric}_bucket{sel()}{RATE})))"


def increase(metric: str, by: str) -> str:
    """sum by (labels) (increase(counter{...}[range])): how much a counter grew over the dashboard's range."""
    return f"sum{_by(by)} (increase({metric}{sel()}[$__range]))"


def last(metric: str, agg: str = "max", by: str = "", **matchers: str) -> str:
    """agg [by (labels)] (gauge{...})."""
    return f"{agg}{_by(by)} ({metric}{sel(**matchers)})"
