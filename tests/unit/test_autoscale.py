"""The autoscaling policy (cluster/autoscale.py) and the pool-size rules (cluster/capacity.py), as pure
functions of timings, bounds and resource totals. The Ray side is exercised on a multi-node cluster in
tests/e2e/test_elastic.py."""

from __future__ import annotations

import pytest

from cluster.autoscale import AutoscalePolicy, RayCapacityRequest, WaitClock, pool_bundle
from cluster.capacity import capacity_of, check_request, pool_bounds
from cluster.config import AutoscaleConfig, load_config

BOUNDS = {"rollout": (1, 3), "reward": (1, 2)}


def _policy(**kw) -> AutoscalePolicy:
    settings = AutoscaleConfig(enabled=True, **{"window": 3, "idle_window": 4, "cooldown_s": 10.0, **kw})
    return AutoscalePolicy(settings, BOUNDS)


def test_wait_clock_charges_scoring_waits_to_reward_and_the_rest_to_rollout():
    clock = WaitClock()
    clock.charge(2.0, scoring=True)
    clock.charge(1.0, scoring=False)
    clock.charge(-1.0, scoring=False)  # a clock going backwards charges nothing
    assert clock.take(4.0) == {"rollout": 0.25, "reward": 0.5}
    assert clock.take(4.0) == {"rollout": 0.0, "reward": 0.0}  # the next step starts at zero
    clock.charge(9.0, scoring=True)
    assert clock.take(3.0)["reward"] == 1.0  # capped


def test_scales_up_the_pool_the_learner_waits_on_after_a_full_window_only():
    p = _policy(wait_share=0.5)
    slow_reward = {"rollout": 0.1, "reward": 0.8}
    assert p.observe(slow_reward, 0.0) == [] and p.observe(slow_reward, 1.0) == []
    (d,) = p.observe(slow_reward, 2.0)
    assert (d.pool, d.direction, d.units) == ("reward", "up", 2) and d.share == pytest.approx(0.8)
    assert p.wanted == {"rollout": 1, "reward": 2}


def test_never_exceeds_max_workers_and_respects_the_cooldown():
    p = _policy(wait_share=0.5, cooldown_s=10.0)
    decisions = []
    for t in range(200):
        decisions += p.observe({"rollout": 0.9, "reward": 0.9}, float(t))
        assert 1 <= p.wanted["rollout"] <= 3 and 1 <= p.wanted["reward"] <= 2
    ups = [(d.pool, d.units) for d in decisions]
    assert ups == [("rollout", 2), ("reward", 2), ("rollout", 3)]  # then capped at max_workers


def test_cooldown_spaces_decisions_of_one_pool():
    p = _policy(wait_share=0.5, window=1, cooldown_s=10.0)
    taken = [t for t in range(30) if p.observe({"rollout": 0.9}, float(t))]
    assert taken == [0, 10]  # two ups (1 -> 2 -> 3), ten seconds apart; then at the bound


def test_releases_after_an_idle_window_down_to_num_workers_with_hysteresis():
    p = _policy(wait_share=0.5, idle_share=0.05, window=1, idle_window=4, cooldown_s=0.0)
    assert p.observe({"reward": 0.9}, 0.0)[0].units == 2
    # between the thresholds: neither up (at the bound) nor down (not idle)
    assert all(not p.observe({"reward": 0.2}, float(t)) for t in range(1, 10))
    out = [p.observe({"reward": 0.01}, float(t)) for t in range(10, 14)]
    assert [d for ds in out for d in ds][0].direction == "down" and p.wanted["reward"] == 1
    assert all(not p.observe({"reward": 0.0}, float(t)) for t in range(14, 40))  # never below num_workers


def test_the_request_is_the_total_and_is_released_at_the_start_sizes():
    cfg = load_config(
        None, ["placement.mode=disaggregated", "rollout.resources.num_cpus=2", "reward.max_workers=2"]
    )
    sent = []
    request = RayCapacityRequest(
        cfg, {"rollout": (1, 1), "reward": (1, 2)}, send=lambda **kw: sent.append(kw)
    )
    request({"rollout": 1, "reward": 2})
    assert sent[-1]["bundles"] == [pool_bundle(cfg, "rollout")] + [pool_bundle(cfg, "reward")] * 2
    assert pool_bundle(cfg, "rollout") == {"segr1_rollout": 1.0, "CPU": 2.0}
    request({"rollout": 1, "reward": 1})
    assert sent[-1] == {"bundles": []}


def test_capacity_counts_units_of_alive_nodes_per_actor():
    cfg = load_config(None, ["placement.mode=disaggregated", "rollout.resources.custom={segr1_rollout: 2}"])
    assert capacity_of(cfg, "rollout", {"segr1_rollout": 5.0, "CPU": 8}) == 2
    assert capacity_of(cfg, "reward", {"segr1_reward": 3.0}) == 3
    assert capacity_of(cfg, "reward", {}) == 0
    assert (
        capacity_of(load_config(None, []), "rollout", {"segr1_rollout": 4}) is None
    )  # colocated: no such rule


def test_requests_are_checked_against_max_workers_naming_the_key():
    cfg = load_config(None, ["rollout.max_workers=4", "reward.num_workers=2"])
    assert pool_bounds(cfg, "rollout") == (1, 4) and pool_bounds(cfg, "reward") == (2, 2)
    assert check_request(cfg, {"rollout": 3, "reward": None}) == {"rollout": 3}
    with pytest.raises(ValueError, match=r"reward pool size 3 is outside 1..2 \(reward.max_workers\)"):
        check_request(cfg, {"reward": 3})
    with pytest.raises(ValueError, match="nothing to scale"):
        check_request(cfg, {"rollout": None, "reward": None})


def test_max_workers_below_num_workers_is_refused_for_reward_too():
    with pytest.raises(Exception, match=r"reward.max_workers=1 is below reward.num_workers=2"):
        load_config(None, ["reward.num_workers=2", "reward.max_workers=1"])
