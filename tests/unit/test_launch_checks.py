"""What is checked or guaranteed before and while a job runs, without a cluster:
- a `ray job submit --working-dir .` job with relative paths fails with one message naming the absolute form;
- every metrics.jsonl line is readable by another process as soon as the driver wrote it (flushed per step)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cluster.config import ConfigError, load_config
from cluster.job_paths import check_job_paths
from tests.e2e.conftest import DEMO_CONFIG

JOB_CWD = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def test_relative_paths_in_an_uploaded_working_dir_fail_with_the_absolute_form():
    cfg = load_config(DEMO_CONFIG)  # runs/models/policy, runs/data/train, ... (relative)
    check_job_paths(cfg, cwd="/home/me/seg-r1")  # a local run: relative paths are fine
    with pytest.raises(ConfigError) as err:
        check_job_paths(cfg, cwd=JOB_CWD)
    msg = str(err.value)
    assert "git-ignored folders such as runs/" in msg
    assert 'data.train="$PWD/runs/data/train"' in msg and 'metrics.run_dir="$PWD/runs/demo"' in msg
    absolute = [f"{k}=/data/{k}" for k in ("model.policy", "data.train", "metrics.run_dir", "checkpoint.dir")]
    check_job_paths(load_config(DEMO_CONFIG, [*absolute, "data.eval=null", "eval.every=0"]), cwd=JOB_CWD)


_READER = """
import json, sys, time
deadline = time.monotonic() + 30
while time.monotonic() < deadline:  # polls: the line must be there already, no waiting on a timer
    lines = open(sys.argv[1]).read().splitlines()
    if lines:
        print(json.dumps(json.loads(lines[-1])))
        break
"""


def test_a_metrics_line_is_readable_by_another_process_right_after_the_step(tmp_path):
    from cluster.driver import TrainDriver
    from cluster.tracking import open_trackers

    cfg = load_config(DEMO_CONFIG, [f"metrics.run_dir={tmp_path}", "metrics.trackers=[jsonl]"])
    driver = object.__new__(TrainDriver)  # only what _write_metrics uses: the file and the trackers
    driver.step = 1
    driver._metrics_file = (tmp_path / "metrics.jsonl").open("w")
    driver.trackers = open_trackers(cfg, tmp_path)
    try:
        driver._write_metrics({"step": 1, "reward_total": 0.5})
        r = subprocess.run(
            [sys.executable, "-c", _READER, str(tmp_path / "metrics.jsonl")], capture_output=True
        )
        assert json.loads(r.stdout) == {"step": 1, "reward_total": 0.5}, r.stderr
    finally:
        driver._metrics_file.close()
