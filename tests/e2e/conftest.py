"""Shared fixtures of the end-to-end tests: tiny models, synthetic data and a short SFT warm-up, built ONCE per
session in a temporary folder, plus helpers to configure and observe a training run.

Every run uses cluster/configs/demo.yaml (GrabCut, the learner) with the sizes overridden down to seconds per step
and one worker per pool unless a test asks for two. Runs share the session's local Ray (tests/conftest.py
`ray_local`); each test's named actors are killed afterwards, so a failed test cannot block the next one's actor
names.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.config import TrainConfig, load_config
from tests.support.paths import REPO

DEMO_CONFIG = REPO / "cluster" / "configs" / "demo.yaml"

# The keys every metrics.jsonl line must carry (README / docs/e2e.md: "one line per step").
METRIC_KEYS = (
    "step",
    "policy_version",
    "reward_total",
    "reward_format",
    "reward_iou",
    "reward_s_measure",
    "reward_segmentation",
    "reward_box_iou",
    "reward_box_l1",
    "reward_refine_gain",
    "episode_turns_mean",
    "stop_rate",
    "iou_turn1_mean",
    "parse_failure_rate",
    "tokens_per_s",
    "masks_per_s",
    "staleness_mean",
    "staleness_max",
    "loss",
    "kl",
    "clip_fraction",
    "ratio_mean",
    "first_ratio_mean",
    "first_clip_fraction",
    "is_weight_mean",
    "is_truncated_fraction",
    "is_masked_fraction",
    "mismatch_logp_abs",
    "mismatch_outside_fraction",
    "num_updates",
    "clip_fraction_low",
    "clip_fraction_high",
    "entropy",
    "advantage_abs_mean",
    "skipped_non_finite",
    "grad_norm",
    "lr",
    "num_completions",
    "num_tokens",
    "learner_s",
    "fill_rounds",
    "weight_sync_s",
    "step_s",
    "groups",
    "zero_variance_groups",
    "actor_restarts",
    "sample_ids",
)
SUMMARY_KEYS = (
    "groups_generated",
    "groups_trained",
    "groups_dropped_stale",
    "groups_filtered",
    "groups_zero_variance",
    "groups_lost",
    "actor_restarts",
    "steps",
    "policy_version",
)

# SFT warm-up of the session's policy: the 0.2M-parameter test preset learns the short points-only answer format
# (reward.answer_format=points, ~26 tokens) in ~150 steps (~30 s): ~90% of its answers parse at temperature 1.
SFT_STEPS = 150
SFT_BATCH = 16
SFT_LR = 1e-2


@dataclass(frozen=True)
class Assets:
    root: Path
    policy: Path  # random tiny Qwen2.5-VL (test preset, ~0.2M parameters)
    train: Path  # 64 synthetic 64x64 training samples
    train_small: Path  # 8 synthetic samples: exactly one batch, seen again at every step


@pytest.fixture(scope="session")
def assets(tmp_path_factory, tiny_policy_dir: Path) -> Assets:
    """The session's tiny policy (tests/conftest.py) and the e2e runs' own two training sets (see Assets)."""
    from cluster.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("e2e-assets")
    policy = tiny_policy_dir
    # 64-px images shown to the policy at 56 px (4 image tokens): GrabCut and generation stay cheap
    write_synthetic(root / "data" / "train", n=64, seed=0, size=64, split="train")
    write_synthetic(root / "data" / "train8", n=8, seed=1, size=64, split="train")
    return Assets(root, Path(policy), root / "data" / "train", root / "data" / "train8")


@pytest.fixture(scope="session")
def sft_run(assets: Assets):
    """The test-preset policy after a short SFT on the points-only format (~30 s on the 2-core machine), with
    run_sft's result: it parses most of its sampled answers at temperature 1, so GRPO has a reward signal to climb
    (tests/e2e/test_train.py checks what it learned)."""
    import torch

    from cluster.data.reader import DatasetReader
    from learner.sft import run_sft

    torch.set_num_threads(2)
    cfg = e2e_config(assets, assets.root / "sft-run")
    out = assets.root / "models" / "sft-policy"
    result = run_sft(
        cfg.policy_spec(),
        cfg.learner,
        DatasetReader.from_config(cfg).next_batch,
        SFT_STEPS,
        out,
        lr=SFT_LR,
        batch_size=SFT_BATCH,
        warmup_steps=5,
        n_fg=1,
        n_bg=1,
    )
    return out, result


@pytest.fixture(scope="session")
def sft_policy(sft_run) -> Path:
    """The SFT'd policy folder every e2e run starts from (unless it says otherwise)."""
    return sft_run[0]


VAL_SAMPLES = 8  # held-out samples a validating run scores at each validation


@pytest.fixture(scope="session")
def held_out(tmp_path_factory) -> Path:
    """16 synthetic held-out samples (the validation runs' data.eval)."""
    from cluster.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("held-out") / "eval"
    write_synthetic(out, n=16, seed=2, size=64, split="val")
    return out


def split_validation(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl lines: (one per step, the val/* lines of validations)."""
    from cluster.driver.validation import is_validation_line

    return [r for r in rows if not is_validation_line(r)], [r for r in rows if is_validation_line(r)]


def e2e_config(assets: Assets, run_dir: Path, *overrides: str, policy: Path | None = None) -> TrainConfig:
    """The demo config shrunk to a seconds-per-step run writing into run_dir (metrics, summary, checkpoints)."""
    return load_config(DEMO_CONFIG, [*e2e_overrides(assets, run_dir, policy), *overrides])


def e2e_overrides(assets: Assets, run_dir: Path, policy: Path | None = None) -> list[str]:
    """e2e_config's overrides of cluster/configs/demo.yaml (also as command-line arguments of a CLI run)."""
    return [
        f"model.policy={policy or assets.policy}",
        f"data.train={assets.train}",
        "data.eval=null",
        "eval.every=0",  # no held-out set: no validation (demo.yaml validates every 10 steps)
        "data.image_size=56",
        "reward.answer_format=points",
        "reward.weights.box_l1=0",  # the points-only format has no box to reward
        "grpo.steps=3",
        "grpo.batch_size=4",
        "grpo.group_size=4",
        # one worker per pool: every job start launches fewer processes (a vLLM engine each); the runs that
        # need two (test_train's, test_faults, test_multinode, the job submitted) ask for them
        "rollout.num_workers=1",
        "reward.num_workers=1",
        "rollout.sampling.max_tokens=48",
        "learner.micro_batch_size=32",
        "metrics.port=0",
        f"metrics.run_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'checkpoints'}",
        "checkpoint.every=0",
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    """The complete lines of metrics.jsonl: while the job runs, the driver may be writing the last one."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.2):
    """Poll `condition` until it returns something truthy (returned) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def wait_while_progressing(
    condition: Callable[[], object],
    progress: Callable[[], object],
    stall: float,
    what: str,
    every: float = 0.2,
):
    """Poll `condition` until it returns something truthy (returned); fail only when `progress()` (e.g. the size
    of a job's log and metrics) stood still for `stall` seconds: a job that goes on but slowly, on a loaded
    machine, is waited for (the test's own timeout is the last bound), one that stalls is not."""
    last, moved = progress(), time.monotonic()
    while True:
        value = condition()
        if value:
            return value
        now = progress()
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall:
            raise AssertionError(f"no progress in {stall:.0f} s ({last}) waiting for {what}")
        time.sleep(every)


def assert_accounting(summary: dict) -> None:
    """No lost work: every generated group was trained, dropped as stale, filtered or left in the pipeline."""
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    assert not missing, f"summary.json lacks {missing}"
    accounted = (
        summary["groups_trained"]
        + summary["groups_dropped_stale"]
        + summary["groups_filtered"]
        + summary["groups_left_over"]
    )
    assert summary["groups_generated"] == accounted, summary
    assert summary["groups_lost"] == 0, summary
    assert summary["groups_failed"] == 0, summary


def assert_metric_lines(rows: list[dict], steps: int, first_step: int = 1) -> None:
    """One line per step, numbered first_step..steps, each with every documented key and finite numbers."""
    assert [r["step"] for r in rows] == list(range(first_step, steps + 1))
    for r in rows:
        missing = [k for k in METRIC_KEYS if k not in r]
        assert not missing, f"metrics.jsonl line of step {r.get('step')} lacks {missing}"
        for k in METRIC_KEYS:
            if k != "sample_ids":
                assert isinstance(r[k], int | float) and math.isfinite(r[k]), (k, r[k])


def job_actor_names(ray, namespace: str = "segr1") -> set[str]:
    """Named actors of a training job (driver, learner-0, rollout-i, reward-i) alive in `namespace`."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == namespace}


def kill_job_actors(ray, namespace: str = "segr1") -> None:
    """Kill what a training job left behind (a failed test) and wait until the names are free again."""
    for name in job_actor_names(ray, namespace):
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:  # gone in between
            pass
    wait_for(lambda: not job_actor_names(ray, namespace), 60, f"the actors of namespace {namespace} to exit")


def start_job(cfg: TrainConfig, resume: bool = False):
    """The driver actor and the ObjectRef of its run(), as cluster.launch.run_training starts them, for tests
    that act while the job runs."""
    from cluster.launch import spawn_driver_actor

    driver = spawn_driver_actor(cfg, resume)
    return driver, driver.run.remote()


def finish_job(ray, driver, run_ref, timeout: float, what: str = "the run to end") -> dict:
    """Wait for run() (at most `timeout` s, then fail naming `what`), close the pools and the driver; returns the
    summary."""
    if not ray.wait([run_ref], timeout=timeout)[0]:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
    summary = ray.get(run_ref)
    ray.get(driver.close.remote(), timeout=60)
    ray.kill(driver, no_restart=True)
    return summary


@pytest.fixture(scope="session")
def e2e_ray(ray_local):
    return ray_local


RISE_STEPS = 12
IMAGE_EVERY = 4  # the sync run's TensorBoard overlays: steps 4, 8, 12
# Sampling hotter than the SFT policy was trained for, so that a fair share of its answers break the format and
# GRPO has something to fix within a dozen steps; lr with a short warm-up (Adam's first step is lr-sized).
RISE_OVERRIDES = ("rollout.sampling.temperature=1.5", "learner.lr=1e-3", "learner.warmup_steps=2")


@pytest.fixture(scope="session")
def sync_run(assets, sft_policy, e2e_ray, tmp_path_factory):
    """12 sync GRPO steps from the SFT policy on 8 fixed images (B=8: the same images every step), two workers per
    pool and the demo's trackers (jsonl + TensorBoard, overlays of 2 groups every 4 steps). test_train checks
    the run, test_trackers what it logged to TensorBoard."""
    from cluster.launch import run_training

    run_dir = tmp_path_factory.mktemp("sync-run")
    cfg = e2e_config(
        assets,
        run_dir,
        f"data.train={assets.train_small}",
        f"grpo.steps={RISE_STEPS}",
        "grpo.batch_size=8",
        "grpo.group_size=8",
        "rollout.num_workers=2",  # the demo's pools: two of each, one weight-sync group of three
        "reward.num_workers=2",
        f"metrics.image_every={IMAGE_EVERY}",
        "metrics.image_samples=2",
        # deltas whatever the changed fraction (auto leaves them off for a learner on the CPU): test_train checks
        # that the workers generate with exactly the learner's weights
        "weight_sync.delta=true",
        "weight_sync.delta_max_changed=1.0",
        *RISE_OVERRIDES,
        policy=sft_policy,
    )
    try:
        summary = run_training(cfg)
    finally:
        kill_job_actors(e2e_ray)
    return cfg, run_dir, summary


@pytest.fixture
def ray_job(e2e_ray):
    """The session's Ray; afterwards every actor a training job left behind (a failed test) is killed."""
    yield e2e_ray
    kill_job_actors(e2e_ray)


def processes_mentioning(text: str, open_files: bool = False) -> list[int]:
    """Processes (other than this one) whose command line contains `text` (a cluster's temp dir, a run dir); with
    `open_files`, also those holding a file under it open: Ray's agents and workers retitle themselves
    (`ray::DashboardAgent`), and only their log files, kept open in the session's folder, still name the cluster
    they belong to."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            named = text in (proc / "cmdline").read_bytes().decode(errors="replace")
            if named or (open_files and _holds_open(proc, text)):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _holds_open(proc: Path, text: str) -> bool:
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if text in os.readlink(fd):
                return True
        except OSError:
            continue
    return False
