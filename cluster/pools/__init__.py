"""The job's actors and where they run: the rollout and reward pools, the learner ranks, and how the pools follow
the cluster.

- topology.py:      the only module that declares Ray actors (`ray.remote`): spawns the pools and the ranks;
- actor_pool.py:    `ActorPool`: least-loaded dispatch, retries, replacing dead actors;
- learner_group.py: `LearnerGroup`: the learner ranks of one torch.distributed group, called together;
- placement.py:     which node each actor is on, and the pools' resource checks before start;
- capacity.py:      how many actors of a pool the alive nodes hold;
- elastic.py:       grows and shrinks the pools with the cluster between steps;
- autoscale.py:     the policy that asks Ray's autoscaler for more rollout / reward units;
- metrics.py:       the pools' Prometheus metrics (sizes, capacity, wait shares, actor placement).

Nothing here imports the training loop (cluster/driver).
"""
