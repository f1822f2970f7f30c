"""`ray job submit --working-dir . -- python -m cluster.train --config ...` against a Ray cluster started for this
test with `ray start --head --node-ip-address 127.0.0.1` (dashboard / job server on, token auth on, as Ray 2.60
does by default): the job uploads the repository, runs the driver as an actor on the cluster and succeeds, and
`segr1 scale` resizes its rollout pool while it runs (the argument and connection errors of `segr1 scale`:
tests/unit/cluster/test_scale_cli.py). A job whose start fails
ends with its real error as the last error printed: relative paths (the upload leaves runs/ behind) get one message
naming the absolute form, and a driver whose __init__ fails leaves no "Fatal Python error: Aborted" dump after it.

The cluster is this test's alone: its own --temp-dir, free ports for every server, its own auth token file. It is
started with --block in a new session, so teardown ends exactly it (SIGTERM to that `ray start` process, which
stops the processes of its node; then whatever is left of its process group). `ray stop` is NOT used: it stops
every Ray on the machine, including other people's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    REPO,
    assert_accounting,
    assert_metric_lines,
    e2e_overrides,
    processes_mentioning,
    read_metrics,
    read_summary,
    wait_for,
)
from tests.e2e.run_control import UNTIL_STOPPED, first_line
from tests.support.sockets import listen_ports

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _cluster_env(token: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
        HF_HUB_OFFLINE="1",
        OMP_WAIT_POLICY="PASSIVE",
    )
    return env


@pytest.fixture(scope="module")
def ray_head():
    """A private `ray start --head` on 127.0.0.1; yields (dashboard address, env for the ray CLI)."""
    tmp = Path(tempfile.mkdtemp(prefix="segr1e2e-", dir="/tmp"))  # short: Ray puts unix sockets in it
    token = tmp / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = _cluster_env(token)
    # Fixed: the ports a client must know before the start. Every other listener binds port 0 and Ray publishes what
    # it got (the job head finds the agent through the GCS): a port picked here and bound seconds later by the agent
    # can be taken by then, and the job server then answers "No available agent to submit job".
    gcs, dash, client = listen_ports(3)
    cmd = [
        RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--num-cpus", "4", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", "0", "--dashboard-agent-grpc-port", "0", "--metrics-export-port", "0",
        "--runtime-env-agent-port", "0", "--node-manager-port", "0", "--object-manager-port", "0",
        "--temp-dir", str(tmp / "ray"),
    ]  # fmt: skip
    log = (tmp / "ray-start.log").open("w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:

        def job_server_up() -> bool:
            if head.poll() is not None:
                raise AssertionError(
                    f"ray start exited ({head.returncode}): {(tmp / 'ray-start.log').read_text()}"
                )
            if _agent_port(tmp / "ray") is None:  # submissions go through the head node's agent
                return False
            r = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True)
            return r.returncode == 0

        wait_for(job_server_up, 600, "the Ray job server", every=1.0)  # a hang guard: slow under load
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops the processes of this node, then exits
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything left in the session it started
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while processes_mentioning(str(tmp), open_files=True) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in processes_mentioning(
            str(tmp), open_files=True
        ):  # started by this cluster (its temp dir): ours to end
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _agent_port(ray_tmp: Path) -> int | None:
    """The head's dashboard agent HTTP port once the agent has published it (None before). Ray writes -1 when the
    agent's HTTP server failed: the job server can then take no submission, so that fails here with the agent's log."""
    session = ray_tmp / "session_latest"
    found = sorted(session.glob("dashboard_agent_listen_port_*"))
    if not found or not (text := found[0].read_text().strip()):
        return None
    if int(text) < 0:
        logs = sorted((session / "logs").glob("dashboard_agent*.log"))
        raise AssertionError(
            f"the dashboard agent's HTTP server did not start: {logs[0].read_text()[-3000:]}"
        )
    return int(text)


def _gcs_address(tmp: str) -> str:
    """The GCS address of the fixture's cluster: the --port of its `ray start` (which names the cluster's own temp
    dir, `tmp`)."""
    for pid in processes_mentioning(tmp):
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


def _stop_job(client: dict) -> None:
    """request_stop of the job's driver (tests/e2e/run_control.py), from a process of its own: this one may be
    connected to the session's Ray."""
    cmd = [sys.executable, "-m", "tests.e2e.run_control", "stop", "segr1"]
    r = subprocess.run(cmd, cwd=REPO, env=client, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def _line_after(run_dir: Path, step: int, job: subprocess.Popen) -> dict | None:
    """The first metrics line after `step`; fails at once if the job ended."""
    if job.poll() is not None:
        raise AssertionError(
            f"the job ended (exit {job.returncode}) at step {step}: " + job.stdout.read()[-4000:]
        )
    return first_line(run_dir, lambda row: row["step"] > step)


def _scale_while_it_runs(client: dict, run_dir: Path, job: subprocess.Popen) -> None:
    """`segr1 scale --rollout 1`, `--rollout 2`, then `--rollout 3` (refused); each resize shows in the first
    metrics line after the driver applied it (the answer comes once the loop applied it)."""
    for before, after in ((2, 1), (1, 2)):
        r = _scale(client, "--rollout", str(after))
        assert r.returncode == 0 and f"rollout: {before} -> {after} workers" in r.stdout, (
            r.stdout + r.stderr[-3000:]
        )
        at = read_metrics(run_dir)[-1]["step"]
        line = wait_for(
            lambda at=at: _line_after(run_dir, at, job), 120, f"a step after the resize to {after}"
        )
        assert line["rollout_workers"] == after, line
    r = _scale(client, "--rollout", "3")  # above rollout.max_workers: refused, the job goes on
    assert r.returncode != 0 and "outside 1..2 (rollout.max_workers)" in r.stderr, r.stdout + r.stderr


def test_a_submitted_job_trains_and_segr1_scale_resizes_it(assets, ray_head, tmp_path):
    """The job runs the e2e preset (tests/e2e/conftest.py) with two rollout workers; while it runs, `segr1 scale
    --rollout 1` then `--rollout 2` change its rollout pool and `--rollout 3` (above rollout.max_workers) is
    refused; the test then stops it (request_stop: its grpo.steps is more than it ever reaches, so it runs as long
    as the scale calls take, whatever the machine's speed) and it succeeds, every step on current weights."""
    address, env = ray_head
    run_dir = tmp_path / "run"
    overrides = [
        *e2e_overrides(assets, run_dir),
        f"grpo.steps={UNTIL_STOPPED}",
        "rollout.sampling.max_tokens=16",
        "rollout.num_workers=2",
        "rollout.max_workers=2",
        "reward.num_workers=1",
    ]
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--"]
    cmd += ["python", "-m", "cluster.train", "--config", "cluster/configs/demo.yaml", *overrides]
    job = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: read_metrics(run_dir) or job.poll() is not None, 300, "step 1 of the job")
        assert job.poll() is None, job.stdout.read()[-4000:]
        client = {**env, "RAY_ADDRESS": _gcs_address(env["RAY_AUTH_TOKEN_PATH"].rsplit("/", 1)[0])}
        _scale_while_it_runs(client, run_dir, job)
        assert job.poll() is None, "the job ended before the test stopped it: " + job.stdout.read()[-4000:]
        _stop_job(client)
        out, _ = job.communicate(timeout=480)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0 and "succeeded" in out, out[-4000:]
    summary = read_summary(run_dir)
    assert_accounting(summary)
    assert summary["stopped_early"], summary
    rows = read_metrics(run_dir)
    assert_metric_lines(rows, summary["steps"])
    assert len(summary["rollout_workers"]) == 2 and "rollout-0" in summary["rollout_workers"]  # one joined
    for r in rows:
        # sync mode: every group was generated by the learner's current weights, the joining worker's included
        # (it got them before serving); a worker left on older weights would show up as staleness and clipping
        assert r["staleness_max"] == 0 and r["clip_fraction"] < 0.01, r


def _submit(address: str, env: dict, *train_args: str) -> str:
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--"]
    cmd += ["python", "-m", "cluster.train", "--config", "cluster/configs/demo.yaml", *train_args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-4000:]
    assert "Fatal Python error" not in out and "SIGABRT" not in out, out[-6000:]
    return out


def _last_error(out: str) -> str:
    return [line for line in out.splitlines() if "Error" in line][-1]


def test_a_failing_job_start_prints_the_real_error_last(assets, ray_head, tmp_path):
    address, env = ray_head
    # demo.yaml's relative paths (runs/...): not in the uploaded copy; one message, before any actor starts
    out = _submit(address, env, "grpo.steps=1")
    assert "pass absolute paths" in out.lower() and 'data.train="$PWD/runs/data/train"' in out, out[-4000:]
    assert "ActorDiedError" not in out
    # the driver actor's __init__ fails (a data set that does not read: a missing one is refused before Ray
    # starts, tests/unit/cluster/test_launch_checks.py); its own error is the last one printed
    broken = tmp_path / "broken-data"
    broken.mkdir()
    (broken / "part-0.parquet").write_bytes(b"not a parquet file")
    out = _submit(
        address,
        env,
        f"model.policy={assets.policy}",
        f"data.train={broken}",
        "data.eval=null",
        "eval.every=0",
        f"metrics.run_dir={tmp_path / 'run'}",
        f"checkpoint.dir={tmp_path / 'ck'}",
    )
    last = _last_error(out)
    assert "part-0.parquet is not a readable Parquet file" in last and "DatasetError" in last, out[-6000:]
    assert "ray.kill() only supported for actors" not in out, out[-6000:]
