"""A rollout lost with its node, on a real two-node Ray cluster (`ray.cluster_utils.Cluster`): the driver hands
rollouts on by reference, so when the node holding a rollout's only copy dies, the reward call that names it
fails. That failure must read as a lost object (`lost_object`, which makes the driver generate the rollout
again), not as the reward actor's error. Results above 1 KB are stored in the producing node's object store,
as real groups (G completions with logprobs) are above Ray's 100 KB inline limit."""

from __future__ import annotations

import pytest

from cluster.pools.actor_pool import lost_object
from tests.conftest import LOCAL_RAY

pytestmark = pytest.mark.slow


class Rollout:
    def generate_by_ref(self) -> tuple[list[str], list[bytes]]:
        return ["c0-0"], [b"x" * 20_000]  # (headers, groups): the groups go to the object store


class Reward:
    def score(self, groups: list[bytes]) -> int:
        return len(groups[0])


def test_a_reward_call_naming_a_rollout_lost_with_its_node_fails_as_a_lost_object():
    import ray
    from ray.cluster_utils import Cluster

    had_local = ray.is_initialized()
    ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"segr1_reward": 1},
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "max_direct_call_object_size": 1024},
        },
    )
    rollout_node = c.add_node(num_cpus=1, resources={"segr1_rollout": 1})
    ray.init(address=c.address, log_to_driver=False)
    try:
        rollout = ray.remote(Rollout).options(resources={"segr1_rollout": 1}, num_cpus=0).remote()
        reward = ray.remote(Reward).options(resources={"segr1_reward": 1}, num_cpus=0).remote()  # on the head
        headers, groups = rollout.generate_by_ref.options(num_returns=2).remote()
        assert ray.get(headers) == ["c0-0"]
        assert ray.get(reward.score.remote(groups)) == 20_000  # resolved on the reward actor's node
        # only the producing node holds the groups: drop the reward side's copy by asking for a fresh object
        headers, groups = rollout.generate_by_ref.options(num_returns=2).remote()
        ray.get(headers)
        c.remove_node(rollout_node)
        with pytest.raises(Exception) as failed:
            ray.get(reward.score.remote(groups), timeout=120)
        # Ray tries to make the object again by re-running its task, whose actor died with the node: the reward
        # task fails with RayTaskError(ObjectReconstructionFailedError), an ObjectLostError; the reward actor lives
        assert lost_object(failed.value), repr(failed.value)
        assert ray.get(reward.score.remote(ray.put([b"ok"]))) == 2
    finally:
        ray.shutdown()
        c.shutdown()
        if had_local:
            ray.init(**LOCAL_RAY)
