"""Which pools start together, and in which order (cluster/pools/placement.py `start_phases`): where vLLM shares a
GPU with the learner or SAM2 (fractional GPUs, colocated), the rollout engines start alone first, so vLLM
profiles the device's free memory before anything else loads onto it; elsewhere the three pools start at once. The
driver honouring the phases on Ray: tests/e2e/test_start_order.py."""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.pools.placement import shares_gpu, start_phases
from tests.support.paths import REPO

CONFIGS = REPO / "cluster" / "configs"
ALONE_FIRST = (("rollout",), ("learner", "reward"))
AT_ONCE = (("learner", "rollout", "reward"),)


@pytest.mark.parametrize(
    ("config", "overrides", "phases"),
    [
        ("qwen3b-1gpu.yaml", [], ALONE_FIRST),  # 0.3 + 0.1 + 0.6 of one GPU
        ("qwen3b-1gpu.yaml", ["learner.resources.num_gpus=1", "reward.resources.num_gpus=0"], AT_ONCE),
        ("qwen3b-1gpu.yaml", ["learner.resources.num_gpus=1"], ALONE_FIRST),  # SAM2 still beside vLLM
        ("qwen3b-1gpu.yaml", ["rollout.resources.num_gpus=1"], AT_ONCE),  # a GPU of its own
        ("qwen3b-1gpu.yaml", ["rollout.engine=hf"], AT_ONCE),  # no memory profile to protect
        ("qwen3b-1gpu.yaml", ["placement.mode=disaggregated"], AT_ONCE),  # each pool on its own nodes
        ("qwen7b-8gpu.yaml", [], AT_ONCE),  # whole GPUs, disaggregated
        ("seg-r1-rl.yaml", [], AT_ONCE),  # whole GPUs, colocated
        ("demo.yaml", [], AT_ONCE),  # CPU
    ],
)
def test_rollout_engines_start_alone_first_only_where_vllm_shares_a_gpu(config, overrides, phases):
    cfg = load_config(CONFIGS / config, overrides)
    assert start_phases(cfg) == phases
    assert shares_gpu(cfg) == (phases == ALONE_FIRST)
    started = [pool for phase in phases for pool in phase]
    assert sorted(started) == ["learner", "reward", "rollout"]  # every pool, once
