"""Weight broadcast: bucket layout, packing round trip, in-process channel, and the gloo wire protocol between
real processes (learner rank 0 + 2 receivers), including a membership change mid-run."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import pytest
import torch

from actors.weight_receiver import receive_and_load
from runtime.weights import layout
from runtime.weights.collective import DistributedWeightReceiver, DistributedWeightSender
from runtime.weights.inprocess import InProcessChannel
from runtime.weights.layout import WeightSyncError, bucket_views, pack_bucket, plan_manifest
from tests.support.weight_receivers import InMemoryEngine, start_receiver, stop_receivers


def _model(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("embed.weight", torch.randn(50, 16, generator=g).to(torch.bfloat16)),
        ("layer.0.w", torch.randn(16, 16, generator=g)),
        ("layer.0.b", torch.randn(16, generator=g).to(torch.bfloat16)),
        ("layer.1.w", torch.randn(3, 5, 7, generator=g)),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.zeros(0, 4)),
        ("ids", torch.arange(10, dtype=torch.int64)),
    ]


def _streamed(model) -> layout.StreamedWeights:
    """The model as a sharded learner streams it: specs on the meta device, tensors produced one at a time in the
    manifest's order (grouped by dtype, as plan_manifest lays them out)."""
    dtypes = list(dict.fromkeys(t.dtype for _, t in model))
    ordered = [(n, t) for d in dtypes for n, t in model if t.dtype == d]
    specs = [(n, torch.empty(t.shape, dtype=t.dtype, device="meta")) for n, t in ordered]
    return layout.StreamedWeights(specs, iter(ordered))


def test_manifest_one_dtype_per_bucket_and_size_limit():
    named = _model()
    m = plan_manifest(named, version=3, bucket_mb=1200 / 2**20)  # 1200-byte buckets
    assert m.version == 3
    dtypes: dict[int, set] = {}
    for spec in m.tensors:
        dtypes.setdefault(spec.bucket, set()).add(spec.dtype)
        assert spec.offset % 64 == 0
    assert all(len(d) == 1 for d in dtypes.values())
    # embed (1600 B) is larger than a bucket: it gets a bucket of its own; other buckets stay within the limit
    embed = next(s for s in m.tensors if s.name == "embed.weight")
    assert m.bucket_nbytes[embed.bucket] == 1600
    assert all(n <= 1200 for i, n in enumerate(m.bucket_nbytes) if i != embed.bucket)
    assert m.total_bytes >= sum(t.numel() * t.element_size() for _, t in named)


def test_pack_and_views_round_trip_bit_identical():
    named = _model()
    m = plan_manifest(named, version=0, bucket_mb=0.001)
    buffers = [pack_bucket(m, i, dict(named)).clone() for i in range(len(m.bucket_nbytes))]
    out = dict(bucket_views(m, buffers))
    for name, t in named:
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t)


def test_streamed_weights_pack_like_a_list_and_refuse_another_order():
    named = _model()
    streamed = _streamed(named)
    m = plan_manifest(layout.layout_of(streamed), version=0, bucket_mb=0.001)
    assert m == plan_manifest(named, version=0, bucket_mb=0.001)
    source = layout.tensor_source(streamed)
    out = dict(bucket_views(m, [pack_bucket(m, i, source).clone() for i in range(len(m.bucket_nbytes))]))
    assert all(torch.equal(out[n], t) for n, t in named)
    backwards = _streamed(named)
    with pytest.raises(WeightSyncError, match="in the manifest's order"):
        backwards[m.tensors[-1].name]


def test_in_process_channel_atomic_versions_and_late_joiner():
    ch = InProcessChannel(bucket_mb=0.001)
    sender, early = ch.sender(), ch.receiver()
    engine = InMemoryEngine()
    sender.send(_model(0), version=1)
    sender.send(_model(1), version=2)
    assert receive_and_load(early, engine) == 1
    assert torch.equal(engine.weights["layer.0.w"], dict(_model(0))["layer.0.w"])
    assert receive_and_load(early, engine) == 2 and engine.loads == 2
    late = ch.receiver()  # joins after version 2: starts from the current weights
    late_engine = InMemoryEngine()
    assert receive_and_load(late, late_engine) == 2
    for name, t in _model(1):
        assert torch.equal(late_engine.weights[name], t)
    sender.close(notify=True)
    assert early.receive() is None


# ------------------------------------------------------------------------------------------------------------
# Real processes over gloo


def _expect(result_q, name, version, model):
    got_name, got_version, weights = result_q.get(timeout=60)
    assert (got_name, got_version) == (name, version), weights
    for n, t in model:
        assert weights[n].dtype == t.dtype and torch.equal(weights[n], t), n


def _connect(sender, members, queues):
    info = sender.prepare(members)
    for q in queues:
        q.put(info)
    sender.connect()


@pytest.mark.parametrize("use_shm", [None, False], ids=["shared-memory", "tcp"])
def test_gloo_broadcast_two_receivers_bit_identical_then_a_third_joins(use_shm, monkeypatch):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr("runtime.weights.shm.SHM_CHUNK_BYTES", 256)  # several shared-memory chunks per bucket
    ctx = mp.get_context("spawn")
    procs = {n: start_receiver(ctx, n) for n in ("rollout-0", "rollout-1")}
    sender = DistributedWeightSender("gloo", bucket_mb=0.002, timeout_s=60, use_shm=use_shm)
    try:
        _connect(sender, list(procs), [p[1] for p in procs.values()])
        assert sender.shm_active is (use_shm is None)  # same machine: the probe finds shared memory
        for version, seed in ((1, 1), (2, 2)):  # version 2 streamed (a sharded learner's gathers)
            stats = sender.send(_model(seed) if version == 1 else _streamed(_model(seed)), version)
            assert stats.version == version and stats.buckets > 1
            for n, (_, _, rq) in procs.items():
                _expect(rq, n, version, _model(seed))
        # a new worker joins at a version boundary: new generation, everyone rejoins, current weights re-sent
        procs["rollout-2"] = start_receiver(ctx, "rollout-2")
        sender.close(notify=True)
        for n in ("rollout-0", "rollout-1"):
            assert procs[n][2].get(timeout=60)[1] == "closed"
        _connect(sender, list(procs), [p[1] for p in procs.values()])
        assert sender.info.generation == 2 and sender.info.world_size == 4
        sender.send(_model(2), 2)
        sender.send(_model(3), 3)
        for n, (_, _, rq) in procs.items():
            _expect(rq, n, 2, _model(2))
            _expect(rq, n, 3, _model(3))
        sender.close(notify=True)
    finally:
        stop_receivers(procs)


def test_receiver_refuses_a_group_without_its_name():
    sender = DistributedWeightSender("gloo", timeout_s=5)
    info = sender.prepare(["rollout-0"])
    with pytest.raises(WeightSyncError, match="rollout-9"):
        DistributedWeightReceiver("rollout-9").join(info)


def test_orphan_segments_of_dead_learners_are_removed():
    from multiprocessing import shared_memory

    from runtime.weights.shm import SHM_PREFIX, remove_orphan_segments

    dead = shared_memory.SharedMemory(name=f"{SHM_PREFIX}999999999-test-0", create=True, size=8)
    mine = shared_memory.SharedMemory(name=f"{SHM_PREFIX}{os.getpid()}-test-0", create=True, size=8)
    try:
        removed = remove_orphan_segments(min_age_s=0)
        assert dead.name.lstrip("/") in removed and mine.name.lstrip("/") not in removed
    finally:
        for seg in (dead, mine):
            seg.close()
            try:
                seg.unlink()
            except FileNotFoundError:  # removed as an orphan: tell this process's tracker too
                from multiprocessing import resource_tracker

                resource_tracker.unregister(seg._name, "shared_memory")


def test_a_header_with_an_unknown_op_is_refused_by_name():
    """Every header carries a WireOp; a receiver refuses anything else instead of guessing what follows."""
    from runtime.weights.wire import WireOp, send_header

    assert WireOp("weights-shm") is WireOp.WEIGHTS_SHM
    sender = DistributedWeightSender("gloo", timeout_s=30, use_shm=False)
    receiver = DistributedWeightReceiver("rollout-0")
    info = sender.prepare(["rollout-0"])
    joined = threading.Thread(target=receiver.join, args=(info,), daemon=True)
    joined.start()
    sender.connect()
    joined.join(timeout=30)
    errors: list[BaseException] = []

    def receive():
        try:
            receiver.receive()
        except WeightSyncError as err:
            errors.append(err)

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    send_header(sender.group.require(), sender.device, {"op": "weights-v2"})
    t.join(timeout=30)
    assert len(errors) == 1 and "'weights-v2'" in str(errors[0])
    sender.close()
    receiver.close()
