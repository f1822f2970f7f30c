"""The layer below the workers: what several of them need and that needs torch, OpenCV or Ray.

- qwen_vl.py: the Qwen2.5-VL processor, prompt encoding and policy loading (rollout, learner, evaluation)
- weights/:   the weight transport between the learner and the rollout workers (config, bucket layout, wire
              format, transports)
- metrics.py: the metrics facade (Prometheus through Ray's metrics agent, recorded locally in tests)
- images.py:  the image and mask codec, and the policy's NxN view of an image
- threads.py: each worker process's share of the node's cores
- quiet.py:   the libraries' named noise (vLLM INFO, expected warnings, loading bars) silenced as each worker starts

It imports protos and nothing of actors/, reward_service/, learner/ or cluster/ (import-linter, `make lint`).
"""
