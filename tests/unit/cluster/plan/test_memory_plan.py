"""The memory plan (`segr1 plan`, cluster/plan/memory.py): parameter counts from the shapes equal a real model's,
the shipped configs fit and a one-rank 7B learner does not (with the change that fits), pools sharing a GPU add up,
a CPU-only config never fails on GPU size, docs/learner.md holds the plan's figures, and the learner's terms agree
with what a real step of the tiny policy allocates on CPU (measured with torch's profiler)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cluster.cli import main
from cluster.plan.memory import Sequence, learner_plan
from cluster.plan.model_shapes import (
    SHIPPED_SHAPES,
    from_config_json,
    image_tokens,
    load_policy_shapes,
    param_counts,
)
from cluster.plan.report import docs_table
from tests.support.paths import REPO

ROOT = REPO
CONFIGS = ROOT / "cluster" / "configs"


def test_parameter_counts_from_shapes_equal_the_real_models(tiny_policy_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from cluster.dev.tiny_models import policy_config

    shapes = from_config_json(json.loads((tiny_policy_dir / "config.json").read_text()))
    assert shapes == SHIPPED_SHAPES["segr1/tiny-test"]
    for preset in ("test", "demo"):
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(policy_config(preset))
        numel = sum(p.numel() for p in model.parameters())
        assert param_counts(SHIPPED_SHAPES[f"segr1/tiny-{preset}"])["total"] == numel, preset
    # the published sizes of the models the shipped configs name
    assert param_counts(SHIPPED_SHAPES["Qwen/Qwen2.5-VL-3B-Instruct"])["total"] == pytest.approx(
        3.75e9, rel=0.01
    )
    assert param_counts(SHIPPED_SHAPES["Qwen/Qwen2.5-VL-7B-Instruct"])["total"] == pytest.approx(
        8.29e9, rel=0.01
    )


def test_lora_adapters_and_sam2_variants_are_counted_as_built(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from cluster.dev.tiny_models import policy_config
    from cluster.plan.memory import lora_params
    from cluster.plan.model_shapes import ShapesError, sam2_shapes
    from learner.config import LearnerConfig
    from learner.policy import _apply_lora

    model = _apply_lora(Qwen2_5_VLForConditionalGeneration(policy_config("test")), LearnerConfig(lora_rank=8))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params(SHIPPED_SHAPES["segr1/tiny-test"], 8) == trainable
    # SAM2: a Hugging Face folder's Hiera widths and depths, else the config or checkpoint name
    backbone = {"embed_dim_per_stage": [144, 288, 576, 1152], "blocks_per_stage": [2, 6, 36, 4]}
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"backbone_config": backbone}}))
    assert sam2_shapes(str(tmp_path), None)[0].variant == "large"
    assert (
        sam2_shapes("/x/sam2.1_hiera_base_plus.pt", "configs/sam2.1/sam2.1_hiera_b+.yaml")[0].variant
        == "base_plus"
    )
    with pytest.raises(ShapesError, match="which SAM2"):
        sam2_shapes("/x/model.pt", None)


def test_qwen7b_fits_with_its_ranks_and_one_rank_names_the_learner_and_the_fix(capsys):
    assert main(["plan", "--config", str(CONFIGS / "qwen7b-8gpu.yaml")]) == 0
    out = capsys.readouterr().out
    assert "learner (per rank, 4 rank(s) on GPU)" in out and "DOES NOT FIT" not in out
    # vLLM's encoder profile follows data.image_size (768 -> 756 px: 27 x 27 tokens), not its default 16,384
    assert "vision encoder profiled at one data.image_size image (729 tokens" in out
    assert main(["plan", "--config", str(CONFIGS / "qwen7b-8gpu.yaml"), "learner.world_size=1"]) == 1
    captured = capsys.readouterr()
    assert "segr1 plan: learner" in captured.err and "on one GPU of 80 GB" in captured.err
    assert "change: learner.world_size=4 fits (4 learner GPUs): learner 76." in captured.out
    # the dry run prints the same plan after the config and the prompts
    assert main(["train", "--config", str(CONFIGS / "qwen7b-8gpu.yaml"), "--dry-run"]) == 0
    assert "\n# memory plan (per GPU of 80 GB)\n" in capsys.readouterr().out


def test_episodes_are_planned_at_their_longest_and_a_too_long_one_is_refused(capsys):
    """rollout.max_turns T: a row holds T answers, T images and T - 1 user turns; the logits only the answers'
    slots; an episode longer than vLLM's max_model_len fails the plan, naming the fields to change."""
    from cluster.config import load_config
    from cluster.plan.report import build_plan

    qwen7b = str(CONFIGS / "qwen7b-8gpu.yaml")
    one, two = (build_plan(load_config(qwen7b, [f"rollout.max_turns={t}"])) for t in (1, 2))
    a, b = one.sequence, two.sequence
    assert (a.turns, b.turns, a.refine_tokens) == (1, 2, 0) and b.refine_tokens > 0
    assert (
        b.total == a.total + a.image_tokens + b.refine_tokens + a.completion and b.answers == 2 * a.completion
    )
    terms = [{t.name: t for t in p.pools[0].terms} for p in (one, two)]
    assert terms[1]["logits"].bytes == pytest.approx(terms[0]["logits"].bytes * (2 * 400 + 1) / 401)
    assert "(episodes of 2 turns)" in terms[1]["activations text"].formula
    assert not one.failures and two.failures == [] or "learner" in two.failures[0]
    assert main(["plan", "--config", qwen7b, "rollout.max_turns=8"]) == 1
    err = capsys.readouterr().err
    assert (
        "an episode of rollout.max_turns=8 turns runs to about" in err
        and "rollout.max_model_len 8,192" in err
    )


def test_plan_says_what_each_pods_object_store_must_hold(capsys):
    """Ray's object store per node (cluster/k8s sizes /dev/shm from it): a rollout pod holds one weight version
    in the rollout dtype, more than the 0.95 x 16 GiB a 16Gi /dev/shm gives Ray (issue 29)."""
    assert main(["plan", "--config", str(CONFIGS / "qwen7b-8gpu.yaml"), "--json"]) == 0
    stores = {p["pool"]: p for p in json.loads(capsys.readouterr().out)["object_store"]}
    assert set(stores) == {"rollout", "learner", "reward", "driver"}
    version = stores["rollout"]["terms"][0]
    params = param_counts(SHIPPED_SHAPES["Qwen/Qwen2.5-VL-7B-Instruct"])["total"]
    assert version["name"] == "weight version" and version["bytes"] == params * 2  # bfloat16
    assert stores["rollout"]["total"] > 0.95 * 16 * 2**30 > stores["reward"]["total"]
    assert stores["learner"]["terms"][0]["bytes"] == params * 2  # rank 0's export
    assert main(["plan", "--config", str(CONFIGS / "qwen7b-8gpu.yaml")]) == 0
    assert "\nRay object store per node (host shared memory, /dev/shm" in capsys.readouterr().out


def _plan(capsys, config: str, *overrides: str) -> dict:
    assert main(["plan", "--config", str(CONFIGS / config), *overrides, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _terms(pools: list[dict], pool: str) -> dict[str, int]:
    return {t["name"]: t["bytes"] for p in pools if p["pool"] == pool for t in p["terms"]}


def test_weight_sync_staging_is_planned_on_both_ends_for_every_transport(capsys):
    """Issue 23: every transport's staging is a named term. nccl: two packing buckets on the learner's GPU, two
    receive buckets and vLLM's layer-wise reload beside what vLLM claims on the rollout GPU; a bucket is never
    smaller than the largest tensor (the 7B's embeddings, 1.09 GB, over bucket_mb 512). cuda-ipc: the same on
    the one shared GPU. gloo: the buckets on both hosts. Every config: the object store's version on both hosts;
    the pieces of an engine whose workers are other processes (TP > 1), and none for one in process (TP 1, both
    modes)."""
    s7 = SHIPPED_SHAPES["Qwen/Qwen2.5-VL-7B-Instruct"]
    embed7, params7 = s7.vocab * s7.hidden * 2, param_counts(s7)["total"]
    plan = _plan(capsys, "qwen7b-8gpu.yaml")
    assert plan["fits"]
    assert _terms(plan["pools"], "learner")["sync packing"] == 2 * embed7
    rollout = _terms(plan["pools"], "rollout")
    assert rollout["sync receive"] == 2 * embed7 and rollout["reload layer"] == embed7
    pool = next(p for p in plan["pools"] if p["pool"] == "rollout")
    assert pool["total"] == pool["claimed"] + 3 * embed7  # beside gpu_memory_utilization x GPU
    host = _terms(plan["weight_sync_host"], "rollout")
    assert host["catch-up copy"] == params7 * 2 and "pieces" not in host  # async, TP 1: one process
    tp2 = _plan(capsys, "qwen7b-8gpu.yaml", "rollout.tensor_parallel_size=2")
    assert _terms(tp2["weight_sync_host"], "rollout")["pieces"] == 2 * embed7  # pieces of one tensor
    assert _terms(plan["weight_sync_host"], "learner") == {"export": params7 * 2}

    gloo = _plan(capsys, "qwen7b-8gpu.yaml", "weight_sync.backend=gloo", "weight_sync.bucket_mb=2048")
    assert "sync packing" not in _terms(gloo["pools"], "learner")
    assert "sync receive" not in _terms(gloo["pools"], "rollout")
    assert _terms(gloo["weight_sync_host"], "learner")["sync packing"] == 2 * 2048 * 2**20
    assert _terms(gloo["weight_sync_host"], "rollout")["sync receive"] == 2 * 2048 * 2**20

    s3 = SHIPPED_SHAPES["Qwen/Qwen2.5-VL-3B-Instruct"]
    embed3 = s3.vocab * s3.hidden * 2
    ipc = _plan(capsys, "qwen3b-1gpu.yaml")
    assert ipc["fits"] and _terms(ipc["pools"], "learner")["sync packing"] == 2 * embed3
    assert _terms(ipc["pools"], "rollout")["sync receive"] == 2 * embed3
    assert ipc["gpus"][0]["bytes"] == sum(p["total"] for p in ipc["pools"])
    assert "pieces" not in _terms(ipc["weight_sync_host"], "rollout")  # sync, TP 1: one process
    assert main(["plan", "--config", str(CONFIGS / "qwen7b-8gpu.yaml")]) == 0
    out = capsys.readouterr().out
    assert "[beside vLLM's claim]" in out and "\nWeight sync, host memory per process (RAM):\n" in out


def test_pools_sharing_one_gpu_add_up_and_the_advice_is_computed(capsys):
    argv = ["plan", "--config", str(CONFIGS / "qwen3b-1gpu.yaml"), "learner.lora_rank=0", "--json"]
    assert main(argv) == 1
    plan = json.loads(capsys.readouterr().out)
    (gpu,) = plan["gpus"]  # learner 0.6 + rollout 0.3 + reward 0.1 of one GPU
    assert gpu["members"] == ["learner-0", "rollout-0", "reward-0"]
    assert gpu["bytes"] == sum(p["total"] for p in plan["pools"]) > plan["gpu_bytes"]
    assert any(a.startswith("learner.lora_rank=64 fits") for a in plan["advice"])
    # vLLM without room for one max_model_len sequence refuses to start: the plan says so and what fits
    argv = ["plan", "--config", str(CONFIGS / "qwen7b-8gpu.yaml"), "rollout.gpu_memory_utilization=0.22"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "rollout: vLLM's KV cache holds" in out and "change: rollout.gpu_memory_utilization=0.24" in out


def test_a_cpu_only_config_reports_host_memory_and_never_fails_on_gpu_size(capsys):
    argv = [
        "plan",
        "--config",
        str(CONFIGS / "demo.yaml"),
        "--model-shapes",
        "tiny-demo",
        "--gpu-memory-gb",
        "1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "CPU-only: host memory per process" in out and "GPUs:" not in out
    # an unknown model is a usage error naming the way out
    assert main(["plan", "--config", str(CONFIGS / "seg-r1-rl.yaml")]) == 2
    assert "--model-shapes NAME" in capsys.readouterr().err


def test_docs_hold_every_shipped_configs_figures():
    text = (ROOT / "docs" / "learner.md").read_text()
    table = docs_table(CONFIGS)
    assert table in text, "docs/learner.md's memory table is stale; paste cluster.plan.report.docs_table()"
    assert " NO |" not in table and len(table.splitlines()) == 2 + len(list(CONFIGS.glob("*.yaml")))


# ----------------------------------------------------------------------------------------------------------------
# The plan against a real learner step on CPU


def _allocation_peak(fn) -> int:
    """Peak of bytes torch allocates on CPU during fn() beyond what was live before: the allocation events of
    torch's profiler (profile_memory) summed in time order (a private but stable part of torch.profiler)."""
    from torch._C._profiler import _EventType

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize(("checkpointing", "turns"), [(False, 1), (True, 1), (False, 2)])
def test_learner_terms_agree_with_a_measured_cpu_step(tiny_policy_dir, checkpointing, turns):
    """Static terms (parameters, AdamW states, the reference) equal the storages after a step; the dynamic ones
    (gradients + activations + logits) are within 25% of the step's allocation peak. Step 2 is measured, so the
    AdamW states already exist and the peak is the forward/backward's. `turns` 2: every completion an episode of
    two turns (two images a row, a picture and a user turn between the answers)."""
    from cluster.data.synth import generate_samples
    from learner.learner import Learner
    from tests.support.synthetic import episode_groups, scored_groups
    from tests.unit.learner.test_learner import make_cfg

    cfg = make_cfg(tiny_policy_dir, micro_batch_size=16, gradient_checkpointing=checkpointing)
    samples = list(generate_samples(4, seed=0, size=64))
    learner = Learner(cfg.learner_spec())
    if turns == 1:
        groups = scored_groups(learner.policy, samples, group_size=4, seed=1, max_tokens=48)
    else:
        groups = episode_groups(learner.policy, samples, group_size=4, seed=1, max_tokens=24, every=1)
    answer = max(len(t) for g in groups for c in g.group.completions for t in _answers(c))
    seen = []
    logprobs = learner.policy.logprobs

    def recording(batch, model=None, temperature=1.0):
        if torch.is_grad_enabled():  # the update's forward (the no-grad passes are smaller)
            seen.append((*batch["input_ids"].shape, int(batch["completion_lengths"].max())))
        return logprobs(batch, model, temperature)

    learner.policy.logprobs = recording
    learner.step(groups, *samples)
    peak = _allocation_peak(lambda: learner.step(groups, *samples))
    rows, width, completion = seen[-1]
    shapes = load_policy_shapes(str(tiny_policy_dir))[0]
    patches, img = image_tokens(shapes, cfg.data.image_size)
    refine = completion - turns * answer - (turns - 1) * img  # the user turns' tokens between the answers
    seq = Sequence(patches, img, width - completion - img, answer, turns, refine)
    assert seq.total == width and seq.span == completion
    plan = learner_plan(cfg, shapes, seq)
    terms = {t.name: t.bytes for t in plan.terms}
    assert rows == 16 and not plan.on_gpu

    optimiser = _storage_bytes(
        v for s in learner.optimizer.state.values() for v in s.values() if torch.is_tensor(v)
    )
    assert terms["parameters"] == _storage_bytes(learner.policy.model.parameters())
    assert terms["reference"] == _storage_bytes(learner.policy.reference.parameters())
    assert math.isclose(terms["optimiser"], optimiser, rel_tol=1e-3)  # + AdamW's step counters
    dynamic = sum(
        terms.get(k, 0)
        for k in ("gradients", "activations text", "activations vision", "logits", "attention")
    )
    ratio = dynamic / peak
    print(
        f"checkpointing={checkpointing} turns={turns}: plan {dynamic:,} B, measured peak {peak:,} B, "
        f"plan/measured {ratio:.3f}"
    )
    assert 0.75 <= ratio <= 1.25


def _answers(completion) -> list[list[int]]:
    """Each turn's answer tokens of a completion (runs of policy_mask 1)."""
    mask = completion.policy_mask or [1] * len(completion.token_ids)
    runs, run = [], []
    for tok, m in zip(completion.token_ids, mask, strict=True):
        if m:
            run.append(tok)
        elif run:
            runs, run = [*runs, run], []
    return [*runs, run] if run else runs
