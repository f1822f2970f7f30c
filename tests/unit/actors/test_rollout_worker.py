"""RolloutWorker in-process with the transformers engine on the tiny Qwen2.5-VL."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from actors import metrics as M
from actors.engine import StaleWeightsError
from actors.weight_receiver import receive_and_load
from actors.worker import RolloutWorker
from cluster.config import build_config
from protos import RolloutRequest, Sample, SamplingConfig
from runtime.weights.inprocess import InProcessChannel
from tests.support.engine_state import lend, weights_of


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def cfg(tiny_policy_dir):
    return build_config(
        {
            "model": {"policy": str(tiny_policy_dir)},
            "prompt": {"preset": "compact"},  # the tiny policy's short prompts
            "rollout": {"engine": "hf"},
            "data": {"image_size": 56},
        }
    )


@pytest.fixture(scope="module")
def _shared_worker(cfg) -> tuple[RolloutWorker, list]:
    built = RolloutWorker(cfg.policy_spec(), cfg.rollout, name="rollout-test")
    return built, weights_of(built.engine.model)


@pytest.fixture
def worker(_shared_worker) -> RolloutWorker:
    """The module's worker at version 0 with its initial weights, whatever the tests before did to it."""
    built, initial = _shared_worker
    yield from lend(built, initial, built.engine.model)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _sample(i: int, size: tuple[int, int] = (90, 70)) -> Sample:
    rng = np.random.default_rng(i)
    h, w = size
    return Sample(
        id=f"s-{i}",
        source="synthetic",
        split="train",
        task="foreground",
        instruction="Identify and segment all the primary objects in the image.",
        image=_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
        mask=_png((rng.random((h, w)) > 0.5).astype(np.uint8)),
        width=w,
        height=h,
    )


def _request(sample: Sample, min_version: int = 0, g: int = 3) -> RolloutRequest:
    return RolloutRequest(
        request_id=f"req-{sample.id}",
        sample_id=sample.id,
        instruction=sample.instruction,
        group_size=g,
        sampling=SamplingConfig(temperature=1.0, max_tokens=8, seed=1),
        min_policy_version=min_version,
    )


def test_each_request_is_counted_under_its_purpose(worker):
    """A validation request (purpose "val") beside a training one: each group carries its request's purpose and
    the throughput counters count each under it (the dashboard's training panels read purpose="train")."""
    samples = [_sample(3), _sample(4)]
    requests = [_request(samples[0]), _request(samples[1]).model_copy(update={"purpose": "val"})]
    before = {p: M.GROUPS.value(worker="rollout-test", purpose=p) for p in ("train", "val")}
    tokens = {p: M.TOKENS.value(worker="rollout-test", purpose=p) for p in ("train", "val")}
    groups = worker.generate(requests, *samples)
    assert [g.purpose for g in groups] == ["train", "val"]
    for p, g in zip(("train", "val"), groups, strict=True):
        assert M.GROUPS.value(worker="rollout-test", purpose=p) - before[p] == 1
        generated = sum(len(c.token_ids) for c in g.completions)
        assert M.TOKENS.value(worker="rollout-test", purpose=p) - tokens[p] == generated


def test_generate_stamps_groups(worker):
    samples = [_sample(0), _sample(1, size=(40, 120))]
    tokens_before = M.TOKENS.value(worker="rollout-test", purpose="train")
    groups = worker.generate([_request(s) for s in samples], *samples)
    assert [g.group_id for g in groups] == ["req-s-0", "req-s-1"]
    assert [g.sample_id for g in groups] == ["s-0", "s-1"]
    for g in groups:
        assert g.worker == "rollout-test" and g.policy_version == worker.policy_version == 0
        assert g.group_size == 3 and g.prompt_tokens > 4 and g.generate_s > 0
    generated = sum(len(c.token_ids) for g in groups for c in g.completions)
    assert M.TOKENS.value(worker="rollout-test", purpose="train") - tokens_before == generated
    assert M.REQUESTS_IN_FLIGHT.value(worker="rollout-test") == 0
    assert M.POLICY_VERSION.value(worker="rollout-test") == 0
    assert M.GENERATE_SECONDS.value(worker="rollout-test") >= 1
    assert worker.ping()["policy_version"] == 0 and worker.ping()["engine"] == "HFEngine"


def test_request_for_newer_weights_is_refused_until_resynced(worker):
    s = _sample(2)
    stale_before = M.STALE_REQUESTS.value(worker="rollout-test")
    needed = worker.policy_version + 1
    with pytest.raises(StaleWeightsError, match="holds policy version") as err:
        worker.generate([_request(s, min_version=needed)], s)
    assert err.value.needed == needed and err.value.held == needed - 1
    assert M.STALE_REQUESTS.value(worker="rollout-test") == stale_before + 1
    # The pool's repair: push the current weights, then retry.
    named = [(n, p.detach().clone()) for n, p in worker.engine.model.named_parameters()]
    assert worker.load_weights(named, needed) == needed
    groups = worker.generate([_request(s, min_version=needed)], s)
    assert groups[0].policy_version == needed
    assert M.POLICY_VERSION.value(worker="rollout-test") == needed


def test_stale_error_survives_pickling():
    err = pickle.loads(pickle.dumps(StaleWeightsError("rollout-3", 4, 7)))
    assert isinstance(err, StaleWeightsError) and (err.worker, err.held, err.needed) == ("rollout-3", 4, 7)


def test_mismatched_samples_are_rejected(worker):
    a, b = _sample(3), _sample(4)
    with pytest.raises(ValueError, match="requests but 1 samples"):
        worker.generate([_request(a), _request(b)], a)
    with pytest.raises(ValueError, match="same order"):
        worker.generate([_request(a), _request(b)], b, a)


def test_weights_from_the_in_process_channel(worker):
    channel = InProcessChannel(bucket_mb=1)
    receiver = channel.receiver()
    version = worker.policy_version + 1
    g = torch.Generator().manual_seed(0)
    named = [
        (n, p.detach() + 0.01 * torch.randn(p.shape, generator=g))
        for n, p in worker.engine.model.named_parameters()
    ]
    channel.sender().send(named, version)
    assert receive_and_load(receiver, worker) == version
    assert worker.policy_version == version
    params = dict(worker.engine.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in named)
    s = _sample(5)
    assert worker.generate([_request(s)], s)[0].policy_version == version


def test_weights_over_the_gloo_weight_sync_group(worker):
    """The learner's sender (rank 0) and this worker's receiver (rank 1) in two threads of one process."""
    import threading

    from runtime.weights.collective import DistributedWeightSender

    sender = DistributedWeightSender(backend="gloo", bucket_mb=1, timeout_s=60, use_shm=False)
    info = sender.prepare([worker.name])
    joined = {}
    t = threading.Thread(target=lambda: joined.setdefault("rank", worker.weight_sync_join(info)))
    t.start()
    sender.connect()
    t.join(timeout=60)
    assert joined["rank"] == 1
    version = worker.policy_version + 1
    named = [(n, p.detach() * 0.9) for n, p in worker.engine.model.named_parameters()]
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("version", worker.weight_sync_receive()))
    t.start()
    sender.send(named, version)
    t.join(timeout=60)
    sender.close()
    assert got["version"]["version"] == version == worker.policy_version
    params = dict(worker.engine.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in named)


def test_an_abandoned_stream_unlocks_the_engine_which_refuses_until_the_object_store_resends(worker):
    """The learner fails half-way through a version: the worker's engine is waiting for the next bucket under
    the rollout lock. The driver's weight_sync_abort ends that wait at once (not after weight_sync.timeout_s),
    the engine refuses to generate (half its tensors are new), and the driver's resend of the current version
    through the object store (a Mapping) makes it whole again."""
    import threading

    from actors.engine import InconsistentWeightsError
    from runtime.weights.abandon import WeightSyncAborted
    from runtime.weights.collective import DistributedWeightSender
    from runtime.weights.layout import StreamedWeights

    sender = DistributedWeightSender(backend="gloo", bucket_mb=0.01, timeout_s=5, use_shm=False)
    info = sender.prepare([worker.name])
    t = threading.Thread(target=worker.weight_sync_join, args=(info,))
    t.start()
    sender.connect()
    t.join(timeout=60)
    version = worker.policy_version + 1
    named = [(n, p.detach() * 0.8) for n, p in worker.engine.model.named_parameters()]
    failing = threading.Event()

    def gathered():  # the learner's tensors, until it fails half-way (buckets 0 .. i-2 were received by then)
        for k, item in enumerate(named):
            if k == len(named) // 2:
                failing.set()
                raise RuntimeError("learner failed while gathering")
            yield item

    got: dict = {}

    def receive() -> None:
        try:
            got["version"] = worker.weight_sync_receive()
        except BaseException as err:  # handed to the test
            got["error"] = err

    r = threading.Thread(target=receive, daemon=True)
    r.start()
    with pytest.raises(RuntimeError, match="gathering"):
        sender.send(StreamedWeights(named, gathered()), version)
    assert failing.is_set() and worker.engine._consistent is False  # the engine is half-way through its load
    receiver = worker._receiver
    worker.weight_sync_abort(info.generation)
    assert (
        receiver._abort.is_set()
    )  # the load's wait for the next bucket ends now, releasing the rollout lock
    r.join(30)
    assert not r.is_alive() and isinstance(got.get("error"), WeightSyncAborted), got
    s = _sample(6)
    with pytest.raises(InconsistentWeightsError):  # the lock is free: it refuses instead of blocking
        worker.generate([_request(s)], s)
    assert worker.load_weights(dict(named), version) == version  # the object store's resend
    assert worker.generate([_request(s)], s)[0].policy_version == version
    sender.abandon()  # gloo's teardown waits timeout_s for what the abandoned generation left pending
    sender.close()


def test_object_store_versions_as_deltas_and_a_delta_against_another_base_refused(worker, tiny_policy_dir):
    """weight_sync.delta over the object store (Learner.export_weights(base) -> RolloutWorker.load_weights): the
    first export is whole, the next a delta against the version the worker holds; a delta against a version the
    worker does not hold is refused (it answers its old version, weights untouched) and the whole one loads."""
    from learner.learner import Learner
    from runtime.weights.delta import DELTA, RAW, DeltaExport

    spec = build_config(
        {
            "model": {"policy": str(tiny_policy_dir)},
            "grpo": {"beta": 0.0},
            "weight_sync": {"backend": "object-store", "delta": True, "delta_max_changed": 1.0},
        }
    ).learner_spec()
    learner = Learner(spec)
    params = list(learner.policy.hf_model().parameters())

    def version(v: int, base: int | None) -> DeltaExport:
        with torch.no_grad():
            params[0].view(-1)[: 16 * v] += 0.5  # a few values change
        learner.policy_version = v
        return learner.export_weights(base)

    def engine_equals_learner() -> bool:
        return all(torch.equal(a, b) for a, b in zip(worker.engine.model.parameters(), params, strict=True))

    first = version(1, None)
    assert first.base is None and {k for k, _ in first.payloads} == {RAW}
    assert worker.load_weights(first, 1) == 1 and engine_equals_learner()
    second = version(2, 1)
    assert second.base == 1 and DELTA in {k for k, _ in second.payloads}
    assert sum(p.numel() for _, p in second.payloads) < sum(p.numel() for _, p in first.payloads) // 10
    assert worker.load_weights(second, 2) == 2 and engine_equals_learner()
    third = version(3, 2)
    worker._store_delta.version = 1  # as if it missed version 2
    assert worker.load_weights(third, 3) == 2 and not engine_equals_learner()
    assert worker.load_weights(learner.export_weights(None), 3) == 3 and engine_equals_learner()
