"""The TensorBoard tracker of the e2e sync run (tests/e2e/conftest.py `sync_run`, the demo's trackers): the driver
writes the event files (read back through tensorboard's EventAccumulator), and a TensorBoard server over them
serves the run's reward curve."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import IMAGE_EVERY, RISE_STEPS, read_metrics
from tests.tracker_readers import tensorboard_events, tensorboard_hparams

pytestmark = pytest.mark.slow
pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def tb_run(sync_run):
    return sync_run[1]


def test_driver_writes_tensorboard_logs(tb_run):
    rows = read_metrics(tb_run)
    acc = tensorboard_events(tb_run / "tensorboard")
    reward = acc.Scalars("reward/total_mean")
    assert [e.step for e in reward] == [r["step"] for r in rows] == list(range(1, RISE_STEPS + 1))
    assert [e.value for e in reward] == pytest.approx([r["reward_total"] for r in rows], rel=1e-6)
    assert [e.step for e in acc.Scalars("learner/loss")] == list(range(1, RISE_STEPS + 1))
    assert [i.step for i in acc.Images("train/overlay_1")] == list(
        range(IMAGE_EVERY, RISE_STEPS + 1, IMAGE_EVERY)
    )
    assert "reward_hist/iou" in acc.Tags()["histograms"]
    hparams = tensorboard_hparams(acc)
    assert hparams["grpo.steps"] == RISE_STEPS and hparams["metrics.trackers"] == '["jsonl", "tensorboard"]'
    assert hparams["git_commit"] != ""


def start_tensorboard(logdir: Path, log: Path, deadline_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """`tensorboard --logdir logdir --host 127.0.0.1 --port 0` and its URL, read from its banner in `log`."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(logdir),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"(http://127\.0\.0\.1:\d+)/", log.read_text())
        if found:  # the banner names the port the OS picked
            return proc, found.group(1)
        time.sleep(0.2)  # polling interval of the readiness check
    proc.kill()
    raise AssertionError(f"tensorboard printed no URL within {deadline_s:.0f} s: {log.read_text()[-2000:]}")


def poll_json(url: str, deadline_s: float, ready) -> object:
    """GET url until `ready(json)` holds (TensorBoard loads the event files in the background)."""
    import json

    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                last = json.loads(resp.read())
            if ready(last):
                return last
        except (urllib.error.URLError, ConnectionError, ValueError):
            pass
        time.sleep(0.5)  # polling interval of the readiness check, not a stand-in for it
    raise AssertionError(f"{url} did not answer as expected within {deadline_s:.0f} s; last answer {last!r}")


def test_tensorboard_server_serves_the_reward_curve(tb_run, tmp_path):
    proc, base = start_tensorboard(tb_run, tmp_path / "tensorboard.log")
    try:
        runs = poll_json(f"{base}/data/runs", 60, lambda r: "tensorboard" in r)
        query = urllib.parse.urlencode({"run": "tensorboard", "tag": "reward/total_mean"})
        points = poll_json(f"{base}/data/plugin/scalars/scalars?{query}", 60, lambda p: len(p) == RISE_STEPS)
        assert runs == ["tensorboard"]
        assert [step for _wall, step, _value in points] == list(range(1, RISE_STEPS + 1))
    finally:
        proc.kill()
        proc.wait(timeout=30)
