"""The learner: one GRPO step per batch of scored groups (grpo.updates_per_batch optimiser updates, pi_old and
the behaviour importance weights from a no-grad pass first: learner/update.py), weight export/broadcast,
checkpoints.

A plain class (`ray.remote` is applied in cluster/pools/topology.py only), usable in-process by tests and on the GPU
machine without Ray.

    learner = Learner(cfg.learner_spec())             # cluster/config.py hands the learner its sections
    stats = learner.step(scored_groups, *samples)     # sample i belongs to group i; policy_version += 1 per batch
    info = learner.weight_sync_prepare(["rollout-0", "rollout-1"])   # then, concurrently:
    learner.weight_sync_connect()  ||  receiver_i.join(info)         # (runtime/weights/collective.py)
    learner.broadcast_weights()    ||  receive_and_load(receiver_i, engine)
    learner.save_checkpoint(data_cursor=reader.cursor())

Over Ray the driver passes the samples as ObjectRefs in the varargs (Ray resolves them), so each image is
serialised once per step. The prompts are the groups' own prompt_token_ids; only the images are processed
again.

A learner group (learner.world_size > 1) is one Learner per rank (rank, world_size, init_method), the policy
sharded with torch FSDP2 (learner/sharding.py); each rank trains its slice of the completions with the batch's
global denominators, so an N-rank step equals a 1-rank step on the same batch. step, loss_on, save_checkpoint,
load_checkpoint, broadcast_weights and export_weights are then COLLECTIVE: every rank calls them with the same
arguments, and they return the same figures on every rank (docs/learner.md, "Sharded learner").
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from learner import metrics as M
from learner.checkpoint import (
    best_checkpoint,
    latest_checkpoint,
    load_optimizer_state,
    mark_best,
    rank_rng,
    read_best,
    read_state,
    save_checkpoint,
    save_optimizer_state,
    save_policy,
    set_rng_state,
    supersede_after,
)
from learner.config import LearnerSpec
from learner.policy import Policy, learner_device
from learner.publish import export_streamed, node_ip, weight_sender
from learner.sharding import (
    barrier,
    broadcast_object,
    join_group,
    max_over_ranks,
    sum_over_ranks,
    together,
)
from learner.update import LOSS_STAT_KEYS, Plan, finish_fused, minibatch_loss, plan_batch, score_old
from learner.weights_io import (
    HFWriter,
    OneAtATime,
    drain,
    load_adapter,
    load_hf_weights,
    save_adapter,
    weight_specs,
)
from protos import Sample, ScoredGroup, StepStats, TrainBatch, check_pairs
from runtime.memory import peak_memory
from runtime.quiet import quiet_libraries
from runtime.threads import limit_threads
from runtime.weights.abandon import Abandonable
from runtime.weights.delta import DeltaEncoder, DeltaExport
from runtime.weights.interface import SendStats, WeightSender
from runtime.weights.layout import StreamedWeights
from runtime.weights.wire import GroupInfo


def lr_multiplier(step: int, warmup: int, schedule: str, total_steps: int) -> float:
    """Linear warm-up over `warmup` steps, then constant / cosine / linear decay to 0 at total_steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown learner.schedule {schedule!r}; use constant, cosine or linear")


class Learner:
    """GRPO learner over a Qwen2.5-VL policy folder (spec.policy.path)."""

    def __init__(
        self,
        spec: LearnerSpec,
        rank: int = 0,
        world_size: int = 1,
        init_method: str | None = None,
        total_steps: int | None = None,
    ):
        quiet_libraries()
        limit_threads()
        self.spec, self.rank, self.world_size = spec, rank, world_size
        torch.manual_seed(spec.policy.seed)
        device = learner_device(spec.learner, rank)
        # a 1-member group (init_method given) takes the sharded code path too: the GPU check runs it on one GPU
        self.sharded = world_size > 1 or init_method is not None
        if self.sharded:
            join_group(device, rank, world_size, init_method)
        load_device = torch.device("cpu") if self.sharded else device  # fully_shard moves shards to device
        self.policy = Policy(spec.policy, spec.learner, device, spec.grpo.beta > 0, load_device)
        if self.sharded:
            self.policy.shard(world_size)
        self.params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=spec.learner.lr, weight_decay=spec.learner.weight_decay
        )
        self.total_steps = total_steps if total_steps is not None else spec.grpo.steps
        self.step_count = 0
        self.policy_version = 0
        self._sender: WeightSender | None = None
        self._export_delta: DeltaEncoder | None = None  # the object store's versions, with weight_sync.delta
        self._sender_backend = ""
        self._sync = Abandonable()  # weight_sync_abort() ends a blocked connect / broadcast at once
        M.POLICY_VERSION.set(0)

    # -- the optimiser step ---------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        lc = self.spec.learner
        return lc.lr * lr_multiplier(step, lc.warmup_steps, lc.schedule, self.total_steps)

    def step(self, groups: Sequence[ScoredGroup], *samples: Sample) -> StepStats:
        """Train on B scored groups (sample i is group i's image): advantages from the rewards, a no-grad pass
        for pi_old and the behaviour importance weights (skipped where the update's own forward gives the same:
        update.fused), then grpo.updates_per_batch mini-batch updates (GRPO
        loss over micro-batches with gradient accumulation, grad clipping, AdamW). policy_version += 1 and
        step_count += 1 per call, however many updates it made (learner/update.py)."""
        t0 = time.perf_counter()
        plan = self._plan(groups, samples)
        score_old(self.policy, plan, self.spec.grpo, self.world_size)
        lr = self.lr_at(self.step_count)
        losses, norms, skipped = [], [], 0
        acc, first = dict.fromkeys((*LOSS_STAT_KEYS, "num_tokens"), 0.0), None
        for k in range(len(plan.minibatches)):
            self.optimizer.zero_grad(set_to_none=True)
            loss, sums, head = minibatch_loss(self.policy, plan, k, self.spec.grpo, True, self.world_size)
            first = head if first is None else first
            losses.append(loss)
            acc = {key: acc[key] + sums[key] for key in acc}
            norm = self._update(lr, plan, k)
            skipped += norm is None
            norms.extend([] if norm is None else [norm])
        finish_fused(plan, self.spec.grpo, self.policy.device, self.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        losses, acc, first = _over_ranks(losses, acc, first, self.policy.device, self.world_size)
        self.step_count += 1
        self.policy_version += 1
        out = StepStats(
            step=self.step_count,
            policy_version=self.policy_version,
            loss=sum(losses) / len(losses),
            grad_norm=sum(norms) / len(norms) if norms else 0.0,  # clip_grad_norm_'s norms are global
            lr=lr,
            step_s=max_over_ranks(time.perf_counter() - t0, self.policy.device, self.world_size),
            skipped_non_finite=skipped,
            num_updates=len(plan.minibatches),
            first_ratio_mean=first["ratio_mean"] if first else 1.0,
            first_clip_fraction=first["clip_fraction"] if first else 0.0,
            **self._counts(groups, plan),
            **_token_means(acc),
            **plan.is_stats,
            advantage_abs_mean=_advantage_abs_mean(plan.adv),
        )
        self._record(out)
        return out

    def step_by_ref(self, batch: TrainBatch, *rollouts_and_samples: Any) -> StepStats:
        """`step` on a batch the driver routed by reference: Ray resolved the rollouts and samples it names
        (protos/routing.py); this rank joins each group with its scores itself."""
        groups, samples = batch.assemble(rollouts_and_samples)
        return self.step(groups, *samples)

    def _update(self, lr: float, plan: Plan, k: int) -> float | None:
        """Clip the accumulated gradient and step AdamW at `lr`; a non-finite gradient norm skips the update (a
        poisoned mini-batch must not poison the weights; its groups are counted). Returns the norm or None."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.spec.learner.grad_clip)
        value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP2
        if not math.isfinite(value):
            groups = {plan.rows[r][0] for chunk in plan.minibatches[k] for r in chunk}
            M.SKIPPED_GROUPS.inc(len(groups), reason="non_finite_grad")
            return None
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        return value

    @torch.no_grad()
    def loss_on(self, groups: Sequence[ScoredGroup], *samples: Sample) -> float:
        """The loss step() would report on this batch if the weights did not move between its updates (exactly
        step()'s loss when grpo.updates_per_batch is 1), without updating anything."""
        return self._accumulate(groups, samples, backward=False)[0]

    def _accumulate(
        self, groups: Sequence[ScoredGroup], samples: Sequence[Sample], backward: bool
    ) -> tuple[float, dict, dict]:
        """Plan, no-grad pass, then forward (+ backward, gradients summed over every update) of every
        mini-batch at the current weights; (mean mini-batch loss, stats, counts). Tests and loss_on."""
        plan = self._plan(groups, samples)
        score_old(self.policy, plan, self.spec.grpo, self.world_size)
        losses, acc = [], dict.fromkeys((*LOSS_STAT_KEYS, "num_tokens"), 0.0)
        for k in range(len(plan.minibatches)):
            loss, sums, _ = minibatch_loss(self.policy, plan, k, self.spec.grpo, backward, self.world_size)
            losses.append(loss)
            acc = {key: acc[key] + sums[key] for key in acc}
        finish_fused(plan, self.spec.grpo, self.policy.device, self.world_size)
        losses, acc, _ = _over_ranks(losses, acc, None, self.policy.device, self.world_size)
        stats = {**_token_means(acc), **plan.is_stats, "advantage_abs_mean": _advantage_abs_mean(plan.adv)}
        return sum(losses) / len(losses), stats, self._counts(groups, plan)

    def _plan(self, groups: Sequence[ScoredGroup], samples: Sequence[Sample]) -> Plan:
        sampled = _check_batch(groups, samples)
        lc, g = self.spec.learner, self.spec.grpo
        return plan_batch(self.policy, groups, samples, sampled, g, lc, self.rank, self.world_size)

    @staticmethod
    def _counts(groups: Sequence[ScoredGroup], plan: Plan) -> dict:
        n_tokens = sum(c.policy_tokens for _, c in plan.rows)
        return {"num_groups": len(groups), "num_completions": len(plan.rows), "num_tokens": n_tokens}

    def _record(self, s: StepStats) -> None:
        M.STEP_SECONDS.observe(s.step_s)
        M.LOSS.set(s.loss)
        M.KL.set(s.kl)
        M.CLIP_FRACTION.set(s.clip_fraction_low, side="low")
        M.CLIP_FRACTION.set(s.clip_fraction_high, side="high")
        M.GRAD_NORM.set(s.grad_norm)
        M.IS_WEIGHT_MEAN.set(s.is_weight_mean)
        M.IS_CAPPED_FRACTION.set(s.is_truncated_fraction, mode="truncate")
        M.IS_CAPPED_FRACTION.set(s.is_masked_fraction, mode="mask")
        M.MISMATCH_LOGP_ABS.set(s.mismatch_logp_abs)
        M.MISMATCH_OUTSIDE_FRACTION.set(s.mismatch_outside_fraction)
        M.LR.set(s.lr)
        M.POLICY_VERSION.set(s.policy_version)
        M.STEPS.inc()
        M.TOKENS.inc(s.num_tokens)

    # -- weights --------------------------------------------------------------------------------------------
    def export_dtype(self) -> torch.dtype:
        """The rollout engines' dtype (LearnerSpec.export_dtype, resolved by cluster/config.py)."""
        return getattr(torch, self.spec.export_dtype)

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of every policy parameter in the rollout dtype, one at a time. COLLECTIVE
        under FSDP2: every rank exhausts it, in the same order (learner/weights_io.py)."""
        return self.policy.named_weights(self.export_dtype())

    def export_weights(self, base: int | None = None) -> dict[str, torch.Tensor] | DeltaExport:
        """CPU copies of named_weights() on rank 0 (the object-store transport; tests); {} on the other ranks,
        which only take part in the gathers. COLLECTIVE. With weight_sync.delta on for the object store, a
        DeltaExport instead (weight_sync.backend object-store only): deltas against `base`, the version every rollout
        worker holds (None: whole)."""
        if self.rank != 0:
            drain(self.named_weights())
            return {}
        store = self.weight_sync_backend() == "object-store"  # else only catch-up and fallback: whole
        if not (store and self.spec.weight_sync.delta_on("object-store", self.policy.device.type == "cuda")):
            return {n: t.detach().to("cpu", copy=True) for n, t in self.named_weights()}
        if self._export_delta is None:
            self._export_delta = DeltaEncoder(
                self.spec.weight_sync.delta_max_changed, self.spec.weight_sync.full_every
            )
        stream = OneAtATime(self.named_weights())
        try:
            weights = StreamedWeights(weight_specs(self.policy, self.export_dtype()), stream)
            return export_streamed(
                self._export_delta, weights, self.spec.weight_sync.bucket_mb, base, self.policy_version
            )
        finally:
            drain(stream)

    def weight_sync_backend(self) -> str:
        """weight_sync.backend as resolved by cluster/config.py (TrainConfig.weight_transport)."""
        backend = self.spec.weight_sync.backend
        if backend == "auto":  # a spec built by hand: the CPU / GPU default
            return "nccl" if self.policy.device.type == "cuda" else "gloo"
        return backend

    def weight_sync_prepare(self, members: Sequence[str], host: str | None = None) -> dict:
        """Open a new generation of the weight-sync group for `members` (rollout worker names); returns the
        GroupInfo (as a dict) each member passes to `WeightReceiver.join`. Non-blocking."""
        backend = self.weight_sync_backend()
        if backend == "object-store":
            raise RuntimeError("weight_sync.backend=object-store has no group: ship export_weights() instead")
        if self._sender is None or self._sender_backend != backend:
            gpu = self.policy.device.type == "cuda"
            self._sender = weight_sender(backend, host or node_ip(), self.spec.weight_sync, gpu)
            self._sender_backend = backend
        info = self._sender.prepare(list(members))
        self._generation = info.generation
        return info.to_dict()

    def weight_sync_connect(self) -> None:
        """Blocks until every member joined the prepared generation (or weight_sync_abort() gives it up)."""
        self._sync.run(self._generation, self._sender.connect, "forming")

    def broadcast_weights(self) -> dict:
        """Send the current policy (version policy_version) to every member, one bucket gathered at a time;
        returns SendStats as a dict (rank 0; {} on the other ranks). COLLECTIVE. A weight_sync_abort() meanwhile
        abandons the transfer at once (WeightSyncAborted); rank 0 still completes every gather of the stream, so
        the learner ranks stay in step (the stream is shared with the abandoned send under a lock)."""
        stream = OneAtATime(self.named_weights())
        if self.rank != 0:  # the gathers only, in the order rank 0's sender packs them
            drain(stream)
            return {}
        try:
            if self._sender is None:
                raise RuntimeError("broadcast_weights before weight_sync_prepare/connect")
            weights = StreamedWeights(weight_specs(self.policy, self.export_dtype()), stream)
            send = lambda: self._sender.send(weights, self.policy_version)  # noqa: E731
            info = self._sender.info  # None for the in-process transport: no generation to abandon
            s: SendStats = send() if info is None else self._sync.run(info.generation, send, "broadcasting")
        finally:
            drain(stream)  # a failed or abandoned send still completes every gather
        return M.record_sync(s, self._sender_backend)

    def weight_sync_abort(self) -> int:
        """A member of the group is gone (the driver saw it die): give up the generation being formed or used at
        once, without waiting for weight_sync.timeout_s; the driver then prepares a new one. The driver calls it
        concurrently with a blocked connect / broadcast (the learner actor's `control` concurrency group).
        Returns the abandoned generation."""
        generation = getattr(self, "_generation", 0)
        self._sync.abandon(generation)
        if self._sender is not None:
            self._sender.abandon()
        return generation

    def weight_sync_group(self) -> GroupInfo | None:
        return self._sender.info if self._sender is not None else None

    def peak_memory(self) -> dict:
        """This rank's peak memory (runtime/memory.py): segr1 preflight's measured column."""
        return peak_memory()

    def close(self) -> None:
        """Close the weight-sync sender; a sharded learner also leaves its process group (every rank calls it)."""
        if self._sender is not None:
            self._sender.close()
        if self.sharded:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(
        self,
        data_cursor: dict | None = None,
        extra: dict | None = None,
        root: str | None = None,
        protect: Sequence[int] = (),
    ) -> str:
        """Write `<checkpoint.dir>/step-<n>` atomically (policy HF folder, optimiser, state JSON), keep K (and
        the best one, and the `protect`ed steps: those whose validation is still running). COLLECTIVE: rank 0
        writes the HF folder and state.json, every rank its part of the optimiser state (DCP); the same path
        on every rank. A multi-node group needs checkpoint.dir on a filesystem every rank sees."""
        t0 = time.perf_counter()
        cc = self.spec.checkpoint
        state = {
            "policy_version": self.policy_version,
            "data_cursor": data_cursor,
            "extra": extra or {},
            "policy_source": self.spec.policy.path,
            "world_size": self.world_size,
        }
        path = save_checkpoint(
            root or cc.dir,
            self.step_count,
            state,
            self._write_policy,
            lambda folder: save_optimizer_state(self.policy.model, self.optimizer, folder),
            cc.keep,
            set(protect),
            rank=self.rank,
            world_size=self.world_size,
        )
        M.CHECKPOINT_SECONDS.observe(time.perf_counter() - t0)
        return str(path)

    def _write_policy(self, folder: Path) -> None:
        """A plain HF folder (LoRA: adapters merged, checkpoint names), gathered one tensor at a time; under
        LoRA the adapters also go to adapter.safetensors next to it."""
        writer = HFWriter(self.policy, write=self.rank == 0)
        if self.rank == 0:
            save_policy(writer, folder, self.spec.policy.path, self.policy.processor)
        else:
            writer.save_pretrained(str(folder))
        if self.policy.lora:
            save_adapter(self.policy, folder.parent, write=self.rank == 0)

    def _load_weights(self, folder: Path) -> dict:
        state = read_state(folder)
        if self.policy.lora:
            load_adapter(self.policy, folder)
        else:
            load_hf_weights(self.policy, folder / "policy")
        return state

    def mark_best(self, step: int, metric: str, value: float) -> str:
        """Record checkpoint step-<step> as the best by `metric` (best.json in checkpoint.dir)."""
        return str(mark_best(self.spec.checkpoint.dir, step, metric, value))

    def load_checkpoint(self, path: str | None = None) -> dict:
        """Restore policy weights, optimiser, step, policy_version and RNG states from a checkpoint folder
        (default: the newest complete one under checkpoint.dir; "best": the one best.json names; either way the
        step-* folders after it are moved to superseded/). Returns its state (data_cursor for the driver's reader) and "best" (best.json).
        COLLECTIVE; the checkpoint may come from a group of any size (the optimiser state is resharded)."""
        root = self.spec.checkpoint.dir
        folder = best_checkpoint(root) if path == "best" else Path(path) if path else latest_checkpoint(root)
        folder = broadcast_object(folder, self.world_size)  # rank 0's view of the folder, for every rank
        if folder is None:
            what = "best.json naming an existing step-* folder" if path == "best" else "step-* folders"
            raise FileNotFoundError(f"no checkpoint under {root} ({what})")
        state = together(lambda: self._load_weights(folder), self.world_size, f"loading {folder}")
        load_optimizer_state(self.policy.model, self.optimizer, folder, self.world_size)
        set_rng_state(rank_rng(state, self.rank))
        self.step_count, self.policy_version = int(state["step"]), int(state["policy_version"])
        M.POLICY_VERSION.set(self.policy_version)
        best = read_best(root)
        barrier(self.world_size)  # every rank read the folder before rank 0 moves later ones away
        if path in (None, "best") and self.rank == 0:  # latest: the incomplete step-* folders it skipped
            supersede_after(root, self.step_count)
        return {**state, "best": best}


# ------------------------------------------------------------------------------------------------------------


def _check_batch(groups: Sequence[ScoredGroup], samples: Sequence[Sample]) -> tuple[float, int]:
    """Groups and samples pair up and were sampled alike; returns their (temperature, max_tokens)."""
    if not groups:
        raise ValueError("Learner.step needs at least one scored group")
    check_pairs(groups, samples, "Learner.step")
    for sg in groups:
        if sg.group.group_size < 2:
            raise ValueError(
                f"group {sg.group.group_id!r} has G={sg.group.group_size}: a single completion gets a "
                "zero advantage, training would be a silent no-op; use grpo.group_size >= 2"
            )
    sampled = {(sg.group.temperature, sg.group.max_tokens) for sg in groups}
    if len(sampled) > 1:
        raise ValueError(
            f"one batch mixes groups sampled with different (temperature, max_tokens): {sorted(sampled)}; "
            "the learner scores every token at the temperature it was sampled at, one per step"
        )
    return sampled.pop()


def _token_means(acc: dict) -> dict:
    """Token-weighted means of the loss statistics summed over micro-batches (minibatch_loss)."""
    return {k: acc[k] / max(acc["num_tokens"], 1.0) for k in LOSS_STAT_KEYS}


def _advantage_abs_mean(adv: torch.Tensor) -> float:
    """Mean |advantage| over the batch's completions (every rank plans the whole batch's advantages). The batch's
    rewards, zero-variance groups and staleness are the driver's figures (cluster/driver/metrics.py)."""
    return float(adv.abs().mean())


def _over_ranks(
    losses: list[float], acc: dict, first: dict | None, device: torch.device, world_size: int
) -> tuple[list[float], dict, dict | None]:
    """Each rank's partial loss sums (global denominators: their sum is the batch's loss), token-weighted stat
    sums and first micro-batch -> the batch's figures, the same on every rank."""
    if world_size <= 1:
        return losses, acc, first
    keys = list(acc)
    w = float(first["num_tokens"]) if first else 0.0
    head = [w, w * first["ratio_mean"], w * first["clip_fraction"]] if first else [0.0, 0.0, 0.0]
    out = sum_over_ranks([*losses, *(acc[k] for k in keys), *head], device, world_size)
    n, m = len(losses), len(losses) + len(keys)
    first = {"ratio_mean": out[m + 1] / out[m], "clip_fraction": out[m + 2] / out[m]} if out[m] > 0 else None
    return out[:n], dict(zip(keys, out[n:m], strict=True)), first
