"""The autoscaling policy (cluster/pools/autoscale.py) and the pool-size rules (cluster/pools/capacity.py), as pure
functions of timings, bounds and resource totals. The Ray side is exercised on a multi-node cluster in
tests/e2e/test_elastic.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cluster.config import AutoscaleConfig, load_config
from cluster.pools.autoscale import AutoscalePolicy, RayCapacityRequest, WaitClock, pool_bundle
from cluster.pools.capacity import capacity_of, check_request, pool_bounds
from tests.support.paths import REPO

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


def test_the_request_is_the_total_of_every_pool_and_stands_until_released():
    cfg = load_config(
        None, ["placement.mode=disaggregated", "rollout.resources.num_cpus=2", "reward.max_workers=2"]
    )
    sent = []
    request = RayCapacityRequest(cfg, send=lambda **kw: sent.append(kw))
    request.release()
    assert sent == []  # nothing asked yet: nothing to withdraw
    request({"rollout": 1, "reward": 2})
    assert sent[-1]["bundles"] == [pool_bundle(cfg, "rollout")] + [pool_bundle(cfg, "reward")] * 2
    assert pool_bundle(cfg, "rollout") == {"segr1_rollout": 1.0, "CPU": 2.0}
    request({"rollout": 1, "reward": 1})  # back at the start sizes: still asked (the cluster may have shrunk)
    assert sent[-1]["bundles"] == [pool_bundle(cfg, "rollout"), pool_bundle(cfg, "reward")]
    request.release()
    request.release()
    assert sent[-1] == {"bundles": []} and len(sent) == 3  # withdrawn once


def test_floor_max_workers_asks_for_the_bounds_from_the_start_and_never_less():
    p = _policy(floor="max_workers", wait_share=0.5, idle_share=0.05, window=1, idle_window=1, cooldown_s=0.0)
    assert p.floors == {"rollout": 3, "reward": 2} and p.wanted == {"rollout": 3, "reward": 2}
    busy_then_idle = [{"rollout": 0.9, "reward": 0.9}] * 5 + [{"rollout": 0.0, "reward": 0.0}] * 5
    assert not [d for t, shares in enumerate(busy_then_idle) for d in p.observe(shares, float(t))]
    assert p.wanted == {"rollout": 3, "reward": 2}


class _Pool:
    def __init__(self, size: int):
        self.size = size


class _Recorder:
    """What Elastic hands Ray's autoscaler (RayCapacityRequest's interface), kept for the test to read."""

    def __init__(self):
        self.sent: list = []

    def __call__(self, wanted):
        self.sent.append(dict(wanted))

    def release(self):
        self.sent.append("released")


@pytest.mark.parametrize(
    ("floor", "asked"),
    [("max_workers", {"rollout": 3, "reward": 2}), ("num_workers", {"rollout": 1, "reward": 1})],
)
def test_the_job_asks_at_its_start_without_anyone_scaling_and_releases_at_its_end(floor, asked):
    from cluster.pools.elastic import Elastic

    cfg = load_config(
        None,
        [
            "placement.mode=disaggregated",
            f"placement.autoscale={{enabled: true, floor: {floor}}}",
            "rollout.max_workers=3",
            "reward.max_workers=2",
        ],
    )
    recorder = _Recorder()
    elastic = Elastic(cfg, {"rollout": _Pool(1), "reward": _Pool(1)}, request=recorder)
    assert recorder.sent == [asked]
    elastic.close()
    assert recorder.sent == [asked, "released"]


def test_without_the_policy_nothing_is_asked():
    from cluster.pools.elastic import Elastic

    cfg = load_config(None, ["placement.mode=disaggregated", "rollout.max_workers=3"])
    recorder = _Recorder()
    Elastic(cfg, {"rollout": _Pool(1), "reward": _Pool(1)}, request=recorder).close()
    assert recorder.sent == []


def _group_units(manifest: Path, pool: str) -> tuple[int, float]:
    """(maxReplicas, units of the pool's resource per pod) of the KubeRay worker group named `pool`."""
    from cluster.pools.topology import POOL_RESOURCES

    spec = yaml.safe_load(manifest.read_text())["spec"]
    group = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == pool)
    if "resources" in group:  # KubeRay >= 1.4: the group's own Ray resources
        advertised = group["resources"]
    else:  # rayStartParams.resources: '"{\\"segr1_x\\": 1}"'
        advertised = json.loads(group["rayStartParams"]["resources"].strip('"').replace('\\"', '"'))
    return group["maxReplicas"], float(advertised[POOL_RESOURCES[pool]])


def test_the_shipped_8gpu_config_asks_for_what_its_groups_can_reach():
    """qwen7b-8gpu.yaml: each pool's max_workers is its KubeRay group's maxReplicas x units per pod / units per
    actor, and the standing request for them is on (placement.autoscale.floor=max_workers)."""
    from cluster.pools.capacity import units_per_actor

    cfg = load_config(REPO / "cluster" / "configs" / "qwen7b-8gpu.yaml", [])
    for pool in ("rollout", "reward"):
        replicas, per_pod = _group_units(REPO / "cluster" / "k8s" / "raycluster-qwen7b-8gpu.yaml", pool)
        reachable = int(replicas * per_pod / units_per_actor(cfg, pool))
        assert pool_bounds(cfg, pool)[1] == reachable, f"{pool}.max_workers is not the group's {reachable}"
        assert reachable > pool_bounds(cfg, pool)[0], f"{pool}: the group autoscales above num_workers"
    assert cfg.placement.autoscale.enabled and cfg.placement.autoscale.floor == "max_workers"


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
