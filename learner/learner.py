"""The learner: one GRPO step per batch of scored groups (grpo.updates_per_batch optimiser updates, pi_old and
the behaviour importance weights from a no-grad pass first: learner/update.py), weight export/broadcast,
checkpoints.

A plain class (`ray.remote` is applied in cluster/topology.py only), usable in-process by tests and on the GPU
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

Data parallel over several GPUs (learner.num_gpus > 1) shards the policy with torch FSDP2 (`fully_shard`), one
Learner process per GPU (rank, world_size, init_method), each rank training on its slice of the completions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from learner import metrics as M
from learner.checkpoint import (
    best_checkpoint,
    latest_checkpoint,
    load_optimizer,
    mark_best,
    read_best,
    read_state,
    save_checkpoint,
    save_optimizer,  # noqa: F401  (re-exported for callers that save only the optimiser)
    save_policy,
    set_rng_state,
    supersede_after,
)
from learner.config import LearnerSpec
from learner.policy import Policy, learner_device
from learner.update import LOSS_STAT_KEYS, Plan, finish_fused, minibatch_loss, plan_batch, score_old
from protos import Sample, ScoredGroup, StepStats, check_pairs
from runtime.threads import limit_threads
from runtime.weights.abandon import Abandonable
from runtime.weights.collective import DistributedWeightSender
from runtime.weights.config import WeightSyncConfig
from runtime.weights.cuda_ipc import CudaIpcSender
from runtime.weights.interface import SendStats, WeightSender
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
        limit_threads()
        self.spec, self.rank, self.world_size = spec, rank, world_size
        torch.manual_seed(spec.policy.seed)
        device = learner_device(spec.learner, rank)
        self.policy = Policy(spec.policy, spec.learner, device, load_reference=spec.grpo.beta > 0)
        if world_size > 1:
            _setup_fsdp2(self.policy.model, rank, world_size, init_method)
            self.policy.share_vision = False  # FSDP2 unshards root params only in the root forward
        self.params = self.policy.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=spec.learner.lr, weight_decay=spec.learner.weight_decay
        )
        self.total_steps = total_steps if total_steps is not None else spec.grpo.steps
        self.step_count = 0
        self.policy_version = 0
        self._sender: WeightSender | None = None
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
        losses, norms, skipped = [], [], False
        acc, first = dict.fromkeys((*LOSS_STAT_KEYS, "num_tokens"), 0.0), None
        for k in range(len(plan.minibatches)):
            self.optimizer.zero_grad(set_to_none=True)
            loss, sums, head = minibatch_loss(self.policy, plan, k, self.spec.grpo, True, self.world_size)
            first = head if first is None else first
            losses.append(loss)
            acc = {key: acc[key] + sums[key] for key in acc}
            norm = self._update(lr, plan, k)
            skipped |= norm is None
            norms.extend([] if norm is None else [norm])
        finish_fused(plan, self.spec.grpo, self.policy.device, self.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.policy_version += 1
        out = StepStats(
            step=self.step_count,
            policy_version=self.policy_version,
            loss=sum(losses) / len(losses),
            grad_norm=sum(norms) / len(norms) if norms else 0.0,
            lr=lr,
            step_s=time.perf_counter() - t0,
            skipped_non_finite=skipped,
            num_updates=len(plan.minibatches),
            first_ratio_mean=first["ratio_mean"] if first else 1.0,
            first_clip_fraction=first["clip_fraction"] if first else 0.0,
            **self._counts(groups, plan),
            **_token_means(acc),
            **plan.is_stats,
            **_batch_stats(groups, plan.adv, self.policy_version),
        )
        self._record(out)
        return out

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
        stats = {**_token_means(acc), **plan.is_stats, **_batch_stats(groups, plan.adv, self.policy_version)}
        return sum(losses) / len(losses), stats, self._counts(groups, plan)

    def _plan(self, groups: Sequence[ScoredGroup], samples: Sequence[Sample]) -> Plan:
        sampled = _check_batch(groups, samples)
        lc, g = self.spec.learner, self.spec.grpo
        return plan_batch(self.policy, groups, samples, sampled, g, lc, self.rank, self.world_size)

    @staticmethod
    def _counts(groups: Sequence[ScoredGroup], plan: Plan) -> dict:
        n_tokens = sum(len(c.token_ids) for _, c in plan.rows)
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

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """(HF name, tensor) of every policy parameter in the rollout dtype, on the learner's device."""
        return self.policy.named_weights(self.export_dtype())

    def export_weights(self) -> dict[str, torch.Tensor]:
        """CPU copies of named_weights() (the object-store transport; tests)."""
        return {n: t.detach().to("cpu", copy=True) for n, t in self.named_weights()}

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
            self._sender = _weight_sender(backend, host or _node_ip(), self.spec.weight_sync)
            self._sender_backend = backend
        info = self._sender.prepare(list(members))
        self._generation = info.generation
        return info.to_dict()

    def weight_sync_connect(self) -> None:
        """Blocks until every member joined the prepared generation (or weight_sync_abort() gives it up)."""
        self._sync.run(self._generation, self._sender.connect, "forming")

    def broadcast_weights(self) -> dict:
        """Send the current policy (version policy_version) to every member; returns SendStats as a dict. A
        weight_sync_abort() meanwhile abandons the transfer at once (WeightSyncAborted)."""
        if self._sender is None or self._sender.info is None:
            raise RuntimeError("broadcast_weights before weight_sync_prepare/connect")
        send = lambda: self._sender.send(self.named_weights(), self.policy_version)  # noqa: E731
        s: SendStats = self._sync.run(self._sender.info.generation, send, "broadcasting")
        M.SYNC_SECONDS.observe(s.seconds, backend=self._sender_backend)
        M.SYNC_BYTES.inc(s.nbytes, backend=self._sender_backend)
        M.SYNC_VERSION.set(s.version)
        return {"version": s.version, "bytes": s.nbytes, "buckets": s.buckets, "seconds": s.seconds}

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

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(
        self,
        data_cursor: dict | None = None,
        extra: dict | None = None,
        root: str | None = None,
        protect: Sequence[int] = (),
    ) -> str:
        """Write `<checkpoint.dir>/step-<n>` atomically (policy HF folder, optimiser, state JSON), keep K (and
        the best one, and the `protect`ed steps: those whose validation is still running)."""
        t0 = time.perf_counter()
        cc = self.spec.checkpoint
        state = {
            "policy_version": self.policy_version,
            "data_cursor": data_cursor,
            "extra": extra or {},
            "policy_source": self.spec.policy.path,
        }
        path = save_checkpoint(
            root or cc.dir, self.step_count, state, self._write_policy, self.optimizer, cc.keep, set(protect)
        )
        if self.policy.lora:
            _save_lora_adapter(self.policy.model, path)
        M.CHECKPOINT_SECONDS.observe(time.perf_counter() - t0)
        return str(path)

    def _write_policy(self, folder: Path) -> None:
        if self.policy.lora:  # a plain HF folder: adapters merged, checkpoint names
            save_policy(_MergedWeights(self.policy), folder, self.spec.policy.path, self.policy.processor)
        else:
            save_policy(self.policy.hf_model(), folder, self.spec.policy.path, self.policy.processor)

    def mark_best(self, step: int, metric: str, value: float) -> str:
        """Record checkpoint step-<step> as the best by `metric` (best.json in checkpoint.dir)."""
        return str(mark_best(self.spec.checkpoint.dir, step, metric, value))

    def load_checkpoint(self, path: str | None = None) -> dict:
        """Restore policy weights, optimiser, step, policy_version and RNG states from a checkpoint folder
        (default: the newest under checkpoint.dir; "best": the one best.json names, later step-* folders moved
        to superseded/). Returns its state (data_cursor for the driver's reader) and "best" (best.json)."""
        root = self.spec.checkpoint.dir
        folder = best_checkpoint(root) if path == "best" else Path(path) if path else latest_checkpoint(root)
        if folder is None:
            what = "best.json naming an existing step-* folder" if path == "best" else "step-* folders"
            raise FileNotFoundError(f"no checkpoint under {root} ({what})")
        state = read_state(folder)
        if self.policy.lora:
            _load_lora_adapter(self.policy.model, folder)
        else:
            _load_policy_weights(self.policy.model, folder / "policy")
        load_optimizer(self.optimizer, folder)
        set_rng_state(state["rng"])
        self.step_count, self.policy_version = int(state["step"]), int(state["policy_version"])
        M.POLICY_VERSION.set(self.policy_version)
        if path == "best":
            supersede_after(root, self.step_count)
        return {**state, "best": read_best(root)}


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


def _batch_stats(groups: Sequence[ScoredGroup], adv: torch.Tensor, version: int) -> dict:
    rewards = [r for sg in groups for r in sg.totals]
    zero_var = sum(sg.zero_variance for sg in groups)
    stale = [version - sg.group.policy_version for sg in groups]
    return {
        "reward_mean": sum(rewards) / len(rewards),
        "zero_variance_groups": zero_var,
        "advantage_abs_mean": float(adv.abs().mean()),
        "staleness_max": max(stale),
        "staleness_mean": sum(stale) / len(stale),
    }


def _weight_sender(backend: str, host: str, ws: WeightSyncConfig) -> WeightSender:
    """The sender of a resolved weight_sync.backend (gloo, nccl or cuda-ipc) at this node's address."""
    if backend == "cuda-ipc":
        return CudaIpcSender(host=host, bucket_mb=ws.bucket_mb, timeout_s=ws.timeout_s)
    return DistributedWeightSender(backend=backend, host=host, bucket_mb=ws.bucket_mb, timeout_s=ws.timeout_s)


def _node_ip() -> str:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.util.get_node_ip_address()
    return "127.0.0.1"


@torch.no_grad()
def _load_policy_weights(model, folder: Path) -> None:
    """Copy a saved HF folder's weights into the live model (the optimiser keeps its parameter objects)."""
    from runtime.qwen_vl import load_policy

    saved = load_policy(folder, dtype=torch.float32, device="cpu")
    own = dict(model.named_parameters())
    for name, p in saved.named_parameters():
        if name not in own:
            raise RuntimeError(f"{folder}: parameter {name!r} is not in the live policy; wrong checkpoint?")
        own[name].copy_(p)


class _MergedWeights:
    """save_policy() adapter for the LoRA path: config + merged weights under their checkpoint names."""

    def __init__(self, policy: Policy):
        self.policy = policy

    def save_pretrained(self, folder: str, **_k) -> None:
        from safetensors.torch import save_file

        base = self.policy.hf_model()
        base.config.save_pretrained(folder)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(folder)
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.policy.named_weights()}
        save_file(tensors, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})


def _save_lora_adapter(model, path: Path) -> None:
    import peft
    from safetensors.torch import save_file

    sd = peft.get_peft_model_state_dict(model)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(Path(path) / "adapter.safetensors")
    )


def _load_lora_adapter(model, folder: Path) -> None:
    import peft
    from safetensors.torch import load_file

    peft.set_peft_model_state_dict(model, load_file(str(folder / "adapter.safetensors")))


def _setup_fsdp2(model, rank: int, world_size: int, init_method: str | None) -> None:
    """FSDP2 data parallel: one process per GPU, decoder layers and vision blocks sharded, then the root.
    UNVERIFIED on these machines (no GPUs): a code path for learner.num_gpus > 1."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=world_size)
    inner = model.model
    for layer in inner.language_model.layers:
        fully_shard(layer)
    for block in inner.visual.blocks:
        fully_shard(block)
    fully_shard(model)
