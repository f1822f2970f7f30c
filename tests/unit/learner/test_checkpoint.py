"""Checkpoints: atomic, keep-K, plain HF policy folder, optimiser state by parameter name (DCP) and the older
pickle-free format, RNG state as JSON, and exact resume (same next batch, same next loss, same weights) with the
tiny policy and the real data reader."""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cluster.config import TrainConfig
from cluster.data.reader import DatasetReader
from learner.checkpoint import (
    CheckpointError,
    best_checkpoint,
    latest_checkpoint,
    load_optimizer,
    load_optimizer_state,
    mark_best,
    read_best,
    read_state,
    rng_state,
    save_checkpoint,
    save_optimizer,
    save_optimizer_state,
    set_rng_state,
    step_dirs,
    supersede_after,
)
from learner.learner import Learner
from tests.support.checkpoints import empty_optimizer, empty_policy
from tests.support.synthetic import scored_groups

torch.set_num_threads(2)


def test_rng_state_round_trips_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.9))
    for _ in range(2):
        p.grad = torch.randn(3, 2)
        opt.step()
    save_optimizer(opt, tmp_path)
    assert {f.name for f in tmp_path.iterdir()} == {"optimizer.safetensors", "optimizer.json"}
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=0.5)
    load_optimizer(opt2, tmp_path)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(s1["state"][0][key], s2["state"][0][key])


def _trained(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    return model, opt


def test_dcp_optimizer_state_by_parameter_name_and_the_old_format_still_read(tmp_path):
    model, opt = _trained(0)
    save_optimizer_state(model, opt, tmp_path)  # no process group: DCP in one process
    assert (tmp_path / "optimizer" / ".metadata").is_file()
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    fresh.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.5)  # no state yet: allocated, then filled
    load_optimizer_state(fresh, opt2, tmp_path)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 0.1
    for pid in s1["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1["state"][pid][key], s2["state"][pid][key]), (pid, key)
    old = tmp_path / "old"
    old.mkdir()
    save_optimizer(opt, old)  # a checkpoint from before the sharded learner
    opt3 = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    load_optimizer_state(fresh, opt3, old)
    assert torch.equal(opt3.state_dict()["state"][0]["exp_avg"], s1["state"][0]["exp_avg"])
    with pytest.raises(CheckpointError, match="learner.world_size=1"):
        load_optimizer_state(fresh, opt3, old, world_size=2)


def test_keep_k_atomic_and_crash_leftovers(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"policy_version": step}, empty_policy, empty_optimizer, keep=2)
    assert [s for s, _ in step_dirs(tmp_path)] == [2, 3]
    assert read_state(latest_checkpoint(tmp_path))["policy_version"] == 3

    def crash(folder):
        folder.mkdir()
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 4, {}, crash, empty_optimizer, keep=2)
    assert [s for s, _ in step_dirs(tmp_path)] == [2, 3]  # no half-written step-4
    assert not list(tmp_path.glob(".tmp-*"))


def test_read_state_names_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(Exception, match="state.json"):
        read_state(tmp_path)


# A checkpoint writer in its own process, with the real writers (safetensors, DCP): "full" lets its files grow to
# 1 MB only (RLIMIT_FSIZE, SIGXFSZ ignored: a write past it fails with EFBIG, as on a full disk), "kill" SIGKILLs
# it in the middle of writing step 2.
_WRITER = """
import json, os, resource, signal, sys
import torch
from safetensors.torch import load_file
from safetensors.torch import save_file
from learner.checkpoint import CheckpointError, save_checkpoint, save_optimizer_state

root, how = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Linear(256, 256)
opt = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 256)).sum().backward()
opt.step()

def policy(folder):
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": model.weight.detach().repeat(8, 1).contiguous()}, str(folder / "model.safetensors"))  # 2 MB
    if how == "kill" and folder.parent.name.startswith(".tmp-step-000002"):
        os.kill(os.getpid(), signal.SIGKILL)

save_checkpoint(root, 1, {"policy_version": 1}, policy, lambda folder: save_optimizer_state(model, opt, folder))
if how == "full":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    save_checkpoint(root, 2, {"policy_version": 2}, policy, lambda folder: save_optimizer_state(model, opt, folder))
except CheckpointError as err:
    print(json.dumps({"error": str(err)}))
"""


def _writer(root, how: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WRITER, str(root), how], capture_output=True, text=True, timeout=300
    )


def test_a_write_that_finds_no_space_keeps_the_previous_checkpoint_and_says_why(tmp_path):
    out = _writer(tmp_path, "full")
    assert out.returncode == 0, out.stderr
    message = json.loads(out.stdout)["error"]
    assert f"checkpoint {tmp_path / 'step-000002'} was not written" in message, message
    assert "File too large (os error 27)" in message, message  # what safetensors said, errno found in it
    assert f"the newest complete checkpoint is still {tmp_path / 'step-000001'}" in message, message
    assert f"free space under {tmp_path}" in message and "--resume" in message, message
    assert _steps(tmp_path) == [1] and not list(tmp_path.glob(".tmp-*"))
    # the previous checkpoint still loads: state, weights, optimiser state
    folder = latest_checkpoint(tmp_path)
    assert read_state(folder)["policy_version"] == 1
    assert load_file(str(folder / "policy" / "model.safetensors"))["w"].shape == (2048, 256)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    load_optimizer_state(model, opt, folder)
    assert opt.state_dict()["state"][0]["step"] == 1


def test_a_writer_killed_mid_write_leaves_only_a_hidden_folder_and_resume_takes_the_previous(tmp_path):
    out = _writer(tmp_path, "kill")
    assert out.returncode == -signal.SIGKILL, out.stderr
    assert _steps(tmp_path) == [1] and len(list(tmp_path.glob(".tmp-step-000002-*"))) == 1
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    save_checkpoint(tmp_path, 2, {}, empty_policy, empty_optimizer)  # the next save clears the leftover
    assert _steps(tmp_path) == [1, 2] and not list(tmp_path.glob(".tmp-*"))


def test_resume_skips_a_step_folder_that_is_not_complete_and_names_what_it_lacks(tmp_path, caplog):
    save_checkpoint(tmp_path, 1, {"policy_version": 1}, empty_policy, empty_optimizer)
    partial = tmp_path / "step-000002"  # a copy cut short
    shutil.copytree(tmp_path / "step-000001", partial)
    (partial / "optimizer.json").unlink()
    with caplog.at_level(logging.WARNING, logger="learner.checkpoint"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-000001"
    assert "step-000002, not a complete checkpoint: no optimiser state" in caplog.text
    with pytest.raises(
        CheckpointError, match=r"step-000002 is not a complete checkpoint: no optimiser state"
    ):
        read_state(partial)
    state = json.loads((partial / "state.json").read_text())
    (partial / "state.json").write_text(json.dumps({**state, "format_version": 0}))
    with pytest.raises(CheckpointError, match=r"state.json is format 0, not 1 \(written by another version"):
        read_state(partial)
    save_checkpoint(tmp_path, 3, {}, empty_policy, empty_optimizer, keep=1)  # keep counts complete ones only
    assert _steps(tmp_path) == [2, 3]  # step 1 pruned; the partial step 2 neither counted nor deleted


def _steps(root) -> list[int]:
    return [s for s, _ in step_dirs(root)]


def test_best_checkpoint_and_protected_steps_survive_pruning(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, {}, empty_policy, empty_optimizer, keep=1)
    assert _steps(tmp_path) == [2]
    mark_best(tmp_path, 2, "val/mean_iou", 0.5)
    save_checkpoint(tmp_path, 3, {}, empty_policy, empty_optimizer, keep=1)
    save_checkpoint(tmp_path, 4, {}, empty_policy, empty_optimizer, keep=1)  # 3 goes, the best (2) stays
    save_checkpoint(
        tmp_path, 5, {}, empty_policy, empty_optimizer, keep=1, protect={4}
    )  # 4 is still being validated
    assert _steps(tmp_path) == [2, 4, 5]
    save_checkpoint(
        tmp_path, 6, {}, empty_policy, empty_optimizer, keep=1
    )  # 4's validation is in and was not better
    assert _steps(tmp_path) == [2, 6]
    assert read_best(tmp_path) == {"step": 2, "path": "step-000002", "metric": "val/mean_iou", "value": 0.5}
    assert best_checkpoint(tmp_path) == tmp_path / "step-000002"
    mark_best(tmp_path, 6, "val/mean_iou", 0.7)
    save_checkpoint(tmp_path, 7, {}, empty_policy, empty_optimizer, keep=1)
    assert _steps(tmp_path) == [6, 7]  # the old best is an ordinary old checkpoint again


def test_mark_best_names_a_missing_step_and_supersede_moves_later_steps(tmp_path):
    assert read_best(tmp_path) is None and best_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="step-000003"):
        mark_best(tmp_path, 3, "val/mean_iou", 0.1)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {}, empty_policy, empty_optimizer, keep=3)
    moved = supersede_after(tmp_path, 1)
    assert _steps(tmp_path) == [1]
    assert sorted(p.name[:11] for p in moved) == ["step-000002", "step-000003"]
    assert all(p.parent == tmp_path / "superseded" and (p / "state.json").is_file() for p in moved)


# ------------------------------------------------------------------------------------------------------------
# Exact resume with the tiny policy


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_policy_dir, synthetic_data):
    root = tmp_path_factory.mktemp("resume")
    cfg = TrainConfig.model_validate(
        {
            "model": {"policy": str(tiny_policy_dir)},
            "prompt": {"preset": "compact"},  # the tiny policy's short prompts
            "data": {"train": str(synthetic_data), "image_size": 56},
            "rollout": {"sampling": {"max_tokens": 32}},
            "grpo": {"group_size": 4, "beta": 0.04, "steps": 3},
            "learner": {"lr": 1e-4, "micro_batch_size": 4, "warmup_steps": 2, "schedule": "cosine"},
            "checkpoint": {"dir": str(root / "ckpt"), "keep": 1},
        }
    )
    return cfg


def _train(learner: Learner, reader: DatasetReader, steps: int) -> list:
    out = []
    for _ in range(steps):
        samples = reader.next_batch(2)
        groups = scored_groups(learner.policy, samples, 4, seed=learner.step_count, max_tokens=24)
        next_loss = learner.loss_on(groups, *samples)
        stats = learner.step(groups, *samples)
        out.append(([s.id for s in samples], next_loss, stats.loss))
    return out


def test_resume_gives_the_same_next_batch_loss_and_weights(setup):
    cfg = setup
    full = Learner(cfg.learner_spec())
    reference = _train(full, DatasetReader.from_config(cfg), 3)
    torch.manual_seed(123)  # the RNG state at the moment of the step-2 save, replayed below
    marker = torch.rand(3)

    first = Learner(cfg.learner_spec())
    reader = DatasetReader.from_config(cfg)
    assert _train(first, reader, 2) == reference[:2]
    torch.manual_seed(123)
    path = first.save_checkpoint(data_cursor=reader.state_dict())
    del first
    partial = Path(path).with_name("step-000003")  # a copy cut short: skipped, then moved aside by the resume
    shutil.copytree(f"{path}/policy", partial / "policy")

    resumed = Learner(cfg.learner_spec())
    state = resumed.load_checkpoint()  # newest complete one under checkpoint.dir
    assert str(latest_checkpoint(cfg.checkpoint.dir)) == path
    assert not partial.exists() and [p.name[:11] for p in partial.parent.glob("superseded/*")] == [
        "step-000003"
    ]
    assert torch.equal(torch.rand(3), marker)  # RNG states restored
    assert (resumed.step_count, resumed.policy_version) == (2, 2)
    reader2 = DatasetReader.from_config(cfg)
    reader2.load_state_dict(state["data_cursor"])
    third = _train(resumed, reader2, 1)[0]
    assert third[0] == reference[2][0]  # same next batch
    assert third[1] == reference[2][1] and third[2] == reference[2][2]  # same next loss
    for (n, a), (_, b) in zip(
        full.policy.model.named_parameters(), resumed.policy.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), n


def test_checkpoint_policy_is_a_plain_hf_folder(setup):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from runtime.qwen_vl import load_policy, load_processor

    cfg = setup
    learner = Learner(
        cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"keep": 3})}).learner_spec()
    )
    path = learner.save_checkpoint(data_cursor=None)
    folder = f"{path}/policy"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    assert load_processor(folder).tokenizer is not None
    live = dict(learner.policy.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, live[name]), name
    assert load_policy(folder) is not None


def test_resume_from_the_best_checkpoint(setup, tmp_path):
    """checkpoint.resume_from=best: the learner loads the step best.json names (weights, step, version), later
    step-* folders move to superseded/, and the state carries best.json for the driver."""
    cfg = setup.model_copy(update={"checkpoint": setup.checkpoint.model_copy(update={"dir": str(tmp_path)})})
    first = Learner(cfg.learner_spec())
    reader = DatasetReader.from_config(cfg)
    _train(first, reader, 1)
    first.save_checkpoint(data_cursor=reader.state_dict())
    weights = {n: p.detach().clone() for n, p in first.policy.model.named_parameters()}
    first.mark_best(1, "val/mean_iou", 0.25)
    _train(first, reader, 1)
    first.save_checkpoint(data_cursor=reader.state_dict())  # keep=1: step 1 survives as the best
    assert _steps(tmp_path) == [1, 2]
    del first

    resumed = Learner(cfg.learner_spec())
    state = resumed.load_checkpoint("best")
    assert (resumed.step_count, resumed.policy_version) == (1, 1)
    assert state["best"] == {"step": 1, "path": "step-000001", "metric": "val/mean_iou", "value": 0.25}
    assert _steps(tmp_path) == [1] and len(list((tmp_path / "superseded").iterdir())) == 1
    for n, p in resumed.policy.model.named_parameters():
        assert torch.equal(p, weights[n]), n
