"""Dummy weights (`model.dummy_weights`, segr1 preflight): every model is built from its folder's config.json alone,
at the shapes the weights would have. The names and shapes a weight update must carry, derived from config.json
(runtime.qwen_vl.config_weight_shapes: what a vLLM engine with load_format="dummy" expects), equal those of the
saved checkpoint; the transformers engine, the learner's model and SAM2 build from folders without weights; and a
process reports its peak memory (runtime/memory.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actors.hf_engine import HFEngine
from actors.vllm_engine import checkpoint_shapes
from reward_service.segmenters import SegmenterUnavailable, build_segmenter
from runtime.memory import peak_memory
from runtime.qwen_vl import config_weight_shapes, load_policy


def _weightless(folder: Path, out: Path) -> Path:
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


def test_update_names_and_shapes_from_config_equal_the_checkpoints(tiny_policy_dir, tiny_text_model_dir):
    for folder in (tiny_policy_dir, tiny_text_model_dir):
        assert config_weight_shapes(folder) == checkpoint_shapes(folder)


def test_policy_and_engine_build_from_a_folder_without_weights(
    tiny_policy_dir, tiny_text_model_dir, tmp_path
):
    bare = _weightless(tiny_policy_dir, tmp_path / "policy")
    with pytest.raises(OSError):
        load_policy(bare)  # no weights: only dummy weights can build it
    # the tiny policy was built from seed 0 by the same initialisation: another seed, so a dummy build that read
    # the saved weights is told apart from one that drew them (a test that seeded 0 last would make them equal)
    torch.manual_seed(1)
    model = load_policy(bare, "float32", "cpu", dummy=True)
    real = load_policy(tiny_policy_dir, "float32", "cpu")
    shapes = {n: p.shape for n, p in real.named_parameters()}
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert not torch.equal(model.lm_head.weight, real.lm_head.weight)  # random, not the saved weights
    engine = HFEngine(bare, device="cpu", dummy=True)
    assert sorted(engine.weight_names()) == sorted(
        n for n, _ in real.named_parameters(remove_duplicate=False)
    )
    text = HFEngine(_weightless(tiny_text_model_dir, tmp_path / "text"), device="cpu", dummy=True)
    assert len(text.weight_names()) > 0


def test_sam2_builds_at_its_config_shape_without_weights(tiny_sam2_dir, tmp_path):
    bare = _weightless(tiny_sam2_dir, tmp_path / "sam2")
    with pytest.raises(SegmenterUnavailable):
        build_segmenter("hf-sam2", str(bare))
    real = build_segmenter("hf-sam2", str(tiny_sam2_dir))
    dummy = build_segmenter("hf-sam2", str(bare), dummy=True)
    assert dummy.size == real.size
    assert {n: p.shape for n, p in dummy.model.named_parameters()} == {
        n: p.shape for n, p in real.model.named_parameters()
    }


def test_peak_memory_covers_what_the_process_and_its_children_held():
    block = bytearray(64 * 2**20)  # touched: resident
    block[::4096] = b"x" * len(block[::4096])
    got = peak_memory()
    assert got["device"] == "cpu" and got["rss_peak_bytes"] >= 64 * 2**20

    # a child that holds 96 MiB (an engine core in its own process): counted while it lives
    code = "import sys; b = bytearray(96 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        got = peak_memory()
        assert got["children_rss_peak_bytes"] >= 96 * 2**20
        assert got["peak_bytes"] == got["rss_peak_bytes"] + got["children_rss_peak_bytes"]
    finally:
        child.stdin.close()
        child.wait(timeout=60)
