"""cluster.pools.learner_group.LearnerGroup on a real local Ray, with a stand-in rank class (the Learner's constructor and
method names, no model): collective calls reach every rank, rank-0-only calls rank 0 alone, a rank's death is
reported as LearnerDied at once while its peer still hangs in the "collective", and an ordinary error is raised
as it is."""

from __future__ import annotations

import threading
import time

import pytest

from cluster.config import load_config
from cluster.pools.learner_group import LearnerDied, LearnerGroup

pytestmark = pytest.mark.usefixtures("ray_local")


class Rank:
    """Rank `rank` of `world_size`: step() of rank 0 waits for its peer (as a collective would) unless told not to."""

    def __init__(self, spec, rank: int, world_size: int, init_method: str | None):
        self.rank, self.world_size, self.init_method = rank, world_size, init_method
        self.calls: list[str] = []
        self._peer = threading.Event()  # never set: the peer of a hanging collective

    def step(self, x: int, hang: bool = False):
        self.calls.append("step")
        if x < 0 and self.rank == 1:
            raise ValueError(f"bad batch {x}")
        if hang and self.rank == 0:
            self._peer.wait(timeout=300)
        return {"rank": self.rank, "x": x, "init_method": self.init_method}

    def mark_best(self, step: int):
        self.calls.append("mark_best")
        return self.rank

    def weight_sync_group(self):  # rank 0 only; here: what each rank was asked
        return list(self.calls)

    def close(self):
        return None


@pytest.fixture
def group():
    cfg = load_config(
        None, ["learner.world_size=2", "learner.resources.num_cpus=0.5", "placement.namespace=segr1-lg"]
    )
    g = LearnerGroup.start(cfg, Rank)
    yield g
    g.shutdown(timeout=10)


def test_collective_calls_reach_every_rank_and_rank0_calls_only_rank0(group):
    assert group.names == ["learner-0", "learner-1"] and len(group.nodes) == 2
    out = group.get(group.step.remote(3))
    assert out["rank"] == 0 and out["x"] == 3
    assert out["init_method"].startswith("tcp://") and out["init_method"].rsplit(":", 1)[1].isdigit()
    assert group.get(group.mark_best.remote(1)) == 0
    assert group.get(group.weight_sync_group.remote()) == ["step", "mark_best"]


def test_a_dead_rank_is_reported_at_once_while_its_peer_hangs(group):
    import ray

    ref = group.step.remote(1, hang=True)
    assert not group.ready(ref)
    ray.kill(ray.get_actor("learner-1", namespace="segr1-lg"), no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(LearnerDied) as died:
        group.get(ref)
    assert time.monotonic() - t0 < 60  # rank 0 still hangs: its collective would wait 300 s
    assert died.value.rank_name == "learner-1" and died.value.node == group.nodes[1]
    assert "learner-1" in str(died.value) and died.value.cause


def test_an_ordinary_error_of_one_rank_is_raised_as_it_is(group):
    with pytest.raises(ValueError, match="bad batch -1"):
        group.get(group.step.remote(-1))
