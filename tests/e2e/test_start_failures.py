"""A job whose start fails after Ray is up ends with that error, raised as it came (not a cleanup error raised over
it), and leaves none of its actors behind: the driver, rollout-i, reward-i, every learner rank and the learner's
placement group. One test per kind of start error, on the session's local Ray, each job in its own namespace:

- a tracker that cannot open (TensorBoard's log folder is a file): the last step of the driver's start, so the
  learner group and both pools are up when it fails (the issue's case: an MLflow store that would not open);
- a data set that does not read (a shard that is not Parquet): the driver's first step, nothing else started;
- a checkpoint that does not load (--resume onto a step-* folder whose weights file is damaged): the learner fails
  after the pools started;
- a placement that cannot be met: disaggregated placement on a cluster advertising no segr1_* resource (refused
  after Ray is up, before any actor), and a learner group whose placement group finds no room (taken back).

What can be known before Ray starts (the same kinds, caught earlier) is tests/unit/cluster/test_launch_checks.py's.
"Gone" is read from the GCS: the job's named actors (ray.util.list_named_actors lists every actor holding its name:
alive, pending or restarting) and the placement groups created during the test that are not REMOVED. The state
API (ray.util.state) needs the dashboard, which the session's Ray runs without.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.conftest import DEMO_CONFIG, e2e_config, e2e_overrides, kill_job_actors

pytestmark = pytest.mark.slow

GONE_WITHIN_S = 60.0


@pytest.fixture
def job(e2e_ray, request):
    """(ray, the job's own namespace, the placement groups that existed before it); afterwards whatever the job
    left behind is killed, so a failing test cannot hold names the next one needs."""
    namespace = f"segr1-start-{request.node.name.removeprefix('test_')[:40]}"
    before = set(e2e_ray.util.placement_group_table())
    yield e2e_ray, namespace, before
    kill_job_actors(e2e_ray, namespace)


def left_behind(ray, namespace: str, before: set[str]) -> tuple[list[str], list[str]]:
    actors = sorted(
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace
    )
    groups = sorted(
        f"{pg_id} ({pg['state']}, bundles {list(pg['bundles'].values())})"
        for pg_id, pg in ray.util.placement_group_table().items()
        if pg_id not in before and pg["state"] != "REMOVED"
    )
    return actors, groups


def assert_all_gone(ray, namespace: str, before: set[str], timeout: float = GONE_WITHIN_S) -> None:
    """Poll until no actor of `namespace` and no placement group made since `before` is left; fail naming them."""
    deadline = time.monotonic() + timeout
    while True:
        actors, groups = left_behind(ray, namespace, before)
        if not actors and not groups:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{timeout:.0f} s after the failed start, still there: actors {actors} in namespace {namespace!r}, "
                f"placement groups {groups}"
            )
        time.sleep(0.2)  # polling interval; the deadline above bounds the wait


# the e2e runs' shrunk demo (tests/e2e/conftest.py) with the transformers engine: no vLLM engine to start
ENGINE = "rollout.engine=hf"


def test_a_tracker_that_cannot_open_ends_the_job_with_its_error_and_stops_every_actor(
    assets, job, tmp_path, caplog
):
    from cluster.cli import main

    ray, namespace, before = job
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tensorboard").write_text("a file where TensorBoard's log folder goes")
    # the CLI, as a user runs it: what propagates out of main() is what Python prints, last
    with pytest.raises(FileExistsError) as err:
        main(
            ["train", "--config", str(DEMO_CONFIG), *e2e_overrides(assets, run_dir), ENGINE]
            + [f"placement.namespace={namespace}"]
        )
    assert str(run_dir / "tensorboard") in str(err.value), err.value
    assert err.value.__context__ is None, f"raised while another error was handled: {err.value.__context__!r}"
    cleanup = [r.getMessage() for r in caplog.records if r.name == "cluster.launch"]
    assert cleanup == [], cleanup  # closing the pools and the learner group reported no failure
    assert_all_gone(ray, namespace, before)


def test_a_data_set_that_does_not_read_ends_the_job_with_its_error(assets, job, tmp_path):
    from cluster.data.reader import DatasetError
    from cluster.launch import run_training

    ray, namespace, before = job
    data = tmp_path / "data"
    data.mkdir()
    (data / "part-0.parquet").write_bytes(b"not parquet")  # there and readable: passes the start checks
    cfg = e2e_config(
        assets, tmp_path / "run", f"data.train={data}", ENGINE, f"placement.namespace={namespace}"
    )
    with pytest.raises(DatasetError, match="part-0.parquet is not a readable Parquet file") as err:
        run_training(cfg)
    assert err.value.__context__ is None, err.value.__context__
    assert_all_gone(ray, namespace, before)


def test_a_checkpoint_that_does_not_load_ends_the_job_with_its_error_and_stops_every_actor(
    assets, job, tmp_path
):
    from cluster.launch import run_training

    ray, namespace, before = job
    run_dir = tmp_path / "run"
    folder = (
        run_dir / "checkpoints" / "step-000001"
    )  # complete to --resume's start check, its weights damaged
    (folder / "policy").mkdir(parents=True)
    (folder / "policy" / "config.json").write_text("{}")
    (folder / "policy" / "model.safetensors").write_bytes(b"\xff" * 64)
    (folder / "optimizer.json").write_text("{}")
    (folder / "state.json").write_text(json.dumps({"format_version": 1, "step": 1, "policy_version": 1}))
    cfg = e2e_config(assets, run_dir, ENGINE, f"placement.namespace={namespace}")
    with pytest.raises(
        Exception, match=r"step-000001/policy/model\.safetensors is not a readable safetensors"
    ) as err:
        run_training(cfg, resume=True)
    assert err.value.__context__ is None, err.value.__context__
    assert_all_gone(ray, namespace, before)


def test_a_placement_that_cannot_be_met_ends_the_job_before_any_actor(assets, job, tmp_path):
    from cluster.config import ConfigError
    from cluster.launch import run_training

    ray, namespace, before = job
    cfg = e2e_config(assets, tmp_path, "placement.mode=disaggregated", f"placement.namespace={namespace}")
    with pytest.raises(
        ConfigError, match="no node of this Ray cluster advertises segr1_driver, segr1_rollout"
    ):
        run_training(cfg)
    assert_all_gone(ray, namespace, before)


def test_a_learner_group_without_room_takes_back_its_placement_group(assets, job, tmp_path):
    from cluster.pools.topology import spawn_learner_ranks
    from learner.learner import Learner

    ray, namespace, before = job
    cfg = e2e_config(
        assets, tmp_path, "learner.resources.custom={segr1_nowhere: 1}", f"placement.namespace={namespace}"
    )
    with pytest.raises(RuntimeError, match=r"found no room in 1 s: each asks for .*'segr1_nowhere': 1"):
        spawn_learner_ranks(cfg, Learner, ready_timeout_s=1.0)
    assert_all_gone(ray, namespace, before)


class CloseFails:
    """A driver whose close() raises (as DriverActor.close did on a LearnerGroup before this was fixed)."""

    def close(self) -> None:
        raise RuntimeError("closing failed on purpose")


def test_a_close_that_fails_is_logged_and_the_driver_still_goes(job, caplog):
    from cluster.config import load_config
    from cluster.launch import stop_driver
    from cluster.pools.topology import spawn_driver

    ray, namespace, before = job
    driver = spawn_driver(load_config(DEMO_CONFIG, [f"placement.namespace={namespace}"]), CloseFails)
    with caplog.at_level("WARNING", logger="cluster.launch"):
        stop_driver(driver, timeout_s=60)  # returns: the job's own error, if any, stays the one raised
    (record,) = [r.getMessage() for r in caplog.records if r.name == "cluster.launch"]
    assert record == "closing the job's actors failed: RuntimeError: closing failed on purpose", record
    assert_all_gone(ray, namespace, before)
