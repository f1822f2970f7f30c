"""`RolloutWorker`: a plain class around one rollout engine; cluster/pools/topology.py makes it the Ray actor
`rollout-<i>` (namespace segr1). The same class runs in-process in tests and on the GPU machine without Ray.

    worker = RolloutWorker(cfg, name="rollout-0")
    groups = worker.generate(requests, *samples)         # sample i belongs to request i (ObjectRefs over Ray)
    worker.load_weights(named_tensors, version)          # or weight_sync_join(info) + weight_sync_receive()

Versioning: every group is stamped with the policy version of the weights that generated it (read under the
engine's lock). A request whose `min_policy_version` is above the worker's version raises `StaleWeightsError`
BEFORE anything is generated: the pool resyncs the worker's weights and retries; old weights are never used
silently. Every group also carries the prompt token ids the engine generated after (`prompt_token_ids`), so
the learner scores the completions after exactly the same prompt.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from actors import metrics as M
from actors.config import RolloutConfig
from actors.engine import GenerationBatch, NamedTensors, RolloutEngine, StaleWeightsError
from protos import GroupHeader, RolloutGroup, RolloutRequest, Sample, SamplingConfig, check_pairs
from protos.config import PolicySpec
from runtime.images import resize_for_policy
from runtime.memory import peak_memory
from runtime.quiet import quiet_libraries
from runtime.threads import limit_threads
from runtime.weights.abandon import Abandonable
from runtime.weights.delta import DeltaDecoder, DeltaExport, apply_export

logger = logging.getLogger(__name__)


def rollout_device(rollout: RolloutConfig) -> str:
    import torch

    if rollout.resources.num_gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"rollout.resources.num_gpus={rollout.resources.num_gpus} but CUDA is not available in the "
                "rollout process; set rollout.resources.num_gpus=0 to generate on CPU"
            )
        return "cuda"
    return "cpu"


def build_engine(
    policy: PolicySpec,
    rollout: RolloutConfig,
    engine: str | None = None,
    images_per_prompt: int | None = None,
) -> RolloutEngine:
    """The engine rollout.engine names (hf | vllm). Both serve concurrent callers (async GRPO's two requests in
    flight): vLLM runs their requests in the same engine steps, transformers one call after the other.
    `images_per_prompt`: episodes of that many turns (each later turn shows one more picture); None:
    rollout.max_turns."""
    kind = engine or rollout.engine
    images_per_prompt = images_per_prompt or rollout.max_turns
    common = dict(
        answer_format=policy.answer_format,
        image_size=policy.image_size,
        dtype=policy.dtype,
        prompts=policy.prompt,
    )
    if kind == "hf":
        from actors.hf_engine import HFEngine

        return HFEngine(policy.path, device=rollout_device(rollout), dummy=policy.dummy_weights, **common)
    if kind != "vllm":
        raise ValueError(f"rollout.engine={kind!r} is not one of hf, vllm")
    from actors.vllm_engine import VLLMEngine

    return VLLMEngine(
        policy.path,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        tensor_parallel_size=rollout.tensor_parallel_size,
        enable_prefix_caching=rollout.enable_prefix_caching,
        max_model_len=rollout.max_model_len,
        enforce_eager=rollout.enforce_eager,
        seed=policy.seed,
        load_format="dummy" if policy.dummy_weights else "auto",
        images_per_prompt=images_per_prompt,
        **common,
    )


class RolloutWorker:
    """Generates RolloutGroups with one engine; receives weights; reports its version."""

    def __init__(
        self,
        policy: PolicySpec,
        rollout: RolloutConfig | None = None,
        name: str = "rollout-0",
        engine: RolloutEngine | None = None,
    ):
        quiet_libraries()
        limit_threads()
        self.policy, self.rollout, self.name = policy, rollout or RolloutConfig(), name
        self.engine = engine if engine is not None else build_engine(policy, self.rollout)
        self.engine_kind = type(self.engine).__name__
        self._receiver = None
        self._sync = Abandonable()  # weight_sync_abort(generation) ends a blocked join / receive at once
        self._store_delta = DeltaDecoder()  # the object store's last version, with weight_sync.delta
        self._in_flight = 0
        self._count_lock = threading.Lock()
        M.POLICY_VERSION.set(self.engine.policy_version, worker=name)
        M.REQUESTS_IN_FLIGHT.set(0, worker=name)

    # -- generation ------------------------------------------------------------------------------------------------
    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def generate(self, requests: Sequence[RolloutRequest], *samples: Sample) -> list[RolloutGroup]:
        """G completions per request; sample i is request i's sample (its image is resized to data.image_size)."""
        requests = list(requests)
        check_pairs(requests, samples, f"RolloutWorker {self.name!r}: generate")
        needed = max((r.min_policy_version for r in requests), default=0)
        if needed > self.engine.policy_version:
            M.STALE_REQUESTS.inc(len(requests), worker=self.name)
            raise StaleWeightsError(self.name, self.engine.policy_version, needed)
        t0 = time.perf_counter()
        self._track(len(requests))
        try:
            images = self._images(samples)
            batch = self.engine.generate_batch(requests, images)
        finally:
            self._track(-len(requests))
        elapsed = time.perf_counter() - t0
        if batch.policy_version < needed:  # versions only increase; a broken engine would be caught here
            raise StaleWeightsError(self.name, batch.policy_version, needed)
        self._record(requests, batch, elapsed)
        return [
            RolloutGroup(
                group_id=req.request_id,
                sample_id=req.sample_id,
                policy_version=batch.policy_version,
                completions=comps,
                temperature=req.sampling.temperature,
                max_tokens=req.sampling.max_tokens,
                prompt_token_ids=prompt_ids,  # one list per group: the G completions share the prompt
                worker=self.name,
                generate_s=elapsed,
                purpose=req.purpose,
            )
            for req, comps, prompt_ids in zip(
                requests, batch.completions, batch.prompt_token_ids, strict=True
            )
        ]

    def next_turns(
        self,
        prompt_ids: Sequence[Sequence[int]],
        answers: Sequence[Sequence[int]],
        images: Sequence[Sequence[Any]],
        sampling: SamplingConfig,
    ) -> GenerationBatch:
        """One answer per episode's next turn: episode i's previous prompt (as the engine reported it) and answer
        ids, then the refine text after its newest picture; `images[i]`: the episode's pictures so far, the
        sample's image first, each at the policy's NxN. Returns each new prompt as the model saw it."""
        from actors.engine import NextTurn
        from runtime.turns import next_turn_ids

        refine = self.engine.prompts.refine_text(self.policy.image_size)
        turns = [
            NextTurn(next_turn_ids(self.engine.tokenizer, p, a, refine), list(im), sampling)
            for p, a, im in zip(prompt_ids, answers, images, strict=True)
        ]
        self._track(len(turns))
        try:
            return self.engine.generate_turns(turns)
        finally:
            self._track(-len(turns))

    def generate_by_ref(
        self, requests: Sequence[RolloutRequest], *samples: Sample
    ) -> tuple[list[GroupHeader], list[RolloutGroup]]:
        """`generate`, answered in two parts for a driver that routes the groups without reading them (called
        with Ray's num_returns=2): the headers it reads, and the groups it hands on by reference."""
        groups = self.generate(requests, *samples)
        return [GroupHeader.of(g) for g in groups], groups

    def next_turns_by_ref(
        self,
        requests: Sequence[RolloutRequest],
        groups: Sequence[RolloutGroup],
        pictures: Sequence[Sequence[bytes | None]],
        *samples: Sample,
    ) -> tuple[list[GroupHeader], list[RolloutGroup]]:
        """The next turn of the groups' episodes that go on (a picture from the reward pool's score_turn; None:
        the episode ended), answered like `generate_by_ref` (Ray's num_returns=2): headers, and the groups with
        those episodes one turn longer (actors/episodes.py)."""
        from actors.episodes import next_turns

        check_pairs(list(requests), samples, f"RolloutWorker {self.name!r}: next_turns_by_ref")
        t0 = time.perf_counter()
        self._track(len(requests))
        try:
            out, batch = next_turns(self.engine, self.policy.image_size, requests, groups, pictures, samples)
        finally:
            self._track(-len(requests))
        elapsed = time.perf_counter() - t0
        if batch is not None:
            tokens = sum(len(c[0].token_ids) for c in batch.completions)
            purpose = requests[0].purpose if requests else "train"
            M.TOKENS.inc(tokens, worker=self.name, purpose=purpose)
            M.PROMPT_TOKENS.inc(sum(batch.prompt_tokens), worker=self.name, purpose=purpose)
            M.GENERATE_SECONDS.observe(elapsed, worker=self.name)
        out = [g.model_copy(update={"generate_s": g.generate_s + elapsed, "worker": self.name}) for g in out]
        return [GroupHeader.of(g) for g in out], out

    def _images(self, samples: Sequence[Sample]) -> list[Any]:
        """The policy's NxN RGB images; None for a text-only model (it sees the instruction only)."""
        if not getattr(self.engine, "is_vision_language", True):
            return [None] * len(samples)
        size = self.policy.image_size
        return [resize_for_policy(s.image, size) for s in samples]

    def _track(self, delta: int) -> None:
        with self._count_lock:
            self._in_flight += delta
            M.REQUESTS_IN_FLIGHT.set(self._in_flight, worker=self.name)

    def _record(self, requests: list[RolloutRequest], batch: GenerationBatch, elapsed: float) -> None:
        tokens = 0
        for req, group, prompt_tokens in zip(requests, batch.completions, batch.prompt_tokens, strict=True):
            n = sum(len(c.token_ids) for c in group)
            tokens += n
            M.TOKENS.inc(n, worker=self.name, purpose=req.purpose)
            M.PROMPT_TOKENS.inc(prompt_tokens, worker=self.name, purpose=req.purpose)
            M.GROUPS.inc(worker=self.name, purpose=req.purpose)
        M.GENERATE_SECONDS.observe(elapsed, worker=self.name)
        M.TOKENS_PER_SECOND.set(tokens / elapsed if elapsed > 0 else 0.0, worker=self.name)
        M.POLICY_VERSION.set(batch.policy_version, worker=self.name)

    # -- weights ---------------------------------------------------------------------------------------------------
    def load_weights(self, named_tensors: NamedTensors | DeltaExport, version: int) -> int:
        """Switch the engine to `version` atomically (every tensor of the policy, Hugging Face names). Takes
        (name, tensor) pairs or a name -> tensor mapping (the learner's export_weights(), via the object store), or
        a DeltaExport (weight_sync.delta). Returns the engine's version: still the old one when the export is a
        delta against a version this worker does not hold (the driver then sends it whole)."""
        t0 = time.perf_counter()
        if isinstance(named_tensors, DeltaExport):
            named_tensors = apply_export(self._store_delta, named_tensors)
            if named_tensors is None:
                logger.info(
                    "%s: a delta against a version it does not hold; waiting for the whole one", self.name
                )
                return self.engine.policy_version
        elif isinstance(named_tensors, Mapping):
            self._store_delta.version = -1  # the engine moves past what the decoder holds
            named_tensors = list(named_tensors.items())
        self.engine.load_weights(named_tensors, version)
        M.WEIGHT_LOAD_SECONDS.observe(time.perf_counter() - t0, worker=self.name)
        M.POLICY_VERSION.set(self.engine.policy_version, worker=self.name)
        return self.engine.policy_version

    def rewind(self, version: int) -> int:
        """The learner restarted from an older checkpoint (cluster/driver/recovery.py): accept `version` next although
        versions otherwise only increase. Generation refuses until that version is loaded."""
        if self._receiver is not None:  # a load waiting for the old learner's next bucket stops (and unlocks)
            self._receiver.abort()
        self.engine.rewind(version)
        # the restarted learner numbers its weight-sync generations from 1 again: forget what was abandoned, after
        # aborting the dead learner's group (an NCCL receive cut by its death would hold this process's stream)
        self._sync.abandon_all()
        self._sync, self._receiver = Abandonable(), None
        return version

    def weight_sync_join(self, info: Mapping[str, Any] | Any) -> int:
        """Join the learner's weight-sync group (Learner.weight_sync_prepare(...) -> info); returns the rank."""
        from runtime.weights.collective import DistributedWeightReceiver

        if self._receiver is None:
            device = "cuda" if self.rollout.resources.num_gpus > 0 else None
            self._receiver = DistributedWeightReceiver(self.name, device=device)
        generation = int(info["generation"] if isinstance(info, Mapping) else info.generation)
        receiver = self._receiver
        return self._sync.run(generation, lambda: receiver.join(info), "joining")

    def weight_sync_receive(self) -> dict | None:
        """Receive one version from the learner, streaming its buckets into the engine: {"version", "decode_s"
        (applying weight_sync.delta's payloads)}, or None when closed. A transfer that breaks off leaves the
        engine refusing to generate until a complete one loads."""
        from actors.weight_receiver import receive_and_load

        if self._receiver is None or self._receiver.info is None:
            raise RuntimeError(f"{self.name}: call weight_sync_join(info) before weight_sync_receive()")
        receiver = self._receiver  # calls self.load_weights once, with the version's stream of buckets
        version = self._sync.run(
            receiver.info.generation, lambda: receive_and_load(receiver, self), "receiving"
        )
        if version is None:
            return None
        decode_s = receiver.delta.decode_s
        M.WEIGHT_DECODE_SECONDS.observe(decode_s, worker=self.name)
        return {"version": version, "decode_s": decode_s}

    def weight_sync_abort(self, generation: int) -> None:
        """The learner gave up `generation` (a member died): a join or receive blocked on it returns at once
        (WeightSyncAborted); the next generation starts from a fresh receiver."""
        self._sync.abandon(generation)
        joined = self._receiver.info if self._receiver is not None else None
        if joined is None or joined.generation <= generation:
            if self._receiver is not None:  # an engine load waiting for the next bucket stops (and unlocks)
                self._receiver.abort()
            self._receiver = None

    # -- health ----------------------------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "engine": self.engine_kind,
            "policy_version": self.engine.policy_version,
            "in_flight": self._in_flight,
            "pid": os.getpid(),
        }

    def peak_memory(self) -> dict:
        """This process's peak memory (runtime/memory.py): segr1 preflight's measured column."""
        return peak_memory()

    def close(self) -> None:
        self.engine.close()
        if self._receiver is not None:
            self._receiver.close()
