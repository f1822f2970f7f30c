"""The whole memory plan of a job: every pool (cluster/plan/memory.py), the pools that share a GPU added up, what
cannot fit, and the computed change that would make it fit; as a table or JSON (`segr1 plan`, `segr1 train
--dry-run`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cluster.plan.memory import (
    GB,
    VLLM_DEFAULT_MAX_MODEL_LEN,
    PoolPlan,
    Sequence,
    add_weight_sync_terms,
    estimate_sequence,
    learner_plan,
    object_store_plan,
    reward_plan,
    rollout_plan,
    weight_sync_host_plan,
)
from cluster.plan.model_shapes import load_policy_shapes, sam2_shapes


@dataclass
class GPU:
    """One GPU and the actors on it (a whole-GPU actor alone, fractional ones packed together)."""

    members: list[str]
    bytes: int


@dataclass
class MemoryPlan:
    gpu_bytes: int
    pools: list[PoolPlan]
    gpus: list[GPU]
    sequence: Sequence
    sources: list[str]
    failures: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    object_store: list[PoolPlan] = field(default_factory=list)  # Ray's object store per node of each pool
    sync_host: list[PoolPlan] = field(default_factory=list)  # weight sync's host memory per process

    @property
    def on_gpu(self) -> bool:
        return any(p.on_gpu for p in self.pools)

    @property
    def fits(self) -> bool:
        return not self.failures


def _pools(cfg, gpu_bytes: int, shapes) -> tuple[list[PoolPlan], Sequence]:
    seq = estimate_sequence(cfg, shapes)
    sam = None
    if cfg.reward.segmenter != "grabcut":
        sam = sam2_shapes(cfg.reward.segmenter_path, cfg.reward.sam2_config)[0]
    pools = [learner_plan(cfg, shapes, seq), rollout_plan(cfg, shapes, seq, gpu_bytes), reward_plan(cfg, sam)]
    add_weight_sync_terms(cfg, shapes, pools[0], pools[1])
    return pools, seq


def _gpus(pools: list[PoolPlan]) -> list[GPU]:
    """Whole-GPU actors each on their own GPUs (every GPU of a pool holds the pool's per-GPU figure); actors
    asking for a fraction are packed first-fit by fraction, largest first, as Ray packs them."""
    out, shared = [], []
    for p in pools:
        if not p.on_gpu or p.gpus_per_actor <= 0:
            continue
        if p.gpus_per_actor >= 1:
            out.append(GPU([f"{p.pool} (x{p.actors}, {p.gpus_per_actor:g} GPU each)"], p.total))
        else:
            shared += [(p.gpus_per_actor, p.total, f"{p.pool}-{i}") for i in range(p.actors)]
    bins: list[tuple[float, GPU]] = []
    for frac, nbytes, name in sorted(shared, key=lambda x: -x[0]):
        for k, (used, gpu) in enumerate(bins):
            if used + frac <= 1 + 1e-9:
                gpu.members.append(name)
                gpu.bytes += nbytes
                bins[k] = (used + frac, gpu)
                break
        else:
            bins.append((frac, GPU([name], nbytes)))
    return out + [gpu for _, gpu in bins]


def build_plan(cfg, gpu_gb: float = 80.0, model_shapes: str | None = None) -> MemoryPlan:
    """The memory plan of `cfg` on GPUs of `gpu_gb` GB (ShapesError when the policy's shapes are unknown)."""
    shapes, source = load_policy_shapes(cfg.model.policy, model_shapes)
    gpu_bytes = int(gpu_gb * GB)
    pools, seq = _pools(cfg, gpu_bytes, shapes)
    sources = [f"policy shapes: {source}"]
    if cfg.reward.segmenter != "grabcut":
        sources.append(f"segmenter: {sam2_shapes(cfg.reward.segmenter_path, cfg.reward.sam2_config)[1]}")
    plan = MemoryPlan(gpu_bytes, pools, _gpus(pools), seq, sources)
    plan.object_store = object_store_plan(cfg, shapes, seq)
    plan.sync_host = weight_sync_host_plan(cfg, shapes)
    _check(cfg, plan, model_shapes)
    return plan


def _check(cfg, plan: MemoryPlan, model_shapes: str | None) -> None:
    for gpu in plan.gpus:
        if gpu.bytes > plan.gpu_bytes:
            who = " + ".join(gpu.members)
            plan.failures.append(
                f"{who} needs {gpu.bytes / GB:.1f} GB on one GPU of {plan.gpu_bytes / GB:.0f} GB"
            )
            plan.advice += _advice(cfg, plan, gpu, model_shapes)
    rollout = next(p for p in plan.pools if p.pool == "rollout")
    need = cfg.rollout.max_model_len or VLLM_DEFAULT_MAX_MODEL_LEN
    if rollout.kv_tokens is not None and rollout.kv_tokens < need:
        plan.failures.append(
            f"rollout: vLLM's KV cache holds {rollout.kv_tokens:,} tokens, fewer than one sequence of "
            f"max_model_len {need:,}; vLLM refuses to start"
        )
        plan.advice.append(_rollout_advice(cfg, plan, need, model_shapes))
    if cfg.rollout.engine == "vllm" and plan.sequence.total > need:
        seq = plan.sequence
        what = f"an episode of rollout.max_turns={seq.turns} turns" if seq.turns > 1 else "a sequence"
        plan.failures.append(
            f"rollout: {what} runs to about {seq.total:,} tokens ({seq.prompt:,} prompt + {seq.span:,}), more "
            f"than rollout.max_model_len {need:,}: vLLM refuses it; raise rollout.max_model_len, or lower "
            "rollout.max_turns / data.image_size / rollout.sampling.max_tokens"
        )


def with_overrides(cfg, *overrides: str):
    from cluster.config import apply_overrides, build_config

    return build_config(apply_overrides(cfg.model_dump(mode="json"), list(overrides)), "plan")


def _fits(cfg, overrides: tuple[str, ...], gpu_bytes: float, model_shapes) -> tuple[bool, float]:
    """(the learner fits, its per-GPU figure) with `overrides`, on what the learner's GPU leaves it."""
    shapes = load_policy_shapes(cfg.model.policy, model_shapes)[0]
    changed = with_overrides(cfg, *overrides)
    pools, _ = _pools(changed, int(gpu_bytes), shapes)
    return pools[0].total <= gpu_bytes, pools[0].total


def _advice(cfg, plan: MemoryPlan, gpu: GPU, model_shapes) -> list[str]:
    """Computed changes that make the learner fit on its GPU (what its GPU-mates leave it)."""
    if not any(m.startswith("learner") for m in gpu.members):
        return [
            _rollout_advice(cfg, plan, cfg.rollout.max_model_len or VLLM_DEFAULT_MAX_MODEL_LEN, model_shapes)
        ]
    learner = plan.pools[0]
    room = plan.gpu_bytes - (gpu.bytes - learner.total)
    lc, tries = cfg.learner, []
    tries += [(f"learner.world_size={r}",) for r in range(lc.ranks + 1, 65)]
    if not lc.gradient_checkpointing:
        tries.append(("learner.gradient_checkpointing=true",))
    m = lc.micro_batch_size
    while m > 1:
        m //= 2
        tries.append((f"learner.micro_batch_size={m}",))
    if lc.lora_rank == 0:
        tries.append(("learner.lora_rank=64",))
    if cfg.grpo.beta > 0:
        tries.append(("grpo.beta=0",))
    out, seen_ranks = [], False
    for t in tries:
        ok, total = _fits(cfg, t, room, model_shapes)
        if ok and not (seen_ranks and t[0].startswith("learner.world_size")):
            seen_ranks |= t[0].startswith("learner.world_size")
            gpus = f" ({t[0].split('=')[1]} learner GPUs)" if t[0].startswith("learner.world_size") else ""
            out.append(
                f"{t[0]} fits{gpus}: learner {total / GB:.1f} GB of the {room / GB:.1f} GB its GPU leaves it"
            )
    if not out:
        out.append(
            f"no single change fits the learner in {room / GB:.1f} GB; combine them or use larger GPUs"
        )
    return out


def _rollout_advice(cfg, plan: MemoryPlan, need: int, model_shapes) -> str:
    shapes = load_policy_shapes(cfg.model.policy, model_shapes)[0]
    for u in range(5, 99):
        changed = with_overrides(cfg, f"rollout.gpu_memory_utilization={u / 100}")
        pools, _ = _pools(changed, plan.gpu_bytes, shapes)
        if (pools[1].kv_tokens or 0) >= need:
            return (
                f"rollout.gpu_memory_utilization={u / 100} holds one {need:,}-token sequence "
                f"({pools[1].kv_tokens:,} KV tokens), or lower rollout.max_model_len"
            )
    return "the rollout's weights do not fit one GPU: raise rollout.tensor_parallel_size"


# ----------------------------------------------------------------------------------------------------------------
# Output


def _gb(n: float) -> str:
    return f"{n / GB:8.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:8.2f} MB"


def format_plan(cfg, plan: MemoryPlan) -> str:
    where = f"per GPU of {plan.gpu_bytes / GB:.0f} GB" if plan.on_gpu else "CPU-only: host memory per process"
    s = plan.sequence
    lines = [
        f"# memory plan ({where})",
        *(f"#   {src}" for src in plan.sources),
        f"#   a row: {s.image_tokens} image tokens ({s.image_patches} patches) + ~{s.text_tokens} text tokens + "
        + (
            f"{s.completion} completion tokens = {s.total}"
            if s.turns == 1
            else f"{s.turns} x {s.completion} answer tokens + {s.turns - 1} x ({s.image_tokens} picture + "
            f"~{s.refine_tokens} refine) tokens = {s.total} (an episode taking every turn)"
        ),
    ]
    for p in plan.pools:
        unit = ("per GPU" if p.on_gpu else "per process") + f", {p.actors} actor(s)"
        if p.pool == "learner":
            unit = f"per rank, {cfg.learner.ranks} rank(s)" + (" on GPU" if p.on_gpu else " on CPU")
        lines.append(f"{p.pool} ({unit}):")
        lines += [f"  {t.name:20s} {_gb(t.bytes)}  {t.formula}{_beside(p, t)}" for t in p.terms]
        claimed = ""
        if p.claimed is not None:
            claimed = " (vLLM claims gpu_memory_utilization x GPU" + (
                " + the terms beside it)" if p.total > p.claimed else ")"
            )
        lines.append(f"  {'total':20s} {_gb(p.total)}{claimed}")
        lines += [f"  {n}" for n in p.notes]
    if plan.on_gpu:
        lines.append("GPUs:")
        for g in plan.gpus:
            ok = "ok" if g.bytes <= plan.gpu_bytes else "DOES NOT FIT"
            lines.append(f"  {' + '.join(g.members)}: {_gb(g.bytes)} of {plan.gpu_bytes / GB:.0f} GB  {ok}")
    lines += _object_store_lines(plan)
    lines += _sync_host_lines(plan)
    lines += [f"cannot fit: {f}" for f in plan.failures]
    lines += [f"  change: {a}" for a in plan.advice]
    return "\n".join(lines) + "\n"


def _object_store_lines(plan: MemoryPlan) -> list[str]:
    """Ray's object store one node of each pool needs: a pod's /dev/shm must hold it (docs/kubernetes.md)."""
    return _pool_terms(
        "Ray object store per node (host shared memory, /dev/shm; docs/kubernetes.md):", plan.object_store
    )


def _beside(pool: PoolPlan, term) -> str:
    return " [beside vLLM's claim]" if pool.claimed is not None and term.outside_claim else ""


def _sync_host_lines(plan: MemoryPlan) -> list[str]:
    """Weight sync's host memory of one process per pool (RAM, not /dev/shm)."""
    return _pool_terms("Weight sync, host memory per process (RAM):", plan.sync_host)


def _pool_terms(title: str, pools) -> list[str]:
    """A titled section: per pool its terms (name, size, formula) and their total."""
    lines = [title]
    for p in pools:
        lines.append(f"  {p.pool}:")
        lines += [f"    {t.name:18s} {_gb(t.bytes)}  {t.formula}" for t in p.terms]
        lines.append(f"    {'total':18s} {_gb(p.total)}")
    return lines


def plan_json(plan: MemoryPlan) -> dict:
    return {
        "gpu_bytes": plan.gpu_bytes,
        "on_gpu": plan.on_gpu,
        "fits": plan.fits,
        "sources": plan.sources,
        "sequence": asdict(plan.sequence),
        "pools": [{**asdict(p), "total": p.total} for p in plan.pools],
        "gpus": [asdict(g) for g in plan.gpus],
        "failures": plan.failures,
        "advice": plan.advice,
        "object_store": [{**asdict(p), "total": p.total} for p in plan.object_store],
        "weight_sync_host": [{**asdict(p), "total": p.total} for p in plan.sync_host],
    }


# The shipped configs and the built-in shapes each needs (model.policy names a cluster volume folder: its model)
SHIPPED_CONFIG_SHAPES = {
    "demo.yaml": "segr1/tiny-demo",
    "qwen3b-1gpu.yaml": None,
    "qwen7b-8gpu.yaml": None,
    "seg-r1-prerl.yaml": None,
    "seg-r1-rl.yaml": "Qwen/Qwen2.5-VL-7B-Instruct",
    "seg-r1-sod.yaml": "Qwen/Qwen2.5-VL-7B-Instruct",
}


def docs_table(config_dir, gpu_gb: float = 80.0) -> str:
    """The Markdown table of docs/learner.md ("Memory plan"): every shipped config's figures (tests check it)."""
    from pathlib import Path

    from cluster.config import load_config

    rows = [
        "| config | learner per rank (params + grads + optimiser / activations + logits / reference) | "
        "rollout per GPU (KV tokens) | reward | fullest GPU | fits |",
        "|---|---|---|---|---|---|",
    ]
    for name, shapes in SHIPPED_CONFIG_SHAPES.items():
        cfg = load_config(Path(config_dir) / name)
        plan = build_plan(cfg, gpu_gb, shapes)
        learner, rollout, reward = plan.pools
        t = {x.name: x.bytes for x in learner.terms}
        state = t["parameters"] + t["gradients"] + t["optimiser"]
        dyn = t["activations text"] + t["activations vision"] + t["logits"]
        kv = f" ({rollout.kv_tokens:,})" if rollout.kv_tokens is not None else ""
        fullest = max((g.bytes for g in plan.gpus), default=0)
        where = f"{fullest / GB:.1f} GB" if plan.on_gpu else "CPU only"
        rows.append(
            f"| {name} | {learner.total / GB:.1f} GB ({state / GB:.1f} / {dyn / GB:.1f} / "
            f"{t.get('reference', 0) / GB:.1f}), {cfg.learner.ranks} rank(s) | {rollout.total / GB:.1f} GB{kv} | "
            f"{reward.total / GB:.1f} GB | {where} | {'yes' if plan.fits else 'NO'} |"
        )
    return "\n".join(rows) + "\n"
