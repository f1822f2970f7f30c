"""The learner on CUDA (run on the GPU machine: `pytest -m gpu tests/gpu/test_learner_gpu.py`): bf16 autocast with
float32 master weights and gradient checkpointing, also through the FSDP2 code path (a 1-member NCCL group);
weight broadcast through CUDA IPC between processes sharing one GPU. Tiny Qwen2.5-VL built offline; needs no Ray."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.config import TrainConfig
from cluster.data.synth import generate_samples
from cluster.dev.tiny_models import build_tiny_policy
from learner.learner import Learner
from tests.support.synthetic import scored_groups

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


def _sharded_step(policy_dir: str, batch, port: int, out_q) -> None:
    """A 1-member NCCL group through the sharded code path (FSDP2 fully_shard, bf16 MixedPrecisionPolicy, fp32
    masters), in its own process so the default process group does not outlive it."""
    samples, groups = batch
    cfg = _cfg(policy_dir, gradient_checkpointing=True)
    learner = Learner(cfg.learner_spec(), rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    sharded = all(hasattr(p, "full_tensor") for p in learner.params)
    masters = {p.dtype for p in learner.params}
    before = dict(learner.export_weights())
    stats = learner.step(groups, *samples)
    after = learner.export_weights()
    moved = sum(not torch.equal(after[n], before[n]) for n in before)
    path = learner.save_checkpoint(root=str(Path(policy_dir).parent / "ckpt-sharded"))
    save_file({k: v.cpu().contiguous() for k, v in after.items()}, f"{path}/exported.safetensors")
    out_q.put((sharded, masters, stats.loss, stats.grad_norm, moved, len(before), path))  # no tensors: the
    # queue would pass them by file descriptors of this process, which ends first


def test_one_rank_bf16_step_with_checkpointing_through_the_fsdp2_path(policy_dir, batch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_sharded_step, args=(str(policy_dir), batch, port, q))
    p.start()
    sharded, masters, loss, grad_norm, moved, n, path = q.get(timeout=600)
    after = load_file(f"{path}/exported.safetensors")
    p.join(timeout=60)
    assert sharded and masters == {torch.float32}  # DTensor parameters, fp32 master weights
    assert torch.isfinite(torch.tensor(loss)) and grad_norm > 0 and moved == n
    assert all(t.dtype == torch.bfloat16 for t in after.values() if t.is_floating_point())
    plain = Learner(_cfg(policy_dir).learner_spec())  # the checkpoint loads into an unsharded learner
    plain.load_checkpoint(path)
    again = plain.export_weights()
    assert all(torch.equal(again[k], after[k].to(again[k].device)) for k in after)


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
