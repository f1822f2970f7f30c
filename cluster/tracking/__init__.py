"""Experiment trackers of a training run (TensorBoard, Weights & Biases, MLflow): see base.py for what each
receives and trackers.py for the driver's side."""

from cluster.tracking.base import (
    SCALAR_NAMES,
    TRACKER_NAMES,
    Tracker,
    flatten,
    run_info,
    scalar_name,
    scalars_of,
)
from cluster.tracking.trackers import Trackers, make_tracker, open_trackers

__all__ = [
    "SCALAR_NAMES",
    "TRACKER_NAMES",
    "Tracker",
    "Trackers",
    "flatten",
    "make_tracker",
    "open_trackers",
    "run_info",
    "scalar_name",
    "scalars_of",
]
