"""runtime.metrics: the facade every pool declares its metrics with."""

from __future__ import annotations

import pytest

from runtime.metrics import REGISTRY, counter, gauge, histogram, load_all


@pytest.fixture(autouse=True)
def _forget_test_metrics():
    """Metrics declared here must not leak into the registry the dashboard/docs tests read."""
    yield
    for name in [n for n in REGISTRY if n.startswith("segr1_test_")]:
        del REGISTRY[name]


def test_counter_gauge_histogram_record_per_label():
    c = counter("segr1_test_things", "things", ("worker",))
    c.inc(2, worker="a")
    c.inc(0, worker="a")  # allowed locally; never forwarded to Ray (which refuses 0)
    c.inc(worker="b")
    assert c.value(worker="a") == 2 and c.total() == 3
    g = gauge("segr1_test_level", "level")
    g.set(4.5)
    assert g.value() == 4.5
    h = histogram("segr1_test_seconds", "seconds", boundaries=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    assert h.value() == 3 and h.mean() == pytest.approx(5.55 / 3)


def test_misuse_is_refused():
    c = counter("segr1_test_refuse", "x", ("worker",))
    with pytest.raises(ValueError, match="labels"):
        c.inc(1)
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, worker="a")
    with pytest.raises(TypeError):
        c.set(1, worker="a")
    with pytest.raises(ValueError, match="segr1_"):
        counter("other_name", "x")
    with pytest.raises(ValueError, match="differen"):
        gauge("segr1_test_refuse", "x")


def test_every_package_declares_prefixed_metrics():
    names = load_all()
    for prefix in (
        "segr1_reward_",
        "segr1_rollout_",
        "segr1_learner_",
        "segr1_driver_",
        "segr1_weight_sync_",
    ):
        assert any(n.startswith(prefix) for n in names), prefix
