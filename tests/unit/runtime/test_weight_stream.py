"""A receiver hands a version to its engine one bucket at a time (runtime/weights/stream.py), over a real gloo
group in threads: the receiving side never holds more than two buckets while the engine ends with exactly the
sent tensors; an engine that stops early makes the learner's send fail instead of hang; an abandoned generation
ends a wait for the next bucket at once."""

from __future__ import annotations

import threading
import weakref

import pytest
import torch

from runtime.weights.abandon import WeightSyncAborted
from runtime.weights.collective import DistributedWeightReceiver, DistributedWeightSender
from runtime.weights.layout import StreamedWeights, WeightSyncError, plan_manifest
from runtime.weights.stream import Staging

BUCKET_MB = 0.001  # 1,048 bytes: a 16 x 16 float32 tensor (1 KiB) per bucket


def _weights(n: int = 8) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(n)
    return [(f"layers.{i}.w", torch.randn(16, 16, generator=g)) for i in range(n)]


def _pair(timeout_s: float = 60, use_shm: bool | None = False):
    sender = DistributedWeightSender("gloo", bucket_mb=BUCKET_MB, timeout_s=timeout_s, use_shm=use_shm)
    receiver = DistributedWeightReceiver("rollout-0")
    info = sender.prepare(["rollout-0"])
    joined = threading.Thread(target=receiver.join, args=(info,), daemon=True)
    joined.start()
    sender.connect()
    joined.join(30)
    return sender, receiver


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as err:  # handed to the test
            out["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _load(receiver, took: threading.Event | None = None) -> tuple[int, dict, int]:
    """An engine's load: copy every tensor, watching how many bytes of received buckets are alive at once; sets
    `took` after the second tensor (bucket 1)."""
    version, stream = receiver.receive()
    bases: list[weakref.ref] = []
    peak, copied = 0, {}
    for name, t in stream:
        bases.append(weakref.ref(t._base))
        alive = {id(b()): b().numel() for b in bases if b() is not None}  # a reused buffer counts once
        peak = max(peak, sum(alive.values()))
        copied[name] = t.clone()
        del t
        if took is not None and len(copied) == 2:
            took.set()
    return version, copied, peak


@pytest.mark.parametrize("use_shm", [None, False], ids=["shared-memory", "tcp"])
def test_the_receiving_side_holds_at_most_two_buckets_and_the_engine_gets_every_tensor(use_shm):
    sender, receiver = _pair(use_shm=use_shm)
    weights = _weights()
    bucket = max(plan_manifest(weights, 1, BUCKET_MB).bucket_nbytes)
    try:
        t, out = _in_thread(lambda: _load(receiver))
        stats = sender.send(weights, 1)
        t.join(30)
        version, copied, peak = out["value"]
        assert version == 1 and receiver.version == 1 and receiver.shared_memory is (use_shm is None)
        assert stats.nbytes == 8 * 1024
        assert peak <= 2 * bucket and receiver.staging.peak_bytes <= 2 * bucket  # not 8 buckets
        assert all(torch.equal(copied[n], w) for n, w in weights)
    finally:
        sender.close()
        receiver.close()


def test_an_engine_that_stops_early_fails_the_send_and_the_group_stays_usable():
    sender, receiver = _pair()
    try:

        def take_one_bucket():
            version, stream = receiver.receive()
            next(iter(stream))  # the engine fails after its first tensor
            stream.close(failed=True)  # receive_and_load: drain the rest, acknowledge -1
            return version

        t, out = _in_thread(take_one_bucket)
        with pytest.raises(WeightSyncError, match="failed to stage weights version 1"):
            sender.send(_weights(), 1)
        t.join(30)
        assert out["value"] == 1 and receiver.version == -1
        t, out = _in_thread(lambda: _load(receiver))
        sender.send(_weights(), 2)  # the next version goes through the same group
        t.join(30)
        assert out["value"][0] == 2 and receiver.version == 2
    finally:
        sender.close()
        receiver.close()


def test_abort_ends_a_wait_for_the_next_bucket_at_once():
    """A learner that fails half-way through a version (its third tensor never comes) leaves the member waiting
    for bucket 2; the driver's abort (RolloutWorker.weight_sync_abort) ends that wait, so the engine's load ends
    and releases the rollout lock instead of holding it for weight_sync.timeout_s."""
    sender, receiver = _pair(timeout_s=5)  # what the group's teardown waits for the never-sent bucket
    weights = _weights()
    took = threading.Event()

    def failing():
        for k, item in enumerate(weights):
            if k == 2:
                raise RuntimeError("learner failed while gathering")
            yield item

    try:
        t, out = _in_thread(lambda: _load(receiver, took))
        with pytest.raises(RuntimeError, match="gathering"):
            sender.send(StreamedWeights(weights, failing()), 1)
        assert took.wait(30)  # buckets 0 and 1 arrived; the member now waits for bucket 2
        receiver.abort()
        t.join(30)
        assert not t.is_alive() and isinstance(out.get("error"), WeightSyncAborted), out
        assert "receiving bucket 2" in str(out["error"])
        assert receiver.version == -1
    finally:
        sender.abandon()
        sender.close()
        receiver.close()


def test_staging_reuses_a_cpu_buffer_only_once_nothing_holds_a_view_of_it():
    staging = Staging()
    first = staging.new(1024, torch.device("cpu"))
    held = first[:8].view(torch.int64)  # the engine still holds a tensor of bucket 0 (an incomplete layer)
    base = first._base
    del first
    second = staging.new(1024, torch.device("cpu"))
    assert second._base is not base  # the held view keeps bucket 0's buffer from being written over
    assert staging.live_bytes() == 2048
    made = {id(base), id(second._base)}
    del held, second
    third = staging.new(512, torch.device("cpu"))  # a smaller last bucket fits an idle buffer: no new one
    assert id(third._base) in made and third.numel() == 512
    assert staging.live_bytes() == 1024 and staging.peak_bytes == 2048
