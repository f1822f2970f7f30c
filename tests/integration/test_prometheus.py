"""A real Prometheus scrapes a short local training run and sees reward throughput above zero (issue 7).

Debian's `prometheus` binary (`make prometheus` installs it) is started on 127.0.0.1 with its own config and
TSDB in tmp_path, scraping every second the metrics agent of the local Ray that `segr1 train` starts
(`metrics.port`). The training run is the real entry point (cluster.launch.run_training on cluster/configs/
demo.yaml, tiny test-preset policy, tiny synthetic set, GrabCut rewards) in a child process: it has a Ray of
its own (the session's `ray_local` may already be up in this process, without a metrics port) and keeps it up
after training until the test has read Prometheus, so the last export is scraped. The queries are the shipped
Grafana dashboard's own (cluster/grafana/segr1.json), with its variables filled in as Grafana would.

The run validates before its first step and every VAL_EVERY steps; after the stop, every count Prometheus holds
is compared exactly with summary.json and metrics.jsonl, training (purpose="train") and validation
(purpose="val") apart, so the test holds however many steps and validations a machine's speed allowed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.paths import REPO

DEMO_CONFIG = REPO / "cluster" / "configs" / "demo.yaml"
DASHBOARD = REPO / "cluster" / "grafana" / "segr1.json"
MAX_STEPS, BATCH, GROUP = 500, 4, 4  # the test stops the run once Prometheus has seen it
# validation before the first step and every VAL_EVERY steps: greedy, G=2 (cluster/evaluation/loop.py)
VAL_SAMPLES, VAL_GROUP, VAL_EVERY = 4, 2, 2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="Debian's prometheus is not installed (`make prometheus` or `apt-get install prometheus`)",
    ),
]

# The child: the same local Ray as `segr1 train` (init_ray: loopback, metrics agent on metrics.port) and the
# real run_training. Commands on stdin: "stop" asks the driver to finish its step and stop (what Ctrl-C does);
# EOF (the test is done, or gone) stops training too and then shuts Ray down. Summary written atomically.
_CHILD = """
import json, os, sys, threading
from pathlib import Path
import ray
from cluster.config import load_config
from cluster.pools.topology import init_ray
from cluster.launch import run_training

cfg = load_config(sys.argv[1], sys.argv[3:])
init_ray(cfg)
done = threading.Event()

def stop_driver():
    try:
        ray.get(ray.get_actor("driver", namespace=cfg.placement.namespace).request_stop.remote())
    except (ValueError, ray.exceptions.RayError):
        pass  # not started yet, or already finished

def commands():
    for line in sys.stdin:
        if line.strip() == "stop":
            stop_driver()
    stop_driver()
    done.set()

threading.Thread(target=commands, daemon=True).start()
summary = run_training(cfg)
tmp = Path(sys.argv[2] + ".tmp")
tmp.write_text(json.dumps(summary))
os.replace(tmp, sys.argv[2])
done.wait()
ray.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


class Prometheus:
    def __init__(self, root: Path, target_port: int):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "prometheus.log"
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: segr1-local\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=root,
            )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after {timeout_s} s:\n{_tail(self.log)}")

    def query(self, expr: str) -> float | None:
        """The value of an instant query that returns one sample (None when it returns nothing)."""
        body = _get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", body
        result = body["data"]["result"]
        assert len(result) <= 1, f"{expr} returned {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


@pytest.fixture
def metrics_port() -> int:
    return _free_port()


@pytest.fixture
def prometheus(tmp_path: Path, metrics_port: int) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path, metrics_port)
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


@pytest.fixture
def training(
    tmp_path: Path, metrics_port: int, tiny_policy_dir: Path
) -> Iterator[tuple[subprocess.Popen, Path, Path]]:
    """Start the training child; yields (process, summary path, log path); closes its stdin in teardown."""
    from cluster.data.synth import write_synthetic

    policy = tiny_policy_dir
    # a set of its own: 4 batches of 112 px images, the size this run's config shows the policy
    write_synthetic(tmp_path / "data", n=4 * BATCH, seed=0, size=112, split="train")
    overrides = [
        f"model.policy={policy}",
        f"data.train={tmp_path / 'data'}",
        f"data.eval={tmp_path / 'data'}",
        f"grpo.steps={MAX_STEPS}",
        f"grpo.batch_size={BATCH}",
        f"grpo.group_size={GROUP}",
        "rollout.sampling.max_tokens=32",
        "rollout.engine=hf",  # the metrics path is the engine's neither; a transformers worker starts faster
        "rollout.num_workers=1",
        "reward.num_workers=1",
        "eval.before_train=true",
        f"eval.every={VAL_EVERY}",
        f"eval.samples={VAL_SAMPLES}",
        f"checkpoint.dir={tmp_path / 'checkpoints'}",
        f"metrics.run_dir={tmp_path / 'run'}",
        f"metrics.port={metrics_port}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own, always
    env.update(
        {
            # Ray's exporters flush every max(this, 1000) ms (default 10 s); read by Ray processes at start
            "RAY_metrics_report_interval_ms": "1000",
            "RAY_USAGE_STATS_ENABLED": "0",
            "OMP_WAIT_POLICY": "PASSIVE",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
        }
    )
    summary, log = tmp_path / "summary.json", tmp_path / "train.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(DEMO_CONFIG), str(summary), *overrides],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    try:
        yield proc, summary, log
    finally:
        if proc.stdin:
            proc.stdin.close()  # the child shuts its Ray down and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _dashboard_expr(title: str) -> str:
    """The first query of the dashboard panel `title`, with Grafana's variables filled in: every cluster (a
    local run has no ray_io_cluster label, which `=~".*"` matches) and a 30 s rate window (training goes on
    until the test stops it, so the window always holds fresh samples)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    expr = next(p["targets"][0]["expr"] for p in panels if p.get("title") == title)
    return expr.replace("$cluster", ".*").replace("$__rate_interval", "30s")


def _wait_summary(proc: subprocess.Popen, summary: Path, log: Path, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while not summary.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before finishing:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"training did not finish in {timeout_s} s:\n{_tail(log)}")
        time.sleep(0.2)
    return json.loads(summary.read_text())


Check = tuple[str, Callable[[float], bool]]


def _poll(
    prom: Prometheus, checks: dict[str, Check], timeout_s: float, proc: subprocess.Popen, log: Path
) -> dict:
    """Query every expression until each one's predicate holds; fails at the deadline or if training died."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {name: prom.query(expr) for name, (expr, _) in checks.items()}
        failed = {
            k: v
            for (k, (_, ok)), v in zip(checks.items(), seen.values(), strict=True)
            if v is None or not ok(v)
        }
        if not failed:
            return seen
        if proc.poll() is not None and proc.returncode != 0:
            raise AssertionError(
                f"training exited with {proc.returncode}; Prometheus saw {seen}\n{_tail(log)}"
            )
        if time.monotonic() > deadline:
            targets = _get_json(f"{prom.url}/api/v1/targets")["data"]["activeTargets"]
            raise AssertionError(
                f"after {timeout_s} s Prometheus still has {failed} (all: {seen}); targets: {targets}\n"
                f"{_tail(log)}\n{_tail(prom.log)}"
            )
        time.sleep(0.5)


def test_prometheus_scrapes_reward_throughput_of_a_local_training_run(prometheus, training) -> None:
    proc, summary_path, log = training
    t0 = time.monotonic()
    # 1. while training runs: the dashboard's reward-throughput and rollout panels go above zero
    live = _poll(
        prometheus,
        {
            "masks_per_s": (_dashboard_expr("Masks / s"), lambda v: v > 0),
            "groups_per_s": (_dashboard_expr("Groups / s"), lambda v: v > 0),
            "rollout_tokens_per_s": (_dashboard_expr("Tokens / s"), lambda v: v > 0),
        },
        timeout_s=150,
        proc=proc,
        log=log,
    )
    t_live = time.monotonic() - t0
    # 2. stop the run (the driver finishes its step, as on Ctrl-C); Ray stays up until stdin closes
    proc.stdin.write(b"stop\n")
    proc.stdin.flush()
    summary = _wait_summary(proc, summary_path, log, timeout_s=60)
    assert summary["steps"] >= 1 and summary["groups_lost"] == 0 and summary["groups_failed"] == 0, summary
    groups = summary["groups_generated"]
    assert groups == summary["steps"] * BATCH == summary["groups_trained"], summary
    # 3. every group and mask the run produced reaches Prometheus, counted once, under its purpose: exact counts
    # from summary.json and metrics.jsonl, whatever number of steps and validations ran before the stop
    vals = [
        row for row in _jsonl(Path(summary_path).parent / "run" / "metrics.jsonl") if "val/samples" in row
    ]
    assert [row["step"] for row in vals] == list(range(0, summary["steps"] + 1, VAL_EVERY)), vals
    val_groups = sum(row["val/samples"] for row in vals)  # every sample generated once (no fault in this run)
    assert val_groups == len(vals) * VAL_SAMPLES, vals

    expected = _expected_counts(groups, val_groups, len(vals))
    totals = _poll(
        prometheus,
        {k: (expr, lambda v, n=n: v == n) for k, (expr, n) in expected.items()},
        timeout_s=30,
        proc=proc,
        log=log,
    )
    print(
        f"\nprometheus after {t_live:.1f} s of training: {json.dumps(live)}; "
        f"after the stop ({summary['steps']} steps, {len(vals)} validations): {json.dumps(totals)}"
    )


def _expected_counts(groups: int, val_groups: int, validations: int) -> dict[str, tuple[str, int]]:
    """name -> (PromQL of a total, its exact value): training and validation work counted apart (`purpose`)."""

    def count(series: str, purpose: str | None = None) -> str:
        return f'sum({series}{{purpose="{purpose}"}})' if purpose else f"sum({series})"

    rollout, masks, scored = (
        "ray_segr1_rollout_groups_total",
        "ray_segr1_reward_masks_scored_total",
        "ray_segr1_reward_groups_scored_total",
    )
    return {
        "rollout_groups": (count(rollout, "train"), groups),
        "masks_scored": (count(masks, "train"), groups * GROUP),
        "groups_scored": (count(scored, "train"), groups),
        "driver_groups_trained": (count("ray_segr1_driver_groups_trained_total"), groups),
        "val_rollout_groups": (count(rollout, "val"), val_groups),
        "val_masks": (count(masks, "val"), val_groups * VAL_GROUP),
        "val_groups": (count(scored, "val"), val_groups),
        "validations": (count("ray_segr1_driver_validations_total"), validations),
    }


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
