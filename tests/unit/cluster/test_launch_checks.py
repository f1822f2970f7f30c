"""What is checked or guaranteed before and while a job runs, without a cluster:
- a `ray job submit --working-dir .` job with relative paths fails with one message naming the absolute form;
- metrics.mlflow_uri takes the tracking stores MLflow 3 opens and refuses its classic folder store when the config
  loads: `segr1 train` exits 2 with one message naming the key, without a traceback and before Ray starts;
- the start checks (cluster/job_paths.py `check_start`) list every missing library, input and unwritable output in
  one message, each with its key; `segr1 train` stops on them before Ray starts, `--dry-run` reports them;
- every metrics.jsonl line is readable by another process as soon as the driver wrote it (flushed per step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config
from cluster.job_paths import check_job_paths, check_start, start_problems
from cluster.tracking.base import EXTRAS
from learner.checkpoint import save_checkpoint
from tests.e2e.conftest import DEMO_CONFIG, REPO
from tests.support.checkpoints import empty_optimizer, empty_policy

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


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "sqlite:////data/mlruns/mlflow.db",
        "postgresql://user@db:5432/mlflow",
        "postgresql+psycopg2://user@db/mlflow",
        "mysql+pymysql://user@db/mlflow",
        "mssql://user@db/mlflow",
        "http://127.0.0.1:5000",
        "https://mlflow.example.org",
        "databricks",
        "databricks://my-profile",
    ],
)
def test_mlflow_tracking_stores_are_accepted(uri):
    assert load_config(None, [f"metrics.mlflow_uri={uri}"]).metrics.mlflow_uri == uri


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        (
            "file:///data/mlruns",
            "MLflow 3 refuses; use a SQLite file, e.g. metrics.mlflow_uri=sqlite:////data/mlruns/",
        ),
        (
            "/data/mlruns",
            "MLflow 3 refuses; use a SQLite file, e.g. metrics.mlflow_uri=sqlite:////data/mlruns/",
        ),
        ("mlruns", "MLflow 3 refuses; use a SQLite file, e.g. metrics.mlflow_uri=sqlite:///mlruns/mlflow.db"),
        ("databricks-uc", "scheme 'databricks-uc' of 'databricks-uc' is not an MLflow tracking store"),
        ("s3://bucket/mlruns", "scheme 's3' of 's3://bucket/mlruns' is not an MLflow tracking store"),
    ],
)
def test_mlflow_folder_store_and_unknown_schemes_are_refused_naming_the_key(uri, says):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["metrics.trackers=[jsonl,mlflow]", f"metrics.mlflow_uri={uri}"])
    assert "\n  metrics.mlflow_uri: " in str(err.value) and says in str(err.value), err.value


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`segr1 ARGS` in a subprocess; RAY_ADDRESS names a port nothing listens on, so a run that got as far as
    starting or joining Ray would fail with Ray's connection error instead of the expected message."""
    segr1 = Path(sys.executable).parent / "segr1"
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", **(env or {})}
    return subprocess.run([str(segr1), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_segr1_train_refuses_the_mlflow_folder_store_before_ray_starts():
    r = _cli(
        "train",
        "--config",
        "cluster/configs/demo.yaml",
        "metrics.trackers=[jsonl,tensorboard,mlflow]",
        "metrics.mlflow_uri=file:///data/mlruns",
    )
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.startswith("segr1 train: invalid configuration"), r.stderr
    assert r.stderr.count("segr1 train:") == 1 and "Traceback" not in r.stderr, r.stderr
    problem = [line.strip() for line in r.stderr.splitlines()[1:] if line.strip()]
    assert len(problem) == 1 and problem[0].startswith("metrics.mlflow_uri: 'file:///data/mlruns'"), r.stderr
    assert "sqlite:////data/mlruns/mlflow.db" in problem[0]


def _startable(root: Path, *overrides: str):
    """demo.yaml with inputs that exist under root and outputs there: every start check passes."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "part-0.parquet").write_bytes(b"")  # the checks look for shards, not into them
    (root / "policy").mkdir()
    return load_config(
        DEMO_CONFIG,
        [
            f"model.policy={root / 'policy'}",
            f"data.train={root / 'data'}",
            f"data.eval={root / 'data'}",
            f"metrics.run_dir={root / 'run'}",
            f"checkpoint.dir={root / 'run' / 'checkpoints'}",
            *overrides,
        ],
    )


def test_start_checks_pass_and_name_every_problem_with_its_key(tmp_path, monkeypatch):
    check_start(_startable(tmp_path / "good"))
    (tmp_path / "a-file").write_text("")
    (tmp_path / "no-shards").mkdir()
    cfg = _startable(
        tmp_path / "bad",
        f"data.train={tmp_path / 'no-data'}",
        f"data.eval={tmp_path / 'no-shards'}",
        f"model.policy={tmp_path / 'no-policy'}",
        "model.reference=Qwen/Qwen2.5-VL-3B-Instruct",  # a hub id: not a path of this machine
        f"checkpoint.dir={tmp_path / 'a-file' / 'checkpoints'}",
        "metrics.trackers=[jsonl,wandb]",
    )
    monkeypatch.setitem(EXTRAS, "wandb", ("segr1_no_such_module", "wandb"))
    with pytest.raises(ConfigError) as err:
        check_start(cfg)
    lines = str(err.value).splitlines()
    assert lines[0] == "the job cannot start (checked before Ray or any actor starts):"
    keys = [line.strip().split("=", 1)[0].split(" ", 1)[0] for line in lines[1:]]
    assert keys == ["metrics.trackers", "data.train", "data.eval", "model.policy", "checkpoint.dir"], lines
    assert "pip install -e '.[wandb]'" in lines[1]
    assert f"segr1 data synth --out {tmp_path / 'no-data'}" in lines[2]
    assert "no *.parquet shards" in lines[3] and "no such file or folder" in lines[4]
    assert f"{tmp_path / 'a-file'} is a file, not a folder" in lines[5]


def test_resume_needs_the_checkpoint_it_continues_from(tmp_path):
    cfg = _startable(tmp_path)
    assert start_problems(cfg, resume=False) == []
    (problem,) = start_problems(cfg, resume=True)
    assert problem.startswith(f"checkpoint.dir={tmp_path / 'run' / 'checkpoints'}: no such file or folder")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (problem,) = start_problems(cfg, resume=True)
    assert problem.startswith("checkpoint.dir=") and "needs a complete step-* folder" in problem
    assert "run without --resume" in problem
    (tmp_path / "run" / "checkpoints" / "step-000002").mkdir()  # empty: named with what it lacks
    (problem,) = start_problems(cfg, resume=True)
    assert "step-000002: no readable state.json" in problem and "no policy/config.json" in problem, problem
    save_checkpoint(tmp_path / "run" / "checkpoints", 1, {"policy_version": 1}, empty_policy, empty_optimizer)
    assert start_problems(cfg, resume=True) == []  # the complete step-1 (the empty step-2 is skipped)
    best = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume_from": "best"})})
    (problem,) = start_problems(best, resume=True)
    assert "checkpoint.resume_from=best needs a best.json" in problem


def test_paths_are_not_checked_through_ray_client(tmp_path, monkeypatch):
    cfg = load_config(DEMO_CONFIG, [f"data.train={tmp_path / 'no-data'}"])
    assert any(p.startswith("data.train=") for p in start_problems(cfg))
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # the actors' files may not be this machine's
    assert start_problems(cfg) == []


def test_segr1_train_stops_on_the_start_checks_before_ray_and_the_dry_run_reports_them(
    tmp_path, capsys, monkeypatch
):
    import cluster.launch
    from cluster.cli import main

    def no_ray(cfg):
        raise AssertionError("the start checks should have stopped the job before Ray started")

    monkeypatch.setattr(cluster.launch, "init_ray", no_ray)
    missing = tmp_path / "no-data"
    args = ["train", "--config", str(DEMO_CONFIG), f"data.train={missing}", f"metrics.run_dir={tmp_path}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("segr1 train: the job cannot start") and err.count("segr1 train:") == 1, err
    assert f"  data.train={missing}: no such file or folder" in err
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "\n# start checks: `segr1 train` would stop before Ray starts:\n" in out
    assert f"\n#   data.train={missing}: no such file or folder" in out


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
    from cluster.driver.loop import TrainDriver
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
