"""The transformers rollout engine on CUDA (run on the GPU machine: `pytest -m gpu tests/gpu/test_hf_engine_gpu.py`).

Tiny Qwen2.5-VL built offline; bf16 (the production dtype) and float32. Needs no Ray and no vLLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from actors.engine import render_messages
from actors.hf_engine import HFEngine, sampling_logprobs
from protos import RolloutRequest, SamplingConfig
from protos.answer import COMPACT
from runtime.qwen_vl import append_completions, encode_prompts, model_inputs

pytestmark = pytest.mark.gpu

IMAGE_SIZE = 112


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))


def _req(i: int, g: int = 8, **sampling) -> RolloutRequest:
    sampling.setdefault("max_tokens", 32)
    return RolloutRequest(
        request_id=f"r{i}", sample_id=f"s{i}", instruction=f"Identify and segment object {i}.", group_size=g,
        sampling=SamplingConfig(**sampling),
    )  # fmt: skip


def _teacher_forced(engine: HFEngine, req, image, group, temperature: float) -> list[torch.Tensor]:
    messages = [render_messages(req, True, COMPACT, "full", IMAGE_SIZE)]
    prompts = encode_prompts(engine.processor, [image], messages)
    ids = [c.token_ids for c in group]
    batch = append_completions(prompts, ids, [0] * len(ids), pad_token_id=engine.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = engine.model(**model_inputs(batch, engine.device)).logits.float()  # (N, T, V)
    suppress = torch.tensor(engine.suppress_ids, device=engine.device)
    out = []
    for r, comp in enumerate(ids):
        rows = logits[r, -len(comp) - 1 : -1]  # (n, V)
        lp = sampling_logprobs(rows, temperature, 1.0, suppress)
        out.append(lp.gather(-1, torch.tensor(comp, device=engine.device)[:, None])[:, 0].cpu())
    return out


@pytest.mark.parametrize(("dtype", "atol"), [("bfloat16", 0.1), ("float32", 2e-3)])
def test_cuda_generation_matches_teacher_forcing(tiny_policy_dir, dtype, atol):
    engine = HFEngine(tiny_policy_dir, device="cuda", dtype=dtype, image_size=IMAGE_SIZE, prompts=COMPACT)
    assert engine.device.type == "cuda" and next(engine.model.parameters()).dtype == getattr(torch, dtype)
    reqs = [_req(i, temperature=1.0, seed=i) for i in range(4)]
    images = [_image(i) for i in range(4)]
    batch = engine.generate_batch(reqs, images)
    assert [len(g) for g in batch.completions] == [8] * 4
    for req, image, group in zip(reqs, images, batch.completions, strict=True):
        for comp, lp in zip(group, _teacher_forced(engine, req, image, group, 1.0), strict=True):
            assert len(comp.logprobs) == len(comp.token_ids) >= 1
            diff = (torch.tensor(comp.logprobs) - lp).abs().max().item()
            assert diff < atol, f"{dtype}: behaviour vs teacher-forced logprob differ by {diff}"


def test_cuda_seeds_and_weight_updates(tiny_policy_dir):
    engine = HFEngine(
        tiny_policy_dir, device="cuda", dtype="bfloat16", image_size=IMAGE_SIZE, prompts=COMPACT
    )
    req, image = _req(0, g=4, temperature=1.0, seed=7), _image(0)
    a = engine.generate([req], [image])[0]
    b = engine.generate([req, _req(1, g=4, temperature=1.0, seed=8)], [image, _image(1)])[0]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    named = [(n, p.detach().float().cpu() * 1.5) for n, p in engine.model.named_parameters()]  # CPU fp32 in
    engine.load_weights(named, 1)
    assert engine.policy_version == 1
    params = dict(engine.model.named_parameters())
    assert all(torch.equal(params[n], t.to("cuda", torch.bfloat16)) for n, t in named)
    assert len(engine.generate([req], [image])[0]) == 4
