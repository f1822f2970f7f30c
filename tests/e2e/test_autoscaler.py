"""The pools make Ray's autoscaler work (docs/scaling.md, "Autoscaling"): Ray's own autoscaler (the v1
`StandardAutoscaler`, started by the head as on KubeRay) with Ray's fake multi-node provider, which starts a Ray
node on this machine for every node it launches, on a `ray.cluster_utils.Cluster` head.

The node types are those of cluster/k8s/raycluster-qwen7b-8gpu.yaml, shrunk: the head advertises segr1_driver
and segr1_learner (one CPU, the learner's), a `rollout` type advertises one segr1_rollout unit per node (1..3
nodes) and a `reward` type one segr1_reward unit (one node). The job starts with one rollout node, its rollout
pool at one worker with rollout.max_workers=3 and placement.autoscale.floor=max_workers: the job's standing
`request_resources` makes the autoscaler launch two more rollout nodes and the pool grows into them; nobody
adds a node or calls `segr1 scale`. The test stops the run once the third worker served a trained step.

`ray.cluster_utils.AutoscalingCluster` is not used: its start() runs `ray stop --force` (every Ray process of the
machine's user, other runs included), and Ray 2.60's wheel lacks the fake_multi_node/example.yaml it reads. The
head here starts the same monitor with a complete config instead, on a port of its own; the nodes the provider
launched (inside the monitor) are ended by pid at the end, found by this cluster's session folder.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.conftest import (
    REPO,
    assert_accounting,
    assert_metric_lines,
    e2e_config,
    processes_mentioning,
    read_metrics,
    wait_for,
)
from tests.e2e.run_control import following_the_cluster, stop_run, wait_for_event, wait_for_line
from tests.support.sockets import listen_ports

pytestmark = pytest.mark.slow

NAMESPACE = "segr1-autoscaler"
MAX_ROLLOUT = 3
HEAD = {"CPU": 1, "segr1_driver": 1, "segr1_learner": 1}
NODE_TYPES = {  # what the autoscaler may launch: (resources of one node, min nodes, max nodes)
    "rollout": ({"CPU": 1, "segr1_rollout": 1}, 1, MAX_ROLLOUT),
    "reward": ({"CPU": 1, "segr1_reward": 1}, 1, 1),
}
ENV = {
    "RAY_FAKE_CLUSTER": "1",
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
}  # the fake provider; a 1 s autoscaler loop


def _autoscaling_config(gcs_address: str) -> dict:
    """A complete cluster config for the fake multi-node provider (the keys Ray's config validation asks for)."""
    types = {"ray.head.default": {"resources": HEAD, "node_config": {}, "max_workers": 0}}
    for name, (resources, least, most) in NODE_TYPES.items():
        types[name] = {"resources": resources, "node_config": {}, "min_workers": least, "max_workers": most}
    lists = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    starts = ("head_start_ray_commands", "worker_start_ray_commands", "rsync_exclude", "rsync_filter")
    return {
        "cluster_name": "segr1-autoscaler-test",
        "max_workers": sum(most for _, _, most in NODE_TYPES.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,  # every fake node has this machine's address
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "head_node_type": "ray.head.default",
        "available_node_types": types,
        "docker": {},
        "auth": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        **{key: [] for key in (*lists, *starts)},
    }


def _end_session_processes(session_dir: str) -> list[int]:
    """End, by pid, what is left of the cluster's session (the nodes the provider launched in the monitor, and
    their agents, found by the session's log files they hold open)."""
    import psutil

    left = []
    for pid in processes_mentioning(session_dir, open_files=True):
        try:
            left.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=30)
    return [p.pid for p in left]


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory):
    """The head (with Ray's autoscaler) and the node types' minimum nodes, launched by the autoscaler; the session's
    local Ray (if any) is put aside for the module and started again afterwards."""
    import ray
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
    from ray.cluster_utils import Cluster

    from tests.conftest import init_session_ray

    had_session_ray = ray.is_initialized()
    if had_session_ray:
        ray.shutdown()
    saved = {key: os.environ.get(key) for key in (*ENV, "PYTHONPATH")}
    os.environ.update(ENV)  # read by the monitor the head starts, which launches the nodes
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved["PYTHONPATH"]) if p)
    (port,) = listen_ports(1)  # not ephemeral: still free when the head binds it
    config = tmp_path_factory.mktemp("autoscaler") / "cluster.json"
    config.write_text(json.dumps(_autoscaling_config(f"{ray.util.get_node_ip_address()}:{port}")))
    head = {"num_cpus": HEAD["CPU"], "resources": {k: v for k, v in HEAD.items() if k != "CPU"}}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **head,
            "include_dashboard": False,
            "gcs_server_port": port,
            "autoscaling_config": str(config),
            "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID},  # the provider's head
        },
    )
    session_dir = cluster.head_node.get_session_dir_path()
    try:
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        wait_for(lambda: _units(ray) == {"segr1_rollout": 1, "segr1_reward": 1}, 180, "the minimum nodes")
        yield ray, cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        _end_session_processes(session_dir)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if had_session_ray:
            init_session_ray()


def _units(ray) -> dict[str, float]:
    """segr1_rollout / segr1_reward units on the alive nodes."""
    have = ray.cluster_resources()
    return {res: have.get(res, 0.0) for res in ("segr1_rollout", "segr1_reward")}


def _requested(resource: str) -> float | None:
    """Units of `resource` in the cluster's request_resources (the v1 autoscaler's KV entry); None: none made."""
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(b"autoscaler_resource_request")
    return None if raw is None else sum(b.get(resource, 0.0) for b in json.loads(raw))


def _job_config(assets, run_dir):
    return e2e_config(
        assets,
        run_dir,
        *following_the_cluster(NAMESPACE),
        "placement.autoscale={enabled: true, floor: max_workers}",
        "rollout.num_workers=1",
        f"rollout.max_workers={MAX_ROLLOUT}",
        "reward.num_workers=1",
        "weight_sync.timeout_s=30",
        "rollout.engine=hf",  # a vLLM engine per new node would cost more than the scenario; same pool logic
    )


def test_the_rollout_pool_grows_as_the_autoscaler_adds_the_nodes_the_job_asks_for(
    assets, autoscaling, tmp_path
):
    from tests.e2e.conftest import start_job

    ray, cluster = autoscaling
    assert _units(ray)["segr1_rollout"] == 1, "the job must start at a rollout capacity of 1"
    cfg = _job_config(assets, tmp_path)
    driver, run_ref = start_job(cfg)
    try:
        asked = lambda: _requested("segr1_rollout") == MAX_ROLLOUT  # noqa: E731
        # deadlines are hang guards: on a loaded machine the job's start alone took over 120 s
        wait_for_event(asked, 600, f"the job's request for {MAX_ROLLOUT} segr1_rollout units", run_ref)

        def third_worker_served(line):
            return line.get("rollout_workers") == MAX_ROLLOUT and line["by_rollout_worker"].get("rollout-2")

        what = f"a step with {MAX_ROLLOUT} rollout workers, trained on rollout-2's groups"
        line = wait_for_line(tmp_path, third_worker_served, 600, what, run_ref)
        assert line["by_rollout_worker"]["rollout-2"]["tokens"] > 0
        assert _units(ray)["segr1_rollout"] == MAX_ROLLOUT  # launched by the autoscaler, not by this test
        summary = stop_run(ray, driver, run_ref, timeout=600)  # closes the driver: the request is withdrawn
    except BaseException:
        for row in read_metrics(tmp_path)[-5:]:
            print({k: row.get(k) for k in ("step", "rollout_workers", "reward_workers", "step_s")})
        raise
    finally:
        ray.kill(driver, no_restart=True)
    assert summary["rollout_workers"] == [f"rollout-{i}" for i in range(MAX_ROLLOUT)], summary
    assert summary["scale_decisions"] == [] and summary["stopped_early"], summary
    assert summary["actor_restarts"] == 0, summary  # nothing waited unplaced or crash-looped meanwhile
    assert_metric_lines(read_metrics(tmp_path), summary["steps"])
    assert_accounting(summary)  # groups_lost == 0
    assert _requested("segr1_rollout") == 0, "the job's end withdraws its request"
