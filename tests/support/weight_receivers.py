"""Test doubles of a rollout worker's receiving side: an engine without a model that keeps the last version it
was given (`InMemoryEngine`), and a bare receiving endpoint around it (`WeightReceiverEndpoint`), run as the Ray
actor `weights-<name>` by `receiver_actor` (the weight-broadcast integration test). Production receives through
actors/worker.py and actors/weight_receiver.py."""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from actors.weight_receiver import WeightLoadingEngine, receive_and_load
from runtime.weights.collective import DistributedWeightReceiver
from runtime.weights.wire import GroupInfo


class InMemoryEngine:
    """Holds the last complete version it was given: a real engine without a model. Like the real engines it is
    inconsistent (would refuse to generate) from the start of a load until the load completed, and it records the
    most bytes of received buckets alive at once while it loads (`staged_peak`, from the tensors' bases)."""

    def __init__(self):
        self.version = -1
        self.weights: dict[str, torch.Tensor] = {}
        self.loads = 0
        self.consistent = True
        self.staged_peak = 0

    def load_weights(self, named_tensors, version: int) -> None:
        self.consistent = False
        bases: list[weakref.ref] = []
        weights = {}
        for n, t in named_tensors:
            base = t._base if t._base is not None else t
            if not any(b() is base for b in bases):
                bases.append(weakref.ref(base))
            live = sum(b().numel() * b().element_size() for b in bases if b() is not None)
            self.staged_peak = max(self.staged_peak, live)
            weights[n] = t.detach().clone()  # copy out of the staging buffers
            del t, base
        self.weights, self.version, self.consistent = weights, version, True
        self.loads += 1


class WeightReceiverEndpoint:
    """A receiving endpoint with its own engine (default: InMemoryEngine): a Ray actor (`receiver_actor`) or
    in-process."""

    def __init__(self, name: str, engine: WeightLoadingEngine | None = None):
        self.name = name
        self.engine = engine if engine is not None else InMemoryEngine()
        self.receiver = DistributedWeightReceiver(name)
        self.lock = threading.Lock()

    def join(self, info: GroupInfo | Mapping[str, Any]) -> int:
        return self.receiver.join(info)

    def receive(self) -> int | None:
        """Receive one version and switch the engine to it; None when the learner closed the stream."""
        return receive_and_load(self.receiver, self.engine, self.lock)

    def state(self) -> dict:
        """Engine version, number of load_weights calls, sha256 of every tensor (bit-identity checks)."""
        weights = getattr(self.engine, "weights", {})
        digests = {
            n: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, t in weights.items()
            if t.numel()
        }
        return {
            "version": getattr(self.engine, "version", None),
            "loads": getattr(self.engine, "loads", None),
            "digests": digests,
            "shared_memory": self.receiver.shared_memory,
            "consistent": getattr(self.engine, "consistent", None),
            "staged_peak": getattr(self.engine, "staged_peak", None),
            "receiver_peak": getattr(getattr(self.receiver, "staging", None), "peak_bytes", None),
        }


def bucket_stream(
    named, version: int, bucket_bytes: int, fail_at: int | None = None, taken: list | None = None
):
    """What a weight receiver hands an engine (runtime/weights/stream.py): the buckets of `named` one at a time;
    `fail_at`: the transfer breaks off before that bucket; `taken` collects the indices of the buckets read."""
    from runtime.weights.layout import WeightSyncError, pack_bucket, plan_manifest
    from runtime.weights.stream import WeightStream

    manifest = plan_manifest(named, version, bucket_bytes / 2**20)
    by_name = dict(named)

    def buffers():
        for i in range(len(manifest.bucket_nbytes)):
            if i == fail_at:
                raise WeightSyncError("the learner went away")
            if taken is not None:
                taken.append(i)
            yield pack_bucket(manifest, i, by_name)

    return WeightStream(manifest, buffers())


def receiver_actor(name: str, num_cpus: float = 0) -> Any:
    """A WeightReceiverEndpoint(name) as the Ray actor `weights-<name>`, started: a group's `timeout_s` then bounds
    its join alone, not the worker process's start too (a minute and more on a loaded 2-core machine)."""
    import ray

    actor = ray.remote(WeightReceiverEndpoint).options(name=f"weights-{name}", num_cpus=num_cpus).remote(name)
    ray.get(actor.__ray_ready__.remote(), timeout=600)  # a hang guard
    return actor


# ------------------------------------------------------------------------------------------------------------
# A receiver in a process of its own (gloo between real processes): test_weight_sync, test_weight_delta


def receiver_process(name: str, info_q, result_q) -> None:
    """Join every group announced on `info_q` (None: exit) and report each version loaded on `result_q` as
    (name, version, weights), then (name, "closed", None) when the group closed, or (name, "error", repr)."""
    torch.set_num_threads(1)
    receiver, engine = DistributedWeightReceiver(name), InMemoryEngine()
    try:
        while (info := info_q.get()) is not None:
            receiver.join(info)
            while (v := receive_and_load(receiver, engine)) is not None:
                result_q.put((name, v, dict(engine.weights)))
            result_q.put((name, "closed", None))
    except Exception as err:  # report to the test instead of hanging it
        result_q.put((name, "error", repr(err)))


def start_receiver(ctx, name: str) -> tuple[Any, Any, Any]:
    """(process, info queue, result queue) of a `receiver_process` started in multiprocessing context `ctx`."""
    info_q, result_q = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=receiver_process, args=(name, info_q, result_q), daemon=True)
    p.start()
    return p, info_q, result_q


def stop_receivers(procs: Mapping[str, tuple[Any, Any, Any]]) -> None:
    """Ask every receiver process to exit; kill one that does not within 10 s."""
    for p, info_q, _ in procs.values():
        info_q.put(None)
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
