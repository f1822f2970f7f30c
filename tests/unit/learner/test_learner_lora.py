"""LoRA in the learner (needs peft; skipped without it): the reference is the base model with the adapter off,
exported and saved weights are merged under the checkpoint names, and a checkpoint restores the adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from cluster.data.synth import generate_samples
from learner.learner import Learner
from tests.support.synthetic import scored_groups

pytest.importorskip("peft")
torch.set_num_threads(2)


def test_lora_step_export_and_checkpoint(tiny_policy_dir, tmp_path):
    from tests.unit.learner.test_learner import make_cfg

    cfg = make_cfg(tiny_policy_dir, lora_rank=4, lr=1e-3)
    learner = Learner(cfg.learner_spec())
    assert learner.policy.reference is None  # the base model (adapter disabled) is the reference
    assert sum(p.numel() for p in learner.params) < 0.1 * sum(
        p.numel() for p in learner.policy.model.parameters()
    )
    samples = list(generate_samples(2, seed=0, size=64))
    groups = scored_groups(learner.policy, samples, group_size=4, seed=1, max_tokens=32)
    loss0 = learner.loss_on(groups, *samples)
    learner.step(groups, *samples)
    assert learner.loss_on(groups, *samples) < loss0
    exported = learner.export_weights()
    with safe_open(str(tiny_policy_dir / "model.safetensors"), "pt") as f:
        assert set(exported) == set(f.keys())
        changed = [n for n in f.keys() if not torch.equal(exported[n], f.get_tensor(n))]
    assert changed and all("proj" in n or "qkv" in n for n in changed)  # only adapted linears moved
    path = learner.save_checkpoint(root=str(tmp_path / "ckpt"))
    resumed = Learner(cfg.learner_spec())
    resumed.load_checkpoint(path)
    again = resumed.export_weights()
    assert all(torch.equal(exported[n], again[n]) for n in exported)
    from runtime.qwen_vl import load_policy

    saved = dict(load_policy(f"{path}/policy").named_parameters())
    live = dict(learner.policy.hf_model().named_parameters())
    assert len(saved) < len(live)  # the saved folder is plain (no lora_A / lora_B), merged
