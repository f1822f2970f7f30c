"""The one configuration tree of a training job, composed from the sections each package owns.

The rollout, reward, learner (+ grpo, checkpoint) and weight-transport sections live beside their workers
(actors/config.py, reward_service/config.py, learner/config.py, runtime/weights/config.py) and the shared
`PolicySpec` / `PromptConfig` / `Resources` in protos/config.py; this module adds the job's own sections (model,
data, eval, metrics, placement), validates the rules that span sections, and hands each worker only its section
(`policy_spec(phase)` with the prompts of training or evaluation, `weight_transport`). Workers never see
`TrainConfig`.

Loaded from YAML (`load_config`) with `key.sub=value` overrides from the command line. Every field has a
description and bounds; an invalid value fails with a message naming the field, saying why and how to fix it.
Nothing is silently rewritten. `segr1 train --config FILE --dry-run` prints the resolved tree and the prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from actors.config import RolloutConfig, SamplingSection
from learner.config import CheckpointConfig, GRPOConfig, LearnerConfig, LearnerSpec
from protos.config import STRICT, PolicySpec, PromptConfig, PromptTexts, Resources
from reward_service.config import RewardConfig, RewardWeights
from runtime.weights.config import WeightSyncConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "GRPOConfig",
    "LearnerConfig",
    "LearnerSpec",
    "MetricsConfig",
    "ModelConfig",
    "AutoscaleConfig",
    "PlacementConfig",
    "EvalConfig",
    "EvalTokens",
    "PolicySpec",
    "PromptConfig",
    "PromptTexts",
    "Resources",
    "RewardConfig",
    "RewardWeights",
    "RolloutConfig",
    "SamplingSection",
    "TrainConfig",
    "WeightSyncConfig",
    "build_config",
    "dump_config",
    "load_config",
]


INFLIGHT_CALLS = 2
"""generate calls the rollout pool keeps in flight per actor (cluster/pools/topology.py; the object store plan)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which field, why, and how to fix it."""


class ModelConfig(BaseModel):
    """Which policy and which segmenter."""

    model_config = STRICT

    policy: str = Field(
        "runs/models/policy",
        min_length=1,
        description="Policy: a Hugging Face folder or hub id of a Qwen2.5-VL model (the tiny one in the demo).",
    )
    reference: str | None = Field(
        None,
        description="Frozen reference for the KL term; None uses the starting policy. Unused when beta=0.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto: bfloat16 on GPU, float32 on CPU."
    )
    dummy_weights: bool = Field(
        False,
        description="Build the policy, reference and segmenter from their config.json with random weights, "
        "reading no weight file (`segr1 preflight` sets it); never for a real run.",
    )


# The tracking stores MLflow 3 opens, by the URI's scheme (mlflow/tracking/_tracking_service/utils.py,
# _register_tracking_stores): SQLAlchemy databases (mlflow/store/db/db_types.py; "postgresql+psycopg2" counts as
# postgresql), a tracking server, Databricks. "file" and "" (a bare path) select the classic folder store, whose
# constructor raises unless MLFLOW_ALLOW_FILE_STORE=true is set in the driver's process (mlflow/store/tracking/
# file_store.py); "databricks-uc" and "uc" are model registries, for which MLflow raises as a tracking URI.
MLFLOW_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def mlflow_uri_problem(uri: str) -> str | None:
    """Why MLflow 3 would refuse `uri` as metrics.mlflow_uri (None: a tracking store it opens)."""
    scheme = uri if uri in ("databricks", "databricks-uc", "uc") else urlparse(uri).scheme.lower()
    if scheme.split("+", 1)[0] in MLFLOW_SCHEMES:
        return None
    if scheme in ("file", ""):
        folder = (urlparse(uri).path if scheme == "file" else uri).rstrip("/") or "."
        return (
            f"{uri!r} selects MLflow's classic folder store (file:// or a bare folder path), which MLflow 3 "
            f"refuses; use a SQLite file, e.g. metrics.mlflow_uri=sqlite:///{folder}/mlflow.db, a tracking "
            "server (http://HOST:5000), or leave metrics.mlflow_uri unset for <run_dir>/mlflow.db"
        )
    return (
        f"scheme {scheme!r} of {uri!r} is not an MLflow tracking store; use sqlite:///<path>/mlflow.db, "
        "postgresql://, mysql://, mssql://, http(s)://<tracking server> or databricks[://<profile>]"
    )


class MetricsConfig(BaseModel):
    """Prometheus export and run logs."""

    model_config = STRICT

    port: int = Field(
        9108, ge=0, le=65535, description="Prometheus port of the driver; 0 disables the server."
    )
    run_dir: str = Field(
        "runs/train", min_length=1, description="metrics.jsonl, plots and summary.json go here."
    )
    trackers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        min_length=1,
        max_length=4,
        description="Experiment trackers: jsonl (metrics.jsonl, always on), tensorboard, wandb, mlflow "
        "(pip extras of the same names).",
    )
    image_every: int = Field(
        10,
        ge=0,
        le=1_000_000,
        description="Send prediction overlays to the trackers every N steps; 0: never.",
    )
    image_samples: int = Field(
        4, ge=1, le=32, description="Overlays per image_every step (the first groups)."
    )
    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI; None: a local SQLite store <run_dir>/mlflow.db. Accepted (MLflow 3's "
        "tracking stores): sqlite:///<path>/mlflow.db (sqlite:////abs/path/mlflow.db for an absolute path), "
        "postgresql://, mysql://, mssql:// (each optionally +driver), http(s)://<tracking server>, "
        "databricks[://<profile>]. Refused before the job starts: file:// and bare folder paths (MLflow 3 "
        "refuses its classic folder store) and databricks-uc / uc (model registries, not tracking stores).",
    )
    project: str = Field(
        "segr1", min_length=1, max_length=128, description="wandb project and MLflow experiment name."
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_uri(cls, uri: str | None) -> str | None:
        problem = mlflow_uri_problem(uri) if uri else None
        if problem:
            raise ValueError(problem)
        return uri

    @model_validator(mode="after")
    def _trackers(self) -> MetricsConfig:
        if "jsonl" not in self.trackers:
            raise ValueError(
                f"metrics.trackers={self.trackers} lacks 'jsonl': metrics.jsonl is always written (resume and the "
                "reports read it); add 'jsonl' to the list"
            )
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"metrics.trackers={self.trackers} names a tracker twice; list each once")
        return self


class DataConfig(BaseModel):
    """Data sets and the image size the policy sees."""

    model_config = STRICT

    train: str = Field(
        "runs/data/train", min_length=1, description="Folder (or file) of training Parquet shards."
    )
    eval: str | None = Field(None, description="Folder of held-out Parquet shards.")
    image_size: int = Field(
        768, ge=16, le=4096, description="Images are resized to NxN for the policy (SEG-R1: 768 or 1024)."
    )
    shuffle: bool = Field(True, description="Shuffle per epoch with the job seed.")
    on_corrupt: Literal["skip", "raise"] = Field(
        "skip", description="A corrupt row is reported, then skipped or fatal."
    )


class AutoscaleConfig(BaseModel):
    """Asking Ray's autoscaler for rollout / reward capacity from the driver's step timings (docs/scaling.md)."""

    model_config = STRICT

    enabled: bool = Field(
        False,
        description="Ask Ray's autoscaler for rollout / reward capacity (request_resources, from the job's start: "
        "`floor`, plus a unit for a pool the learner waits on; disaggregated).",
    )
    wait_share: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Ask for one more unit of a pool when the learner waited on it for more than this share "
        "of the step time over `window` steps.",
    )
    idle_share: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Release one requested unit when the wait share stayed below this over `idle_window` steps.",
    )
    window: int = Field(4, ge=1, le=10_000, description="Steps the wait share is averaged over to scale up.")
    idle_window: int = Field(20, ge=1, le=100_000, description="Steps of idle before a request is released.")
    cooldown_s: float = Field(
        120.0, ge=0.0, le=86_400.0, description="Seconds between two decisions of the same pool."
    )
    floor: Literal["num_workers", "max_workers"] = Field(
        "num_workers",
        description="Units of each pool asked of the autoscaler from the job's start to its end: num_workers "
        "(more only while the learner waits on the pool) or max_workers (the pools grow to their bounds).",
    )


class PlacementConfig(BaseModel):
    """Where the pools run."""

    model_config = STRICT

    mode: Literal["colocated", "disaggregated"] = Field(
        "colocated",
        description="colocated: all pools share the node(s); disaggregated: each on its own group.",
    )
    ray_address: str | None = Field(
        None, description="Ray address; None starts a local Ray unless RAY_ADDRESS set."
    )
    namespace: str = Field("segr1", min_length=1, description="Ray namespace of the named actors.")
    capacity_interval_s: float = Field(
        5.0,
        gt=0.0,
        le=3600.0,
        description="Disaggregated: how often the driver reads the cluster's segr1_rollout / segr1_reward "
        "units and grows or shrinks the pools to them (up to max_workers).",
    )
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig)


class EvalTokens(BaseModel):
    """New-token limit of one evaluation answer, per task (the reference's eval/ scripts' max_new_tokens)."""

    model_config = STRICT

    foreground: int = Field(
        1024,
        ge=1,
        le=32768,
        description="Foreground sets (reference: 1024, eval_foreground_segmentation.py).",
    )
    referring: int = Field(
        512, ge=1, le=32768, description="Referring sets (reference: 512, eval_referring_segmentation.py)."
    )
    reasoning: int = Field(
        512, ge=1, le=32768, description="Reasoning sets (reference: 512, eval_reasoning_segmentation.py)."
    )


class EvalConfig(BaseModel):
    """Evaluation: decoding of `segr1 eval`, `segr1 predict` and the demo's before / after, and validation while
    training (every / samples / before_train)."""

    model_config = STRICT

    max_tokens: EvalTokens = Field(default_factory=EvalTokens)
    generation_config: bool = Field(
        False,
        description="Decode as the policy folder's generation_config.json says (do_sample, temperature, top_p, "
        "top_k, repetition_penalty), as the reference's model.generate did; false: greedy (--sample: "
        "rollout.sampling).",
    )
    # validation during training (cluster/driver/validation.py): greedy answers on a fixed subset of data.eval, scored
    # like `segr1 eval`, logged as val/* (metrics.jsonl, Prometheus, the trackers), through the training pools
    every: int = Field(
        0, ge=0, le=10_000_000, description="Validate every N optimiser steps (needs data.eval); 0: off."
    )
    samples: int = Field(
        64,
        ge=0,
        le=1_000_000,
        description="Validation samples: a fixed subset of data.eval drawn with the job seed; 0: all of it.",
    )
    before_train: bool = Field(
        False,
        description="Also validate the starting policy before the first step (a fresh run; a resumed one does "
        "not validate its checkpoint's step again).",
    )


class TrainConfig(BaseModel):
    """A whole training job."""

    model_config = STRICT

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of data order, sampling and initialisation.")

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        if self.reward.segmenter in ("hf-sam2", "sam2") and not self.reward.segmenter_path:
            raise ValueError(
                f"reward.segmenter={self.reward.segmenter} needs reward.segmenter_path "
                "(a Hugging Face SAM2 folder for hf-sam2, a .pt checkpoint for sam2), or use reward.segmenter=grabcut"
            )
        if self.reward.segmenter == "sam2" and not self.reward.sam2_config:
            raise ValueError(
                "reward.segmenter=sam2 needs reward.sam2_config, e.g. configs/sam2.1/sam2.1_hiera_l.yaml"
            )
        w = self.reward.weights
        if (w.box_iou > 0 or w.box_l1 > 0) and self.reward.answer_format == "points":
            raise ValueError(
                f"reward.weights.box_iou={w.box_iou} / box_l1={w.box_l1} reward boxes, but "
                "reward.answer_format=points asks for none; set both to 0 or use answer_format=full"
            )
        top_p = self.rollout.sampling.top_p
        if top_p < 1.0 and self.grpo.tis_cap > 0:
            raise ValueError(
                f"rollout.sampling.top_p={top_p} with grpo.tis_cap={self.grpo.tis_cap}: the engine's behaviour "
                "logprobs are normalised over the top-p nucleus, the learner's over the whole vocabulary, so every "
                "importance weight pi_old / pi_behaviour would carry the nucleus's probability mass (< 1) as if "
                "it were a policy change. Set rollout.sampling.top_p=1 (the reference's setting) or turn the "
                "correction off with grpo.tis_cap=0"
            )
        for key, section in (("rollout", self.rollout), ("reward", self.reward)):
            mw = section.max_workers
            if mw is not None and mw < section.num_workers:
                raise ValueError(
                    f"{key}.max_workers={mw} is below {key}.num_workers={section.num_workers}; raise it or unset it"
                )
        self._check_validation()
        if self.rollout.max_turns > 1 and self.reward.embedding_cache == 0:  # a later turn: decodes only
            self.reward.embedding_cache = self.reward.max_inflight_per_worker * self.rollout.max_batch_groups
        return self

    def _check_validation(self) -> None:
        v, best = self.eval, self.checkpoint.keep_best
        if (v.every > 0 or v.before_train) and not self.data.eval:
            raise ValueError(
                f"eval.every={v.every} / eval.before_train={v.before_train} validate on data.eval, which is "
                "unset; set data.eval to a folder of held-out shards or eval.every=0 and eval.before_train=false"
            )
        if best is not None and v.every == 0:
            raise ValueError(
                f"checkpoint.keep_best={best} keeps the best validated checkpoint, but eval.every=0 never "
                "validates; set eval.every (e.g. 10) or checkpoint.keep_best=null"
            )

    # -- what each worker is handed -----------------------------------------------------------------------------
    def policy_spec(self, phase: Literal["train", "eval"] = "train") -> PolicySpec:
        """The policy every worker loads (model.*, data.image_size, reward.answer_format, seed) and the prompts
        it is asked with: `prompt` resolved for `phase` (train: rollout, learner, SFT; eval: evaluation)."""
        return PolicySpec(
            path=self.model.policy,
            reference=self.model.reference,
            dtype=self.model.dtype,
            image_size=self.data.image_size,
            answer_format=self.reward.answer_format,
            prompt=self.prompt.resolve(phase),
            seed=self.seed,
            dummy_weights=self.model.dummy_weights,
        )

    def weight_transport(self) -> WeightSyncConfig:
        """weight_sync with `auto` resolved: gloo for a CPU learner, cuda-ipc when learner and rollout share one
        GPU in colocated mode (fractional GPUs), nccl otherwise."""
        ws = self.weight_sync
        if ws.backend != "auto":
            return ws
        if self.learner.num_gpus == 0:
            backend = "gloo"
        else:
            fractional = 0 < self.rollout.resources.num_gpus < 1 and 0 < self.learner.resources.num_gpus < 1
            backend = "cuda-ipc" if fractional and self.placement.mode == "colocated" else "nccl"
        return ws.model_copy(update={"backend": backend})

    def learner_spec(self) -> LearnerSpec:
        """The learner's sections, the policy, and how its weights reach the rollout engines."""
        return LearnerSpec(
            policy=self.policy_spec(),
            learner=self.learner,
            grpo=self.grpo,
            checkpoint=self.checkpoint,
            weight_sync=self.weight_transport(),
            export_dtype=self.rollout_dtype(),
        )

    def rollout_dtype(self) -> str:
        """The dtype the rollout engines hold (model.dtype; auto: bfloat16 on GPU workers, float32 on CPU)."""
        if self.model.dtype != "auto":
            return self.model.dtype
        return "bfloat16" if self.rollout.resources.num_gpus > 0 else "float32"


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _parse_scalar(text: str) -> Any:
    """An override's value, read as YAML ('3' -> 3, 'true' -> True, 'null' -> None, '[1,2]' -> list)."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. grpo.group_size=8)")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_scalar(raw)
    return tree


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling against `segr1 train --dry-run` or docs/configuration.md"
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        lines.append(f"  {field}: {msg}{got}")
    return "\n".join(lines)


def build_config(tree: dict, source: str = "<dict>") -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults when path is None) and apply overrides."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist; pass --config with a YAML file (see cluster/configs/)"
            )
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        tree = loaded or {}
        source = str(p)
    if overrides:
        apply_overrides(tree, overrides)
        source += " + overrides"
    return build_config(tree, source)


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what --dry-run prints)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
