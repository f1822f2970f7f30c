"""The memory plan of a training job before launch: per pool, the bytes one GPU (or, on a CPU-only config, one
process) holds, each term named with its formula. Pure functions of the TrainConfig and the models' shapes
(cluster/plan/model_shapes.py); no weights are loaded, Ray is not needed. `segr1 plan` prints it; docs/learner.md
("Memory plan") states the formulas and their assumptions.

Learner (per rank; learner.ranks ranks, FSDP2 sharding parameters, gradients and optimiser states):
  parameters   P x 4 / ranks          float32 master weights (learner/policy.py loads the policy in float32 and
                                      runs the forward under bf16 autocast on a GPU)
  gradients    P_trainable x 4 / ranks
  optimiser    P_trainable x 8 / ranks   AdamW's two float32 moments
  fsdp2        (root params + their gradient + 2 largest blocks) x compute bytes when ranks > 1: what FSDP2
               holds unsharded (the issue's mixed-precision policy: bf16 gathered parameters)
  activations  per decoder layer and token (text) / vision block and patch, learner.gradient_checkpointing keeps
               only each layer's float32 input and recomputes one layer at a time
  logits       rows x (answer slots + 1) x vocab x (compute bytes + 12): the lm_head output, the float32
               log-softmax input kept for backward, and its gradient with softmax in backward; answer slots =
               max_tokens, or T x max_tokens for episodes of rollout.max_turns T (the lm_head runs only where
               the policy answered, learner/policy.py episode_slots)
  attention    on CPU without checkpointing: rows x heads x L^2 x 4 per layer (SDPA's math path with a padding
               mask keeps the weights; GPU kernels keep O(L))
  reference    P x model.dtype bytes / ranks: sharded like the policy (grpo.beta > 0, not under LoRA without
               model.reference)
  overhead     CUDA context + allocator slack on a GPU
Rollout (vLLM, per GPU): gpu_memory_utilization x GPU, of which weights P x dtype / TP, a working set, and the KV
cache that is left: 2 x layers x kv_heads x head_dim x dtype bytes per token. Reward (SAM2): weights, the cached
features of max_inflight_per_worker images, the encoder's working set for a batch of them.
Ray's object store (host shared memory) of one node per pool: object_store_plan (a rollout or learner node holds one
weight version in the rollout dtype; cluster/k8s sizes the pods' /dev/shm from it, docs/kubernetes.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.config import INFLIGHT_CALLS
from cluster.plan.model_shapes import (
    PolicyShapes,
    Sam2Shapes,
    image_tokens,
    param_counts,
    sam2_embedding_bytes,
    sam2_encoder_working_bytes,
)

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT = 1_000_000_000  # CUDA context, cuBLAS / NCCL workspaces of one process
ALLOCATOR_SLACK = 0.05  # fraction of the torch allocations lost to fragmentation of the caching allocator
VLLM_DEFAULT_MAX_MODEL_LEN = 8192  # actors/config.py: max_model_len None -> 8192
VLLM_BATCHED_TOKENS = 8192  # tokens of vLLM's profiling forward (its max_num_batched_tokens)
TEMPLATE_TOKENS = 30  # chat template tokens around the system and user texts
# a later user turn's template tokens: turn end, user header, vision start / end, assistant header
LATER_TURN_TOKENS = 12
CHARS_PER_TOKEN = 3.0  # the prompt text's characters per token (English BPE runs ~4: this overestimates)
SAM2_ENCODE_BATCH = 16  # reward_service/segmenters/hf_sam2.py encode_batch_size on CUDA


@dataclass
class Term:
    name: str
    bytes: int
    formula: str
    outside_claim: bool = False  # held beside what vLLM claims (gpu_memory_utilization x GPU), added to it


@dataclass
class PoolPlan:
    """One pool's memory per GPU (on_gpu) or per process (CPU), as named terms."""

    pool: str
    actors: int
    gpus_per_actor: float
    on_gpu: bool
    terms: list[Term] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    claimed: int | None = None  # what the pool takes from its GPU when that is not the sum (vLLM's budget)
    kv_tokens: int | None = None  # vLLM on a GPU: the tokens its KV cache holds

    @property
    def total(self) -> int:
        if self.claimed is None:
            return sum(t.bytes for t in self.terms)
        return self.claimed + sum(t.bytes for t in self.terms if t.outside_claim)

    def add(self, name: str, nbytes: float, formula: str, outside_claim: bool = False) -> None:
        self.terms.append(Term(name, int(nbytes), formula, outside_claim))


@dataclass(frozen=True)
class Sequence:
    """Token counts of one training row: the prompt (image tokens + text) and the completion; with `turns` > 1
    (rollout.max_turns) the row is an episode: after each answer but the last, a user turn of `refine_tokens`
    with one more picture of `image_tokens` (every episode taking every turn: the longest row)."""

    image_patches: int
    image_tokens: int
    text_tokens: int
    completion: int
    turns: int = 1
    refine_tokens: int = 0

    @property
    def prompt(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def span(self) -> int:
        """Tokens after the first prompt: the learner's completion span (its logits)."""
        return self.turns * self.completion + (self.turns - 1) * (self.image_tokens + self.refine_tokens)

    @property
    def total(self) -> int:
        return self.prompt + self.span

    @property
    def answers(self) -> int:
        """The policy's own tokens of a row (every turn's answer): the slots the learner makes logits at."""
        return self.turns * self.completion


def estimate_sequence(cfg, s: PolicyShapes) -> Sequence:
    """Prompt and completion lengths of cfg: image tokens exact (processor rounding), text estimated from the
    characters of the rendered training prompt (and of the refine turn), completion rollout.sampling.max_tokens,
    rollout.max_turns turns."""
    from protos.answer import default_instruction

    fmt, size = cfg.reward.answer_format, cfg.data.image_size
    prompts = cfg.policy_spec("train").prompt
    text = prompts.system_text(fmt, size) + prompts.user_text(
        default_instruction("foreground"), "foreground", fmt, size
    )
    patches, img = image_tokens(s, size)
    words = math.ceil(len(text) / CHARS_PER_TOKEN) + TEMPLATE_TOKENS
    turns = cfg.rollout.max_turns
    refine = (
        math.ceil(len(prompts.refine_text(size)) / CHARS_PER_TOKEN) + LATER_TURN_TOKENS if turns > 1 else 0
    )
    return Sequence(patches, img, words, cfg.rollout.sampling.max_tokens, turns, refine)


# ----------------------------------------------------------------------------------------------------------------
# The learner's terms: pure functions of shapes and counts (tests/unit/cluster/plan/test_memory_plan.py checks them against a
# real step of the tiny policy)


def layer_activation_bytes(hidden: int, inter: int, compute: int) -> int:
    """Bytes autograd keeps per token of one decoder layer (or vision block): the float32 residual input and
    normalised output of its two RMSNorms (16 h), what the linears keep (their input: shared when nothing is cast,
    one copy per linear under autocast), q / k / v (k, v repeated to every head), the attention output and
    o_proj's input (5 h), and the SwiGLU MLP's gate, silu(gate), up and their product (4 i)."""
    linear_inputs = 2 * hidden if compute == 4 else 5 * hidden
    return 16 * hidden + compute * (linear_inputs + 5 * hidden + 4 * inter)


def activation_bytes(
    s: PolicyShapes, rows: int, seq: int, images: int, patches: int, compute: int, ckpt: bool
):
    """(text, vision) activation bytes of one forward over `rows` rows of `seq` tokens and `images` images of
    `patches` patches; with checkpointing each layer keeps its float32 input and one layer is recomputed."""
    tokens, vis = rows * seq, images * patches
    text_layer = layer_activation_bytes(s.hidden, s.intermediate, compute)
    vis_layer = layer_activation_bytes(s.vision_hidden, s.vision_intermediate, compute)
    merged = patches // s.merge**2 * images
    vis_extra = merged * (2 * 4 * s.vision_hidden * s.merge**2 + compute * s.hidden)  # the patch merger
    text_extra = tokens * 3 * 4 * s.hidden  # embeddings, final norm input and output
    if ckpt:
        text = tokens * (s.layers * 4 * s.hidden + text_layer) + text_extra
        vision = vis * (s.vision_depth * compute * s.vision_hidden + vis_layer) + vis_extra
    else:
        text = tokens * s.layers * text_layer + text_extra
        vision = vis * s.vision_depth * vis_layer + vis_extra
    return text, vision


def logits_bytes(s: PolicyShapes, rows: int, completion: int, compute: int) -> int:
    return rows * (completion + 1) * s.vocab * (compute + 12)


def lora_params(s: PolicyShapes, rank: int) -> int:
    """Adapter parameters: r x (in + out) per targeted linear; the MLP names also match the vision tower's."""
    h, kv, i = s.hidden, s.kv_dim, s.intermediate
    text = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
    vision = 3 * (s.vision_hidden + s.vision_intermediate)
    return rank * (s.layers * text + s.vision_depth * vision)


def rows_per_forward(cfg) -> int:
    """Completions in one forward of one rank (learner/update.py micro_chunks)."""
    lc, g = cfg.learner, cfg.grpo
    per_update = math.ceil(g.batch_size * g.group_size / g.updates_per_batch)
    mine = math.ceil(per_update / lc.ranks)
    if lc.grad_accumulation:
        return math.ceil(mine / lc.grad_accumulation)
    return min(lc.micro_batch_size, mine)


def images_per_forward(cfg, rows: int, turns: int = 1) -> int:
    """Distinct images of a forward: the vision tower runs once per group's image when one rank holds the whole
    policy (learner/policy.py share_vision); FSDP2 ranks run it once per row. Each picture of a later turn is
    its row's own (`turns`: rollout.max_turns)."""
    pictures = rows * (turns - 1)
    if cfg.learner.ranks > 1:
        return rows + pictures
    return min(rows, math.ceil((rows - 1) / cfg.grpo.group_size) + 1) + pictures


def learner_precision(cfg) -> tuple[int, bool]:
    """(compute bytes, on_gpu): bf16 autocast on a GPU learner unless learner.precision=fp32 (learner/policy.py)."""
    on_gpu = cfg.learner.num_gpus > 0
    if cfg.learner.precision == "fp32":
        return 4, on_gpu
    if cfg.learner.precision == "bf16":
        return 2, on_gpu
    return (2 if on_gpu else 4), on_gpu


def reference_bytes_per_param(cfg, on_gpu: bool) -> int:
    if cfg.model.dtype == "auto":
        return 2 if on_gpu else 4
    return DTYPE_BYTES[cfg.model.dtype]


def learner_plan(cfg, s: PolicyShapes, seq: Sequence) -> PoolPlan:
    """Per rank: one GPU of learner.ranks (FSDP2), or one CPU process."""
    lc, ranks = cfg.learner, cfg.learner.ranks
    compute, on_gpu = learner_precision(cfg)
    counts = param_counts(s)
    total = counts["total"]
    trainable = lora_params(s, lc.lora_rank) if lc.lora_rank > 0 else total
    pool = PoolPlan("learner", ranks, lc.resources.num_gpus, on_gpu)
    held = total + (trainable if lc.lora_rank > 0 else 0)  # LoRA: the frozen base + the adapters
    pool.add("parameters", held * 4 / ranks, f"{held:,} x 4 B / {ranks}")
    pool.add("gradients", trainable * 4 / ranks, f"{trainable:,} trainable x 4 B / {ranks}")
    pool.add("optimiser", trainable * 8 / ranks, f"AdamW 2 x 4 B x {trainable:,} / {ranks}")
    if ranks > 1:
        root = counts["root"]
        root_grads = root if lc.lora_rank == 0 else 0
        gathered = (root + root_grads + 2 * counts["max_block"]) * compute
        pool.add("fsdp2 gathered", gathered, f"(root {root:,} + its grads + 2 x block) x {compute} B")
    rows = rows_per_forward(cfg)
    images = images_per_forward(cfg, rows, seq.turns)
    ckpt = lc.gradient_checkpointing
    text, vision = activation_bytes(s, rows, seq.total, images, seq.image_patches, compute, ckpt)
    other = activation_bytes(s, rows, seq.total, images, seq.image_patches, compute, not ckpt)
    how = "checkpointed (without: {:.1f} GB)" if ckpt else "all layers kept (checkpointed: {:.1f} GB)"
    episodes = f" (episodes of {seq.turns} turns)" if seq.turns > 1 else ""
    what = f"{rows} rows x {seq.total} tokens{episodes} x {s.layers} layers, {how.format(other[0] / GB)}"
    pool.add("activations text", text, what)
    what = f"{images} images x {seq.image_patches} patches, {how.format(other[1] / GB)}"
    pool.add("activations vision", vision, what)
    pool.add("logits", logits_bytes(s, rows, seq.answers, compute), f"{rows} x {seq.answers + 1} x {s.vocab}")
    if not on_gpu and not ckpt:
        # CPU SDPA with a padding mask: its math path keeps each layer's (rows, heads, L, L) weights for backward
        # (checkpointed: one layer's at a time, while the logits are already freed)
        what = f"{rows} rows x {s.heads} heads x {seq.total}^2 x 4 B x {s.layers} layers (CPU attention)"
        pool.add("attention", rows * s.heads * seq.total**2 * 4 * s.layers, what)
    if cfg.grpo.beta > 0 and not (lc.lora_rank > 0 and cfg.model.reference is None):
        ref = reference_bytes_per_param(cfg, on_gpu)
        what = f"{total:,} x {ref} B / {ranks}, sharded (grpo.beta={cfg.grpo.beta})"
        pool.add("reference", total * ref / ranks, what)
    if on_gpu:
        torch_bytes = sum(t.bytes for t in pool.terms)
        pool.add(
            "overhead", CUDA_CONTEXT + ALLOCATOR_SLACK * torch_bytes, "CUDA context + 5% allocator slack"
        )
    return pool


def kv_bytes_per_token(s: PolicyShapes, dtype_bytes: int, tp: int) -> int:
    return 2 * s.layers * s.kv_dim * dtype_bytes // tp


def rollout_plan(cfg, s: PolicyShapes, seq: Sequence, gpu_bytes: int) -> PoolPlan:
    """vLLM on a GPU claims gpu_memory_utilization of it: weights, a working set, and the KV cache that is left.
    The HF engine (or vLLM on CPU) holds its weights and the KV of the sequences one generate call batches."""
    r = cfg.rollout
    on_gpu = r.resources.num_gpus > 0
    dtype = DTYPE_BYTES[cfg.rollout_dtype()]
    total = param_counts(s)["total"]
    tp = r.tensor_parallel_size if r.engine == "vllm" else 1
    pool = PoolPlan("rollout", r.max_workers or r.num_workers, r.resources.num_gpus, on_gpu)
    pool.add("weights", total * dtype / tp, f"{total:,} x {dtype} B / TP {tp}")
    per_token = kv_bytes_per_token(s, dtype, tp)
    seqs = r.max_batch_groups * cfg.grpo.group_size
    if not (on_gpu and r.engine == "vllm"):
        pool.add(
            "kv cache", per_token * seq.total * seqs, f"{seqs} sequences x {seq.total} tokens x {per_token} B"
        )
        return pool
    working = 1_000_000_000 + VLLM_BATCHED_TOKENS * (4 * s.hidden + 2 * s.intermediate) * dtype // tp
    pool.add("working set", working, f"1 GB + {VLLM_BATCHED_TOKENS} tokens x (4 h + 2 i) x {dtype} B / TP")
    budget = int(r.gpu_memory_utilization * gpu_bytes)
    kv = budget - pool.terms[0].bytes - working
    pool.add("kv cache", max(kv, 0), f"{r.gpu_memory_utilization} x GPU - weights - working set")
    pool.claimed = budget
    kv_tokens = max(kv, 0) // per_token
    fit = kv_tokens // seq.total
    pool.notes.append(
        f"KV: {per_token:,} B a token -> {kv_tokens:,} tokens = {fit} sequences of {seq.prompt} prompt + "
        f"{seq.span} completion tokens{f' (episodes of {seq.turns} turns)' if seq.turns > 1 else ''} "
        f"(one generate call batches {seqs})"
    )
    pool.notes.append(
        f"vision encoder profiled at one data.image_size image ({seq.image_tokens} tokens; the engine's "
        "mm_processor_kwargs), not the processor's default max_pixels (16,384 tokens)"
    )
    pool.kv_tokens = kv_tokens
    return pool


def reward_plan(cfg, sam: Sam2Shapes | None) -> PoolPlan:
    """SAM2 in float32 (bf16 autocast on CUDA), the cached features of the images in flight, the encoder's
    working set of one encode batch. GrabCut holds no model."""
    rw = cfg.reward
    on_gpu = rw.resources.num_gpus > 0
    pool = PoolPlan("reward", rw.num_workers, rw.resources.num_gpus, on_gpu)
    if sam is None:
        pool.notes.append("grabcut: no model weights; images only")
        return pool
    act = 2 if on_gpu else 4
    images = rw.max_inflight_per_worker
    batch = min(images, SAM2_ENCODE_BATCH if on_gpu else 1)
    pool.add("weights", sam.params * 4, f"SAM2.1 {sam.variant}: {sam.params:,} x 4 B")
    pool.add("image features", images * sam2_embedding_bytes(sam, act), f"{images} images in flight")
    pool.add("encoder working set", batch * sam2_encoder_working_bytes(sam, act), f"encode batch of {batch}")
    if on_gpu:
        pool.add("overhead", CUDA_CONTEXT, "CUDA context")
    return pool


# ----------------------------------------------------------------------------------------------------------------
# Ray's object store per node: what a pod of each pool must hold (docs/kubernetes.md sizes /dev/shm from it)

TOKEN_BYTES = 12  # an int64 token id + its float32 behaviour logprob (protos/messages.py Completion)


def sample_bytes(cfg) -> int:
    """Upper bound of one Sample as it travels: the image uncompressed (RGB) and its mask, data.image_size^2 each
    (the shards hold encoded images, smaller)."""
    return cfg.data.image_size**2 * 4


def group_bytes(cfg, seq: Sequence) -> int:
    """One RolloutGroup: G completions of max_tokens (id + logprob each; episodes: their whole span) and the
    prompt ids."""
    return cfg.grpo.group_size * seq.span * TOKEN_BYTES + seq.prompt * 8


def object_store_plan(cfg, s: PolicyShapes, seq: Sequence) -> list[PoolPlan]:
    """Bytes Ray's object store of ONE node of each pool must hold at once (on_gpu False: host shared memory).
    rollout: one weight version (learner.export_weights() in the rollout dtype: the catch-up of a new or restarted
    worker, and the fallback when a broadcast fails) + its in-flight calls; learner: rank 0's export + one step's
    groups; reward: its in-flight groups; driver (the head): the samples it hands out and the groups it gathers."""
    params, dtype = param_counts(s)["total"], cfg.rollout_dtype()
    weights = params * DTYPE_BYTES[dtype]
    version = f"{params:,} x {DTYPE_BYTES[dtype]} B ({dtype})"
    sample, group = sample_bytes(cfg), group_bytes(cfg, seq)
    per_sample = f"{cfg.data.image_size}^2 x 4 B (RGB + mask)"
    r, rw, g = cfg.rollout, cfg.reward, cfg.grpo
    calls = INFLIGHT_CALLS * r.max_batch_groups
    rollout = PoolPlan("rollout", 1, r.resources.num_gpus, False)
    rollout.add("weight version", weights, version + ": export_weights() for catch-up")
    rollout.add("samples in flight", calls * sample, f"{calls} samples x {per_sample}")
    rollout.add("groups returned", calls * group, f"{calls} groups x {group:,} B")
    learner = PoolPlan("learner", 1, cfg.learner.resources.num_gpus, False)
    learner.add("weight version", weights, version + ": rank 0's export_weights()")
    learner.add("step's groups", g.batch_size * (sample + group), f"{g.batch_size} x (sample + group)")
    reward = PoolPlan("reward", 1, rw.resources.num_gpus, False)
    inflight = rw.max_inflight_per_worker
    reward.add("groups in flight", inflight * (sample + group), f"{inflight} x (sample + group)")
    rollouts, rewards = r.max_workers or r.num_workers, rw.max_workers or rw.num_workers
    workers = rollouts * calls + rewards * rw.max_inflight_per_worker
    driver = PoolPlan("driver", 1, 0, False)
    driver.add("samples handed out", workers * sample, f"{workers} samples in flight x {per_sample}")
    held = g.batch_size * (g.max_staleness + 1)
    driver.add("groups gathered", held * group, f"{held} groups (batch x (max_staleness + 1))")
    return [rollout, learner, reward, driver]


def node_object_store(pools: list[PoolPlan], names: list[str]) -> int:
    """The object store one node needs when it runs the actors of `names` (colocated: every pool on one node)."""
    return sum(p.total for p in pools if p.pool in names)


# ----------------------------------------------------------------------------------------------------------------
# Weight sync: what each transport stages on both ends (runtime/weights/, actors/vllm_reload.py)

MIB = 1 << 20
WEIGHT_PIECE_BYTES = 512 * MIB  # actors/vllm_reload.py: one piece sent to a vLLM worker in another process


def sync_bucket(cfg, s: PolicyShapes) -> tuple[int, str]:
    """(bytes, formula) of the largest bucket: weight_sync.bucket_mb, or the largest tensor (the embeddings,
    V x h x dtype) when that is larger (a tensor over a bucket travels alone)."""
    dtype = DTYPE_BYTES[cfg.rollout_dtype()]
    embed = s.vocab * s.hidden * dtype
    bucket = cfg.weight_sync.bucket_mb * MIB
    if embed > bucket:
        return (
            embed,
            f"embeddings {s.vocab} x {s.hidden} x {dtype} B (over bucket_mb {cfg.weight_sync.bucket_mb})",
        )
    return bucket, f"bucket_mb {cfg.weight_sync.bucket_mb} MiB"


def multiprocess_engine(cfg) -> bool:
    """vLLM whose workers run in other processes (TP > 1): weights go in pieces."""
    r = cfg.rollout
    return r.engine == "vllm" and r.tensor_parallel_size > 1


def add_weight_sync_terms(cfg, s: PolicyShapes, learner: PoolPlan, rollout: PoolPlan) -> None:
    """The GPU side: the learner's packing slots (nccl, cuda-ipc: bucket i+1 packed while i travels), the
    rollout's receive buffers (the bucket its engine loads + the next arriving) and vLLM's layer-wise reload (one
    layer materialised at a time, the largest being the embeddings), both beside vLLM's claimed budget."""
    backend = cfg.weight_transport().backend
    bucket, what = sync_bucket(cfg, s)
    if backend in ("nccl", "cuda-ipc") and learner.on_gpu:
        learner.add("sync packing", 2 * bucket, f"2 x bucket ({what}), {backend}")
    if learner.on_gpu and delta_on(cfg, learner_gpu=True):
        params, dtype = param_counts(s)["total"], DTYPE_BYTES[cfg.rollout_dtype()]
        formula = f"{params:,} x {dtype} B + 1 bucket: weight_sync.delta's last version (rank 0)"
        learner.add("delta base", params * dtype + bucket, formula)
    if not rollout.on_gpu:
        return
    if backend in ("nccl", "cuda-ipc"):
        formula = f"2 x bucket ({what}): the one loading + the next arriving, {backend}"
        rollout.add("sync receive", 2 * bucket, formula, outside_claim=True)
    if cfg.rollout.engine == "vllm":
        dtype = DTYPE_BYTES[cfg.rollout_dtype()]
        tp = cfg.rollout.tensor_parallel_size
        formula = f"largest layer, V {s.vocab} x h {s.hidden} x {dtype} B / TP {tp}: vLLM's layer-wise reload"
        rollout.add("reload layer", s.vocab * s.hidden * dtype / tp, formula, outside_claim=True)


def delta_on(cfg, learner_gpu: bool) -> bool:
    """Whether weight_sync.delta is on for this config (WeightSyncConfig.delta_on, with the resolved backend)."""
    ws = cfg.weight_transport()
    return ws.delta_on(ws.backend, learner_gpu)


def weight_sync_host_plan(cfg, s: PolicyShapes) -> list[PoolPlan]:
    """Host memory of ONE process per pool for weight sync: gloo's buckets (packed on the learner's host,
    received on the rollout's), the object store's version (learner rank 0 exports it; a new or restarted rollout
    worker, and any worker when a broadcast fails, deserialises it whole), and the pieces a multi-process vLLM
    engine sends (one packed by the actor, one received by the engine core)."""
    backend = cfg.weight_transport().backend
    params, dtype = param_counts(s)["total"], DTYPE_BYTES[cfg.rollout_dtype()]
    bucket, what = sync_bucket(cfg, s)
    version = f"{params:,} x {dtype} B"
    learner = PoolPlan("learner", 1, cfg.learner.resources.num_gpus, False)
    rollout = PoolPlan("rollout", 1, cfg.rollout.resources.num_gpus, False)
    if backend == "gloo":
        learner.add("sync packing", 2 * bucket, f"2 x bucket ({what}), gloo")
        rollout.add("sync receive", 2 * bucket, f"2 x bucket ({what}), gloo")
    learner.add("export", params * dtype, version + ": export_weights() for the object store (rank 0)")
    rollout.add("catch-up copy", params * dtype, version + ": the object store's version, deserialised")
    learner_gpu = cfg.learner.resources.num_gpus > 0
    if delta_on(cfg, learner_gpu):
        if not learner_gpu:
            learner.add(
                "delta base", params * dtype + bucket, version + " + 1 bucket: weight_sync.delta (rank 0)"
            )
        rollout.add("delta copy", params * dtype, version + ": weight_sync.delta's last version, applied to")
    if multiprocess_engine(cfg):
        piece = max(WEIGHT_PIECE_BYTES, s.vocab * s.hidden * dtype)
        rollout.add("pieces", 2 * piece, f"2 x {piece / MIB:.0f} MiB: one packed, one in the engine core")
    return [learner, rollout]
