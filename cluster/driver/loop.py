"""The training driver: one GRPO job over the rollout, reward and learner pools (the map: cluster/driver/__init__.py
and docs/architecture.md).

- sync:  `_run_sync`, one step per iteration: generate B groups and score them (with `grpo.filter_zero_variance`,
         draw more until B informative groups are kept: batches.py), learn, publish. Staleness 0.
- async: `_run_async`, the stages pipelined: rollout and reward work ahead of the learner by at most
         `grpo.max_staleness` policy versions; older groups are dropped and counted.
- turns: with rollout.max_turns > 1 a chunk goes rollout -> reward up to that many times (its episodes that go
         on see their mask and answer again, `_next_turn`) before its groups are scored for good.

The driver reads only each group's header and scores; the completions go rollout -> reward -> learner by ref
(RoutedGroup, TrainBatch). A rollout lost with its node is generated again. Every group is accounted for:
generated = trained + dropped_stale + filtered + left_over, and `lost` (whatever is missing) must be 0.
cluster/launch.py runs the driver as a Ray actor; `workers` names the classes its pools run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import ray

from cluster.config import TrainConfig
from cluster.data.reader import DatasetReader
from cluster.driver import metrics as DM
from cluster.driver.batches import fill_batch
from cluster.driver.calls import generate_by_ref, next_turn_by_ref, score_by_ref
from cluster.driver.metrics import overlay_examples, run_summary, step_bar, step_line
from cluster.driver.recovery import checkpoint_failed, discard_in_flight, run_with_recovery
from cluster.driver.start import start_workers
from cluster.driver.state import (
    Accounting,
    Chunk,
    InFlight,
    RoutedGroup,
    Samples,
    open_work,
    regeneration,
    rollout_request,
    routed,
    split_by_staleness,
    train_batch,
    truncate_metrics,
)
from cluster.driver.validation import Validator
from cluster.driver.weights import WeightPublisher
from cluster.pools.actor_pool import DEATH, ActorPool, WorkFailed, lost_object, wait_any
from cluster.pools.elastic import Elastic
from cluster.pools.learner_group import LearnerCall, LearnerGroup
from cluster.pools.placement import Placement
from cluster.pools.topology import Workers
from cluster.tracking import open_trackers
from protos import GroupHeader, GroupScores, StepStats

logger = logging.getLogger(__name__)


class TrainDriver:
    """Runs `cfg.grpo.steps` optimiser steps (from the checkpoint when resuming) and returns the summary.
    `workers()` names the actor classes (cluster.launch.training_workers); it runs in the driver's process.
    `progress_bar`: the step bar Ray draws on the submitting process (the demo draws its own from metrics.jsonl)."""

    def __init__(self, cfg: TrainConfig, workers: Callable[[], Workers], resume=False, progress_bar=True):
        self.cfg = cfg
        self._progress_bar = progress_bar
        self.run_dir = Path(cfg.metrics.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.reader = DatasetReader.from_config(cfg)
        self.samples = Samples(self.reader)  # the reader's, after those a checkpoint left open
        self.acct = Accounting()
        self.step = 0
        self.version = 0
        self.stop_requested, self._resumed = False, resume
        self._chunk_seq = 0
        classes = workers()
        self.learner_cls = classes.learner  # start_learner() starts the group again after a death
        self.last_checkpoint: str | None = None
        self.learner: LearnerGroup
        self.weights: WeightPublisher
        self.rollout: ActorPool
        self.reward: ActorPool
        start_workers(self, cfg, classes, on_error=self._repair)  # rollout first where vLLM shares a GPU
        self.placement = Placement(lambda: self.learner.handles(), (self.rollout, self.reward))
        self.elastic = Elastic(cfg, {"rollout": self.rollout, "reward": self.reward})
        best = lambda *a: self.learner.mark_best(*a)  # noqa: E731  (keep_best; the learner may be restarted)
        self.validator = Validator(cfg, self.rollout, self.reward, self._write_metrics, best)
        if resume:
            self._resume()
        self.weights.setup(self.rollout)
        if self.version > 0:  # the workers load the starting policy; a resumed run pushes its own
            self.weights.publish(self.rollout, self.version)
        self._metrics_file = (self.run_dir / "metrics.jsonl").open("a" if resume else "w")
        self.trackers = open_trackers(cfg, self.run_dir, resume=resume, step=self.step)  # cluster/tracking

    # -- control ---------------------------------------------------------------------------------------------
    def request_stop(self) -> bool:
        """Finish the step in progress, checkpoint and return (Ctrl-C, preemption)."""
        self.stop_requested = True
        return True

    def run(self) -> dict:
        bar = step_bar(self.cfg, self._progress_bar)
        bar.update(self.step)
        t0 = time.perf_counter()
        try:
            if not self._resumed:  # eval.before_train (a resumed run's step was validated before, if due)
                self.validator.maybe_start(0, self.version, lambda: self._checkpoint(None), first=True)
            run_with_recovery(self, lambda: self._train(bar))  # a dead learner rank: restart, rewind
        finally:
            bar.close()
        summary = run_summary(self, time.perf_counter() - t0)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self._metrics_file.close()
        self.trackers.close()
        return summary

    def _train(self, bar) -> None:
        (self._run_sync if self.cfg.grpo.mode == "sync" else self._run_async)(bar)
        self.validator.drain(lambda: self._advance(timeout=0.5))  # the last validation
        if self.step > 0 and (self.cfg.checkpoint.every == 0 or self.step % self.cfg.checkpoint.every):
            self._checkpoint(None)

    def _done(self) -> bool:
        return self.stop_requested or self.step >= self.cfg.grpo.steps

    # -- one step of each mode ----------------------------------------------------------------------------------
    def _run_sync(self, bar) -> None:
        """Synchronous GRPO, one step per iteration: generate -> score -> learn -> publish. Every trained group
        was generated by the current policy (staleness 0)."""
        g = self.cfg.grpo
        while not self._done():
            self._apply_resize()
            t0 = time.perf_counter()
            # generate B prompts and score them; with filter_zero_variance, draw more until B groups teach
            filled = fill_batch(
                self._generate_and_score, g.batch_size, g.filter_zero_variance, g.max_fill_rounds
            )
            if not filled.kept:  # counted as filtered; the step is drawn again from new prompts
                logger.warning("no informative group in %d rounds of generation", filled.fill_rounds + 1)
                continue
            stats, kept = self._learn(filled.kept)  # learn
            sync = self._publish(stats)  # the rollout pool generates with the new policy from now on
            self._end_step(stats, kept, filled.chunks, t0, sync, filled.fill_rounds)
            bar.update(1)

    def _run_async(self, bar) -> None:
        """Asynchronous GRPO: generation and scoring run ahead of the learner by at most grpo.max_staleness
        policy versions (B * (max_staleness + 1) groups in flight); the learner trains on B fresh scored groups
        as soon as it is free, and each step's weights are published when it ends."""
        g = self.cfg.grpo
        flight = InFlight(capacity=g.batch_size * (g.max_staleness + 1))
        training: LearnerCall | None = None  # the learner's step in progress
        batch: list[RoutedGroup] = []
        t_step = time.perf_counter()
        while not self._done() or training is not None:
            self._apply_resize()
            if not self._done() and flight.room() > 0:  # generate: keep the pipeline full
                flight.add(self._generate(min(g.batch_size, flight.room())))
            # score what was generated, collect what was scored; wake up for the learner's step too
            flight.ready.extend(self._advance(timeout=0.5, also=() if training is None else training.refs))
            flight.forget_done()  # chunks trained, dropped or failed for good
            if training is None and not self._done():
                batch = self._take_fresh(flight)
                if batch:
                    training = self.learner.step(*train_batch(batch))  # learn, while the pools go on
            if training is not None and self._lost(training, batch):  # the batch comes back through the pools
                training = None
            if training is not None and self.learner.done(training):
                stats = self.learner.wait(training)
                sync = self._publish(stats)
                self._end_step(stats, batch, flight.open_chunks(), t_step, sync)
                training, t_step = None, time.perf_counter()
                bar.update(1)
        self._finish_async(flight)

    # -- the stages -------------------------------------------------------------------------------------------
    def _generate_and_score(self, n: int) -> tuple[list[RoutedGroup], list[Chunk]]:
        """Sync mode's draw: n new prompts generated and scored; (the groups the filter keeps, their chunks)."""
        chunks = self._generate(n)
        scored: list[RoutedGroup] = []
        while self.rollout.pending or self.reward.pending:  # a chunk is scored as soon as its rollout returns
            scored.extend(self._advance(timeout=0.5))
        return self._filter(scored, {c.chunk_id: c for c in chunks}), chunks

    def _take_fresh(self, flight: InFlight) -> list[RoutedGroup]:
        """B groups within max_staleness of the learner's version (first scored first), or [] while fewer are
        ready; stale ones are dropped wherever they sit (scoring can finish out of generation order)."""
        g = self.cfg.grpo
        fresh, stale = split_by_staleness(list(flight.ready), self.version, g.max_staleness)
        for r in stale:
            self.acct.groups_dropped_stale += 1
            DM.GROUPS_DROPPED_STALE.inc()
            self._close(r, flight.chunks)
        if g.filter_zero_variance:  # counted and closed like in sync mode
            fresh = self._filter(fresh, flight.chunks)
        flight.ready = deque(fresh)
        if len(flight.ready) < g.batch_size:
            return []
        return [flight.ready.popleft() for _ in range(g.batch_size)]

    def _finish_async(self, flight: InFlight) -> None:
        """Let in-flight work finish so every generated group is accounted for, then count what is left."""
        leftover = list(flight.ready)
        while self.rollout.pending or self.reward.pending:
            leftover.extend(self._advance(timeout=0.1))
        self.acct.groups_left_over += len(leftover)

    def _generate(self, n: int) -> list[Chunk]:
        """Read n samples, put each image in the object store once, and send them to the rollout pool. The
        groups stay in the object store (Chunk.rollout); the driver reads their headers."""
        samples, cursors = self.samples.read(n)
        per_call = max(1, min(self.cfg.rollout.max_batch_groups, math.ceil(n / self.rollout.size)))
        chunks = []
        for start in range(0, len(samples), per_call):
            part, at = samples[start : start + per_call], cursors[start : start + per_call]
            chunk = Chunk(self._chunk_seq, [ray.put(s) for s in part], at, open=len(part))
            self._chunk_seq += 1
            chunk.requests = [
                rollout_request(self.cfg, self.version, chunk.chunk_id, i, s) for i, s in enumerate(part)
            ]
            self.rollout.submit(chunk, lambda a, c=chunk: generate_by_ref(a, c))
            chunks.append(chunk)
        return chunks

    def _advance(self, timeout: float, also: tuple = ()) -> list[RoutedGroup]:
        """Block until a rollout, a score or one of `also` finishes (at most `timeout` s; one ray.wait over both
        pools, no busy loop), send finished rollouts on to the reward pool, and return the groups scored."""
        t0 = time.perf_counter()
        wait_any((self.rollout, self.reward), timeout, also)
        if not also:  # the learner has nothing to train: it waits on scoring, else on generation
            self.elastic.waited(time.perf_counter() - t0, scoring=self.reward.pending > 0)
        for chunk, result in self.rollout.poll(timeout=0):
            if not self.validator.take(chunk, result):
                self._score(chunk, result)
        scored: list[RoutedGroup] = []
        for chunk, result in self.reward.poll(timeout=0):
            if not self.validator.take(chunk, result):
                scored.extend(self._scored(chunk, result))
        self._record_restarts()
        return scored

    def _score(self, chunk: Chunk, headers: list[GroupHeader] | WorkFailed) -> None:
        """A chunk's rollout returned: count its groups and send the rollout's ref to the reward pool."""
        if isinstance(headers, WorkFailed) and lost_object(headers.error):  # its node died before it was read
            self._regenerate_chunk(chunk)
            return
        if isinstance(headers, WorkFailed):
            raise RuntimeError(
                f"rollout of chunk {chunk.chunk_id} failed: {headers.error}"
            ) from headers.error
        if not chunk.counted:  # a rollout generated again replaces a lost one: its groups were counted
            chunk.counted = True
            self.acct.groups_generated += len(headers)
            DM.GROUPS_GENERATED.inc(len(headers))
        chunk.headers = headers
        last = chunk.turn >= self.cfg.rollout.max_turns  # a later turn: to the actor holding the embedding
        self.reward.submit(chunk, lambda a, c=chunk: score_by_ref(a, c, last), prefer=chunk.scorer)

    def _scored(self, chunk: Chunk, result: list[GroupScores] | WorkFailed) -> list[RoutedGroup]:
        if isinstance(result, WorkFailed) and lost_object(result.error):  # the rollout's node died
            logger.warning(
                "chunk %s: its rollout was lost (%s); generating it again", chunk.chunk_id, result.error
            )
            self._regenerate_chunk(chunk)
            return []
        if isinstance(result, WorkFailed):
            logger.error("scoring chunk %s failed for good: %s", chunk.chunk_id, result.error)
            self.acct.groups_failed += len(chunk.requests)
            chunk.open = 0  # nothing of it will come back: it no longer holds a place in the pipeline
            return []
        if chunk.turn < self.cfg.rollout.max_turns and any(s.goes_on for g in result for s in g.scores):
            chunk.scores = result
            self._next_turn(chunk, result[0].reward_worker)  # as soon as this turn's masks are back
            return []
        groups = routed(chunk, result)
        zero = sum(r.zero_variance for r in groups)
        self.acct.groups_zero_variance += zero
        DM.GROUPS_ZERO_VARIANCE.inc(zero)
        return groups

    def _filter(self, scored: list[RoutedGroup], chunks: dict[int, Chunk]) -> list[RoutedGroup]:
        if not self.cfg.grpo.filter_zero_variance:
            return scored
        kept = []
        for r in scored:
            if r.zero_variance:
                self.acct.groups_filtered += 1
                DM.GROUPS_FILTERED.inc()
                self._close(r, chunks)  # a filtered group is done: the checkpoint cursor may pass its chunk
            else:
                kept.append(r)
        return kept

    def _learn(self, batch: list[RoutedGroup]) -> tuple[StepStats, list[RoutedGroup]]:
        """Sync mode's learner step on `batch`; when a rollout it names was lost with its node, the batch is
        generated and scored again (same requests and seeds) and trained then."""
        while True:
            try:
                return self.learner.wait(self.learner.step(*train_batch(batch))), batch
            except Exception as err:
                if not lost_object(err):
                    raise
                logger.warning("a rollout of the step's batch was lost (%s); generating it again", err)
                self._regenerate(batch)
                batch = []
                while self.rollout.pending or self.reward.pending:
                    batch.extend(self._advance(timeout=0.5))

    def _lost(self, training: LearnerCall, batch: list[RoutedGroup]) -> bool:
        """Async mode: True when the learner's step failed because a rollout it names was lost with its node;
        the batch is then generated again and returns to the pipeline (its chunks stay open)."""
        try:
            self.learner.done(training)
        except Exception as err:
            if not lost_object(err):
                raise
            logger.warning("a rollout of the step's batch was lost (%s); generating it again", err)
            self._regenerate(batch)
            return True
        return False

    def _regenerate(self, groups: list[RoutedGroup]) -> None:
        """Send `groups` to the rollout pool again (their rollout is gone); they come back through `_advance`."""
        for chunk in regeneration(groups):
            self._regenerate_chunk(chunk)

    def _regenerate_chunk(self, chunk: Chunk) -> None:
        chunk.headers, chunk.turn, chunk.pictures, chunk.scores = [], 1, None, None  # every turn again
        self.rollout.submit(chunk, lambda a, c=chunk: generate_by_ref(a, c))

    def _next_turn(self, chunk: Chunk, scorer: str) -> None:
        """The chunk's episodes that go on take their next turn; a retry (its actor died) sends the same refs."""
        before, pictures, chunk.scorer = chunk.rollout, chunk.pictures, scorer
        chunk.turn += 1
        self.rollout.submit(chunk, lambda a, c=chunk: next_turn_by_ref(a, c, before, pictures))

    def _publish(self, stats: StepStats) -> dict:
        """The learner's new policy version to every rollout worker; the weight sync's figures."""
        self.version, self.step = stats.policy_version, self.step + 1
        DM.STEP.set(self.step)
        return self.weights.publish(self.rollout, self.version)

    def _end_step(
        self,
        stats: StepStats,
        batch: list[RoutedGroup],
        chunks: list[Chunk],
        t0: float,
        sync: dict,
        fill: int = 0,
    ) -> None:
        """Account for the trained groups, write the step's metrics line, checkpoint and validate when due."""
        trained_by = stats.policy_version - 1  # Learner.step moves the policy one version per call
        staleness = [trained_by - r.policy_version for r in batch]
        for s in staleness:
            DM.STALENESS.observe(s)
        self.acct.groups_trained += len(batch)
        DM.GROUPS_TRAINED.inc(len(batch))
        index = {c.chunk_id: c for c in chunks}
        for r in batch:
            self._close(r, index)
        where = {"step": self.step, "policy_version": self.version, "restarts": self._restarts()}
        step_s = time.perf_counter() - t0
        line = step_line(stats, batch, staleness, sync, step_s, fill_rounds=fill, **where)
        line.update(self.elastic.step_line(self.step, step_s))
        self._write_metrics(line, batch)
        saved = self.cfg.checkpoint.every and self.step % self.cfg.checkpoint.every == 0
        if saved:
            self._checkpoint(list(index.values()))
        self.validator.maybe_start(
            self.step, self.version, None if saved else lambda: self._checkpoint(chunks)
        )

    def _close(self, r: RoutedGroup, chunks: dict[int, Chunk]) -> None:
        """One group of its chunk is done (trained, dropped or filtered): a done chunk leaves the pipeline."""
        chunk = chunks.get(r.chunk_id)
        if chunk is not None:
            chunk.open -= 1
            chunk.closed.add(r.index)
            if chunk.open == 0:
                chunks.pop(r.chunk_id, None)

    def _repair(self, handle, err: BaseException) -> bool:
        """on_error of the rollout pool: a worker that missed an update is resynced, then retried."""
        from actors.engine import StaleWeightsError

        if isinstance(err, StaleWeightsError):
            try:
                ray.get(self.weights.on_start(handle))
            except DEATH:  # it died catching up (the pool replaces it), or the learner it loads from died
                self.learner.check_alive()  # LearnerDied: the driver restarts the learner group
            return True
        return False

    def _record_restarts(self) -> None:
        self.placement.refresh((self.rollout, self.reward))  # a restarted actor may be on another node
        for pool in (self.rollout, self.reward):
            seen = DM.ACTOR_RESTARTS.value(pool=pool.prefix)
            if pool.stats.restarts > seen:
                DM.ACTOR_RESTARTS.inc(pool.stats.restarts - seen, pool=pool.prefix)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def _checkpoint(self, open_chunks: list[Chunk] | None) -> str:
        """Save through the learner: the reader's cursor, and the samples of `open_chunks` whose groups are not done
        yet (async mode's pipeline), generated again first after a resume (state.py `open_work`)."""
        replay, acct = open_work(open_chunks or [], self.acct)
        cursor = self.reader.state_dict()
        extra = dict(
            accounting=acct, replay=replay, actor_restarts=self._restarts(), chunk_seq=self._chunk_seq
        )
        protect = self.validator.protected()  # keep_best: steps still being validated
        try:
            path = self.learner.save_checkpoint(data_cursor=cursor, extra=extra, protect=protect)
        except ray.exceptions.RayTaskError as err:  # a rank's CheckpointError: the job ends saying why
            raise checkpoint_failed(err, self.cfg.checkpoint.dir) from None
        self.last_checkpoint = path
        return path

    def _resume(self) -> None:
        frm = self.cfg.checkpoint.resume_from
        state = self.learner.load_checkpoint(None if frm == "latest" else frm)
        self.last_checkpoint = state.get("path", frm)
        self.restore(state)
        logger.info("resumed at step %d (policy version %d)", self.step, self.version)

    def restore(self, state: dict) -> None:
        """Rewind to a checkpoint's state (the learner loaded it): --resume, and a learner restart."""
        self.validator.restore_best(state.get("best"))
        self.samples.restore(state.get("data_cursor"), state.get("extra", {}).get("replay", []))
        self.step, self.version = int(state["step"]), int(state["policy_version"])
        acct = state.get("extra", {}).get("accounting")
        if acct:
            self.acct = Accounting(**acct)
        # sampling seeds derive from chunk ids: continue the numbering so a resumed run draws what an
        # uninterrupted one would have drawn
        self._chunk_seq = int(state.get("extra", {}).get("chunk_seq", 0))
        truncate_metrics(self.run_dir / "metrics.jsonl", self.step)

    # -- what recovery uses (cluster/driver/recovery.py's `Restartable`) ----------------------------------------
    def drain_in_flight(self) -> int:
        return discard_in_flight((self.rollout, self.reward), self.validator)

    def start_learner(self) -> None:
        """A new learner group (the old one was killed); the weight publisher sends from it from now on."""
        self.learner = LearnerGroup.start(self.cfg, self.learner_cls)
        self.weights.rebind(self.learner)

    def rewind(self, state: dict) -> None:
        """Back to a checkpoint's state (the learner loaded it); metrics.jsonl is cut to its step."""
        self._metrics_file.close()
        self.restore(state)
        self._metrics_file = (self.run_dir / "metrics.jsonl").open("a")

    def republish(self) -> None:
        """The current policy version to every rollout worker, which is told first to accept an older one."""
        # first, so that a worker (re)started from here on (the broadcast restarts a dead one) loads the
        # checkpoint's weights under the checkpoint's version, not under the dead learner's newer number
        self.weights.version = self.version
        self.rollout.broadcast(lambda w: w.rewind.remote(self.version))
        self.weights.setup(self.rollout)
        self.weights.publish(self.rollout, self.version)

    # -- reporting ---------------------------------------------------------------------------------------------
    def _restarts(self) -> int:
        return self.rollout.stats.restarts + self.reward.stats.restarts

    def _write_metrics(self, line: dict, batch: list[RoutedGroup] = ()) -> None:
        """The one place a metrics line leaves the driver (one per step, one per validation with val/*): into
        metrics.jsonl and every tracker (with the step's batch: reward histograms, overlays)."""
        self._metrics_file.write(json.dumps(line) + "\n")
        self._metrics_file.flush()
        rewards = [c.rewards for r in batch for c in r.scores.scores]
        examples = lambda n: overlay_examples(batch[:n])  # noqa: E731  (fetched only when overlays are drawn)
        self.trackers.log_step(line.get("step", self.step), line, rewards, examples)

    def close(self) -> None:
        self.elastic.close()
        self.trackers.close()  # no-op after run(); a job stopped before it ends its tracker runs here
        self.rollout.shutdown()
        self.reward.shutdown()
        self.learner.shutdown()  # removes the weight-sync shared memory; never raises (a dead rank)

    # -- scaling (cluster/pools/elastic.py) ---------------------------------------------------------------------
    def request_resize(self, rollout: int | None = None, reward: int | None = None) -> dict:
        """Ask for pool sizes (`segr1 scale`); applied between pipeline rounds, within 1..<pool>.max_workers.
        New rollout workers get the current weights before they serve; removed ones finish their work first.
        Returns {"before": sizes, "after": sizes, ...} once the loop applied it."""
        return self.elastic.request_resize(rollout, reward)

    def _apply_resize(self) -> None:
        if "rollout" in self.elastic.apply():
            self.weights.setup(self.rollout)
