"""Operating a running job: Ctrl-C on `python -m cluster.train` finishes the step in progress, writes a checkpoint
and exits 0, and `--resume` goes on from exactly there (async mode: the cursor before the oldest chunk still in
the pipeline). Scaling a running job by hand: tests/e2e/test_job_submit.py (`segr1 scale`, i.e. the driver's
`request_resize`); by the cluster's capacity: tests/e2e/test_elastic.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.e2e.conftest import (
    REPO,
    assert_accounting,
    assert_metric_lines,
    e2e_config,
    finish_job,
    job_actor_names,
    read_metrics,
    read_summary,
    start_job,
    wait_for,
)

pytestmark = pytest.mark.slow

# `python -m cluster.train` with Ctrl-C raising KeyboardInterrupt as in a terminal: a process started in the
# background of a non-interactive shell (CI runners, nohup, `cmd &`) inherits SIGINT ignored, and Python then keeps
# it ignored, so the test would depend on how the suite was launched
AS_IN_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'cluster.train'; runpy.run_module('cluster.train', run_name='__main__', alter_sys=True)"
)


def test_ctrl_c_checkpoints_exits_cleanly_and_resume_continues(assets, sft_policy, ray_job, tmp_path):
    from cluster.config import dump_config
    from learner.checkpoint import latest_checkpoint, read_state

    ray = ray_job
    steps = 40  # far more than run before the signal
    cfg = e2e_config(assets, tmp_path, f"grpo.steps={steps}", "grpo.mode=async", policy=sft_policy)
    config_file = tmp_path / "job.yaml"
    config_file.write_text(dump_config(cfg))
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,  # the test session's Ray: no second cluster
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", AS_IN_A_TERMINAL, "--config", str(config_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the signal goes to the job's driver process alone
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or len(read_metrics(tmp_path)) >= 2,
            300,
            "step 2 in metrics.jsonl",
        )
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    assert "stopping: finishing the current step" in err
    summary = read_summary(tmp_path)
    assert '"stopped_early": true' in out  # the summary printed on stdout is the one written to summary.json
    assert summary["stopped_early"] and 2 <= summary["steps"] < steps, summary
    assert_accounting(summary)
    stopped = summary["steps"]
    assert_metric_lines(read_metrics(tmp_path), stopped)
    ckpt = latest_checkpoint(cfg.checkpoint.dir)
    assert int(read_state(ckpt)["step"]) == stopped  # written on the way out, at the last finished step
    wait_for(lambda: not job_actor_names(ray), 60, "the stopped job's actors to exit")

    cfg2 = e2e_config(assets, tmp_path, f"grpo.steps={stopped + 2}", "grpo.mode=async", policy=sft_policy)
    driver, run_ref = start_job(cfg2, resume=True)
    resumed = finish_job(ray, driver, run_ref, timeout=300)
    assert resumed["steps"] == resumed["policy_version"] == stopped + 2 and not resumed["stopped_early"]
    assert_accounting(resumed)
    assert_metric_lines(read_metrics(tmp_path), stopped + 2)
