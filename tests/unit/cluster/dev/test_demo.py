"""`make demo` runs `python -m cluster.dev.demo` with no --config: its default must be the shipped demo config."""

from __future__ import annotations

from cluster.config import load_config
from cluster.dev.demo import DEMO_CONFIG
from tests.support.paths import REPO


def test_the_default_config_is_the_shipped_demo_yaml():
    assert DEMO_CONFIG == REPO / "cluster" / "configs" / "demo.yaml"
    assert load_config(str(DEMO_CONFIG), []).rollout.num_workers == 2
