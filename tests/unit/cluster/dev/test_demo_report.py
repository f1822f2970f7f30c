"""cluster/dev/report.py: the demo's closing summary (figures, the bar against the constant box, where the outputs
are) and the RL phase's line read from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.dev.report import PHASES, StepProgress, beats_constant_box, phase, summary_lines


def _result(after_iou: float = 0.524) -> dict:
    """run_demo's result as eval.json holds it (seed 0's figures of the README)."""
    figures = {"s_measure": 0.61, "box_iou": 0.24, "n": 128, "missing": 0}
    return {
        "seed": 0,
        "before_rl": {"mean_iou": 0.3148, "parse_rate": 1.0, **figures},
        "after_rl": {"mean_iou": after_iou, "parse_rate": 0.984, **figures},
        "constant_baseline": {
            "mean_iou": 0.3963,
            "whole_image": {"mean_iou": 0.3417, "missing": 0},
            "centre": {"mean_iou": 0.3963, "missing": 0},
        },
        "improvement_mean_iou": after_iou - 0.3148,
        "train_summary": {"steps": 60, "groups_generated": 480, "groups_trained": 480, "groups_lost": 0},
        "wall_s": 645.0,
    }


def test_summary_names_the_figures_the_bar_and_the_outputs():
    out = Path("runs/demo")
    lines = summary_lines(_result(), out)
    assert lines == [
        "Seg-R1 demo (seed 0) finished in 10.8 min",
        "  mean IoU on 128 held-out images: 0.315 before RL -> 0.524 after (+0.209)",
        "  best constant box (centre): 0.396, the demo's bar: after RL is above it",
        "  parse rate: 1.00 before, 0.98 after; GRPO: 60 steps, 480 of 480 groups trained, 0 lost",
        "  pictures:    runs/demo/grid_before_rl.png, grid_after_rl.png, reward_curve.png",
        "  metrics:     runs/demo/metrics.jsonl (per step), eval.json (these figures), summary.json (the job)",
        "  TensorBoard: tensorboard --logdir runs/demo",
    ]
    assert all(len(line) <= 120 for line in lines)  # a terminal's width, no JSON


def test_summary_says_when_rl_does_not_beat_the_constant_box():
    result = _result(after_iou=0.35)
    assert not beats_constant_box(result)
    assert "after RL is NOT above it" in summary_lines(result, Path("runs/demo"))[2]
    assert beats_constant_box(_result())


def test_summary_of_a_run_without_parsed_figures():
    result = _result()
    result["after_rl"] = {"mean_iou": None, "parse_rate": None, "n": 128}
    lines = summary_lines(result, Path("out"))
    assert "0.315 before RL -> 0.000 after" in lines[1] and "1.00 before, n/a after" in lines[3]


def test_summary_of_a_run_that_looks_again_gives_turn_one_and_the_last():
    result = _result()
    result["before_rl"]["refinement"] = {
        "turns": 2,
        "turns_mean": 1.9,
        "stop_rate": 0.0,
        "turn1_mean_iou": 0.3,
    }
    result["after_rl"]["refinement"] = {
        "turns": 2,
        "turns_mean": 1.5,
        "stop_rate": 0.5,
        "turn1_mean_iou": 0.5,
    }
    lines = summary_lines(result, Path("runs/demo-2turn"))
    assert lines[4] == (
        "  turn 1 -> last (up to 2 turns): 0.300 -> 0.315 before RL, 0.500 -> 0.524 after; 1.50 turns a sample, "
        "0.50 stop"
    )
    assert len(lines) == len(summary_lines(_result(), Path("runs/demo"))) + 1 and len(lines[4]) <= 120


def test_phase_labels():
    assert PHASES == 6 and phase(4, "RL (GRPO sync)") == "[4/6] RL (GRPO sync)"


def test_step_progress_follows_metrics_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    with StepProgress(metrics, steps=60, desc=phase(4, "RL"), every_s=60.0) as progress:
        progress.poll()  # no file yet: the job has not started
        assert progress.bar.n == 0
        with metrics.open("w") as f:
            f.write(json.dumps({"step": 1, "reward_total": 0.5}) + "\n")
            f.write(
                json.dumps({"step": 2, "reward_total": 0.75}) + "\n" + '{"step": 3, "rew'
            )  # a line half written
            f.flush()
            progress.poll()
            assert progress.bar.n == 2 and progress.bar.postfix == "reward=0.75"
            f.write('ard_total": 1.0}\n' + json.dumps({"step": 3, "val/mean_iou": 0.4567}) + "\n")
            f.flush()
            progress.poll()
            assert progress.bar.n == 3 and progress.bar.postfix == "reward=1.00, val IoU=0.457"
    assert progress.bar.n == 3  # the last poll at exit, then closed
