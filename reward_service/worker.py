"""The reward worker: scores whole rollout groups (and batches of groups) with one image encode per image.

One call: decode each sample's image and mask, parse every completion, encode each distinct image once (batched),
decode every prompt of every group in one batched call, OR each completion's masks, compute its reward terms.
A plain class: tests use it in-process; cluster/topology.py makes it a Ray actor (`reward-<i>`, namespace segr1).

Nothing one request holds can make the worker raise: a sample whose bytes do not decode (or whose mask does not
match its image) scores 0 on every completion with failure "corrupt_sample"; a segmenter error on one image scores
that image's groups 0 with "segmenter_error"; a group paired with another sample's data scores 0 with
"bad_request"; an unexpected error (a bug) scores the call's groups 0 with "internal_error" and logs the
traceback. All are counted (segr1_reward_parse_failures) and logged.

Timings (ScoredGroup.encode_s / decode_s / total_s) are each group's share of the batched call (encode: split over
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
from dataclasses import dataclass, field

import numpy as np

from protos import CompletionReward, ParsedAnswer, RewardRequest, RolloutGroup, Sample, ScoredGroup
from protos.config import PolicySpec
from protos.messages import check_pairs
from reward_service import metrics as m
from reward_service.config import RewardConfig
from reward_service.parser import parse_answer_for
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
from reward_service.segmenters import ImageHandle, build_segmenter_for
from runtime.threads import limit_threads, thread_budget

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    """The state of one request during a call."""

    request: RewardRequest
    failure: str | None = None  # corrupt_sample | segmenter_error: every completion scores 0
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB
    gt: np.ndarray | None = None  # (H, W) bool
    parsed: list[ParsedAnswer] = field(default_factory=list)
    truth: GroundTruth | None = None
    image_key: bytes = b""
    counts: list[np.ndarray | None] = field(
        default_factory=list
    )  # per completion: mask_counts, None: no mask
    encode_s: float = 0.0
    decode_s: float = 0.0

    @property
    def num_prompts(self) -> int:
        return sum(len(p.prompts) for p in self.parsed)


class RewardWorker:
    """Scores rollout groups. `score` is the Ray-facing entry point; `score_requests` the in-process one."""

    def __init__(
        self, policy: PolicySpec, reward: RewardConfig | None = None, name: str = "reward-0", segmenter=None
    ):
        self.policy, self.reward, self.name = policy, reward or RewardConfig(), name
        kind = self.reward.segmenter if segmenter is None else getattr(segmenter, "name", "")
        limit_threads(torch_threads=kind != "grabcut", opencv_threads=True)
        self.segmenter = segmenter if segmenter is not None else build_segmenter_for(self.reward)
        self._lock = threading.Lock()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._io_threads = thread_budget() or os.cpu_count() or 1
        self._executor: ThreadPoolExecutor | None = None

    def ping(self) -> dict:
        return {
            "name": self.name,
            "segmenter": self.segmenter.name,
            "encode_calls": self.segmenter.encode_calls,
            "decode_calls": self.segmenter.decode_calls,
            "pid": os.getpid(),
        }

    def score(self, groups: list[RolloutGroup], *samples: Sample) -> list[ScoredGroup]:
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
                m.GROUPS_SCORED.inc(worker=self.name)
        return out

    def score_requests(self, requests: list[RewardRequest]) -> list[ScoredGroup]:
        self._queue_depth(+len(requests))
        try:
            with self._lock:
                return self._score_locked(requests)
        except Exception:  # a bug, not a bad request: logged with its traceback, counted, the groups score 0
            logger.exception(
                "%s: scoring %d groups failed; they score 0 (internal_error)", self.name, len(requests)
            )
            m.GROUPS_SCORED.inc(len(requests), worker=self.name)
            return [self._failed_group(r.group, "internal_error") for r in requests]
        finally:
            self._queue_depth(-len(requests))

    # -- one call ------------------------------------------------------------------------------------------------
    def _score_locked(self, requests: list[RewardRequest]) -> list[ScoredGroup]:
        t0 = time.perf_counter()
        jobs = self._prepare_all(requests)
        encode_s, handles = self._encode(jobs)
        decode_s = self._decode(jobs, handles)
        out = [self._finish(job) for job in jobs]
        total_s = time.perf_counter() - t0
        out = self._with_timings(jobs, out, total_s)
        m.ENCODE_SECONDS.observe(encode_s, worker=self.name)
        m.DECODE_SECONDS.observe(decode_s, worker=self.name)
        m.TOTAL_SECONDS.observe(total_s, worker=self.name)
        m.GROUPS_SCORED.inc(len(out), worker=self.name)
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

        job = _Job(request)
        s = request.sample
        try:
            job.image, job.gt = decode_sample_arrays(
                s.image, s.mask, s.width, s.height, what=f"sample {s.id!r}"
            )
        except Exception as err:  # CorruptSampleError, or anything else a hostile payload may trigger
            logger.warning("%s: %s; its %d completions score 0", self.name, err, request.group.group_size)
            job.failure = "corrupt_sample"
            return job
        job.truth = ground_truth(job.gt)
        h, w = job.gt.shape
        job.parsed = [
            parse_answer_for(self.reward, c.text, w, h, request.policy_image_size)
            for c in request.group.completions
        ]
        job.image_key = hashlib.blake2b(s.image, digest_size=16).digest()
        return job

    def _encode(self, jobs: list[_Job]) -> tuple[float, dict[bytes, ImageHandle | None]]:
        """Encode each distinct image that has prompts to decode, once, in one batch."""
        images: dict[bytes, np.ndarray] = {}
        for job in jobs:
            if job.failure is None and job.num_prompts:
                images.setdefault(job.image_key, job.image)
        if not images:
            return 0.0, {}
        t0 = time.perf_counter()
        keys = list(images)
        try:
            handles: list[ImageHandle | None] = self.segmenter.encode_batch([images[k] for k in keys])
        except Exception as err:
            logger.warning("%s: batched encode failed (%s); encoding one image at a time", self.name, err)
            handles = [self._encode_one(images[k]) for k in keys]
        elapsed = time.perf_counter() - t0
        by_key = dict(zip(keys, handles, strict=True))
        sharing = {
            k: sum(j.image_key == k and j.failure is None and j.num_prompts > 0 for j in jobs) for k in keys
        }
        for job in jobs:
            if job.image_key in by_key and job.failure is None and job.num_prompts:
                job.encode_s = elapsed / len(keys) / sharing[job.image_key]
        return elapsed, by_key

    def _encode_one(self, image: np.ndarray) -> ImageHandle | None:
        try:
            return self.segmenter.encode(image)
        except Exception as err:
            logger.warning("%s: encoding an image failed: %s", self.name, err)
            return None

    def _decode(self, jobs: list[_Job], handles: dict[bytes, ImageHandle | None]) -> float:
        """Decode every prompt of every job in one batched call; OR each completion's masks."""
        active = [j for j in jobs if j.failure is None and j.num_prompts]
        for job in active:
            if handles.get(job.image_key) is None:
                job.failure = "segmenter_error"
        active = [j for j in active if j.failure is None]
        if not active:
            return 0.0
        items = [(handles[j.image_key], [p for a in j.parsed for p in a.prompts]) for j in active]
        t0 = time.perf_counter()
        try:
            results = self._decode_items(items)
        except Exception as err:
            logger.warning("%s: batched decode failed (%s); decoding one group at a time", self.name, err)
            results = [self._decode_one(item) for item in items]
        elapsed = time.perf_counter() - t0
        total_prompts = sum(len(p) for _, p in items)
        for job, masks in zip(active, results, strict=True):
            if masks is None:
                job.failure = "segmenter_error"
                continue
            job.decode_s = elapsed * job.num_prompts / total_prompts
            job.counts = _completion_counts(job, masks)
        return elapsed

    def _decode_items(self, items) -> list:
        """Masks per item: torch tensors on the segmenter's device when it offers them (no host copy), else numpy."""
        tensors = getattr(self.segmenter, "decode_batch_tensors", None)
        return tensors(items) if tensors is not None else self.segmenter.decode_batch(items)

    def _decode_one(self, item):
        try:
            return self._decode_items([item])[0]
        except Exception as err:
            logger.warning("%s: decoding a group failed: %s", self.name, err)
            return None

    # -- results -------------------------------------------------------------------------------------------------
    def _finish(self, job: _Job) -> ScoredGroup:
        group = job.request.group
        if job.failure is not None:
            return self._failed_group(group, job.failure)
        scores = []
        weights = self.reward.weights
        for k, parsed in enumerate(job.parsed):
            counts = job.counts[k] if job.counts else None
            iou_s = None if counts is None else scores_from_counts(counts, job.truth)
            box_scores = box_terms((p.box for p in parsed.prompts), job.truth)
            rewards = combine(parsed.ok, iou_s, weights, box_scores)
            scores.append(CompletionReward(rewards=rewards, parse_ok=parsed.ok, parse_failure=parsed.failure))
            self._record(rewards, parsed.failure)
        return ScoredGroup(group=group, scores=scores, reward_worker=self.name)

    def _failed_group(self, group: RolloutGroup, reason: str) -> ScoredGroup:
        scores = []
        for _ in group.completions:
            scores.append(CompletionReward(rewards=zero_rewards(), parse_ok=False, parse_failure=reason))
            self._record(scores[-1].rewards, reason)
        return ScoredGroup(group=group, scores=scores, reward_worker=self.name)

    def _record(self, rewards, failure: str | None) -> None:
        m.MASKS_SCORED.inc(worker=self.name)
        if failure is not None:
            m.PARSE_FAILURES.inc(worker=self.name, reason=failure)
        for term in m.TERMS:
            m.REWARD.observe(getattr(rewards, term), worker=self.name, term=term)

    def _with_timings(self, jobs: list[_Job], out: list[ScoredGroup], total_s: float) -> list[ScoredGroup]:
        n = sum(job.request.group.group_size for job in jobs) or 1
        return [
            sg.model_copy(
                update={
                    "encode_s": job.encode_s,
                    "decode_s": job.decode_s,
                    "total_s": total_s * job.request.group.group_size / n,
                }
            )
            for job, sg in zip(jobs, out, strict=True)
        ]

    def _queue_depth(self, delta: int) -> None:
        with self._pending_lock:
            self._pending += delta
            m.QUEUE_DEPTH.set(self._pending, worker=self.name)


def _completion_counts(job: _Job, masks) -> list[np.ndarray | None]:
    """(P, H, W) masks of all the job's prompts, in order (numpy or torch) -> per completion the mask_counts of
    the OR of its own prompts' masks (None: the completion has no prompt)."""
    spans, offset = [], 0
    for parsed in job.parsed:
        spans.append((offset, offset + len(parsed.prompts)))
        offset += len(parsed.prompts)
    with_mask = [k for k, (a, b) in enumerate(spans) if b > a]
    out: list[np.ndarray | None] = [None] * len(spans)
    if isinstance(masks, np.ndarray):
        for k in with_mask:
            a, b = spans[k]
            out[k] = mask_counts(np.logical_or.reduce(masks[a:b], axis=0), job.truth)
        return out
    import torch

    unions = torch.stack([masks[spans[k][0] : spans[k][1]].any(dim=0) for k in with_mask])  # (C, H, W)
    for k, row in zip(with_mask, mask_counts_torch(unions, job.truth), strict=True):
        out[k] = row
    return out
