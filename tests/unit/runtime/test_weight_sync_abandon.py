"""A weight-sync generation with a member that never comes (its node is gone) is abandoned at once on both ends
(runtime/weights/abandon.py), not after weight_sync.timeout_s; the next generation, with the live members only,
forms and carries a version bit-identically."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from runtime.weights.abandon import Abandonable, WeightSyncAborted
from runtime.weights.collective import DistributedWeightReceiver, DistributedWeightSender


def _when_blocked(thread_name: str, then, timeout: float = 30.0) -> threading.Thread:
    """Run `then()` in a thread as soon as a thread named `thread_name` exists (polled, with a deadline)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not any(t.name == thread_name for t in threading.enumerate()):
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        then()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_a_generation_missing_a_member_is_abandoned_at_once_then_reformed_without_it():
    torch.set_num_threads(1)
    sender = DistributedWeightSender(backend="gloo", use_shm=False, timeout_s=300)
    learner_side, member_side = Abandonable(), Abandonable()
    alive = DistributedWeightReceiver("rollout-0")
    info = sender.prepare(["rollout-0", "rollout-1"])  # rollout-1 never joins: its node is gone
    joined: dict = {}

    def join() -> None:
        try:
            member_side.run(info.generation, lambda: alive.join(info), "joining")
        except WeightSyncAborted as err:
            joined["error"] = err

    member = threading.Thread(target=join, daemon=True)
    member.start()
    _when_blocked("weight-sync-forming", lambda: (learner_side.abandon(1), member_side.abandon(1)))
    t0 = time.monotonic()
    with pytest.raises(WeightSyncAborted, match="generation 1 was abandoned while forming"):
        learner_side.run(info.generation, sender.connect, "forming")
    assert time.monotonic() - t0 < 10  # not weight_sync.timeout_s (300 s)
    sender.abandon()
    member.join(10)
    assert isinstance(joined.get("error"), WeightSyncAborted)
    assert learner_side.left_behind == 1

    # generation 2: the live member only, with a fresh receiver (the abandoned one keeps its blocked join)
    fresh = DistributedWeightReceiver("rollout-0")
    info2 = sender.prepare(["rollout-0"])
    assert info2.generation == 2 and not learner_side.abandoned(2)
    t = threading.Thread(target=lambda: member_side.run(2, lambda: fresh.join(info2), "joining"), daemon=True)
    t.start()
    learner_side.run(2, sender.connect, "forming")
    t.join(30)
    weights = [("w", torch.randn(8, 4)), ("b", torch.arange(5, dtype=torch.int64))]
    got: dict = {}

    def receive() -> None:
        version, stream = fresh.receive()
        got["v"] = version, list(stream)  # taking every bucket acknowledges the version

    r = threading.Thread(target=receive, daemon=True)
    r.start()
    learner_side.run(2, lambda: sender.send(weights, 7), "broadcasting")
    r.join(30)
    version, named = got["v"]
    assert version == 7
    assert all(torch.equal(a, dict(named)[n]) for n, a in weights)
    sender.close()
    fresh.close()
