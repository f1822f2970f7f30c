"""cluster.pools.learner_group.LearnerGroup on a real local Ray, with a stand-in rank class (the Learner's
constructor and method names, no model): collective calls reach every rank and rank-0-only calls rank 0 alone, a
step's batch refs arrive resolved, a rank's death is reported as LearnerDied at once while its peer still hangs
in the "collective", and an ordinary error is raised as it is."""

from __future__ import annotations

import threading
import time

import pytest

from cluster.config import load_config
from cluster.pools.learner_group import LearnerDied, LearnerGroup
from protos import BatchPick, GroupScores, TrainBatch

pytestmark = pytest.mark.usefixtures("ray_local")


class Rank:
    """Rank `rank` of `world_size`, with the Learner's method names: step_by_ref() of rank 0 waits for its peer
    (as a collective would) when the batch says so; the batch's refs arrive resolved."""

    def __init__(self, spec, rank: int, world_size: int, init_method: str | None):
        self.rank, self.world_size, self.init_method = rank, world_size, init_method
        self.calls: list[str] = []
        self._peer = threading.Event()  # never set: the peer of a hanging collective

    def step_by_ref(self, batch, *refs):
        self.calls.append("step")
        x = len(batch.picks)
        if batch.picks[0].scores.group_id == "bad" and self.rank == 1:
            raise ValueError(f"bad batch {x}")
        if batch.picks[0].scores.group_id == "hang" and self.rank == 0:
            self._peer.wait(timeout=300)
        return {"rank": self.rank, "x": x, "refs": list(refs), "init_method": self.init_method}

    def mark_best(self, step: int):
        self.calls.append("mark_best")
        return self.rank

    def weight_sync_backend(self):  # rank 0 only; here: what each rank was asked
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


def batch(group_id: str, n: int = 1) -> TrainBatch:
    picks = [
        BatchPick(rollout=0, index=i, scores=GroupScores(group_id=group_id, scores=[])) for i in range(n)
    ]
    return TrainBatch(picks=picks, rollouts=1)


def test_collective_calls_reach_every_rank_and_rank0_calls_only_rank0(group):
    import ray

    assert group.names == ["learner-0", "learner-1"] and len(group.nodes) == 2
    rollout = ray.put(["g0", "g1", "g2"])
    call = group.step(batch("ok", 3), [rollout, "s0", "s1", "s2"])
    assert call.names == ("learner-0", "learner-1") and len(call.refs) == 2
    out = group.wait(call)
    assert out["rank"] == 0 and out["x"] == 3
    assert out["refs"] == [["g0", "g1", "g2"], "s0", "s1", "s2"]  # the rollout's ref arrived resolved
    assert out["init_method"].startswith("tcp://") and out["init_method"].rsplit(":", 1)[1].isdigit()
    assert group.mark_best(1) == 0
    assert group.weight_sync_backend() == ["step", "mark_best"]


def test_a_dead_rank_is_reported_at_once_while_its_peer_hangs(group):
    import ray

    call = group.step(batch("hang"), ["s0"])
    assert not group.done(call)
    ray.kill(ray.get_actor("learner-1", namespace="segr1-lg"), no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(LearnerDied) as died:
        group.wait(call)
    assert time.monotonic() - t0 < 60  # rank 0 still hangs: its collective would wait 300 s
    assert died.value.rank_name == "learner-1" and died.value.node == group.nodes[1]
    assert "learner-1" in str(died.value) and died.value.cause


def test_an_ordinary_error_of_one_rank_is_raised_as_it_is(group):
    with pytest.raises(ValueError, match="bad batch 1"):
        group.wait(group.step(batch("bad"), ["s0"]))
