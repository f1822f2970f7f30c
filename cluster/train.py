"""The training job's entry point for `ray job submit` (and the k8s RayJobs):

    ray job submit --working-dir . -- python -m cluster.train --config cluster/configs/qwen7b-8gpu.yaml
    python -m cluster.train --config cluster/configs/demo.yaml [key.sub=value ...] [--resume] [--dry-run]

The same as `segr1 train` (cluster/commands/train.py): starts a local Ray bound to 127.0.0.1 unless RAY_ADDRESS
(or placement.ray_address) names a cluster, runs the driver as a Ray actor (cluster/launch.py), and prints the
summary as JSON. Ctrl-C asks the driver to finish the step in progress, checkpoint and stop; a second Ctrl-C
kills it.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from cluster.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
