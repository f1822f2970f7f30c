"""Evaluation of a policy: rollout + segmenter, no learner, every sample exactly once, in a fixed order.

- metrics.py:  the paper's segmentation metrics (pysodmetrics foreground set, cIoU / gIoU), per data set;
- loop.py:     `evaluate_samples(rollout, predictor, samples, ...)`, the per-sample results and the summary;
- report.py:   metrics.json, metrics.md (the paper's table layout), predictions.parquet;
- pictures.py: overlays and the grid of the best and worst predictions;
- inputs.py:   the samples of a data set and the policy folder of a checkpoint;
- on_ray.py:   the same loop over the Ray rollout pool and `eval-<i>` Predictor actors (cluster/pools/topology.py).

Parsing and segmenting is reward_service.predictor.Predictor's, the reward worker's own path. `segr1 eval`
(cluster/commands/eval_job.py), `segr1 predict` and the demo use this package.
"""
