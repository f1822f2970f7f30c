"""`segr1 bench NAME [args...]`: run one of the benchmark scripts in bench/ (figures go to --out as JSON)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from cluster.commands.common import CommandError

BENCHES = {
    "reward": "reward_throughput.py",
    "rollout": "rollout_throughput.py",
    "weight-sync": "weight_sync.py",
    "e2e": "e2e.py",
    "synth-baseline": "synth_baseline.py",
    "learner-scaling": "learner_scaling.py",
}
BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def register(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark (bench/*.py); e.g. segr1 bench reward --quick --out r.json")
    p.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script (see its --help)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    script = BENCH_DIR / BENCHES[args.name]
    if not script.is_file():
        raise CommandError(f"{script} not found: segr1 bench runs from a checkout of the repository", 2)
    return subprocess.call([sys.executable, str(script), *args.args])
