"""The training loop of one job, run as the driver actor (cluster/launch.py starts it).

- loop.py:       `TrainDriver`: one step per mode (generate -> score -> learn -> publish), checkpoints, the summary;
- start.py:      starting the learner group and the pools (the rollout engines first where vLLM shares a GPU);
- batches.py:    synchronous mode's batch (dynamic sampling refills);
- state.py:      the accounting of every group, the data order and what a checkpoint carries;
- weights.py:    publishing a new policy version to the rollout pool;
- validation.py: validation on the held-out split every `eval.every` steps;
- recovery.py:   a dead learner rank: rewind to the last checkpoint, restart the group, replay;
- metrics.py:    the driver's Prometheus metrics and the metrics.jsonl line of a step.

The driver uses the pools (cluster/pools); the pools never import the driver (an import-linter contract).
"""
