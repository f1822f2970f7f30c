"""The transformers rollout engine on the tiny Qwen2.5-VL and the tiny text-only Qwen2 (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from actors.engine import InconsistentWeightsError, RolloutEngine, WeightUpdateError, render_messages
from actors.hf_engine import HFEngine, top_p_filter
from cluster.dev.tiny_models import SPECIAL_IDS
from protos import RolloutRequest, SamplingConfig
from protos.answer import COMPACT, preset_prompts
from runtime.qwen_vl import append_completions, encode_prompts, model_inputs, unpadded_ids
from tests.support.engine_state import lend, weights_of

IMAGE_SIZE = 56  # 4 image tokens: keeps the tests fast
IM_END = SPECIAL_IDS["<|im_end|>"]
VISION_IDS = [
    SPECIAL_IDS[t]
    for t in ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# One engine of each model per module; a test that loads weights into it gets it back at version 0 with the
# initial weights afterwards (tests/support/engine_state.py), so no test depends on which ran before it.
@pytest.fixture(scope="module")
def _shared_vl(tiny_policy_dir) -> tuple[HFEngine, list]:
    engine = HFEngine(tiny_policy_dir, device="cpu", image_size=IMAGE_SIZE, prompts=COMPACT)
    return engine, weights_of(engine.model)


@pytest.fixture(scope="module")
def _shared_text(tiny_text_model_dir) -> tuple[HFEngine, list]:
    engine = HFEngine(tiny_text_model_dir, device="cpu", image_size=IMAGE_SIZE, prompts=COMPACT)
    return engine, weights_of(engine.model)


@pytest.fixture
def vl_engine(_shared_vl) -> HFEngine:
    engine, initial = _shared_vl
    yield from lend(engine, initial, engine.model)


@pytest.fixture
def text_engine(_shared_text) -> HFEngine:
    engine, initial = _shared_text
    yield from lend(engine, initial, engine.model)


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))


def _req(i: int, g: int = 4, **sampling) -> RolloutRequest:
    sampling.setdefault("max_tokens", 12)
    return RolloutRequest(
        request_id=f"req-{i}",
        sample_id=f"s-{i}",
        instruction=f"Identify and segment object {i}.",
        group_size=g,
        sampling=SamplingConfig(**sampling),
    )


def _teacher_forced(engine: HFEngine, req, image, completions, temperature: float, top_p: float = 1.0):
    """log p(token) of each completion token from ONE forward pass over prompt + completion."""
    messages = [render_messages(req, image is not None, COMPACT, "full", IMAGE_SIZE)]
    prompts = encode_prompts(engine.processor, [image], messages)
    ids = [c.token_ids for c in completions]
    batch = append_completions(prompts, ids, [0] * len(ids), pad_token_id=engine.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = engine.model(**model_inputs(batch)).logits.float()  # (N, T, V)
    logits[..., VISION_IDS] = float("-inf")  # the engine never samples vision tokens
    t = temperature if temperature > 0 else 1.0
    out = []
    for r, comp in enumerate(ids):
        n = len(comp)
        rows = logits[r, -n - 1 : -1] / t  # logits predicting each completion token, (n, V)
        if t != 1.0 or top_p < 1.0:
            rows = _nucleus(rows, top_p)
        lp = torch.log_softmax(rows, -1).gather(-1, torch.tensor(comp)[:, None])[:, 0]
        out.append(lp)
    return out


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Independent formulation: keep the most likely tokens until their mass reaches top_p."""
    if top_p >= 1.0:
        return logits
    probs = logits.softmax(-1)
    sorted_p, idx = probs.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, idx, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def test_engine_satisfies_protocol(vl_engine):
    assert isinstance(vl_engine, RolloutEngine)
    assert vl_engine.is_vision_language and vl_engine.policy_version == 0
    assert "lm_head.weight" in vl_engine.weight_names()


def test_g_completions_per_image_with_teacher_forced_logprobs(vl_engine):
    reqs = [_req(0, g=4, temperature=0.7, seed=1), _req(1, g=4, temperature=0.7, seed=2)]
    images = [_image(0), _image(1)]
    batch = vl_engine.generate_batch(reqs, images)
    assert [len(g) for g in batch.completions] == [4, 4]
    assert batch.policy_version == 0
    assert all(n > 4 for n in batch.prompt_tokens)  # chat template + 4 image tokens
    for req, image, group in zip(reqs, images, batch.completions, strict=True):
        expected = _teacher_forced(vl_engine, req, image, group, temperature=0.7)
        for comp, lp in zip(group, expected, strict=True):
            assert 1 <= len(comp.token_ids) <= 12 and len(comp.logprobs) == len(comp.token_ids)
            assert comp.finish_reason == ("stop" if comp.token_ids[-1] in vl_engine.stop_ids else "length")
            assert torch.allclose(torch.tensor(comp.logprobs), lp, atol=1e-4), (comp.logprobs, lp.tolist())
    assert len({tuple(c.token_ids) for c in batch.completions[0]}) > 1  # G different samples


def test_each_request_reports_its_own_unpadded_prompt_ids(vl_engine):
    """Prompts of different lengths share one padded generate call; each request gets its own ids back, the
    image tokens expanded (4 at 56 px), exactly what encoding its prompt alone gives."""
    reqs = [_req(3, g=2, seed=1), _req(4, g=2, seed=2).model_copy(update={"instruction": "Segment the " * 6})]
    images = [_image(3), _image(4)]
    batch = vl_engine.generate_batch(reqs, images)
    image_pad = SPECIAL_IDS["<|image_pad|>"]
    for req, image, ids in zip(reqs, images, batch.prompt_token_ids, strict=True):
        alone = encode_prompts(
            vl_engine.processor, [image], [render_messages(req, True, COMPACT, "full", IMAGE_SIZE)]
        )
        assert ids == unpadded_ids(alone)[0] and ids.count(image_pad) == 4
    assert batch.prompt_tokens == [len(ids) for ids in batch.prompt_token_ids]
    assert batch.prompt_tokens[0] < batch.prompt_tokens[1]


def test_top_p_logprobs_are_renormalised_over_the_nucleus(vl_engine):
    req, image = _req(2, g=3, temperature=1.3, top_p=0.5, seed=5), _image(2)
    group = vl_engine.generate([req], [image])[0]
    expected = _teacher_forced(vl_engine, req, image, group, temperature=1.3, top_p=0.5)
    for comp, lp in zip(group, expected, strict=True):
        assert torch.allclose(torch.tensor(comp.logprobs), lp, atol=1e-4)
        assert all(x > -30 for x in comp.logprobs)  # every sampled token lies inside the nucleus


def test_top_p_filter_keeps_at_least_the_top_token():
    logits = torch.tensor([[5.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    out = top_p_filter(logits, 0.01)
    assert torch.isfinite(out[0, 0]) and torch.isinf(out[0, 1:]).all()
    assert torch.isfinite(out[1]).sum() == 1


def test_greedy_gives_g_identical_argmax_completions(vl_engine):
    req, image = _req(3, g=3, temperature=0.0), _image(3)
    group = vl_engine.generate([req], [image])[0]
    assert len({tuple(c.token_ids) for c in group}) == 1
    expected = _teacher_forced(vl_engine, req, image, group[:1], temperature=0.0)[0]
    assert torch.allclose(torch.tensor(group[0].logprobs), expected, atol=1e-4)


def test_seeded_requests_reproduce_alone_or_in_a_batch(vl_engine):
    a, b = _req(4, temperature=1.0, seed=11), _req(5, temperature=1.0, seed=12)
    together = vl_engine.generate([a, b], [_image(4), _image(5)])
    alone = vl_engine.generate([b], [_image(5)])
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in together[1]]
    other_seed = vl_engine.generate([_req(5, temperature=1.0, seed=13)], [_image(5)])
    assert [c.token_ids for c in other_seed[0]] != [c.token_ids for c in together[1]]


def test_vision_tokens_are_never_sampled(vl_engine):
    reqs = [_req(i, g=8, temperature=2.0, max_tokens=24, seed=i) for i in range(2)]
    groups = vl_engine.generate(reqs, [_image(10), _image(11)])
    sampled = {t for g in groups for c in g for t in c.token_ids}
    assert not sampled & set(VISION_IDS)


def test_text_only_model_generates(text_engine):
    assert not text_engine.is_vision_language
    batch = text_engine.generate_batch([_req(0, g=2, temperature=1.0, seed=0)], [None])
    assert len(batch.completions[0]) == 2 and batch.prompt_tokens[0] > 10
    with pytest.raises(ValueError, match="text-only"):
        text_engine.generate([_req(0, g=2)], [_image(0)])


def _mutated(engine: HFEngine, scale: float, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (n, p.detach() * scale + 0.05 * torch.randn(p.shape, generator=g))
        for n, p in engine.model.named_parameters()
    ]


def test_load_weights_switches_version_and_output(text_engine):
    req = _req(7, g=2, temperature=0.0, max_tokens=16)
    before = text_engine.generate([req], [None])[0][0]
    start = text_engine.policy_version
    new = _mutated(text_engine, 2.0, seed=1)
    text_engine.load_weights(new, start + 1)
    assert text_engine.policy_version == start + 1
    after = text_engine.generate([req], [None])[0][0]
    assert after.token_ids != before.token_ids
    params = dict(text_engine.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in new)


def test_bad_updates_are_refused_before_anything_changes(text_engine):
    version = text_engine.policy_version
    snapshot = {n: p.detach().clone() for n, p in text_engine.model.named_parameters()}
    good = _mutated(text_engine, 1.5, seed=2)
    wrong_shape = [(n, t[:1] if n == "lm_head.weight" else t) for n, t in good]
    cases = {
        "unknown name": [*good, ("model.extra.weight", torch.zeros(2))],
        "missing": good[1:],
        "shape": wrong_shape,
    }
    for what, update in cases.items():
        with pytest.raises(WeightUpdateError, match="nothing was loaded"):
            text_engine.load_weights(update, version + 1)
        assert text_engine.policy_version == version, what
    with pytest.raises(WeightUpdateError, match="go back|must be an int"):
        text_engine.load_weights(good, version - 1 if version > 0 else -1)
    for n, p in text_engine.model.named_parameters():
        assert torch.equal(p, snapshot[n]), n


def test_failure_mid_copy_blocks_generation_until_a_full_update(text_engine):
    version = text_engine.policy_version
    good = _mutated(text_engine, 1.0, seed=3)
    bad = list(good)
    name, t = bad[-1]
    broken = torch.empty(t.shape, device="meta")  # right shape, but copying it out fails
    bad[-1] = (name, broken)
    with pytest.raises((RuntimeError, TypeError)):
        text_engine.load_weights(bad, version + 1)
    with pytest.raises(InconsistentWeightsError):
        text_engine.generate([_req(0, g=2)], [None])
    text_engine.load_weights(good, version + 1)
    assert text_engine.policy_version == version + 1
    assert len(text_engine.generate([_req(0, g=2)], [None])[0]) == 2


def test_a_weight_stream_is_checked_first_loaded_bucket_by_bucket_and_a_broken_one_blocks_generation(
    text_engine,
):
    """The transformers engine takes a receiver's stream like vLLM's: refused from its manifest before any bucket
    is read; broken off half-way it leaves the engine refusing to generate; whole, it loads exactly."""
    from runtime.weights.layout import WeightSyncError
    from tests.support.weight_receivers import bucket_stream

    version = text_engine.policy_version
    good = _mutated(text_engine, 1.2, seed=4)
    taken: list[int] = []
    with pytest.raises(WeightUpdateError, match="missing"):
        text_engine.load_weights(bucket_stream(good[1:], version + 1, 4096, taken=taken), version + 1)
    assert taken == [] and text_engine.policy_version == version  # refused before a bucket was received
    with pytest.raises(WeightSyncError, match="went away"):
        text_engine.load_weights(bucket_stream(good, version + 1, 4096, fail_at=3), version + 1)
    with pytest.raises(InconsistentWeightsError):
        text_engine.generate([_req(0, g=2)], [None])
    text_engine.load_weights(bucket_stream(good, version + 1, 4096, taken=taken), version + 1)
    assert text_engine.policy_version == version + 1 and len(taken) > 3
    params = dict(text_engine.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in good)


def test_stop_token_ends_the_completion_and_is_kept(tiny_text_model_dir):
    # the random weights stop ~1/270 per token
    engine = HFEngine(tiny_text_model_dir, device="cpu", image_size=IMAGE_SIZE, prompts=COMPACT)
    group = engine.generate([_req(8, g=16, temperature=1.0, seed=0, max_tokens=200)], [None])[0]
    stopped = [c for c in group if c.finish_reason == "stop"]
    assert stopped and len(stopped) < len(group)
    for comp in group:
        assert len(comp.logprobs) == len(comp.token_ids)
        ends = [k for k, t in enumerate(comp.token_ids) if t in engine.stop_ids]
        if comp.finish_reason == "stop":
            assert ends == [len(comp.token_ids) - 1]  # cut at the first stop token, which is kept
            assert "<|im_end|>" not in comp.text and "<|endoftext|>" not in comp.text
        else:
            assert not ends and len(comp.token_ids) == 200


def test_generate_command_prints_json(tiny_text_model_dir, tmp_path, capsys):
    import json

    from cluster.cli import main

    argv = [
        "generate",
        "--model",
        str(tiny_text_model_dir),
        "--prompt",
        "Segment the cat.",
        "--n",
        "3",
        "--prompts",
        "compact",
    ]
    assert main([*argv, "--max-tokens", "6", "--seed", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["completions"]) == 3 and out["policy_version"] == 0
    for c in out["completions"]:
        assert set(c) >= {"text", "token_ids", "logprobs"} and len(c["token_ids"]) == len(c["logprobs"]) <= 6
    image = tmp_path / "x.png"
    _image(0).save(image)
    assert main(["generate", "--model", str(tiny_text_model_dir), "--image", str(image), "--n", "2"]) == 2
    assert "text-only model" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert main(["generate", "--model", str(tiny_text_model_dir), "--image", "", "--n", "1"]) == 2
    assert "--image is empty" in capsys.readouterr().err  # not silently a text-only prompt


def test_vl_engine_takes_checkpoint_names_and_in_memory_names(vl_engine):
    """transformers saves Qwen2.5-VL as model.* / visual.* but names it model.language_model.* / model.visual.*
    in memory (what the learner sends); an update in either spelling loads."""
    from pathlib import Path

    from safetensors.torch import load_file

    saved = load_file(str(Path(vl_engine.model_path) / "model.safetensors"))
    assert any(n.startswith("visual.") for n in saved)
    in_memory = [(n, p.detach().clone()) for n, p in vl_engine.model.named_parameters()]
    assert any(n.startswith("model.visual.") for n, _ in in_memory)
    v = vl_engine.policy_version
    vl_engine.load_weights([(n, t * 2) for n, t in saved.items()], v + 1)
    params = dict(vl_engine.model.named_parameters())
    assert torch.equal(
        params["model.visual.patch_embed.proj.weight"], saved["visual.patch_embed.proj.weight"] * 2
    )
    vl_engine.load_weights(in_memory, v + 2)  # back to the original weights, learner spelling
    assert all(torch.equal(params[n], t) for n, t in in_memory)


def test_the_prompt_set_and_the_task_choose_the_prompt(tiny_text_model_dir, text_engine):
    """The engine renders its prompt set (PolicySpec.prompt): seg-r1's system prompt and, for a referring request,
    the instruction alone (the reference's evaluation prompt); compact's format sentence for the same request."""
    seg_r1 = HFEngine(tiny_text_model_dir, device="cpu", prompts=preset_prompts("seg-r1", "eval"))
    referring = _req(1, g=2, seed=0, max_tokens=2).model_copy(
        update={"instruction": "Identify and segment the cat", "task": "referring"}
    )
    text = seg_r1.tokenizer.decode(seg_r1.generate_batch([referring], [None]).prompt_token_ids[0])
    assert "A conversation between User and Assistant" in text
    assert "<|im_start|>user\nIdentify and segment the cat<|im_end|>" in text
    compact = text_engine.tokenizer.decode(
        text_engine.generate_batch([referring], [None]).prompt_token_ids[0]
    )
    assert "A conversation" not in compact and "Identify and segment the cat Output format:" in compact


def test_top_k_one_is_greedy_with_logprob_zero(text_engine):
    """top_k=1 keeps one token: whatever the temperature, the greedy tokens, each with probability 1 under the
    distribution it was drawn from (renormalised, as vLLM's processed logprobs)."""
    greedy = text_engine.generate([_req(5, g=2, temperature=0.0, max_tokens=10)], [None])[0][0]
    group = text_engine.generate([_req(5, g=2, temperature=0.7, top_k=1, seed=3, max_tokens=10)], [None])[0]
    for c in group:
        assert c.token_ids == greedy.token_ids and c.logprobs == [0.0] * len(c.token_ids)


def test_repetition_penalty_follows_transformers_rule(text_engine):
    """Greedy decoding with a repetition penalty equals a hand-written loop: each step, logits of every token
    already in the prompt or the completion divided by p (positive) or multiplied by p (negative), vision
    tokens suppressed, argmax."""
    p, n = 3.0, 8
    req = _req(6, g=2, temperature=0.0, max_tokens=n, repetition_penalty=p)
    got = text_engine.generate_batch([req], [None])
    ids = list(got.prompt_token_ids[0])
    expected = []
    for _ in range(n):
        with torch.no_grad():
            logits = text_engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # (V,)
        seen = torch.tensor(sorted(set(ids)))
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p, vals * p)
        logits[VISION_IDS] = float("-inf")
        tok = int(logits.argmax())
        expected.append(tok)
        ids.append(tok)
        if tok in text_engine.stop_ids:
            break
    plain = text_engine.generate([_req(6, g=2, temperature=0.0, max_tokens=n)], [None])[0][0]
    assert got.completions[0][0].token_ids == expected
    assert plain.token_ids != expected  # the penalty changed the answer: the check above could fail
