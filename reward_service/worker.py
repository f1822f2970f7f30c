"""The reward worker: scores whole rollout groups (and batches of groups) with one image encode per image.

One call: decode each sample's image and mask, parse every completion, then the Predictor
(reward_service/predictor.py) encodes each distinct image once (batched), decodes every prompt of every group in one
batched call and ORs each completion's masks; the worker computes each completion's reward terms. It returns
GroupScores (the rewards and timings, not the group: the driver joins them with the group it kept).
A plain class: tests use it in-process; cluster/pools/topology.py makes it a Ray actor (`reward-<i>`, namespace segr1).

Nothing one request holds can make the worker raise: a sample whose bytes do not decode (or whose mask does not
match its image) scores 0 on every completion with failure "corrupt_sample"; a segmenter error on one image scores
that image's groups 0 with "segmenter_error"; a group paired with another sample's data scores 0 with
"bad_request"; an unexpected error (a bug) scores the call's groups 0 with "internal_error" and logs the
traceback. All are counted (segr1_reward_parse_failures) and logged.

Timings (GroupScores.encode_s / decode_s / total_s) are each group's share of the batched call (encode: split over
the groups that share an image; decode: by number of prompts; total: by number of completions), so summing them
over a call's groups gives the call's measured times. A later turn's (the request carries the previous turn's
scores) add the earlier turns', so an episode's scores hold its reward seconds over every turn.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from protos import REWARD_TERMS, CompletionReward, GroupScores, RewardRequest, RolloutGroup, Sample
from protos.config import PolicySpec
from protos.messages import check_pairs
from reward_service import metrics as m
from reward_service.config import RewardConfig
from reward_service.episodes import continue_items, continued_rewards, episode_rewards
from reward_service.predictor import CompletionPrediction, Item, Predictor, turn_items
from reward_service.rewards import GroundTruth, ground_truth, mask_counts, mask_counts_torch, zero_rewards
from runtime.memory import peak_memory
from runtime.threads import thread_budget

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    """The state of one request during a call: its Predictor items (image, parsed answers, masks, failure), one
    per turn of its episodes (reward_service/episodes.py; one for one-turn answers)."""

    request: RewardRequest
    items: list[Item]  # one per turn; only the newest turn's when the request has the previous scores
    truth: GroundTruth | None = None

    @property
    def failure(self) -> str | None:
        return self.items[0].failure


class RewardWorker:
    """Scores rollout groups. `score` is the Ray-facing entry point; `score_requests` the in-process one."""

    def __init__(
        self, policy: PolicySpec, reward: RewardConfig | None = None, name: str = "reward-0", segmenter=None
    ):
        self.predictor = Predictor(policy, reward, name, segmenter)
        self.policy, self.reward, self.name = policy, self.predictor.reward, name
        self._lock = threading.Lock()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._io_threads = thread_budget() or os.cpu_count() or 1
        self._executor: ThreadPoolExecutor | None = None

    @property
    def segmenter(self):
        return self.predictor.segmenter

    def ping(self) -> dict:
        return self.predictor.ping()

    def peak_memory(self) -> dict:
        """This process's peak memory (runtime/memory.py): segr1 preflight's measured column."""
        return peak_memory()

    def score(
        self, groups: list[RolloutGroup], *samples: Sample, previous: list[GroupScores] | None = None
    ) -> list[GroupScores]:
        """Score `groups`; sample i belongs to group i (Ray resolves ObjectRefs passed as the varargs).
        `previous[i]`: group i's scores after its previous turn (episodes of several turns: only the newest turn
        is scored, reward_service/episodes.py)."""
        return self._score(groups, samples, False, previous)[0]

    def score_turn(
        self, groups: list[RolloutGroup], *samples: Sample, previous: list[GroupScores] | None = None
    ) -> tuple[list[GroupScores], list[list[bytes | None]]]:
        """`score`, and for each completion whose episode goes on (CompletionReward.goes_on) the picture of its
        newest mask for its next turn (runtime.overlay.feedback_image at the policy's size, PNG), else None.
        Called with Ray's num_returns=2: the driver reads the scores, the pictures go to the rollout pool."""
        return self._score(groups, samples, True, previous)

    def _score(
        self, groups: list[RolloutGroup], samples, pictures: bool, previous: list[GroupScores] | None
    ) -> tuple[list[GroupScores], list[list[bytes | None]]]:
        # counts only: a group paired with the wrong sample scores 0 (bad_request) below
        check_pairs(groups, samples, f"RewardWorker {self.name!r}: score", match_ids=False)
        size = self.policy.image_size
        requests: list[RewardRequest | RolloutGroup] = []
        for group, sample, prev in zip(groups, samples, previous or [None] * len(groups), strict=True):
            try:
                requests.append(
                    RewardRequest(group=group, sample=sample, policy_image_size=size, previous=prev)
                )
            except Exception as err:  # e.g. a group paired with the wrong sample: that group scores 0
                logger.warning("%s: bad request for group %s: %s", self.name, group.group_id, err)
                requests.append(group)
        good = [r for r in requests if isinstance(r, RewardRequest)]
        scored, shown = self._score_requests(good, pictures) if good else ([], [])
        scored, shown = iter(scored), iter(shown)
        out, out_pictures = [], []
        for r in requests:
            if isinstance(r, RewardRequest):
                out.append(next(scored))
                out_pictures.append(next(shown) if pictures else [])
            else:
                out.append(self._failed_group(r, "bad_request"))
                out_pictures.append([None] * r.group_size if pictures else [])
                m.GROUPS_SCORED.inc(worker=self.name, purpose=r.purpose)
        return out, out_pictures

    def predict(self, groups: list[RolloutGroup], *samples: Sample) -> list[list[CompletionPrediction]]:
        """The Predictor's masks of each completion (evaluation's entry point, e.g. validation while training
        through the reward pool); one call at a time with scoring, on the same segmenter."""
        with self._lock:
            out = self.predictor.predict(groups, *samples)
        for group, preds in zip(groups, out, strict=True):
            m.GROUPS_SCORED.inc(worker=self.name, purpose=group.purpose)
            m.MASKS_SCORED.inc(len(preds), worker=self.name, purpose=group.purpose)
        return out

    def score_requests(self, requests: list[RewardRequest]) -> list[GroupScores]:
        return self._score_requests(requests, pictures=False)[0]

    def _score_requests(
        self, requests: list[RewardRequest], pictures: bool
    ) -> tuple[list[GroupScores], list[list[bytes | None]]]:
        self._queue_depth(+len(requests))
        try:
            with self._lock:
                return self._score_locked(requests, pictures)
        except Exception:  # a bug, not a bad request: logged with its traceback, counted, the groups score 0
            logger.exception(
                "%s: scoring %d groups failed; they score 0 (internal_error)", self.name, len(requests)
            )
            out = [self._failed_group(r.group, "internal_error") for r in requests]
            for r in requests:
                m.GROUPS_SCORED.inc(worker=self.name, purpose=r.group.purpose)
            return out, [[None] * r.group.group_size for r in requests]
        finally:
            self._queue_depth(-len(requests))

    # -- one call ------------------------------------------------------------------------------------------------
    def _score_locked(
        self, requests: list[RewardRequest], pictures: bool
    ) -> tuple[list[GroupScores], list[list[bytes | None]]]:
        t0 = time.perf_counter()
        jobs = self._prepare_all(requests)
        items = [item for job in jobs for item in job.items]
        encode_s, decode_s = self.predictor.segment(items, on_device=True)
        out = [self._finish(job) for job in jobs]
        shown = [self._pictures(job, gs) if pictures else [] for job, gs in zip(jobs, out, strict=True)]
        total_s = time.perf_counter() - t0
        out = self._with_timings(jobs, out, total_s)
        m.ENCODE_SECONDS.observe(encode_s, worker=self.name)
        m.DECODE_SECONDS.observe(decode_s, worker=self.name)
        m.TOTAL_SECONDS.observe(total_s, worker=self.name)
        for job in jobs:
            m.GROUPS_SCORED.inc(worker=self.name, purpose=job.request.group.purpose)
        return out, shown

    def _prepare_all(self, requests: list[RewardRequest]) -> list[_Job]:
        """Decode and parse every request; image decoding releases the GIL, so several run on a thread pool."""
        if len(requests) <= 1 or self._io_threads <= 1:
            return [self._prepare(r) for r in requests]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._io_threads, thread_name_prefix=f"{self.name}-decode")
        return list(self._executor.map(self._prepare, requests))

    def _prepare(self, request: RewardRequest) -> _Job:
        from runtime.images import decode_sample_arrays

        s = request.sample
        try:
            image, gt = decode_sample_arrays(s.image, s.mask, s.width, s.height, what=f"sample {s.id!r}")
        except Exception as err:  # CorruptSampleError, or anything else a hostile payload may trigger
            logger.warning("%s: %s; its %d completions score 0", self.name, err, request.group.group_size)
            return _Job(request, [Item(None, b"", [], failure="corrupt_sample")])
        h, w = gt.shape
        size = request.policy_image_size
        parse = lambda text, allow_stop: self.predictor.parse(text, w, h, size, allow_stop)  # noqa: E731
        key = hashlib.blake2b(s.image, digest_size=16).digest()
        texts = [c.texts for c in request.group.completions]
        items = (turn_items if request.previous is None else continue_items)(parse, texts, image, key)
        return _Job(request, items, ground_truth(gt))

    # -- results -------------------------------------------------------------------------------------------------
    def _finish(self, job: _Job) -> GroupScores:
        group = job.request.group
        if job.failure is not None:
            return self._failed_group(group, job.failure)
        counts = [_mask_counts(item.masks, job.truth) for item in job.items]
        w, prev = self.reward.weights, job.request.previous
        rewards = (
            episode_rewards(job.items, counts, job.truth, w)
            if prev is None
            else continued_rewards(job.items[0], counts[0], job.truth, w, prev.scores)
        )
        scores = []
        for reward, failure in rewards:
            scores.append(reward)
            self._record(reward.rewards, failure, group.purpose)
        return GroupScores(group_id=group.group_id, scores=scores, reward_worker=self.name)

    def _pictures(self, job: _Job, scores: GroupScores) -> list[bytes | None]:
        """The next turn's picture of each completion whose episode goes on: its newest mask and prompts drawn
        on the image (never the ground truth), at the policy's size."""
        from runtime.images import encode_png
        from runtime.overlay import feedback_image

        item, size = job.items[-1], job.request.policy_image_size or self.policy.image_size
        out: list[bytes | None] = []
        for answer, mask, score in zip(item.answers, item.masks, scores.scores, strict=True):
            if not score.goes_on or mask is None:
                out.append(None)
                continue
            mask = mask.cpu().numpy() if hasattr(mask, "cpu") else mask  # (H, W) bool
            boxes = [p.box for p in answer.prompts if p.box is not None]
            points = [pt for p in answer.prompts for pt in p.points]
            labels = [lb for p in answer.prompts for lb in p.labels]
            picture = feedback_image(item.image, mask, size, boxes, points, labels)
            out.append(encode_png(np.asarray(picture)))
        return out

    def _failed_group(self, group: RolloutGroup, reason: str) -> GroupScores:
        scores = []
        for _ in group.completions:
            scores.append(CompletionReward(rewards=zero_rewards(), parse_ok=False, parse_failure=reason))
            self._record(scores[-1].rewards, reason, group.purpose)
        return GroupScores(group_id=group.group_id, scores=scores, reward_worker=self.name)

    def _record(self, rewards, failure: str | None, purpose: str) -> None:
        m.MASKS_SCORED.inc(worker=self.name, purpose=purpose)
        if failure is not None:
            m.PARSE_FAILURES.inc(worker=self.name, reason=failure)
        for term in REWARD_TERMS:
            m.REWARD.observe(getattr(rewards, term), worker=self.name, term=term)

    def _with_timings(self, jobs: list[_Job], out: list[GroupScores], total_s: float) -> list[GroupScores]:
        """Each group's share of the call; a later turn's (a request with `previous`) adds its earlier turns', so
        an episode's scores carry its reward seconds over every turn."""
        n = sum(job.request.group.group_size for job in jobs) or 1
        return [
            gs.model_copy(
                update={
                    "encode_s": sum(item.encode_s for item in job.items) + _earlier(job, "encode_s"),
                    "decode_s": sum(item.decode_s for item in job.items) + _earlier(job, "decode_s"),
                    "total_s": total_s * job.request.group.group_size / n + _earlier(job, "total_s"),
                }
            )
            for job, gs in zip(jobs, out, strict=True)
        ]

    def _queue_depth(self, delta: int) -> None:
        with self._pending_lock:
            self._pending += delta
            m.QUEUE_DEPTH.set(self._pending, worker=self.name)


def _mask_counts(masks: list, truth: GroundTruth) -> list[np.ndarray | None]:
    """Per completion the mask_counts of its (H, W) mask (numpy, or torch on the segmenter's device: counted there
    in one batch, so only 8 numbers per mask reach the host); None stays None (no prompt)."""
    with_mask = [k for k, mask in enumerate(masks) if mask is not None]
    out: list[np.ndarray | None] = [None] * len(masks)
    if not with_mask:
        return out
    if isinstance(masks[with_mask[0]], np.ndarray):
        for k in with_mask:
            out[k] = mask_counts(masks[k], truth)
        return out
    import torch

    unions = torch.stack([masks[k] for k in with_mask])  # (C, H, W)
    for k, row in zip(with_mask, mask_counts_torch(unions, truth), strict=True):
        out[k] = row
    return out


def _earlier(job: _Job, timing: str) -> float:
    previous = job.request.previous
    return getattr(previous, timing) if previous is not None else 0.0
