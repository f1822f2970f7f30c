"""`segr1 scale` against a job on a real `ray start --head` cluster (127.0.0.1, token auth as Ray 2.60 does):
`--rollout 1` then `--rollout 2` change the rollout pool of the running job, which then finishes; a client
without the token gets one message saying what to set; a size above rollout.max_workers is refused naming it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, assert_accounting, read_metrics, read_summary, wait_for
from tests.e2e.test_job_submit import RAY, ray_head  # noqa: F401  (the private `ray start --head` fixture)

pytestmark = pytest.mark.slow


def _scale(env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cluster.cli", "scale", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def test_segr1_scale_resizes_a_running_job(assets, ray_head, tmp_path):  # noqa: F811
    address, env = ray_head
    token_dir = env["RAY_AUTH_TOKEN_PATH"].rsplit("/", 1)[0]
    gcs = (
        subprocess.run(["cat", f"{token_dir}/ray/ray_current_cluster"], capture_output=True, text=True)
    ).stdout
    assert gcs.strip(), "ray start wrote no ray_current_cluster in its temp dir"
    run_dir = tmp_path / "run"
    steps = 14
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
        client = {**env, "RAY_ADDRESS": gcs.strip()}

        no_token = {k: v for k, v in client.items() if not k.startswith("RAY_AUTH")}
        r = _scale(no_token, "--rollout", "1")
        assert r.returncode != 0 and "RAY_AUTH_MODE=token" in r.stderr, r.stdout + r.stderr[-3000:]

        r = _scale(client, "--rollout", "3")
        assert r.returncode == 1 and "rollout.max_workers" in r.stderr, r.stdout + r.stderr[-3000:]

        r = _scale(client, "--rollout", "1")
        assert r.returncode == 0 and "rollout: 2 -> 1 workers" in r.stdout, r.stdout + r.stderr[-3000:]
        at = read_metrics(run_dir)[-1]["step"]
        wait_for(lambda: read_metrics(run_dir)[-1]["step"] > at, 120, "a step after the shrink")
        assert read_metrics(run_dir)[-1]["rollout_workers"] == 1

        r = _scale(client, "--rollout", "2")
        assert r.returncode == 0 and "rollout: 1 -> 2 workers" in r.stdout, r.stdout + r.stderr[-3000:]
        out, _ = job.communicate(timeout=480)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0 and "succeeded" in out, out[-4000:]
    summary = read_summary(run_dir)
    assert_accounting(summary)
    assert summary["steps"] == steps
    assert summary["rollout_workers"] == ["rollout-0", "rollout-1"]
    assert 1 in {r["rollout_workers"] for r in read_metrics(run_dir)}
