"""The training job's entry point.

    segr1 train --config cluster/configs/demo.yaml [key.sub=value ...] [--resume]
    ray job submit --working-dir . -- python -m cluster.train --config cluster/configs/qwen7b-8gpu.yaml

Starts a local Ray bound to 127.0.0.1 unless RAY_ADDRESS (or placement.ray_address) names a cluster, runs the
driver as a Ray actor (cluster/driver.py), and prints the summary as JSON. Ctrl-C asks the driver to finish the
step in progress, checkpoint and stop; a second Ctrl-C kills it.
"""

from __future__ import annotations

import sys

from cluster.config import TrainConfig


def run_training(cfg: TrainConfig, resume: bool = False) -> dict:
    import ray

    from cluster.topology import init_ray, spawn_driver_actor

    init_ray(cfg)
    driver = spawn_driver_actor(cfg, resume)
    run_ref = driver.run.remote()
    try:
        try:
            summary = ray.get(run_ref)
        except KeyboardInterrupt:
            print(
                "\nstopping: finishing the current step and writing a checkpoint (Ctrl-C again to abort)",
                file=sys.stderr,
            )
            ray.get(driver.request_stop.remote())
            summary = ray.get(run_ref)
    finally:  # also when run() failed: free the actor names (`driver`, `rollout-0`, ...) for the next job
        try:
            ray.get(driver.close.remote(), timeout=120)
        finally:
            ray.kill(driver, no_restart=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    from cluster.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
