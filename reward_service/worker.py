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
over a call's groups gives the call's measured times.
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

from protos import CompletionReward, GroupScores, RewardRequest, RolloutGroup, Sample
from protos.config import PolicySpec
from protos.messages import check_pairs
from reward_service import metrics as m
from reward_service.config import RewardConfig
from reward_service.predictor import CompletionPrediction, Item, Predictor
from reward_service.rewards import (
    GroundTruth,
    box_terms,
    combine,
    ground_truth,
    mask_counts,
    mask_counts_torch,
    scores_from_counts,
    zero_rewards,
)
from runtime.memory import peak_memory
from runtime.threads import thread_budget

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    """The state of one request during a call: its Predictor item (image, parsed answers, masks, failure)."""

    request: RewardRequest
    item: Item
    truth: GroundTruth | None = None


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

    def score(self, groups: list[RolloutGroup], *samples: Sample) -> list[GroupScores]:
        """Score `groups`; sample i belongs to group i (Ray resolves ObjectRefs passed as the varargs)."""
        # counts only: a group paired with the wrong sample scores 0 (bad_request) below
        check_pairs(groups, samples, f"RewardWorker {self.name!r}: score", match_ids=False)
        size = self.policy.image_size
        requests: list[RewardRequest | RolloutGroup] = []
        for group, sample in zip(groups, samples, strict=True):
            try:
                requests.append(RewardRequest(group=group, sample=sample, policy_image_size=size))
            except Exception as err:  # e.g. a group paired with the wrong sample: that group scores 0
                logger.warning("%s: bad request for group %s: %s", self.name, group.group_id, err)
                requests.append(group)
        good = [r for r in requests if isinstance(r, RewardRequest)]
        scored = iter(self.score_requests(good)) if good else iter(())
        out = []
        for r in requests:
            if isinstance(r, RewardRequest):
                out.append(next(scored))
            else:
                out.append(self._failed_group(r, "bad_request"))
                m.GROUPS_SCORED.inc(worker=self.name, purpose=r.purpose)
        return out

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
        self._queue_depth(+len(requests))
        try:
            with self._lock:
                return self._score_locked(requests)
        except Exception:  # a bug, not a bad request: logged with its traceback, counted, the groups score 0
            logger.exception(
                "%s: scoring %d groups failed; they score 0 (internal_error)", self.name, len(requests)
            )
            out = [self._failed_group(r.group, "internal_error") for r in requests]
            for r in requests:
                m.GROUPS_SCORED.inc(worker=self.name, purpose=r.group.purpose)
            return out
        finally:
            self._queue_depth(-len(requests))

    # -- one call ------------------------------------------------------------------------------------------------
    def _score_locked(self, requests: list[RewardRequest]) -> list[GroupScores]:
        t0 = time.perf_counter()
        jobs = self._prepare_all(requests)
        encode_s, decode_s = self.predictor.segment([job.item for job in jobs], on_device=True)
        out = [self._finish(job) for job in jobs]
        total_s = time.perf_counter() - t0
        out = self._with_timings(jobs, out, total_s)
        m.ENCODE_SECONDS.observe(encode_s, worker=self.name)
        m.DECODE_SECONDS.observe(decode_s, worker=self.name)
        m.TOTAL_SECONDS.observe(total_s, worker=self.name)
        for job in jobs:
            m.GROUPS_SCORED.inc(worker=self.name, purpose=job.request.group.purpose)
        return out

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
            return _Job(request, Item(None, b"", [], failure="corrupt_sample"))
        h, w = gt.shape
        answers = [
            self.predictor.parse(c.text, w, h, request.policy_image_size) for c in request.group.completions
        ]
        key = hashlib.blake2b(s.image, digest_size=16).digest()
        return _Job(request, Item(image, key, answers), ground_truth(gt))

    # -- results -------------------------------------------------------------------------------------------------
    def _finish(self, job: _Job) -> GroupScores:
        group, item = job.request.group, job.item
        if item.failure is not None:
            return self._failed_group(group, item.failure)
        scores = []
        weights = self.reward.weights
        for parsed, counts in zip(item.answers, _mask_counts(item.masks, job.truth), strict=True):
            iou_s = None if counts is None else scores_from_counts(counts, job.truth)
            box_scores = box_terms((p.box for p in parsed.prompts), job.truth)
            rewards = combine(parsed.ok, iou_s, weights, box_scores)
            scores.append(CompletionReward(rewards=rewards, parse_ok=parsed.ok, parse_failure=parsed.failure))
            self._record(rewards, parsed.failure, group.purpose)
        return GroupScores(group_id=group.group_id, scores=scores, reward_worker=self.name)

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
        for term in m.TERMS:
            m.REWARD.observe(getattr(rewards, term), worker=self.name, term=term)

    def _with_timings(self, jobs: list[_Job], out: list[GroupScores], total_s: float) -> list[GroupScores]:
        n = sum(job.request.group.group_size for job in jobs) or 1
        return [
            gs.model_copy(
                update={
                    "encode_s": job.item.encode_s,
                    "decode_s": job.item.decode_s,
                    "total_s": total_s * job.request.group.group_size / n,
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
