"""Validation during training (cluster/driver/validation.py): the fixed seeded subset of data.eval, the config rules,
and which metrics.jsonl lines are validation lines. The interleaved run through the pools is tested end to end
(tests/e2e/test_validation.py)."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, load_config
from cluster.driver.validation import VAL_METRICS, is_validation_line, select_samples


def test_select_samples_is_a_fixed_seeded_subset_in_data_set_order(synthetic_data):
    from cluster.evaluation.inputs import load_samples

    every = [s.id for s in load_samples(synthetic_data)]
    a = [s.id for s in select_samples(str(synthetic_data), 10, seed=0)]
    assert a == [s.id for s in select_samples(str(synthetic_data), 10, seed=0)]  # fixed
    assert len(a) == len(set(a)) == 10 and set(a) <= set(every)
    assert a == [i for i in every if i in set(a)]  # in the data set's order
    assert a != every[:10]  # drawn over the whole set, not its head
    assert a != [s.id for s in select_samples(str(synthetic_data), 10, seed=1)]  # the job seed picks it
    assert [s.id for s in select_samples(str(synthetic_data), 0, seed=0)] == every  # 0: all of it
    assert [s.id for s in select_samples(str(synthetic_data), 10_000, seed=0)] == every


def test_config_rules_name_the_fields(tmp_path):
    with pytest.raises(ConfigError, match="data.eval"):
        load_config(None, ["eval.every=2"])
    with pytest.raises(ConfigError, match="eval.every=0"):
        load_config(None, ["checkpoint.keep_best=val/mean_iou"])
    with pytest.raises(ConfigError, match="keep_best"):
        load_config(None, [f"data.eval={tmp_path}", "eval.every=2", "checkpoint.keep_best=val/loss"])
    cfg = load_config(
        None,
        [f"data.eval={tmp_path}", "eval.every=2", "eval.samples=8", "checkpoint.keep_best=val/s_measure"],
    )
    assert (cfg.eval.every, cfg.eval.samples, cfg.eval.before_train) == (2, 8, False)
    assert cfg.checkpoint.keep_best == "val/s_measure" and cfg.checkpoint.resume_from == "latest"


def test_keep_best_accepts_exactly_the_validation_metrics():
    from learner.config import CheckpointConfig

    field = CheckpointConfig.model_fields["keep_best"]
    assert set(field.annotation.__args__[0].__args__) == set(VAL_METRICS)


def test_validation_lines_are_told_apart_from_step_lines():
    assert is_validation_line({"step": 2, "val/mean_iou": 0.4})
    assert not is_validation_line({"step": 2, "reward_total": 0.4, "loss": 0.1})


def test_keep_best_marks_only_a_strictly_better_validation(synthetic_data):
    from cluster.driver.validation import Validator

    cfg = load_config(
        None,
        [
            f"data.eval={synthetic_data}",
            "eval.every=2",
            "eval.samples=4",
            "checkpoint.keep_best=val/mean_iou",
        ],
    )
    marked: list[tuple] = []
    v = Validator(
        cfg, rollout=None, reward=None, write=lambda line: None, mark_best=lambda *a: marked.append(a)
    )
    assert len(v.samples) == 4 and v.pending == 0 and v.protected() == []
    v.restore_best(
        {"step": 2, "path": "step-000002", "metric": "val/mean_iou", "value": 0.5}
    )  # from best.json
    v._keep_if_best(4, {"val/mean_iou": 0.5})  # a tie keeps the earlier one
    v._keep_if_best(6, {"val/mean_iou": 0.25})
    v._keep_if_best(8, {"val/mean_iou": 0.75})
    v._keep_if_best(10, {"val/mean_iou": None})  # nothing to compare
    assert marked == [(8, "val/mean_iou", 0.75)] and v.best == 0.75
    v.restore_best({"step": 2, "metric": "val/s_measure", "value": 0.9})  # another metric's record: ignored
    assert v.best == 0.75
