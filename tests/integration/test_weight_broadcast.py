"""Weight broadcast on a real local Ray: 3 receiver actors (tests/support/weight_receivers.py) join the learner's gloo
group, get bit-identical tensors streamed one bucket at a time (one load_weights per version, never more than two
buckets of it staged on the receiving side), and a 4th actor joins mid-run; a transfer cut half-way leaves every
engine refusing to generate until the next generation re-sends the version whole."""

from __future__ import annotations

import hashlib

import pytest
import ray
import torch

from protos import WeightsManifest
from runtime.weights.collective import DistributedWeightSender
from runtime.weights.layout import pack_bucket, plan_manifest
from runtime.weights.wire import WireOp, broadcast, send_op
from tests.support.weight_receivers import receiver_actor

pytestmark = pytest.mark.usefixtures("ray_local")


def _model(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = [
        (f"model.layers.{i}.mlp.weight", torch.randn(64, 48, generator=g).to(torch.bfloat16))
        for i in range(6)
    ]
    out += [("model.norm.weight", torch.randn(48, generator=g)), ("visual.scale", torch.tensor(float(seed)))]
    return out


def _digests(named) -> dict[str, str]:
    return {
        n: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, t in named
    }


def _form_group(sender, actors: dict) -> None:
    info = sender.prepare(list(actors))
    joins = [a.join.remote(info.to_dict()) for a in actors.values()]
    sender.connect()
    ray.get(joins, timeout=60)


def _send(sender, actors: dict, named, version: int) -> list:
    pending = [a.receive.remote() for a in actors.values()]  # every actor blocks in its receive first
    sender.send(named, version)
    return ray.get(pending, timeout=60)


class _CutSender(DistributedWeightSender):
    """Announces a version, sends its first bucket, then vanishes (a learner dying mid-transfer)."""

    def send_first_bucket_only(self, named, version):
        manifest: WeightsManifest = plan_manifest(named, version, self.bucket_mb)
        assert len(manifest.bucket_nbytes) > 1
        pg = self.group.require()
        send_op(pg, self.device, WireOp.WEIGHTS, manifest=manifest.model_dump(mode="json"))
        broadcast(pg, pack_bucket(manifest, 0, dict(named))).wait()
        self.group.pg = None  # drop the group without sending the rest


def test_three_ray_actors_bit_identical_atomic_versions_and_a_late_joiner():
    actors = {f"rollout-{i}": receiver_actor(f"rollout-{i}") for i in range(3)}
    sender = DistributedWeightSender("gloo", bucket_mb=0.004, timeout_s=60, use_shm=False)
    try:
        _form_group(sender, actors)
        for version in (1, 2):
            assert _send(sender, actors, _model(version), version) == [version] * 3
            states = ray.get([a.state.remote() for a in actors.values()])
            bucket = max(plan_manifest(_model(version), version, 0.004).bucket_nbytes)
            for st in states:
                assert st["version"] == version and st["loads"] == version  # one load_weights per version
                assert st["digests"] == _digests(_model(version))  # bit-identical
                # 8 buckets sent; the engine saw at most two alive at once, the receiver staged at most two
                assert 0 < st["staged_peak"] <= 2 * bucket and st["receiver_peak"] <= 2 * bucket

        # a new worker joins at the version boundary: new generation, everyone re-joins, current weights re-sent
        actors["rollout-3"] = receiver_actor("rollout-3")
        _form_group(sender, actors)
        assert _send(sender, actors, _model(2), 2) == [2] * 4
        assert _send(sender, actors, _model(3), 3) == [3] * 4
        for st in ray.get([a.state.remote() for a in actors.values()]):
            assert st["version"] == 3 and st["digests"] == _digests(_model(3))
    finally:
        sender.close()
        for a in actors.values():
            ray.kill(a)


def test_a_transfer_cut_half_way_leaves_every_engine_refusing_until_the_next_generation_resends_it():
    actors = {f"cut-{i}": receiver_actor(f"cut-{i}") for i in range(2)}
    sender = _CutSender("gloo", bucket_mb=0.004, timeout_s=60, use_shm=False)
    try:
        _form_group(sender, actors)
        assert _send(sender, actors, _model(1), 1) == [1, 1]
        pending = [a.receive.remote() for a in actors.values()]
        sender.send_first_bucket_only(_model(2), 2)
        for ref in pending:
            with pytest.raises(ray.exceptions.RayTaskError):
                ray.get(ref, timeout=60)
        for st in ray.get([a.state.remote() for a in actors.values()]):
            assert (
                st["version"] == 1 and st["loads"] == 1 and st["consistent"] is False
            )  # refuses to generate
        _form_group(sender, actors)  # the driver's next generation re-sends the current version
        assert _send(sender, actors, _model(2), 2) == [2, 2]
        for st in ray.get([a.state.remote() for a in actors.values()]):
            assert st["version"] == 2 and st["consistent"] is True and st["digests"] == _digests(_model(2))
    finally:
        for a in actors.values():
            ray.kill(a)


def test_a_member_that_dies_before_joining_fails_the_forming_within_timeout_s():
    """weight_sync.timeout_s bounds forming: a rollout worker killed before it joins makes connect() fail after
    that long (the driver then falls back to the object store), not after torch's 30-minute default; the
    survivors form the next generation at once."""
    import time

    actors = {f"die-{i}": receiver_actor(f"die-{i}") for i in range(2)}
    sender = DistributedWeightSender("gloo", bucket_mb=0.004, timeout_s=5, use_shm=False)
    try:
        info = sender.prepare(list(actors))
        ray.kill(actors.pop("die-1"), no_restart=True)
        join = actors["die-0"].join.remote(info.to_dict())
        t0 = time.perf_counter()
        with pytest.raises(Exception) as err:  # gloo's rendezvous reports the missing rank as a timeout
            sender.connect()
        waited = time.perf_counter() - t0
        assert 4.0 <= waited < 30.0, (waited, err.value)
        with pytest.raises(ray.exceptions.RayTaskError):
            ray.get(join, timeout=60)  # the survivor's join fails too: nobody is left hanging
        _form_group(sender, actors)
        assert _send(sender, actors, _model(1), 1) == [1]
    finally:
        sender.close()
        for a in actors.values():
            ray.kill(a)
