"""vLLM with the tiny Qwen2.5-VL and images (through actors/vllm_plugin.py, registered on every install).

One LLM() for the module. Checks: greedy ids equal transformers' on two random images of different sizes, before
and after a weight push (the same images again after the push: the encoder cache is reset with the weights); seeded G=4 sampling reproduces; a video request is refused with a clear error;
vLLM's own multimodal processing feeds the encoder the learner's pixel values; a conversation that shows a second
picture in a later turn is, token for token and pixel for pixel, the learner's sequence, and the learner's
forward over it gives vLLM's logprobs; the encoder profile is capped at the engine's image_size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("vllm")

import uuid  # noqa: E402

from actors.hf_engine import HFEngine  # noqa: E402
from actors.vllm_engine import VLLMEngine  # noqa: E402
from protos.answer import COMPACT  # noqa: E402
from runtime.images import resize_for_policy  # noqa: E402
from runtime.qwen_vl import (  # noqa: E402
    append_completions,
    encode_prompt_ids,
    encode_prompts,
    expected_image_tokens,
    expected_row_image_tokens,
    image_token_counts,
    load_processor,
    model_inputs,
    unpadded_ids,
)
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
    v = VLLMEngine(tiny_policy_dir, max_model_len=2048, seed=0, prompts=COMPACT, images_per_prompt=2)
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


def _engine_request(v: VLLMEngine, image: Image.Image):
    """The request vLLM's front end builds for an image prompt (its multimodal processor included)."""
    req = _req(6, g=2, max_tokens=2)
    core = v.llm.llm_engine
    return core.input_processor.process_inputs(
        uuid.uuid4().hex, v._prompt(req, image), v._params(req), supported_tasks=core.get_supported_tasks()
    )


def test_engine_and_learner_feed_identical_pixels(engines):
    """Sides that are not multiples of 28 (100 x 70 as it comes, and the rollout worker's image_size^2 = 768^2
    made from it): vLLM's processing and the learner's (encode_prompt_ids of the group's prompt ids) resample
    to the same grid with the same pixels."""
    v, _ = engines
    learner = load_processor(v.model_path)
    raw = Image.fromarray(np.random.default_rng(15).integers(0, 256, (70, 100, 3), dtype=np.uint8))
    for image in (raw, resize_for_policy(raw, v.image_size)):
        request = _engine_request(v, image)
        item = request.mm_features[0].data
        batch = encode_prompt_ids(learner, [image], [list(request.prompt_token_ids)])
        assert torch.equal(item["image_grid_thw"].data, batch["image_grid_thw"][0])
        assert torch.equal(item["pixel_values"].data, batch["pixel_values"]), image.size


def _two_image_conversation(v: VLLMEngine) -> list[dict]:
    """Turn 1 (an image and the task), the policy's answer, turn 2 (a second picture and a question about it)."""
    first = v.prompts.messages("Identify and segment the red shape.", image_size=v.image_size)
    answer = {"role": "assistant", "content": [{"type": "text", "text": "<points>[[10,12]]</points>"}]}
    look = {
        "role": "user",
        "content": [{"type": "image"}, {"type": "text", "text": "The mask it made. Refine."}],
    }
    return [*first, answer, look]


def test_a_conversation_with_two_images_is_the_learners_sequence(engines):
    """Two pictures in one prompt (a later turn shows the policy a new one), of different sizes: vLLM's prompt ids
    equal the learner processor's rendering of the same conversation, its encoder inputs equal encode_prompt_ids'
    for that row (each image's grid and pixels, in order), and the learner's forward over prompt + vLLM's greedy
    completion gives vLLM's logprobs."""
    from vllm import SamplingParams

    v, h = engines
    learner = load_processor(v.model_path)
    images = _images(21)  # 56 x 84 and 100 x 60
    messages = _two_image_conversation(v)
    text = v.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt = {"prompt": text, "multi_modal_data": {"image": images}}
    out = v.llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, logprobs=0), use_tqdm=False)[0]
    prompt_ids, completion = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
    assert unpadded_ids(encode_prompts(learner, [images], [messages])) == [prompt_ids]

    batch = encode_prompt_ids(learner, [images], [prompt_ids])
    assert batch["images_per_row"].tolist() == [2]
    assert image_token_counts(learner, batch) == expected_row_image_tokens(learner, batch)
    assert (
        len(set(expected_image_tokens(learner, batch["image_grid_thw"]))) == 2
    )  # two sizes, two token counts
    core = v.llm.llm_engine
    v.llm.reset_mm_cache()  # else the items just generated come back as cache hits, without their data
    request = core.input_processor.process_inputs(
        uuid.uuid4().hex, prompt, SamplingParams(max_tokens=1), supported_tasks=core.get_supported_tasks()
    )
    v.llm.reset_mm_cache()  # the request is never added: nothing may count as cached in the engine core
    assert list(request.prompt_token_ids) == prompt_ids
    items = [f.data for f in request.mm_features]
    assert torch.equal(torch.stack([i["image_grid_thw"].data for i in items]), batch["image_grid_thw"])
    assert torch.equal(torch.cat([i["pixel_values"].data for i in items]), batch["pixel_values"])

    rows = append_completions(batch, [completion], pad_token_id=int(learner.tokenizer.pad_token_id))
    assert rows["images_per_row"].tolist() == [2] and torch.equal(
        rows["image_grid_thw"], batch["image_grid_thw"]
    )
    with torch.no_grad():
        logits = h.model(**model_inputs(rows), use_cache=False).logits[0, -len(completion) - 1 : -1]  # (C, V)
    learner_lp = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]
    vllm_lp = torch.tensor([lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, completion, strict=True)])
    assert len(completion) > 0 and torch.allclose(learner_lp, vllm_lp, atol=1e-3), (learner_lp, vllm_lp)


def test_the_next_turn_extends_the_engines_own_ids_and_one_forward_scores_both_answers(engines):
    """Turn 2 built from turn 1's ids (runtime/turns.py) with a second picture: vLLM expands both images and
    reports a prompt that starts with turn 1's prompt + answer exactly as it fed and generated them, and ONE
    learner forward over the final sequence gives each answer's behaviour logprobs, turn 1's included."""
    from vllm import SamplingParams

    from runtime.turns import next_turn_ids

    v, h = engines
    learner = load_processor(v.model_path)
    first, second = _images(22)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)

    cached = []

    def generate(prompt):
        out = v.llm.generate(prompt, greedy, use_tqdm=False)[0]
        c = out.outputs[0]
        cached.append(out.num_cached_tokens)
        return (
            list(out.prompt_token_ids),
            list(c.token_ids),
            [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids, strict=True)],
        )

    text = v.tokenizer.apply_chat_template(
        _two_image_conversation(v)[:-2], tokenize=False, add_generation_prompt=True
    )
    p1, a1, lp1 = generate({"prompt": text, "multi_modal_data": {"image": first}})
    ids = next_turn_ids(v.tokenizer, p1, a1, "The mask your prompts made. Refine them, or stop.")
    p2, a2, lp2 = generate({"prompt_token_ids": ids, "multi_modal_data": {"image": [first, second]}})
    assert a1 and a2 and p2[: len(p1) + len(a1)] == p1 + a1 and len(p2) > len(p1) + len(a1)
    assert cached[1] > 0, (
        cached
    )  # turn 2 reads turn 1's KV blocks from the prefix cache (same ids, same image)

    batch = encode_prompt_ids(learner, [[first, second]], [p2])
    assert image_token_counts(learner, batch) == expected_row_image_tokens(learner, batch)
    rows = append_completions(batch, [a2], pad_token_id=int(learner.tokenizer.pad_token_id))
    with torch.no_grad():
        logp = torch.log_softmax(
            h.model(**model_inputs(rows), use_cache=False).logits[0].float(), dim=-1
        )  # (T, V)
    seq = rows["input_ids"][0]  # (T,) no padding: one row
    scored = logp[:-1].gather(1, seq[1:, None])[:, 0]  # (T-1,) logprob of token t+1 after its prefix
    at = [len(p1) + i - 1 for i in range(len(a1))] + [len(p2) + i - 1 for i in range(len(a2))]
    assert torch.allclose(scored[at], torch.tensor(lp1 + lp2), atol=1e-3), (scored[at], lp1 + lp2)


def test_both_engines_continue_episodes_alike_from_turn_ones_ids(engines):
    """generate_turns: each episode's next turn (turn 1's prompt and answer as vLLM reported them, the refine text,
    the sample's image then the picture shown) gets the same prompt ids and the same greedy answer and logprobs
    from vLLM and transformers (which expands the collapsed placeholders itself), and turn 1 is their prefix."""
    from actors.engine import NextTurn
    from protos import SamplingConfig
    from runtime.turns import next_turn_ids

    v, h = engines
    images = _images(23)
    reqs = [_req(7, g=2, temperature=0.0, max_tokens=6), _req(8, g=2, temperature=0.0, max_tokens=6)]
    first = v.generate_batch(reqs, images)
    refine = v.prompts.refine_text(v.image_size)
    turns = [
        NextTurn(
            next_turn_ids(v.tokenizer, first.prompt_token_ids[i], first.completions[i][0].token_ids, refine),
            [images[i], images[1 - i]],  # the sample's image, then the picture shown
            SamplingConfig(temperature=0.0, max_tokens=8),
        )
        for i in range(2)
    ]
    got, want = v.generate_turns(turns), h.generate_turns(turns)
    assert got.prompt_token_ids == want.prompt_token_ids and got.policy_version == want.policy_version == 0
    for i, ids in enumerate(got.prompt_token_ids):
        turn1 = first.prompt_token_ids[i] + first.completions[i][0].token_ids
        assert ids[: len(turn1)] == turn1 and len(got.completions[i]) == 1
    _assert_greedy_equal(got.completions, want.completions)


def test_encoder_profile_is_capped_at_image_size(engines):
    """vLLM sizes its encoder profile and encoder cache by the largest image it expects: one image_size image
    (768 -> 756 px: 729 tokens), not the processor's default max_pixels (16,384 tokens)."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    v, _ = engines
    learner = load_processor(v.model_path)
    grid = learner.image_processor(images=[Image.new("RGB", (v.image_size,) * 2)], return_tensors="pt")
    want = expected_image_tokens(learner, grid["image_grid_thw"])[0]
    info = MULTIMODAL_REGISTRY.create_processor(v.llm.llm_engine.model_config).info
    assert want == 729 and info.get_max_image_tokens() == want
    assert info.get_mm_max_tokens_per_item(2048, {"image": 1})["image"] == want
