"""`segr1 scale` against a job on a real `ray start --head` cluster (127.0.0.1, token auth as Ray 2.60 does):
`--rollout 1` then `--rollout 2` change the rollout pool of the running job, which then finishes. A size above
rollout.max_workers is refused naming it (tests/unit/test_autoscale.py, tests/e2e/test_control.py); the message of a
client without the token: tests/unit/test_scale_cli.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, assert_accounting, read_metrics, read_summary, wait_for
from tests.e2e.test_job_submit import RAY, _processes_mentioning, ray_head  # noqa: F401  (the private `ray start --head` fixture)

pytestmark = pytest.mark.slow


def _gcs_address(tmp: str) -> str:
    """The GCS address of the fixture's cluster: the --port of its `ray start` (which names the cluster's own temp
    dir, `tmp`)."""
    for pid in _processes_mentioning(tmp):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "start" in args and "--head" in args and "--port" in args:
            return f"127.0.0.1:{args[args.index('--port') + 1]}"
    raise AssertionError(f"no `ray start --head` process of {tmp}")


def _scale(env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cluster.cli", "scale", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def test_segr1_scale_resizes_a_running_job(assets, ray_head, tmp_path):  # noqa: F811
    address, env = ray_head
    gcs = _gcs_address(env["RAY_AUTH_TOKEN_PATH"].rsplit("/", 1)[0])
    run_dir = tmp_path / "run"
    steps = 50  # long enough for two `segr1 scale` calls (a few seconds each) while it runs
    overrides = [
        f"model.policy={assets.policy}",
        f"data.train={assets.train}",
        "data.eval=null",
        "eval.every=0",
        "data.image_size=56",
        "reward.answer_format=points",
        "reward.weights.box_l1=0",
        f"grpo.steps={steps}",
        "grpo.batch_size=4",
        "grpo.group_size=4",
        "rollout.sampling.max_tokens=16",
        "rollout.num_workers=2",
        "rollout.max_workers=2",
        "reward.num_workers=1",
        "metrics.port=0",
        f"metrics.run_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'checkpoints'}",
    ]
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--"]
    cmd += ["python", "-m", "cluster.train", "--config", "cluster/configs/demo.yaml", *overrides]
    job = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: read_metrics(run_dir) or job.poll() is not None, 300, "step 1 of the job")
        assert job.poll() is None, job.stdout.read()[-4000:]
        client = {**env, "RAY_ADDRESS": gcs}

        r = _scale(client, "--rollout", "1")
        assert r.returncode == 0 and "rollout: 2 -> 1 workers" in r.stdout, r.stdout + r.stderr[-3000:]
        at = read_metrics(run_dir)[-1]["step"]
        wait_for(lambda: read_metrics(run_dir)[-1]["step"] > at, 120, "a step after the shrink")
        assert read_metrics(run_dir)[-1]["rollout_workers"] == 1

        r = _scale(client, "--rollout", "2")
        assert r.returncode == 0 and "rollout: 1 -> 2 workers" in r.stdout, r.stdout + r.stderr[-3000:]
        scaled_at = read_metrics(run_dir)[-1]["step"]
        assert scaled_at < steps, "the job ended before the second scale: raise `steps`"
        out, _ = job.communicate(timeout=480)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0 and "succeeded" in out, out[-4000:]
    summary = read_summary(run_dir)
    assert_accounting(summary)
    assert summary["steps"] == steps
    assert (
        len(summary["rollout_workers"]) == 2 and "rollout-0" in summary["rollout_workers"]
    )  # a new one joined
    assert 1 in {r["rollout_workers"] for r in read_metrics(run_dir)}
