"""RewardWorker: whole groups scored with one encode per image, bad requests scored 0 (never raised), metrics;
it returns GroupScores (rewards and timings), which ScoredGroup.join pairs with the group they scored."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.config import TrainConfig
from protos import Completion, GroupScores, RewardRequest, RolloutGroup, Sample, ScoredGroup
from protos.answer import format_answer
from reward_service import metrics as m
from reward_service.parser import parse_answer
from reward_service.rewards import compute_rewards
from reward_service.segmenters.grabcut import GrabCutSegmenter
from reward_service.worker import RewardWorker
from runtime.images import encode_png

H, W = 96, 128
POLICY = 64  # the policy saw the images resized to 64x64


def _sample(sid: str, seed: int, centre=(64, 48), size=(H, W)) -> tuple[Sample, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(100, 10, (*size, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    gt = (yy - centre[1]) ** 2 + (xx - centre[0]) ** 2 < 22**2
    image[gt] = (210, 50, 40)
    sample = Sample(
        id=sid,
        source="test",
        split="train",
        task="foreground",
        instruction="segment",
        image=encode_png(image),
        mask=encode_png(gt),
        width=size[1],
        height=size[0],
    )
    return sample, image, gt


def _group(sid: str, texts: list[str], gid: str | None = None) -> RolloutGroup:
    comps = [Completion(text=t, token_ids=[1, 2], logprobs=[-0.5, -0.1]) for t in texts]
    return RolloutGroup(
        temperature=1.0,
        max_tokens=64,
        prompt_token_ids=[1, 2, 3],
        group_id=gid or f"g-{sid}",
        sample_id=sid,
        policy_version=3,
        completions=comps,
    )


# Answers in the policy's 64x64 space; the object (a disk at (64, 48) r 22 in 128x96) is at ~(32, 32) r 11.
GOOD = format_answer([[20, 17, 44, 47]], [[32, 32], [2, 2]], [1, 0], "a red disk")
LOOSE = format_answer([[5, 5, 60, 60]], [[32, 32]], [1], "big box")
TWO = format_answer([[20, 17, 44, 47], [0, 0, 8, 8]], [[32, 32]], [1], "two objects")
TEXTS = [GOOD, "I cannot see anything", LOOSE, TWO]


@pytest.fixture(scope="module")
def cfg() -> TrainConfig:
    return TrainConfig(data={"image_size": POLICY})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """SAM2 on one torch thread, as the tests were measured (the session's tiny SAM2 is in tests/conftest.py)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_scores_a_group_per_completion_with_components(cfg):
    sample, image, gt = _sample("s0", 0)
    worker = RewardWorker(cfg.policy_spec(), cfg.reward, name="w-components")
    [sg] = worker.score([_group("s0", TEXTS)], sample)
    assert sg.reward_worker == "w-components" and len(sg.scores) == 4
    good, garbage, loose, two = sg.scores
    assert good.parse_ok and good.rewards.format == 1.0 and good.rewards.iou > 0.8
    assert (garbage.parse_ok, garbage.parse_failure, garbage.rewards.total) == (False, "missing_bbox", 0.0)
    assert loose.parse_ok and two.parse_ok
    for score, text in zip(sg.scores, TEXTS, strict=True):  # the same terms as scoring the completion alone
        parsed = parse_answer(text, W, H, policy_image_size=POLICY)
        pred = worker.segmenter.segment(image, parsed.prompts).any(axis=0) if parsed.prompts else None
        want = compute_rewards(parsed.ok, pred, gt, cfg.reward.weights, [p.box for p in parsed.prompts])
        assert score.rewards.model_dump() == pytest.approx(want.model_dump())
    assert sg.encode_s >= 0 and sg.decode_s > 0 and sg.total_s >= sg.decode_s


def test_one_encode_per_image_for_a_batch_of_groups(cfg):
    s0, _, _ = _sample("s0", 0)
    s1, _, _ = _sample("s1", 1, centre=(40, 40))
    worker = RewardWorker(cfg.policy_spec(), cfg.reward, name="w-encodes")
    groups = [_group("s0", TEXTS, "a"), _group("s1", TEXTS * 2, "b"), _group("s0", [GOOD, LOOSE], "c")]
    out = worker.score(groups, s0, s1, s0)
    assert [gs.group_id for gs in out] == ["a", "b", "c"]
    assert worker.segmenter.encode_calls == 2  # two distinct images for 14 completions
    assert worker.segmenter.prompts_decoded == 4 + 8 + 2
    assert sum(sg.decode_s for sg in out) == pytest.approx(m.DECODE_SECONDS.mean(worker="w-encodes"))
    assert out[0].scores[0].rewards == out[2].scores[0].rewards  # same sample, same answer, same reward


def test_kept_embeddings_score_an_image_again_with_decodes_only(cfg, tiny_sam2_dir):
    """reward.embedding_cache: an image scored again (a later turn of an episode) is not encoded again, and its
    rewards are those of a fresh encode; the least recently used image is dropped beyond the limit; 0 keeps none."""
    reward = cfg.reward.model_copy(
        update={"segmenter": "hf-sam2", "segmenter_path": str(tiny_sam2_dir), "embedding_cache": 1}
    )
    worker = RewardWorker(cfg.policy_spec(), reward, name="w-kept")
    fresh = RewardWorker(cfg.policy_spec(), reward.model_copy(update={"embedding_cache": 0}), name="w-fresh")
    s0, _, _ = _sample("s0", 0)
    s1, _, _ = _sample("s1", 1, centre=(40, 40))
    first = worker.score([_group("s0", TEXTS, "a")], s0)
    again = worker.score([_group("s0", [LOOSE, GOOD], "b")], s0)  # the same image: decodes only
    assert (worker.segmenter.encode_calls, worker.ping()["embedding_hits"]) == (1, 1)
    assert again[0].scores[1].rewards == first[0].scores[0].rewards and again[0].encode_s == 0.0
    want = fresh.score([_group("s0", [LOOSE, GOOD], "b")], s0)
    assert [c.rewards for c in again[0].scores] == [c.rewards for c in want[0].scores]
    worker.score([_group("s1", TEXTS, "c")], s1)  # a second image pushes the first out (limit 1)
    worker.score([_group("s0", TEXTS, "d")], s0)
    assert worker.segmenter.encode_calls == 3
    for _ in range(2):
        fresh.score([_group("s0", TEXTS, "e")], s0)
    assert fresh.segmenter.encode_calls == 3 and fresh.ping()["embedding_hits"] == 0


def test_one_encode_per_image_with_hf_sam2(cfg, tiny_sam2_dir):
    hf_cfg = cfg.model_copy(
        update={
            "reward": cfg.reward.model_copy(
                update={"segmenter": "hf-sam2", "segmenter_path": str(tiny_sam2_dir)}
            )
        }
    )
    worker = RewardWorker(hf_cfg.policy_spec(), hf_cfg.reward, name="w-hf")
    assert worker.segmenter.name == "hf-sam2"
    s0, image, gt = _sample("s0", 0)
    s1, _, _ = _sample("s1", 1, centre=(40, 40))
    out = worker.score([_group("s0", TEXTS * 2, "a"), _group("s1", TEXTS, "b")], s0, s1)
    seg = worker.segmenter
    assert seg.encode_calls == 2
    assert seg.decode_calls == 2  # token layouts: box + 2 points, box + 1 point (box-only has none here)
    single = parse_answer(GOOD, W, H, policy_image_size=POLICY)
    pred = seg.segment(image, single.prompts).any(axis=0)
    want = compute_rewards(True, pred, gt, hf_cfg.reward.weights, [p.box for p in single.prompts])
    assert out[0].scores[0].rewards.model_dump() == pytest.approx(want.model_dump(), abs=2e-3)


def test_corrupt_sample_scores_zero_and_is_counted(cfg):
    good, _, _ = _sample("s0", 0)
    broken = good.model_copy(update={"id": "bad", "image": b"\x89PNG not really"})
    wrong_mask = good.model_copy(update={"id": "odd", "mask": encode_png(np.zeros((10, 10), bool))})
    worker = RewardWorker(cfg.policy_spec(), cfg.reward, name="w-corrupt")
    out = worker.score(
        [_group("bad", TEXTS), _group("s0", TEXTS), _group("odd", TEXTS)], broken, good, wrong_mask
    )
    for sg in (out[0], out[2]):
        assert sg.totals == [0.0] * 4
        assert {s.parse_failure for s in sg.scores} == {"corrupt_sample"}
    assert out[1].scores[0].rewards.total > 1.5  # the good group in the same call is unaffected
    assert m.PARSE_FAILURES.value(worker="w-corrupt", reason="corrupt_sample") == 8
    assert m.PARSE_FAILURES.value(worker="w-corrupt", reason="missing_bbox") == 1
    assert worker.segmenter.encode_calls == 1


def test_a_group_paired_with_the_wrong_sample_scores_zero(cfg):
    s0, _, _ = _sample("s0", 0)
    s1, _, _ = _sample("s1", 1)
    worker = RewardWorker(cfg.policy_spec(), cfg.reward, name="w-mismatch")
    out = worker.score([_group("s0", TEXTS), _group("s0", TEXTS)], s1, s0)
    assert {s.parse_failure for s in out[0].scores} == {"bad_request"} and out[0].totals == [0.0] * 4
    assert out[1].scores[0].rewards.total > 1.5
    with pytest.raises(ValueError, match="one each"):
        worker.score([_group("s0", TEXTS)])


class _FlakyGrabCut(GrabCutSegmenter):
    """A real GrabCut whose decoder fails on images 77 pixels high (fault injection)."""

    def _decode_batch(self, items):
        if any(h.height == 77 for h, _ in items):
            raise RuntimeError("decoder exploded")
        return super()._decode_batch(items)


def test_a_segmenter_error_scores_that_image_zero_without_raising(cfg):
    s0, _, _ = _sample("s0", 0)
    s1, _, _ = _sample("s1", 1, size=(77, 100))
    worker = RewardWorker(cfg.policy_spec(), cfg.reward, name="w-segerr", segmenter=_FlakyGrabCut())
    out = worker.score([_group("s0", TEXTS), _group("s1", TEXTS), _group("s0", TEXTS[:2])], s0, s1, s0)
    assert out[0].scores[0].rewards.total > 1.5 and out[2].scores[0].rewards.total > 1.5
    assert {s.parse_failure for s in out[1].scores} == {"segmenter_error"} and out[1].totals == [0.0] * 4
    assert m.PARSE_FAILURES.value(worker="w-segerr", reason="segmenter_error") == 4


def test_metrics_are_recorded(cfg):
    s0, _, _ = _sample("s0", 0)
    worker = RewardWorker(cfg.policy_spec(), cfg.reward, name="w-metrics")
    worker.score([_group("s0", TEXTS), _group("s0", TEXTS[:2])], s0, s0)
    assert m.MASKS_SCORED.value(worker="w-metrics", purpose="train") == 6
    assert m.GROUPS_SCORED.value(worker="w-metrics", purpose="train") == 2
    assert m.REWARD.value(worker="w-metrics", term="total") == 6
    assert m.REWARD.value(worker="w-metrics", term="iou") == 6
    assert m.ENCODE_SECONDS.value(worker="w-metrics") == 1
    assert m.TOTAL_SECONDS.value(worker="w-metrics") == 1
    assert m.QUEUE_DEPTH.value(worker="w-metrics") == 0
    assert worker.ping()["encode_calls"] == 1


def test_points_format_and_requests_api(cfg):
    pts_cfg = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"answer_format": "points"})})
    s0, _, _ = _sample("s0", 0)
    worker = RewardWorker(pts_cfg.policy_spec(), pts_cfg.reward, name="w-points")
    texts = ["<points>[[32,32],[2,2]]</points> <labels>[1,0]</labels>", GOOD]
    req = RewardRequest(group=_group("s0", texts), sample=s0, policy_image_size=POLICY)
    [sg] = worker.score_requests([req])
    assert sg.scores[0].parse_ok and sg.scores[0].rewards.iou > 0.3
    assert sg.scores[1].parse_ok  # the full answer also holds points and labels


class _LosesHandles(GrabCutSegmenter):
    """A broken segmenter that returns no handles (a bug in the worker's eyes)."""

    def _encode_batch(self, images):
        return []


def test_an_internal_error_scores_the_call_zero_and_is_counted(cfg, caplog):
    s0, _, _ = _sample("s0", 0)
    worker = RewardWorker(cfg.policy_spec(), cfg.reward, name="w-internal", segmenter=_LosesHandles())
    out = worker.score([_group("s0", TEXTS)], s0)
    assert out[0].totals == [0.0] * 4 and {s.parse_failure for s in out[0].scores} == {"internal_error"}
    assert m.PARSE_FAILURES.value(worker="w-internal", reason="internal_error") == 4
    assert "Traceback" in caplog.text
    assert m.QUEUE_DEPTH.value(worker="w-internal") == 0


def test_scores_travel_without_the_group_and_join_it_by_id(cfg):
    s0, _, _ = _sample("s0", 0)
    s1, _, _ = _sample("s1", 1, centre=(40, 40))
    groups = [_group("s0", TEXTS, "a"), _group("s1", TEXTS[:2], "b")]
    out = RewardWorker(cfg.policy_spec(), cfg.reward, name="w-join").score(groups, s0, s1)
    assert all(type(gs) is GroupScores for gs in out)
    assert "completions" not in out[0].model_dump_json()  # the completions stay with the driver
    joined = [ScoredGroup.join(g, gs) for g, gs in zip(groups, out, strict=True)]
    assert [sg.group for sg in joined] == groups
    assert [sg.totals for sg in joined] == [gs.totals for gs in out]
    assert joined[0].decode_s == out[0].decode_s > 0 and joined[1].reward_worker == "w-join"
    with pytest.raises(ValueError, match="'b' joined with RolloutGroup 'a'"):
        ScoredGroup.join(groups[0], out[1])


def test_throughput_is_counted_under_each_groups_purpose(cfg):
    """Training groups (score) and validation groups (predict) are counted apart: the dashboard's training
    throughput reads purpose="train" only, so validation never moves it."""
    s0, _, _ = _sample("s0", 0)
    worker = RewardWorker(cfg.policy_spec(), cfg.reward, name="w-purpose")
    worker.score([_group("s0", TEXTS)], s0)
    val = _group("s0", TEXTS[:2]).model_copy(update={"purpose": "val"})
    preds = worker.predict([val, val], s0, s0)
    assert [len(p) for p in preds] == [2, 2]
    by = {p: m.MASKS_SCORED.value(worker="w-purpose", purpose=p) for p in ("train", "val")}
    assert by == {"train": 4, "val": 4}
    assert m.GROUPS_SCORED.value(worker="w-purpose", purpose="train") == 1
    assert m.GROUPS_SCORED.value(worker="w-purpose", purpose="val") == 2
    assert m.REWARD.value(worker="w-purpose", term="total") == 4  # rewards: training completions only
