"""`segr1 scale` from outside the cluster, the way a user on a laptop calls it:
`RAY_ADDRESS=http://HEAD:8265 segr1 scale --rollout 2` (docs/scaling.md), against a training job on a real
`ray start --head` with token auth (the fixture of tests/e2e/test_job_submit.py: its own temp dir, ports and
token; teardown ends only that cluster).

The client runs in a network namespace of its own (`unshare -rn`) where nothing of the head can be reached but
the dashboard's port, forwarded through a unix socket; the GCS port is checked to refuse connections there.
With its own empty HOME, TMPDIR and RAY_TMPDIR it cannot see the head's session directory either, and of the
head's it is given only the token file's path. So `ray.init` could find no local node and no GCS: the command
has to go through the job server. Where user namespaces are not allowed, the client runs on the host's network
with the same environment.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e.conftest import DEMO_CONFIG, REPO, e2e_overrides, processes_mentioning, read_metrics, wait_for
from tests.e2e.run_control import UNTIL_STOPPED, first_line
from tests.e2e.test_job_submit import (  # ray_head: the cluster fixture
    BIN,
    RAY,
    ray_head,  # noqa: F401
)
from tests.support.sockets import pump

pytestmark = pytest.mark.slow

# Run inside the client's network namespace: bring up loopback, check the GCS port is closed there, forward
# 127.0.0.1:PORT to the unix socket (the host's end reaches the dashboard), then run the command.
IN_NAMESPACE = r"""
import socket, socketserver, subprocess, sys, threading
sys.path.insert(0, REPO_ROOT)
from tests.support.sockets import pump
sock, port, gcs, cmd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
try:
    socket.create_connection(("127.0.0.1", gcs), timeout=5).close()
    sys.exit(f"the GCS port {gcs} is reachable from the client's namespace")
except ConnectionRefusedError:
    print(f"namespace: GCS port {gcs} refused", file=sys.stderr)

class Forward(socketserver.BaseRequestHandler):
    def handle(self):
        up = socket.socket(socket.AF_UNIX)
        up.connect(sock)
        t = threading.Thread(target=pump, args=(up, self.request), daemon=True)
        t.start()
        pump(self.request, up)
        t.join()
        up.close()

server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Forward)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.exit(subprocess.run(cmd).returncode)
""".replace("REPO_ROOT", repr(str(REPO)))


def _dashboard_bridge(path: Path, port: int) -> socketserver.UnixStreamServer:
    """A unix socket at `path` whose every connection is forwarded to 127.0.0.1:port (the dashboard)."""

    class Forward(socketserver.BaseRequestHandler):
        def handle(self):
            with socket.create_connection(("127.0.0.1", port)) as up:
                back = threading.Thread(target=pump, args=(up, self.request), daemon=True)
                back.start()
                pump(self.request, up)
                back.join()

    server = socketserver.ThreadingUnixStreamServer(str(path), Forward)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@functools.cache
def _namespaces_allowed() -> bool:
    """Whether this machine lets a process have a network namespace of its own (user namespaces)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True)
    return probe.returncode == 0


def _client_env(home: Path, token: str | None, dashboard: str) -> dict[str, str]:
    """A laptop's environment: nothing of the head's but the token file's path (None: no token either) and the
    dashboard's address."""
    for d in ("home", "tmp"):
        (home / d).mkdir(parents=True)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token} if token else {}
    return {
        **auth,
        "PATH": f"{BIN}{os.pathsep}/usr/sbin{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(home / "home"),
        "TMPDIR": str(home / "tmp"),
        # Ray's temp root (get_default_system_temp_dir in ray/_common/utils.py): no session of the head there
        "RAY_TMPDIR": str(home / "tmp"),
        "RAY_ADDRESS": dashboard,
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def _scale_from_outside(dashboard: str, gcs_port: int, token: str | None, tmp: Path, *args: str):
    """`segr1 scale ARGS` with RAY_ADDRESS=http://127.0.0.1:PORT from the isolated client (module docstring);
    `tmp` is the client's own folder."""
    port = int(dashboard.rsplit(":", 1)[1])
    env = _client_env(tmp / "laptop", token, dashboard)  # creates `tmp`
    scale = [sys.executable, "-m", "cluster.cli", "scale", *args]
    if not _namespaces_allowed():
        return subprocess.run(scale, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    bridge = _dashboard_bridge(tmp / "dash.sock", port)
    try:
        cmd = ["unshare", "-rn", sys.executable, "-c", IN_NAMESPACE, str(tmp / "dash.sock"), str(port)]
        cmd += [str(gcs_port), *scale]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    finally:
        bridge.shutdown()
        bridge.server_close()
    assert f"GCS port {gcs_port} refused" in r.stderr, r.stdout + r.stderr[-3000:]
    return r


def _gcs_port(cluster_tmp: str) -> int:
    from tests.e2e.test_job_submit import _gcs_address

    return int(_gcs_address(cluster_tmp).rsplit(":", 1)[1])


def _job_running(job: subprocess.Popen, log: Path, what: str) -> None:
    if job.poll() is not None:
        raise AssertionError(
            f"the job ended (exit {job.returncode}) before {what}: {log.read_text()[-4000:]}"
        )


def _start_training(assets, address: str, env: dict, run_dir: Path, log: Path) -> subprocess.Popen:
    """`ray job submit` of a job with one rollout worker (rollout.max_workers=2) that runs until stopped; the
    returned process follows its log into `log` until it ends. No --working-dir: the head's python has the
    project installed, as the KubeRay image does."""
    overrides = [
        *e2e_overrides(assets, run_dir),
        f"grpo.steps={UNTIL_STOPPED}",
        "rollout.engine=hf",  # a transformers worker starts faster than a vLLM engine
        "rollout.sampling.max_tokens=16",
        "rollout.max_workers=2",
    ]
    cmd = [RAY, "job", "submit", "--address", address, f"--submission-id=train-{uuid.uuid4().hex[:8]}", "--"]
    cmd += ["python", "-m", "cluster.train", "--config", str(DEMO_CONFIG), *overrides]
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop_training(run_dir: Path, job: subprocess.Popen) -> None:
    """What `ray job stop` does, without its CLI's start-up: SIGTERM to the job's entrypoint (its processes
    are the ones naming run_dir, the submitting CLI's included); Ray then ends the job's actors."""
    for pid in processes_mentioning(str(run_dir)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        job.wait(timeout=60)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait(timeout=30)


def test_segr1_scale_through_the_dashboard_without_a_local_ray(assets, ray_head, tmp_path):  # noqa: F811
    """While a job with one rollout worker (rollout.max_workers=2) runs, from the isolated client: without the
    token, `segr1 scale` fails saying what to set; `segr1 scale --rollout 2` prints `rollout: 1 -> 2 workers`
    and the job's next step ran with two rollout workers; `--rollout 3` fails with the driver's refusal on
    stderr. The clients' Ray temp dirs stay empty (they started no node)."""
    address, env = ray_head
    token = env["RAY_AUTH_TOKEN_PATH"]
    gcs = _gcs_port(token.rsplit("/", 1)[0])
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    job = _start_training(assets, address, env, run_dir, log)
    try:
        # while the job starts: a client without the token is told what to set (no traceback)
        r = _scale_from_outside(address, gcs, None, tmp_path / "client-0", "--rollout", "2")
        assert r.returncode == 1 and "set RAY_AUTH_MODE=token" in r.stderr, r.stdout + r.stderr[-3000:]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]

        def first_step():
            _job_running(job, log, "step 1")
            return read_metrics(run_dir)

        wait_for(first_step, 300, "step 1 of the job")
        # side by side (the suite's time): --rollout 3, above rollout.max_workers, is refused without changing
        # anything, so the other one's answer is 1 -> 2 whichever the driver sees first
        with ThreadPoolExecutor(2) as pool:
            grow = pool.submit(
                _scale_from_outside, address, gcs, token, tmp_path / "client-1", "--rollout", "2"
            )
            refused = pool.submit(
                _scale_from_outside, address, gcs, token, tmp_path / "client-2", "--rollout", "3"
            )
            r, r3 = grow.result(), refused.result()
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
        assert r.stdout.splitlines() == ["rollout: 1 -> 2 workers", "reward: 1 -> 1 workers"], r.stdout
        # the driver's refusal comes back on stderr with a failing exit code
        assert r3.returncode == 1 and "outside 1..2 (rollout.max_workers)" in r3.stderr, r3.stdout + r3.stderr
        at = read_metrics(run_dir)[-1]["step"]

        def step_after():
            _job_running(job, log, f"a step after step {at}")
            return first_line(run_dir, lambda row: row["step"] > at)

        line = wait_for(step_after, 120, f"a step after the resize (step > {at})")
        assert line["rollout_workers"] == 2, line
    finally:
        _stop_training(run_dir, job)
    for client in ("client-0", "client-1", "client-2"):
        assert not list((tmp_path / client / "laptop" / "tmp").rglob("session_*")), (
            f"{client} started a Ray node"
        )
