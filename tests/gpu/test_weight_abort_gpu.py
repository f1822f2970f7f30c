"""An abandoned NCCL weight-sync generation frees the learner's CUDA stream (runtime/weights/abandon.py; run on a
machine with two GPUs: `pytest -m gpu tests/gpu/test_weight_abort_gpu.py`).

The learner (this process, cuda:0) and a member (its own process, cuda:1) form an NCCL group and move one version.
Then the member stops answering (SIGSTOP: its node is lost, nobody closes its connections) while the learner has
broadcasts in flight: on NCCL `work.wait()` makes the learner's stream wait for them, so a kernel queued after
them cannot run. Abandoning the generation aborts the communicator (ncclCommAbort): that kernel completes, and a
new generation with a fresh member carries the next version bit-identically. NCCL refuses two ranks of one
communicator on one GPU ("Duplicate GPU detected"), so with one GPU the test is skipped."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from runtime.weights.abandon import Abandonable
from runtime.weights.collective import DistributedWeightSender
from runtime.weights.wire import broadcast
from tests.support.weight_member import digests, replies, spawn_member

pytestmark = pytest.mark.gpu

DEADLINE_S = 120.0  # bounds a failure (a stream that stays blocked); the group's own timeout is longer


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"layer{i}.weight", torch.randn(256, 128, generator=g).cuda()) for i in range(4)]


def _form(learner_side: Abandonable, sender: DistributedWeightSender, conn, generation: int) -> None:
    info = sender.prepare(["rollout-0"])
    assert info.generation == generation
    conn.send(("join", info.to_dict()))
    learner_side.run(generation, sender.connect, "forming")
    assert replies(conn, 1)["joined"][1] == 1


def _send(learner_side: Abandonable, sender: DistributedWeightSender, conn, generation: int, version: int):
    conn.send(("receive", None))
    learner_side.run(generation, lambda: sender.send(_weights(version), version), "broadcasting")
    assert replies(conn, 1)["received"][1:] == (version, digests(_weights(version)))


@pytest.mark.skipif(
    _gpus() < 2,
    reason="NCCL refuses two ranks of one communicator on one GPU (Duplicate GPU detected): needs 2 GPUs",
)
def test_an_abandoned_nccl_generation_is_aborted_and_frees_the_learners_stream():
    torch.cuda.set_device(0)
    sender = DistributedWeightSender(backend="nccl", host="127.0.0.1", bucket_mb=0.1, timeout_s=600)
    learner_side = Abandonable()
    lost, to_lost = spawn_member("rollout-0", cuda_device=1)
    fresh = None
    try:
        _form(learner_side, sender, to_lost, 1)
        _send(learner_side, sender, to_lost, 1, 1)  # the communicator is up and works

        to_lost.send(("receive", None))  # the member waits for the next header...
        os.kill(lost.pid, signal.SIGSTOP)  # ...and its node is lost
        pg = sender.group.require()
        # a header as send_header starts one: its length, then its bytes, which the member cannot have posted
        # (it posts them once it read the length, and its CPU stopped before the length was sent)
        length = torch.tensor([4096], dtype=torch.int64, device="cuda")
        stuck = [broadcast(pg, length), broadcast(pg, torch.zeros(4096, dtype=torch.uint8, device="cuda"))]
        for work in stuck:
            work.wait()  # NCCL: the current stream waits for the broadcast; the CPU goes on
        x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
        y = x * 2  # queued behind broadcasts the lost member never posted
        done = torch.cuda.Event()
        done.record()
        assert not done.query()  # the stream is held by the stuck collectives

        waiter = threading.Thread(target=done.synchronize, daemon=True)
        waiter.start()
        learner_side.abandon(1)  # Learner.weight_sync_abort: the generation's communicator is aborted
        sender.abandon()
        assert (learner_side.aborted, learner_side.unabortable) == (1, 0)
        waiter.join(DEADLINE_S)
        assert not waiter.is_alive(), f"the learner's stream still waits {DEADLINE_S:.0f} s after the abort"
        assert torch.equal(y, torch.arange(1 << 20, device="cuda", dtype=torch.float32) * 2)

        fresh, to_fresh = spawn_member("rollout-0", cuda_device=1)  # generation 2: the live members only
        _form(learner_side, sender, to_fresh, 2)
        _send(learner_side, sender, to_fresh, 2, 2)
        to_fresh.send(("stop", None))
    finally:
        lost.kill()
        if fresh is not None:
            fresh.join(30)
        sender.close()
