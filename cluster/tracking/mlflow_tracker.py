"""MLflow (extra `mlflow`) through MlflowClient. Tracking URI: metrics.mlflow_uri (a store MLflow 3 opens: the config
refuses file:// and folder paths, cluster/config.py `mlflow_uri_problem`), or by default a local SQLite
store <run_dir>/mlflow.db with artifacts in <run_dir>/mlartifacts (browse it with
`mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db`). Experiment: metrics.project. The run id is kept in
<run_dir>/trackers.json; a resumed job continues that run. MLflow has no histogram type: the reward histograms
are not sent to it (their means are, as scalars). Overlays are PNG artifacts overlays/<name>/step_NNNNNN.png."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cluster.tracking.base import load_ids, save_id

PARAMS_PER_CALL = 100  # MLflow's log_batch limit
PARAM_CHARS = 6000


class MlflowTracker:
    def __init__(self, uri: str | None = None, experiment: str = "segr1") -> None:
        self.uri = uri
        self.experiment = experiment
        self.client = None
        self.run_id = ""

    def start(self, run_dir: Path, run_name: str, config: dict, resume: bool, step: int) -> None:
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        self.client = MlflowClient(self.uri or f"sqlite:///{run_dir / 'mlflow.db'}")
        stored = load_ids(run_dir).get("mlflow") if resume else None
        if stored:
            self.run_id = stored
            self.client.update_run(stored, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(self.experiment, (run_dir / "mlartifacts").as_uri())
        )
        tags = {k: str(config[k]) for k in ("segr1_version", "git_commit") if k in config}
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        save_id(run_dir, "mlflow", self.run_id)
        self._params(config)

    def _params(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:PARAM_CHARS]) for k, v in sorted(config.items())]
        for i in range(0, len(params), PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[i : i + PARAMS_PER_CALL])

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()]
        )

    def log_histogram(self, step: int, name: str, values: np.ndarray) -> None:
        return None  # no histogram type in MLflow (module docstring)

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.client.log_image(self.run_id, image, artifact_file=f"overlays/{name}/step_{step:06d}.png")

    def log_text(self, step: int, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"text/{name}/step_{step:06d}.txt")

    def close(self) -> None:
        if self.client is not None and self.run_id:
            self.client.set_terminated(self.run_id)
            self.client = None
