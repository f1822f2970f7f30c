"""One small metrics facade for every pool: counters, gauges and histograms declared once per package.

Each package declares its metrics in its own `metrics.py` (reward_service/metrics.py, actors/metrics.py, ...)
with `counter`, `gauge` and `histogram`. A metric always records in-process (so a plain worker in a unit test can
be asserted on, and so `snapshot()` can report figures), and when the process is part of a Ray cluster
(`ray.is_initialized()`, i.e. inside an actor or the driver) it also forwards to `ray.util.metrics`, which each
Ray node's metrics agent exports for Prometheus (KubeRay pods: port 8080). Ray exports a metric named
`segr1_x` as `ray_segr1_x` (see README's metric reference).

`REGISTRY` holds every declared metric by name: the Grafana dashboard test checks its PromQL against it.
"""

from __future__ import annotations

import bisect
import sys
import threading
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

# Latency buckets in seconds, shared by the pools' timing histograms.
SECONDS_BUCKETS: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
# Reward terms lie in [0, 1]; the total in [0, 2] with Seg-R1's weights (more with the box terms weighted).
REWARD_BUCKETS: tuple[float, ...] = (
    0.05,
    0.1,
    0.2,
    0.3,
    0.4,
    0.5,
    0.6,
    0.7,
    0.8,
    0.9,
    1.0,
    1.25,
    1.5,
    1.75,
    2.0,
    2.5,
    3.0,
    4.0,
)


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never import ray just to find out: plain workers must not pay for it
    return ray is not None and ray.is_initialized()


@dataclass
class Metric:
    """A declared metric. Values are kept per label tuple; histograms keep count, sum and bucket counts."""

    kind: Kind
    name: str
    doc: str
    labels: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()
    _values: dict[tuple[str, ...], float] = field(default_factory=dict, repr=False)
    _hist: dict[tuple[str, ...], list[float]] = field(default_factory=dict, repr=False)
    _ray_metric: object | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- recording -----------------------------------------------------------------------------------------------
    def inc(self, value: float = 1.0, **labels: str) -> None:
        if self.kind != "counter":
            raise TypeError(f"metric {self.name} is a {self.kind}; use set/observe")
        if value < 0:
            raise ValueError(f"counter {self.name} cannot decrease (inc by {value})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + value
        if value > 0:  # Ray's Counter.inc refuses 0
            self._forward("inc", value, labels)

    def set(self, value: float, **labels: str) -> None:
        if self.kind != "gauge":
            raise TypeError(f"metric {self.name} is a {self.kind}; use inc/observe")
        with self._lock:
            self._values[self._key(labels)] = float(value)
        self._forward("set", value, labels)

    def observe(self, value: float, **labels: str) -> None:
        if self.kind != "histogram":
            raise TypeError(f"metric {self.name} is a {self.kind}; use inc/set")
        key = self._key(labels)
        with self._lock:
            h = self._hist.setdefault(key, [0.0, 0.0] + [0.0] * (len(self.boundaries) + 1))
            h[0] += 1  # count
            h[1] += value  # sum
            h[2 + bisect.bisect_left(self.boundaries, value)] += 1
        self._forward("observe", value, labels)

    # -- reading (tests, summaries) ------------------------------------------------------------------------------
    def value(self, **labels: str) -> float:
        """Counter or gauge value for these labels; a histogram's observation count."""
        key = self._key(labels)
        with self._lock:
            if self.kind == "histogram":
                return self._hist.get(key, [0.0])[0]
            return self._values.get(key, 0.0)

    def total(self) -> float:
        """Sum over every label combination (counters), or total observations (histograms)."""
        with self._lock:
            if self.kind == "histogram":
                return sum(h[0] for h in self._hist.values())
            return sum(self._values.values())

    def mean(self, **labels: str) -> float:
        """Mean of a histogram's observations for these labels (0 when none)."""
        with self._lock:
            h = self._hist.get(self._key(labels))
        return h[1] / h[0] if h and h[0] else 0.0

    # -- internals -----------------------------------------------------------------------------------------------
    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labels):
            raise ValueError(f"metric {self.name} takes labels {self.labels}, got {tuple(sorted(labels))}")
        return tuple(str(labels[k]) for k in self.labels)

    def _forward(self, op: str, value: float, labels: dict[str, str]) -> None:
        if not _ray_initialized():
            return
        if self._ray_metric is None:
            self._ray_metric = _make_ray_metric(self)
        tags = {k: str(v) for k, v in labels.items()}
        getattr(self._ray_metric, op)(value, tags=tags)


def _make_ray_metric(m: Metric):
    from ray.util import metrics as rm

    if m.kind == "counter":
        return rm.Counter(m.name, description=m.doc, tag_keys=m.labels)
    if m.kind == "gauge":
        return rm.Gauge(m.name, description=m.doc, tag_keys=m.labels)
    return rm.Histogram(m.name, description=m.doc, boundaries=list(m.boundaries), tag_keys=m.labels)


REGISTRY: dict[str, Metric] = {}
_REGISTRY_LOCK = threading.Lock()


def _declare(
    kind: Kind, name: str, doc: str, labels: tuple[str, ...], boundaries: tuple[float, ...] = ()
) -> Metric:
    if not name.startswith("segr1_"):
        raise ValueError(f"metric name {name!r} must start with 'segr1_' (README: metric reference)")
    with _REGISTRY_LOCK:
        existing = REGISTRY.get(name)
        if existing is not None:
            if (existing.kind, existing.labels, existing.boundaries) != (
                kind,
                tuple(labels),
                tuple(boundaries),
            ):
                raise ValueError(f"metric {name} declared twice with different kind/labels/boundaries")
            return existing
        metric = Metric(kind, name, doc, tuple(labels), tuple(boundaries))
        REGISTRY[name] = metric
        return metric


def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Metric:
    return _declare("counter", name, doc, labels)


def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Metric:
    return _declare("gauge", name, doc, labels)


def histogram(
    name: str, doc: str, boundaries: tuple[float, ...] = SECONDS_BUCKETS, labels: tuple[str, ...] = ()
) -> Metric:
    if list(boundaries) != sorted(set(boundaries)) or not boundaries:
        raise ValueError(f"histogram {name}: boundaries must be strictly increasing and non-empty")
    return _declare("histogram", name, doc, labels, tuple(boundaries))


def load_all() -> dict[str, Metric]:
    """Import every package's metrics module and return the registry (for docs and the dashboard test)."""
    import importlib

    modules = (
        "reward_service.metrics",
        "actors.metrics",
        "learner.metrics",
        "cluster.driver.metrics",
        "cluster.pools.metrics",
    )
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return REGISTRY
