"""SFT warm-up: mask-derived targets are correct answers (the reward parser reads them back onto the mask) and the
`segr1 sft` command writes a loadable HF folder. That a short SFT run makes the tiny policy answer in a format
the parser accepts (greedy) is checked on the SFT warm-up the end-to-end runs start from (tests/e2e/test_train.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.cli import main as cli_main
from cluster.config import TrainConfig
from cluster.data.synth import generate_samples
from learner.sft import mask_in_policy_space, sft_target
from reward_service.parser import parse_answer

torch.set_num_threads(2)
SIZE = 56  # the policy's NxN image (4 image tokens): keeps the test fast


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_policy_dir, synthetic_data):
    root = tmp_path_factory.mktemp("sft")
    cfg = TrainConfig.model_validate(
        {
            "model": {"policy": str(tiny_policy_dir)},
            "prompt": {"preset": "compact"},  # the tiny policy's short prompts
            "data": {"train": str(synthetic_data), "image_size": SIZE},
            "learner": {"micro_batch_size": 8},
            "metrics": {"run_dir": str(root / "run")},
        }
    )
    return root, cfg


@pytest.mark.parametrize("fmt", ["full", "points"])
def test_targets_parse_and_lie_on_the_mask(fmt):
    for sample in generate_samples(6, seed=3, size=64):
        t = sft_target(sample, SIZE, fmt, n_fg=3, n_bg=2)
        parsed = parse_answer(t.text, 64, 64, policy_image_size=SIZE, answer_format=fmt)
        assert parsed.ok, (t.text, parsed.failure, parsed.detail)
        mask = mask_in_policy_space(sample, SIZE)  # (N, N)
        for (x, y), label in zip(t.points, t.labels, strict=True):
            assert mask[y, x] == bool(label)
        if fmt == "full":
            x1, y1, x2, y2 = t.box
            ys, xs = np.nonzero(mask)
            assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert t.text.startswith("<think> ") and "object" in t.text
        else:
            assert "<think>" not in t.text and "<bbox>" not in t.text


def test_targets_are_deterministic():
    s = next(generate_samples(1, seed=4, size=64))
    assert sft_target(s, SIZE, seed=1) == sft_target(s, SIZE, seed=1)


def test_sft_command_writes_a_loadable_policy_folder(setup, capsys):
    root, cfg = setup
    out = root / "cli-out"
    code = cli_main(
        ["sft", "model.policy=" + cfg.model.policy, "data.train=" + cfg.data.train, f"data.image_size={SIZE}",
         "--steps", "2", "--batch-size", "4", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert "policy saved to" in capsys.readouterr().out
    from runtime.qwen_vl import load_policy, load_processor

    assert load_policy(out) is not None and load_processor(out) is not None
    assert cli_main(["sft", "--steps", "0"]) == 2  # a bad argument is a user error, not a traceback
