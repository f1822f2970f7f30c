"""The experiment trackers (cluster/tracking), each read back through its own library's reading API."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cluster.config import ConfigError, TrainConfig, load_config
from cluster.tracking import SCALAR_NAMES, flatten, make_tracker, run_info, scalars_of
from cluster.tracking.base import EXTRAS, require
from tests.tracker_readers import tensorboard_events, tensorboard_hparams, wandb_history

CONFIG = {"grpo.steps": 3, "grpo.mode": "sync", "data.eval": "null", "segr1_version": "0.1.0"}
IMAGE = np.zeros((12, 16, 3), np.uint8)  # (H, W, 3)
IMAGE[2:6, 3:9] = (230, 40, 40)


def _write(tracker, steps, offset=0.0):
    for step in steps:
        tracker.log_scalars(step, {"reward/total_mean": step / 10 + offset, "learner/loss": -step})
        tracker.log_histogram(step, "reward_hist/total", np.linspace(0, step, 8))
    tracker.log_image(steps[-1], "train/overlay_0", IMAGE)
    tracker.log_text(steps[-1], "note", "hello")


def test_scalar_names_group_the_jsonl_keys_and_keep_val_keys():
    line = {
        "step": 3,
        "time": 1.0,
        "reward_total": 0.5,
        "loss": 0.1,
        "val/mean_iou": 0.4,
        "sample_ids": ["a"],
    }
    assert scalars_of(line) == {"reward/total_mean": 0.5, "learner/loss": 0.1, "val/mean_iou": 0.4}
    assert all("/" in name for name in SCALAR_NAMES.values())
    assert len(set(SCALAR_NAMES.values())) == len(SCALAR_NAMES)


def test_flatten_and_run_info():
    assert flatten({"a": {"b": 1, "c": None, "d": [1, 2]}}) == {"a.b": 1, "a.c": "null", "a.d": "[1, 2]"}
    info = run_info()
    assert info["segr1_version"] != "" and len(info["git_commit"]) in (40, len("unknown"))


def test_config_needs_jsonl_and_rejects_duplicates():
    assert TrainConfig().metrics.trackers == ["jsonl", "tensorboard"]
    with pytest.raises(ConfigError, match="lacks 'jsonl'"):
        load_config(None, ["metrics.trackers=[tensorboard]"])
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, ["metrics.trackers=[jsonl,wandb,wandb]"])


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(EXTRAS, "wandb", ("segr1_no_such_module", "wandb"))
    with pytest.raises(ImportError, match=r"pip install 'segr1\[wandb\]'"):
        require("wandb")


def test_a_tracker_that_cannot_open_ends_the_runs_the_others_opened(tmp_path, monkeypatch):
    import cluster.tracking.trackers as trackers

    events = []

    class Opens:
        def start(self, run_dir, run_name, config, resume, step):
            events.append("tensorboard started")

        def close(self):
            events.append("tensorboard closed")

    class Refuses:
        def start(self, run_dir, run_name, config, resume, step):
            raise PermissionError("the tracking store refused the run")

        def close(self):
            events.append("mlflow closed")

    monkeypatch.setattr(
        trackers, "make_tracker", lambda name, **_: Opens() if name == "tensorboard" else Refuses()
    )
    cfg = load_config(None, [f"metrics.run_dir={tmp_path}", "metrics.trackers=[jsonl,tensorboard,mlflow]"])
    with pytest.raises(PermissionError, match="the tracking store refused the run"):
        trackers.open_trackers(cfg, tmp_path)
    assert events == ["tensorboard started", "tensorboard closed"]  # its run ended, not left open


def test_tensorboard_scalars_image_hparams_and_resume(tmp_path):
    pytest.importorskip("tensorboard")
    tb = make_tracker("tensorboard")
    tb.start(tmp_path, "run", CONFIG, resume=False, step=0)
    _write(tb, [1, 2, 3])
    tb.close()
    # resumed from a checkpoint at step 2: step 3 is trained again and replaces the first one
    tb = make_tracker("tensorboard")
    tb.start(tmp_path, "run", CONFIG, resume=True, step=2)
    _write(tb, [3, 4], offset=1.0)
    tb.close()
    acc = tensorboard_events(tmp_path / "tensorboard")
    events = acc.Scalars("reward/total_mean")
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert events[2].value == pytest.approx(1.3)
    image = acc.Images("train/overlay_0")[-1]
    assert (image.width, image.height, image.step) == (16, 12, 4)
    assert tensorboard_hparams(acc)["grpo.steps"] == 3
    assert "reward_hist/total" in acc.Tags()["histograms"]


def test_mlflow_params_metrics_artifacts_and_resume(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    ml = make_tracker("mlflow")
    ml.start(tmp_path, "run", CONFIG, resume=False, step=0)
    _write(ml, [1, 2])
    ml.close()
    ml = make_tracker("mlflow")
    ml.start(tmp_path, "run", CONFIG, resume=True, step=2)
    _write(ml, [3])
    ml.close()
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params["grpo.steps"] == "3" and run.data.tags["segr1_version"] == "0.1.0"
    history = client.get_metric_history(run_id, "reward/total_mean")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert run.info.status == "FINISHED"
    overlays = [f.path for f in client.list_artifacts(run_id, "overlays/train/overlay_0")]
    assert overlays == [
        "overlays/train/overlay_0/step_000002.png",
        "overlays/train/overlay_0/step_000003.png",
    ]
    experiment = client.get_experiment(run.info.experiment_id)
    assert len(client.search_runs([experiment.experiment_id])) == 1  # resumed, not a second run


def test_wandb_offline_history_and_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    wb = make_tracker("wandb")
    wb.start(tmp_path, "run", CONFIG, resume=False, step=0)
    _write(wb, [1, 2])
    wb.close()
    wb = make_tracker("wandb")
    wb.start(tmp_path, "run", CONFIG, resume=True, step=2)
    _write(wb, [3])
    wb.close()
    stored = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    files = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # two offline segments of the same run, `wandb sync` uploads both
    steps = []
    for f in files:
        run_id, rows = wandb_history(f)
        assert run_id == stored
        steps += [int(r["_step"]) for r in rows if "reward/total_mean" in r]
    assert steps == [1, 2, 3]


def test_training_overlay_draws_the_parsed_answer_and_the_gt(tmp_path):
    """open_trackers with jsonl only starts nothing; its overlay draws the first answer's box and points
    (parsed at the policy's image size) and the ground-truth outline on the sample's image."""
    from cluster.tracking import open_trackers
    from protos import Sample
    from protos.answer import format_answer
    from runtime.images import encode_png
    from runtime.overlay import BOX_RGB, GT_RGB, POINT_RGB

    cfg = load_config(None, ["metrics.trackers=[jsonl]", "data.image_size=32", f"metrics.run_dir={tmp_path}"])
    trackers = open_trackers(cfg, tmp_path)
    assert trackers.trackers == {}
    image = np.full((64, 64, 3), 90, np.uint8)  # (H, W, 3); the policy saw it at 32x32: coordinates double
    gt = np.zeros((64, 64), bool)
    gt[40:60, 40:60] = True
    mask = encode_png(gt.astype(np.uint8))
    sample = Sample(
        id="s0",
        source="t",
        split="train",
        task="foreground",
        instruction="",
        image=encode_png(image),
        mask=mask,
        width=64,
        height=64,
    )
    text = format_answer([[2, 2, 14, 14]], [[8, 8], [12, 4]], [1, 0])
    out = trackers.training_overlay(text, sample)  # (64, 64, 3) uint8
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert tuple(out[16, 16]) == POINT_RGB[1] and tuple(out[8, 24]) == POINT_RGB[0]
    assert tuple(out[4, 15]) == BOX_RGB and tuple(out[40, 50]) == GT_RGB
