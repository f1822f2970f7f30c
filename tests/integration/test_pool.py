"""cluster.pools.actor_pool.ActorPool on a real local Ray: exactly-once answers across actor deaths, scaling, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from cluster.pools.actor_pool import ActorPool, WorkFailed
from tests.support.pool_results import DEADLINE_S, collect_exactly_once

pytestmark = pytest.mark.usefixtures("ray_local")


class Echo:
    """A tiny worker: answers (name, x) and can be told to fail or to wait at a Gate until the test opens it."""

    def __init__(self, name: str, version: int = 0):
        self.name = name
        self.version = version

    def work(self, x: int, gate=None):
        if gate is not None:
            import ray

            ray.get(gate.wait.remote())  # held in flight until the test releases the gate
        if x < 0:
            raise ValueError(f"bad input {x}")
        if self.version < 1 and x == 7:
            raise RuntimeError("stale")
        return (self.name, x * 10)

    def set_version(self, v: int):
        self.version = v
        return v


class Gate:
    """A Ray-level event (an async actor): wait() returns once the test calls release(); arrived(n) returns once
    n calls are waiting, so the test knows that work is held inside the actors, not merely queued."""

    def __init__(self):
        self._open = asyncio.Event()
        self._changed = asyncio.Condition()
        self._waiting = 0

    async def wait(self) -> None:
        async with self._changed:
            self._waiting += 1
            self._changed.notify_all()
        await self._open.wait()

    async def arrived(self, n: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self._waiting >= n)
            return self._waiting

    async def release(self) -> None:
        self._open.set()


def _spawner(ray_local, names: list[str], version: int = 1):
    cls = ray_local.remote(Echo)

    def spawn(name):
        names.append(name)
        return cls.options(name=f"test-{name}", namespace="segr1-test", num_cpus=0).remote(name, version)

    return spawn


def _echo_all(pool: ActorPool, n: int) -> dict:
    """pool.map of work(0), ..., work(n - 1), with the deadline."""
    return pool.map([(i, lambda a, i=i: a.work.remote(i)) for i in range(n)], timeout=DEADLINE_S)


def _started(ray_local, pool: ActorPool) -> None:
    """Wait until every actor of a new pool is up (its readiness refs resolved): the next items dispatch at once."""
    starting = pool.waitables()
    ready, _ = ray_local.wait(starting, num_returns=len(starting), timeout=DEADLINE_S)
    assert len(ready) == len(starting), f"{pool.prefix}: {len(starting) - len(ready)} actors never started"


def test_every_item_answered_once_across_a_killed_actor(ray_local):
    """Each actor holds its max_inflight items, the first of them waiting at a gate; echo-0 is killed while its
    two items are in flight: they are re-issued, nothing is answered before the gate opens, and every item is
    answered exactly once."""
    spawned: list[str] = []
    pool = ActorPool("echo", _spawner(ray_local, spawned), 2, max_inflight=2)
    gate = ray_local.remote(num_cpus=0)(Gate).options(namespace="segr1-test").remote()
    _started(ray_local, pool)
    for i in range(6):  # 0, 2 -> echo-0; 1, 3 -> echo-1; 4, 5 queued
        pool.submit(i, lambda a, i=i: a.work.remote(i, gate))
    assert ray_local.get(gate.arrived.remote(2), timeout=DEADLINE_S) == 2  # both actors are inside work()
    ray_local.kill(ray_local.get_actor("test-echo-0", namespace="segr1-test"), no_restart=True)
    early: dict = {}
    deadline = time.monotonic() + DEADLINE_S
    while pool.stats.restarts == 0:  # the pool sees the death through the dead actor's calls
        assert time.monotonic() < deadline, "the pool never saw echo-0 die"
        early.update(pool.poll(timeout=1.0))
    assert early == {} and pool.stats.completed == 0  # the gate still holds every item
    assert pool.stats.retries == 2  # echo-0's two items were in flight when it died, and were re-issued
    ray_local.get(gate.release.remote())
    results = collect_exactly_once(pool, range(6))
    assert {k: v[1] for k, v in results.items()} == {i: i * 10 for i in range(6)}
    assert pool.stats.restarts == 1 and pool.stats.completed == 6
    assert spawned.count("echo-0") == 2  # the dead actor was replaced under its own name
    assert pool.pending == 0
    pool.shutdown()
    ray_local.kill(gate)


def test_application_errors_are_returned_not_raised(ray_local):
    pool = ActorPool("err", _spawner(ray_local, []), 1)
    out = pool.map([(0, lambda a: a.work.remote(-1)), (1, lambda a: a.work.remote(2))], timeout=DEADLINE_S)
    assert isinstance(out[0], WorkFailed) and "bad input -1" in str(out[0].error)
    assert out[1][1] == 20
    pool.shutdown()


def test_on_error_repairs_and_retries(ray_local):
    repaired = []

    def on_error(handle, err):
        if "stale" in str(err):
            ray_local.get(handle.set_version.remote(1))
            repaired.append(err)
            return True
        return False

    pool = ActorPool("stale", _spawner(ray_local, [], version=0), 1, on_error=on_error)
    out = pool.map([(0, lambda a: a.work.remote(7))], timeout=DEADLINE_S)
    assert out[0][1] == 70 and len(repaired) == 1
    pool.shutdown()


def test_an_on_error_that_raises_reaches_the_caller_and_keeps_the_item(ray_local):
    """on_error's own error (the driver's: the learner it repairs a stale worker from died) is raised to the
    caller, and the item is not lost: it is queued again and answered once the repair works."""

    class LearnerGone(RuntimeError):
        pass

    attempts = []

    def on_error(handle, err):
        attempts.append(err)
        if len(attempts) == 1:
            raise LearnerGone("the learner died")
        ray_local.get(handle.set_version.remote(1))
        return True

    pool = ActorPool("gone", _spawner(ray_local, [], version=0), 1, on_error=on_error)
    pool.submit(0, lambda a: a.work.remote(7))
    with pytest.raises(LearnerGone):
        collect_exactly_once(pool, [0])
    assert pool.pending == 1  # queued again, not lost
    assert collect_exactly_once(pool, [0])[0] == ("gone-0", 70)
    pool.shutdown()


def test_resize_up_runs_on_start_and_down_drains(ray_local):
    started = []

    def on_start(handle):
        ref = handle.set_version.remote(5)
        started.append(ref)
        return [ref]

    pool = ActorPool("scale", _spawner(ray_local, []), 1, on_start=on_start)
    pool.resize(3)
    assert pool.size == 3 and len(started) == 3
    out = _echo_all(pool, 9)
    assert sorted(v[1] for v in out.values()) == [i * 10 for i in range(9)]
    ray_local.get(
        started
    )  # every actor started: shrinking then drains the newest (a starting one goes first)
    pool.resize(1)
    assert pool.names == ["scale-0"]
    out = _echo_all(pool, 3)
    assert {v[0] for v in out.values()} == {"scale-0"}
    pool.shutdown()


class Broken:
    def __init__(self, name: str):
        raise RuntimeError(f"cannot load model for {name}")

    def work(self, x: int):
        return x


def test_crash_looping_actor_gives_a_clear_error(ray_local):
    """An actor that dies at every start is restarted with a growing backoff, and called a crash loop only once
    it has died max_consecutive_deaths times over at least crash_loop_s: a restart placed on a node that is lost
    but not yet known to be (a few seconds in Ray) dies at once too, and must not end the job."""
    import re

    from cluster.pools.actor_pool import PoolError

    cls = ray_local.remote(Broken)
    pool = ActorPool(
        "broken",
        lambda n: cls.options(name=f"test-{n}", namespace="segr1-test", num_cpus=0).remote(n),
        1,
        crash_loop_s=2.0,
    )
    with pytest.raises(PoolError, match="(?s)broken-0 died .*cannot load model") as err:
        pool.map([(0, lambda a: a.work.remote(1))], timeout=120)
    deaths, seconds = map(int, re.search(r"died (\d+) times in a row in (\d+) s", str(err.value)).groups())
    assert deaths >= 3 and seconds >= 2, str(err.value)
    assert pool.stats.restarts == deaths - 1  # the last death is the one it gave up on


def test_an_actor_killed_before_it_was_placed_is_no_crash_loop(ray_local):
    """A replacement waiting for a node (here: a resource no node has) and killed there (the chaos run's rollout
    kill landing on a replacement whose node was just lost) never ran its code: restarted at once each time, never
    called a crash loop, however often and however long; an actor that ran and died is (the test above)."""
    cls = ray_local.remote(Echo)

    def spawn(name):
        nowhere = {"segr1_test_absent": 1}
        return cls.options(name=f"test-{name}", namespace="segr1-test", num_cpus=0, resources=nowhere).remote(
            name, 1
        )

    pool = ActorPool("unplaced", spawn, 1, max_consecutive_deaths=2, crash_loop_s=0.0)
    for kills in range(1, 4):
        ray_local.kill(pool.handles()["unplaced-0"], no_restart=True)
        deadline = time.monotonic() + DEADLINE_S
        while pool.stats.restarts < kills:  # the pool sees the death when it polls the start
            assert time.monotonic() < deadline, f"kill {kills} never seen"
            pool.poll(timeout=1.0)
    assert pool.names == ["unplaced-0"] and pool.stats.restarts == 3
    pool.shutdown()


def test_ties_spread_work_over_every_actor(ray_local):
    pool = ActorPool("spread", _spawner(ray_local, []), 2, max_inflight=2)
    # both up before the first item: an actor still starting takes no work
    ray_local.get([h.__ray_ready__.remote() for h in pool.handles().values()])
    served = []
    for i in range(4):  # one item at a time: every actor is idle at each dispatch
        served.extend(
            v[0] for v in pool.map([(i, lambda a, i=i: a.work.remote(i))], timeout=DEADLINE_S).values()
        )
    assert sorted(set(served)) == ["spread-0", "spread-1"]
    pool.shutdown()


def test_actor_without_capacity_left_is_dropped_not_restarted(ray_local):
    """A death when the cluster holds no room for the actor (its node went away): dropped, its work re-issued
    to the others, no restart and no crash-loop count; with room, the same death restarts it."""
    room = {"n": 1}
    spawned: list[str] = []
    pool = ActorPool("cap", _spawner(ray_local, spawned), 2, max_inflight=2, capacity=lambda: room["n"])
    assert len(_echo_all(pool, 4)) == 4  # both serving
    ray_local.kill(ray_local.get_actor("test-cap-1", namespace="segr1-test"), no_restart=True)
    for i in range(6):  # two of them go to the dead actor: its death is seen, its items re-issued
        pool.submit(i, lambda a, i=i: a.work.remote(i))
    results = collect_exactly_once(pool, range(6))
    assert {k: v[1] for k, v in results.items()} == {i: i * 10 for i in range(6)}
    assert pool.names == ["cap-0"] and pool.stats.dropped == 1 and pool.stats.restarts == 0
    assert spawned == ["cap-0", "cap-1"]
    room["n"] = 2  # capacity back: the pool grows into it, and a death with room restarts
    pool.resize(2)
    ray_local.kill(ray_local.get_actor("test-cap-0", namespace="segr1-test"), no_restart=True)
    out = _echo_all(pool, 4)
    assert sorted(v[1] for v in out.values()) == [0, 10, 20, 30]
    assert pool.stats.restarts == 1 and pool.stats.dropped == 1 and pool.size == 2
    pool.shutdown()


@pytest.mark.parametrize("on_start", [None, lambda h: [h.set_version.remote(1)]], ids=["plain", "on_start"])
def test_an_actor_never_placed_gets_no_work_and_is_shrunk_away_first(ray_local, on_start):
    """An actor asking for a resource no node has (like a replacement waiting for a node that is gone) is given no
    item, with or without on_start: every item is answered by the one that runs. resize(n) below the size drains
    first the actors whose start has not finished, not the newest serving one, and nothing is left pending."""
    cls = ray_local.remote(Echo)

    def spawn(name):
        nowhere = {"segr1_test_absent": 1} if name == "shrink-0" else {}
        return cls.options(name=f"test-{name}", namespace="segr1-test", num_cpus=0, resources=nowhere).remote(
            name, 1
        )

    pool = ActorPool("shrink", spawn, 2, on_start=on_start)
    out = _echo_all(pool, 6)
    assert {who for who, _ in out.values()} == {"shrink-1"}
    pool.resize(1)
    assert pool.names == ["shrink-1"] and pool.pending == 0
    pool.shutdown()
