"""Delta weight sync (runtime/weights/delta.py, payloads.py): lossless over many AdamW versions, a full version
whenever a receiver may not hold the base, and real gloo groups with a late joiner, a restarted receiver and a
receiver that lost its base."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import pytest
import torch

from actors.weight_receiver import receive_and_load
from runtime.weights.collective import DistributedWeightReceiver, DistributedWeightSender
from runtime.weights.delta import DELTA, RAW, DeltaDecoder, DeltaEncoder, apply_delta, delta_nbytes
from runtime.weights.layout import StreamedWeights, WeightSyncError, bucket_views, plan_manifest
from tests.support.weight_receivers import InMemoryEngine, start_receiver, stop_receivers

BUCKET_MB = 4096 / 2**20  # 4 KiB buckets: several per version


class Policy:
    """fp32 master weights trained by AdamW on random gradients; `export()` is the bf16 policy a learner sends
    (plus one fp32 tensor: a bucket of another word size)."""

    def __init__(self, lr: float, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        shapes = {"embed": (64, 32), "layer.0.w": (32, 32), "layer.0.b": (32,), "layer.1.w": (48, 32)}
        self.params = {n: torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for n, s in shapes.items()}
        self.norm = torch.ones(32) + torch.randn(32, generator=g) * 1e-3
        self.opt = torch.optim.AdamW(self.params.values(), lr=lr)
        self.g = g

    def step(self) -> None:
        for p in self.params.values():
            p.grad = torch.randn(p.shape, generator=self.g)
        self.opt.step()

    def export(self) -> list[tuple[str, torch.Tensor]]:
        named = [(n, p.detach().to(torch.bfloat16)) for n, p in self.params.items()]
        return [*named, ("norm", self.norm)]


def _send(encoder: DeltaEncoder, named, version: int, fresh: bool = False):
    m = plan_manifest(named, version, BUCKET_MB)
    base = encoder.begin(m, fresh=fresh)
    return m, base, [encoder.payload(m, i, dict(named)) for i in range(len(m.bucket_nbytes))]


def _receive(decoder: DeltaDecoder, m, base, payloads) -> dict[str, torch.Tensor]:
    assert base is None or decoder.holds(m, base)
    decoder.begin(m, delta=base is not None)
    held = [decoder.apply(i, kind, p.clone()) for i, (kind, p) in enumerate(payloads)]
    decoder.finish(m.version)
    return dict(bucket_views(m, held))


def _version(policy: Policy, encoder: DeltaEncoder, decoder: DeltaDecoder, version: int):
    """One AdamW step, sent and received; asserts the receiver's tensors equal the export bit for bit. Returns the
    version's base and payloads."""
    policy.step()
    named = policy.export()
    m, base, payloads = _send(encoder, named, version)
    got = _receive(decoder, m, base, payloads)
    encoder.commit(m)
    for n, t in named:
        assert torch.equal(got[n].view(torch.uint8), t.contiguous().view(torch.uint8)), (version, n)
    return base, payloads


def test_fifty_adamw_versions_arrive_bit_equal_and_mostly_as_deltas():
    policy, encoder, decoder = Policy(lr=1e-6), DeltaEncoder(max_changed=0.1, full_every=20), DeltaDecoder()
    kinds, fractions = [], []
    for version in range(1, 51):
        base, _ = _version(policy, encoder, decoder, version)
        kinds.append(base is not None)
        if base is not None:
            assert encoder.stats.payload_bytes < encoder.stats.full_bytes
            fractions.append(encoder.stats.changed_fraction)
    assert kinds[0] is False and kinds[20] is False and kinds[40] is False  # first, then every full_every-th
    assert sum(kinds) == 47
    assert max(fractions) < 0.1


def test_large_changes_go_whole_and_the_next_versions_skip_the_comparison():
    policy, encoder, decoder = Policy(lr=1e-2), DeltaEncoder(max_changed=0.1, full_every=50), DeltaDecoder()
    bases = []
    for version in range(1, 8):
        base, payloads = _version(policy, encoder, decoder, version)
        bases.append(base)
        if base is not None:  # compared: the first bucket changed too much, so every bucket went RAW
            assert [k for k, _ in payloads] == [RAW] * len(payloads)
            assert encoder.stats.raw_buckets == [0] and encoder.stats.changed_fraction > 0.1
    # v1 full; v2 compared (too large) -> skip 1 (v3 full); v4 compared -> skip 2 (v5, v6); v7 compared
    assert bases == [None, 1, None, 3, None, None, 6]


def test_a_fresh_generation_or_a_failed_send_goes_whole():
    policy, encoder = Policy(lr=1e-6), DeltaEncoder()
    policy.step()
    encoder.commit(_send(encoder, policy.export(), 1)[0])
    m2, base2, _ = _send(encoder, policy.export(), 2)
    assert base2 == 1
    encoder.invalidate(m2)  # version 2's send failed
    m3, base3, _ = _send(encoder, policy.export(), 3)
    assert base3 is None
    encoder.commit(m3)
    assert _send(encoder, policy.export(), 4, fresh=True)[1] is None  # a receiver may be new


def test_a_superseded_send_cannot_touch_the_newer_versions_buckets():
    """gloo cannot abort a blocked broadcast: the send of an abandoned generation may wake after the next version
    began. It must neither encode into the encoder's buckets nor invalidate or commit the newer version."""
    policy, encoder = Policy(lr=1e-6), DeltaEncoder()
    policy.step()
    named = policy.export()
    old = plan_manifest(named, 1, BUCKET_MB)
    encoder.begin(old)
    encoder.payload(old, 0, dict(named))
    new, base, payloads = _send(encoder, named, 2, fresh=True)  # the next generation sends version 2 whole
    with pytest.raises(WeightSyncError, match="superseded"):
        encoder.payload(old, 1, dict(named))
    with pytest.raises(WeightSyncError, match="superseded"):
        encoder.commit(old)
    encoder.invalidate(old)  # the old send's failure path: changes nothing
    encoder.commit(new)
    assert encoder.acked == 2 and base is None and {k for k, _ in payloads} == {RAW}


def test_a_corrupt_delta_payload_is_refused_by_what_is_wrong():
    shadow = torch.zeros(64, dtype=torch.uint8)
    cur = shadow.clone()
    cur.view(torch.int16)[3] = 7
    base = shadow.clone()
    from runtime.weights.delta import encode_delta

    payload, count = encode_delta(base, cur, torch.int16, limit=1 << 20)
    assert count == 1 and payload.numel() == delta_nbytes(1, torch.int16)
    apply_delta(shadow, payload, torch.int16)
    assert torch.equal(shadow, cur)
    with pytest.raises(WeightSyncError, match="does not hold 1 changed"):
        apply_delta(shadow, payload[:-2], torch.int16)
    bad = payload.clone()
    bad[8:12].view(torch.int32)[0] = 1000
    with pytest.raises(WeightSyncError, match="outside its bucket"):
        apply_delta(shadow, bad, torch.int16)
    assert DELTA != RAW


# ------------------------------------------------------------------------------------------------------------
# Real gloo groups


def _streamed(named) -> StreamedWeights:
    """The policy as a sharded learner streams it: specs on the meta device, each full tensor produced once, in
    the manifest's order (by dtype, as plan_manifest lays them out)."""
    ordered = [(n, t) for d in dict.fromkeys(t.dtype for _, t in named) for n, t in named if t.dtype == d]
    specs = [(n, torch.empty(t.shape, dtype=t.dtype, device="meta")) for n, t in ordered]
    return StreamedWeights(specs, iter(ordered))


@pytest.mark.parametrize("use_shm", [None, False], ids=["shared-memory", "tcp"])
def test_fifty_versions_over_gloo_with_a_late_joiner_and_a_restart(use_shm):
    """Every other version streamed as a sharded learner sends it."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ctx = mp.get_context("spawn")
    procs: dict = {}

    def start(name):
        procs[name] = start_receiver(ctx, name)

    def regroup(sender):
        sender.close(notify=True)
        info = sender.prepare(sorted(procs))
        for _, q, _ in procs.values():
            q.put(info)
        sender.connect()

    policy = Policy(lr=1e-6)
    sender = DistributedWeightSender("gloo", bucket_mb=BUCKET_MB, timeout_s=60, use_shm=use_shm)
    sender.delta = DeltaEncoder(max_changed=0.1, full_every=100)
    start("rollout-0")
    bases = []
    try:
        regroup(sender)
        for version in range(1, 51):
            if version == 20:  # a worker joins late
                start("rollout-1")
                regroup(sender)
            if version == 35:  # a worker is restarted: a new process that holds nothing
                sender.close(notify=True)
                procs.pop("rollout-0")[0].kill()
                start("rollout-0")
                regroup(sender)
            policy.step()
            named = policy.export()
            stats = sender.send(named if version % 2 else _streamed(named), version)
            bases.append(stats.delta_base)
            for name, (_, _, rq) in sorted(procs.items()):
                got = rq.get(timeout=60)
                while got[1] == "closed":
                    got = rq.get(timeout=60)
                assert got[:2] == (name, version), got
                assert all(torch.equal(got[2][n], t) for n, t in named), (name, version)
        assert sender.shm_active is (use_shm is None)
        # full at the start, when rollout-1 joined and when rollout-0 restarted; deltas otherwise
        assert [v for v, b in enumerate(bases, 1) if b is None] == [1, 20, 35]
    finally:
        sender.close(notify=False)
        stop_receivers(procs)


def test_a_receiver_that_lost_its_base_refuses_the_delta_and_gets_the_version_whole():
    policy = Policy(lr=1e-6)
    sender = DistributedWeightSender("gloo", bucket_mb=BUCKET_MB, timeout_s=30, use_shm=False)
    sender.delta = DeltaEncoder()
    receiver, engine = DistributedWeightReceiver("rollout-0"), InMemoryEngine()
    info = sender.prepare(["rollout-0"])
    joined = threading.Thread(target=receiver.join, args=(info,), daemon=True)
    joined.start()
    sender.connect()
    joined.join(timeout=30)
    got: list = []
    for version, lost in ((1, False), (2, False), (3, True), (4, False)):
        if lost:
            receiver.delta.version = 1  # holds an older version than the learner's base (2)
        policy.step()
        named = policy.export()
        t = threading.Thread(target=lambda: got.append(receive_and_load(receiver, engine)), daemon=True)
        t.start()
        stats = sender.send(named, version)
        t.join(timeout=30)
        assert got[-1] == version and all(torch.equal(engine.weights[n], x) for n, x in named)
        assert (stats.delta_base is None) is (version in (1, 3)), version
    sender.close()
    receiver.close()
