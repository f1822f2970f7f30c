"""The learner on CUDA (run on the GPU machine: `pytest -m gpu tests/gpu/test_learner_gpu.py`): bf16 autocast with
float32 master weights and gradient checkpointing; weight broadcast through CUDA IPC between processes sharing one
GPU. Tiny Qwen2.5-VL built offline; needs no Ray."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from cluster.config import TrainConfig
from cluster.data.synth import generate_samples
from cluster.tiny_models import build_tiny_policy
from learner.learner import Learner
from learner.synthetic import scored_groups

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    # the demo preset (~2M parameters, 4 layers), not the session's test-preset tiny_policy_dir
    return build_tiny_policy(tmp_path_factory.mktemp("models") / "policy", seed=0, preset="demo")


def _cfg(policy_dir, **learner) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": {"policy": str(policy_dir)},
            "prompt": {"preset": "compact"},  # the tiny policy's short prompts
            "data": {"image_size": 112},
            "rollout": {"sampling": {"max_tokens": 48}},
            "grpo": {"group_size": 4, "beta": 0.04},
            "learner": {"lr": 1e-4, "micro_batch_size": 4, "num_gpus": 1, "precision": "bf16", **learner},
        }
    )


@pytest.fixture(scope="module")
def batch(policy_dir):
    samples = list(generate_samples(2, seed=0, size=128))
    learner = Learner(_cfg(policy_dir).learner_spec())
    return samples, scored_groups(learner.policy, samples, group_size=4, seed=1, max_tokens=40)


def test_bf16_autocast_step_keeps_fp32_master_weights_and_learns(policy_dir, batch):
    samples, groups = batch
    learner = Learner(_cfg(policy_dir, gradient_checkpointing=True).learner_spec())
    assert learner.policy.device.type == "cuda" and learner.policy.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in learner.params)
    assert (
        learner.policy.reference is not None
        and next(learner.policy.reference.parameters()).dtype == torch.bfloat16
    )
    before = {n: p.detach().clone() for n, p in learner.policy.model.named_parameters()}
    loss0 = learner.loss_on(groups, *samples)
    stats = learner.step(groups, *samples)
    assert torch.isfinite(torch.tensor(stats.loss)) and stats.grad_norm > 0
    assert all(not torch.equal(p, before[n]) for n, p in learner.policy.model.named_parameters())
    assert learner.loss_on(groups, *samples) < loss0
    exported = learner.named_weights()
    assert all(
        t.dtype == torch.bfloat16 for _, t in exported if t.is_floating_point()
    )  # model.dtype auto on GPU


def test_gradient_checkpointing_gives_the_same_gradients(policy_dir, batch):
    samples, groups = batch
    grads = []
    for ckpt in (False, True):
        learner = Learner(_cfg(policy_dir, gradient_checkpointing=ckpt, precision="fp32").learner_spec())
        learner._accumulate(groups, samples, backward=True)
        grads.append({n: p.grad.detach().clone() for n, p in learner.policy.model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-3, atol=1e-6), name


def _ipc_receiver(name: str, info_q, out_q) -> None:
    import hashlib

    from runtime.weights.collective import DistributedWeightReceiver

    r = DistributedWeightReceiver(name, device="cuda")
    r.join(info_q.get())
    version, named = r.receive()
    digests = {
        n: hashlib.sha256(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, t in named
    }
    out_q.put((name, version, digests))


def test_cuda_ipc_broadcast_bit_identical_between_processes_on_one_gpu():
    import hashlib

    from runtime.weights.cuda_ipc import CudaIpcSender

    g = torch.Generator().manual_seed(0)
    named = [(f"w{i}", torch.randn(256, 128, generator=g).to(torch.bfloat16).cuda()) for i in range(8)]
    named.append(("b", torch.randn(7, generator=g).cuda()))
    want = {
        n: hashlib.sha256(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for n, t in named
    }
    ctx = mp.get_context("spawn")
    out_q, queues, procs = ctx.Queue(), [], []
    for k in range(2):
        q = ctx.Queue()
        p = ctx.Process(target=_ipc_receiver, args=(f"rollout-{k}", q, out_q), daemon=True)
        p.start()
        queues.append(q)
        procs.append(p)
    sender = CudaIpcSender(bucket_mb=0.1, timeout_s=120)
    info = sender.prepare(["rollout-0", "rollout-1"])
    for q in queues:
        q.put(info)
    sender.connect()
    stats = sender.send(named, 7)
    assert stats.buckets > 1
    for _ in range(2):
        name, version, digests = out_q.get(timeout=120)
        assert version == 7 and digests == want, name
    sender.close()
    for p in procs:
        p.join(timeout=30)
