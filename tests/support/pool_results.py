"""Collect a cluster.pools.actor_pool.ActorPool's answers with a deadline: a lost item (the defect the pool tests look for)
fails the test naming the keys still missing, instead of hanging the run."""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable

import pytest

# Generous on purpose: a bound on a lost answer, not on speed (the slowest of these waits is a worker start).
DEADLINE_S = 300.0


def collect_exactly_once(pool, keys: Iterable[Hashable], deadline_s: float = DEADLINE_S) -> dict:
    """Poll `pool` until every key of `keys` is answered: {key: value}. Fails on a key answered twice, on a key
    nobody asked for, and when `deadline_s` passes with keys still unanswered."""
    wanted = set(keys)
    results: dict = {}
    deadline = time.monotonic() + deadline_s
    while wanted - results.keys():
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(wanted - results.keys(), key=repr)
            pytest.fail(
                f"{pool.prefix} pool: no answer within {deadline_s:.0f} s for {missing} "
                f"(answered {sorted(results, key=repr)}; pending {pool.pending}; {pool.stats})"
            )
        for key, value in pool.poll(timeout=min(5.0, left)):
            assert key in wanted, f"{pool.prefix} pool: key {key!r} answered but never asked for"
            assert key not in results, f"{pool.prefix} pool: key {key!r} answered twice"
            results[key] = value
    return results


def wait_until_dead(ray, handle, deadline_s: float = DEADLINE_S) -> None:
    """Return once `handle`'s actor is dead: ray.kill only asks for it, so a call made right after may still be
    served. Pings until one fails with the actor's death (each ping is answered at once while it lives)."""
    from ray.exceptions import GetTimeoutError

    from cluster.pools.actor_pool import DEATH

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=max(deadline - time.monotonic(), 0.1))
        except DEATH:
            return
        except GetTimeoutError:
            break
    pytest.fail(f"the actor {handle} is still alive {deadline_s:.0f} s after it was killed")
