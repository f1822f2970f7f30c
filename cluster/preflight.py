"""`segr1 preflight`'s job: the training job itself (cluster/launch.py's driver actor, its pools, placement, weight
sync and metrics) run for a few steps with `model.dummy_weights=true`, each start and step attributed to a stage.

    result = run_preflight(cfg)    # {"summary", "weight_syncs", "memory", "metrics"}; StageFailed names the stage

Stages, in the order the job passes them: model files (config.json, tokenizer and processor files, before Ray),
start checks (cluster/job_paths.py), placement (Ray, the pools' resources, every actor placed), learner start,
engine start (the rollout workers' engines), reward start (the segmenters), first weight sync (the first publish:
it must go through weight_sync.backend, not fall back to the object store), then `step N`. A failure raises
`StageFailed(stage, cause)`: the cause in one line, a remote error's own exception rather than Ray's traceback.

`PreflightDriver` is `DriverActor` (TrainDriver) with the stage bookkeeping, a wait for every pool's actors before
the first step, no checkpoint (the weights are random) and, at the end, every actor's peak memory
(runtime/memory.py) through the pools.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import ray

from cluster.config import ConfigError, TrainConfig
from cluster.driver.loop import TrainDriver
from cluster.job_paths import check_job_paths, check_start
from cluster.launch import DriverActor, stop_driver, training_workers
from cluster.pools.placement import check_pool_resources
from cluster.pools.topology import init_ray, spawn_driver

START_TIMEOUT_S = 1800.0  # a 7B vLLM engine compiling CUDA graphs on a cold node takes minutes


class StageFailed(RuntimeError):
    """The preflight stopped at `stage` because of `cause` (one line)."""

    def __init__(self, stage: str, cause: str):
        super().__init__(f"{stage}: {cause}")
        self.stage, self.cause = stage, cause

    def __reduce__(self):
        return (StageFailed, (self.stage, self.cause))


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failed)\b.*")


def describe(err: BaseException) -> str:
    """What went wrong, in one line: a RayTaskError's cause, an actor's failed __init__ (the exception line of
    the creation task's traceback Ray prints), else the error itself."""
    while isinstance(getattr(err, "cause", None), BaseException) and err.cause is not err:
        err = err.cause
    if isinstance(err, StageFailed):
        return err.cause
    text = str(err)
    lines = [ln.rstrip() for ln in text.splitlines()]
    if "Traceback" in text or "creation task" in text:
        hits = [i for i, ln in enumerate(lines) if _EXCEPTION_LINE.match(ln)]
        if hits:  # the raised exception's own line(s), after the traceback
            return " ".join(ln.strip() for ln in lines[hits[-1] :] if ln.strip())[:800]
    first = " ".join(ln.strip() for ln in lines if ln.strip())[:800]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


# Files of a model folder that dummy weights still read (runtime.qwen_vl.load_processor, vLLM's tokenizer).
POLICY_FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def model_file_problems(cfg: TrainConfig) -> list[str]:
    """What the job's local model folders lack for dummy weights (a hub id is left to the workers to resolve)."""
    problems = []
    folders = {"model.policy": cfg.model.policy}
    if cfg.model.reference and cfg.grpo.beta > 0:
        folders["model.reference"] = cfg.model.reference
    for key, path in folders.items():
        folder = Path(path)
        if not folder.is_dir():
            if not _hub_id(path):
                problems.append(f"{key}={path}: no such folder")
            continue
        missing = [f for f in POLICY_FILES if not (folder / f).is_file()]
        if not any(all((folder / f).is_file() for f in group) for group in TOKENIZER_FILES):
            missing.append("tokenizer.json (or vocab.json + merges.txt)")
        if missing:
            problems.append(f"{key}={path}: lacks {', '.join(missing)}")
    sam = cfg.reward.segmenter_path
    if cfg.reward.segmenter == "hf-sam2" and sam and not (Path(sam) / "config.json").is_file():
        problems.append(f"reward.segmenter_path={sam}: lacks config.json")
    return problems


def _hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/"))


class PreflightDriver(DriverActor):
    """The training driver with the preflight's stages (see the module docstring)."""

    def __init__(self, *args: Any):
        self.stage = "learner start"
        self.weight_syncs: list[dict] = []
        super().__init__(*args)

    def preflight(self, start_timeout_s: float = START_TIMEOUT_S) -> dict:
        """Start, run cfg.grpo.steps steps, and report; StageFailed names the stage that failed."""
        if self._start_error is not None:
            raise StageFailed(self._start_stage(), describe(self._start_error)) from None
        self._wait_started(start_timeout_s)
        self.stage = "step 1"
        try:
            summary = TrainDriver.run(self)
        except Exception as err:
            raise StageFailed(self.stage, describe(err)) from None
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return {
            "summary": summary,
            "weight_syncs": self.weight_syncs,
            "memory": self.peak_memory(),
            "metrics": [json.loads(ln) for ln in lines if ln.strip()],
        }

    def _start_stage(self) -> str:
        """Which part of the start raised (cluster/driver/start.py names the one it was starting)."""
        part = getattr(self, "starting", "learner")  # unset: the failure came before any part started
        if part == "learner":  # the learner group, or its first call (its ranks' constructors)
            return "placement" if "found no room" in str(self._start_error) else "learner start"
        return {"rollout": "engine start", "reward": "reward start"}.get(part, "driver start")

    def _wait_started(self, timeout_s: float) -> None:
        """Every rollout and reward actor up (placed, its engine or segmenter built), the first failure raised."""
        stage = {"rollout": "engine start", "reward": "reward start"}
        refs = {}
        for pool in (self.rollout, self.reward):
            for name, handle in pool.handles().items():
                refs[handle.__ray_ready__.remote()] = (stage[pool.prefix], name)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
            if not done:
                names = ", ".join(sorted(refs[r][1] for r in pending))
                raise StageFailed(
                    "placement",
                    f"{names} not up after {timeout_s:.0f} s: no node has the resources they ask for "
                    "(rollout/reward.resources, placement.mode), or their start is still running "
                    "(--start-timeout)",
                )
            try:
                ray.get(done[0])
            except Exception as err:
                what, name = refs[done[0]]
                raise StageFailed(what, f"{name}: {describe(err)}") from None

    def _publish(self, stats) -> dict:
        self.stage = (
            "first weight sync" if not self.weight_syncs else f"weight sync after step {self.step + 1}"
        )
        sync = super()._publish(stats)
        self.weight_syncs.append({"step": self.step, **sync})
        if sync.get("backend") != self.weights.backend:
            raise RuntimeError(
                f"weight_sync.backend={self.weights.backend} failed and version {self.version} went through the "
                "object store instead (the driver's log names the failure)"
            )
        self.stage = f"step {self.step + 1}"
        return sync

    def _checkpoint(self, open_chunks) -> str:
        return ""  # random weights: nothing worth saving, and checkpoint.dir may hold the real run's

    def peak_memory(self) -> list[dict]:
        """Every actor's peak memory, through the pools and the learner group: [{pool, actor, ...}]."""
        rows = []
        for pool in (self.rollout, self.reward):
            measured = pool.broadcast(lambda a: a.peak_memory.remote())
            rows += [{"pool": pool.prefix, "actor": n, **measured[n]} for n in sorted(measured)]
        handles = self.learner.handles()
        measured = ray.get([h.peak_memory.remote() for h in handles.values()])
        rows += [{"pool": "learner", "actor": n, **m} for n, m in zip(handles, measured, strict=True)]
        return rows


def run_preflight(cfg: TrainConfig, start_timeout_s: float = START_TIMEOUT_S) -> dict:
    """The preflight job on local Ray or RAY_ADDRESS (cfg as `segr1 preflight` builds it: dummy weights, N
    steps). Returns PreflightDriver.preflight's report; raises StageFailed."""
    problems = model_file_problems(cfg)
    if problems:
        raise StageFailed(
            "model files", "; ".join(problems) + " (docs/kubernetes.md: the files preflight needs)"
        )
    try:
        check_job_paths(cfg)
        check_start(cfg, False)
    except ConfigError as err:
        raise StageFailed("start checks", str(err)) from None
    try:
        init_ray(cfg)
        check_pool_resources(cfg)
    except Exception as err:
        raise StageFailed("placement", describe(err)) from None
    driver = spawn_driver(cfg, PreflightDriver, cfg, training_workers, False, False)
    try:
        return ray.get(driver.preflight.remote(start_timeout_s))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, StageFailed):
            raise err.cause from None
        raise StageFailed("driver", describe(err)) from None
    except ray.exceptions.RayActorError as err:
        raise StageFailed("driver", describe(err)) from None
    finally:
        stop_driver(driver)
