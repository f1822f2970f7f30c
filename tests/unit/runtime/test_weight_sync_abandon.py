"""A weight-sync generation with a member that never comes or stops answering mid-transfer (its node is gone) is
abandoned at once on both ends (runtime/weights/abandon.py), not after weight_sync.timeout_s, and its
communicator is handed to abort (an NCCL one is aborted: tests/gpu/test_weight_abort_gpu.py; a gloo one cannot be,
torch 2.13); the next generation, with the live members only, forms and carries a version bit-identically."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from runtime.weights.abandon import Abandonable, WeightSyncAborted
from runtime.weights.collective import DistributedWeightReceiver, DistributedWeightSender
from runtime.weights.wire import ABORTABLE_BACKENDS
from tests.support.weight_member import digests, replies, spawn_member


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


def _weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"layer{i}.weight", torch.randn(32, 24, generator=g)) for i in range(4)]


def test_a_member_lost_mid_transfer_is_abandoned_on_both_ends_and_the_live_member_gets_the_next_version():
    """Three processes on gloo: the learner (this one) and two members. Version 1 reaches both; then rollout-1's
    node is lost (SIGSTOP: nobody closes its connections, as with a node gone) while version 2 is in flight. The
    learner and the live member abandon generation 1 at once; each hands the group its calls formed to abort,
    which gloo cannot do (torch 2.13: wire.ABORTABLE_BACKENDS), so both report it unabortable and the learner's
    call stays blocked in its left-behind thread (on NCCL the same path aborts the communicator and frees the
    stream). Generation 2, with the live member only, carries version 3 bit-identically."""
    assert "gloo" not in ABORTABLE_BACKENDS  # else the blocked gloo call below would end: assert that instead
    torch.set_num_threads(1)
    sender = DistributedWeightSender(backend="gloo", use_shm=False, timeout_s=300, bucket_mb=0.004)
    learner_side = Abandonable()
    (live, to_live), (lost, to_lost) = spawn_member("rollout-0"), spawn_member("rollout-1")
    try:
        info = sender.prepare(["rollout-0", "rollout-1"])
        for conn in (to_live, to_lost):
            conn.send(("join", info.to_dict()))
        learner_side.run(1, sender.connect, "forming")
        for conn, rank in ((to_live, 1), (to_lost, 2)):
            assert replies(conn, 1)["joined"][1] == rank
            conn.send(("receive", None))
        learner_side.run(1, lambda: sender.send(_weights(1), 1), "broadcasting")
        for conn in (to_live, to_lost):
            assert replies(conn, 1)["received"][1:] == (1, digests(_weights(1)))

        os.kill(lost.pid, signal.SIGSTOP)  # rollout-1's node is gone
        to_live.send(("receive", None))
        _when_blocked("weight-sync-broadcasting", lambda: learner_side.abandon(1))
        with pytest.raises(WeightSyncAborted, match="generation 1 was abandoned while broadcasting"):
            learner_side.run(1, lambda: sender.send(_weights(2), 2), "broadcasting")
        sender.abandon()  # what Learner.weight_sync_abort does next (SenderGroup.abandon: gloo cannot abort)
        assert (learner_side.left_behind, learner_side.aborted, learner_side.unabortable) == (1, 0, 1)
        blocked = [t for t in threading.enumerate() if t.name == "weight-sync-broadcasting"]
        assert blocked and blocked[0].is_alive()  # gloo's call waits for the lost member until timeout_s

        to_live.send(("abandon", 1))  # the driver's weight_sync_abort to every live member
        got = replies(to_live, 2)
        assert got["abandoned"][1] == {"aborted": 0, "unabortable": 1}
        assert got["failed"][1] == "WeightSyncAborted", got["failed"]

        info2 = sender.prepare(["rollout-0"])
        assert info2.generation == 2
        to_live.send(("join", info2.to_dict()))
        learner_side.run(2, sender.connect, "forming")
        assert replies(to_live, 1)["joined"][1] == 1
        to_live.send(("receive", None))
        learner_side.run(2, lambda: sender.send(_weights(3), 3), "broadcasting")
        assert replies(to_live, 1)["received"][1:] == (3, digests(_weights(3)))
    finally:
        to_live.send(("stop", None))
        lost.kill()
        live.join(30)
        sender.close()
