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


def test_two_turn_examples_shift_the_first_answer_and_stop_only_on_a_right_mask():
    from learner.sft_turns import STOP_IOU, refine_example
    from reward_service.parser import parse_answer

    kinds = set()
    for sample in generate_samples(24, seed=5, size=64):
        t = sft_target(sample, SIZE, "full", n_fg=2, n_bg=1)
        ex = refine_example(sample, t, SIZE, "full", seed=0)
        assert ex == refine_example(sample, t, SIZE, "full", seed=0)  # deterministic per sample
        assert ex.picture.size == (SIZE, SIZE)  # what the policy is shown: NxN like every image it sees
        first = parse_answer(ex.first, 64, 64, policy_image_size=SIZE)
        second = parse_answer(ex.second, 64, 64, policy_image_size=SIZE, allow_stop=True)
        assert second.ok, (ex.second, second.failure)
        if ex.iou >= STOP_IOU:
            assert second.stop and not second.prompts
        else:
            assert ex.second == t.text and first.prompts[0].box != second.prompts[0].box
        kinds.add(second.stop)
    assert kinds == {True, False}  # both lessons occur


def test_two_turn_sft_rows_hold_both_pictures_and_train_the_second_answer_only(setup):
    from cluster.data.reader import DatasetReader
    from learner.sft import SftTrainer
    from runtime.turns import IMAGE_PAD

    _, cfg = setup
    samples = DatasetReader.from_config(cfg).next_batch(6)
    trainer = SftTrainer(cfg.policy_spec(), cfg.learner, turns=2, refine_share=0.5, total_steps=2)
    kept, targets = trainer.targets(samples)
    prompts, answers = trainer._two_turn_prompts(kept, targets)
    counts = prompts["images_per_row"].tolist()
    assert set(counts) == {1, 2}  # one- and two-turn examples in one batch
    pad = trainer.policy.processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    one_turn = trainer.policy.prompt_ids(kept)
    for r, ids in enumerate(prompts["input_ids"].tolist()):
        ids = [i for i, m in zip(ids, prompts["attention_mask"][r].tolist(), strict=True) if m]
        if counts[r] == 1:
            assert ids == one_turn[r] and answers[r] == trainer._ids(targets[r].text)
        else:  # the first turn's prompt, then (its shifted answer, the refine turn with the picture)
            assert ids[: len(one_turn[r])] == one_turn[r] and ids.count(pad) > one_turn[r].count(pad)
    losses = [trainer.step(samples) for _ in range(2)]
    assert all(np.isfinite(losses)) and trainer.step_count == 2
