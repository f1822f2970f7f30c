"""Evaluation: the core loop with a scripted rollout and a box segmenter (exact expectations), then `segr1 eval`
and `segr1 predict` on the tiny policy (deterministic, every sample once, three outputs per image)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster.config import TrainConfig
from cluster.data.synth import generate_samples
from cluster.evaluation.loop import evaluate_samples
from cluster.evaluation.report import write_outputs
from protos import Completion, RolloutGroup
from reward_service.predictor import Predictor
from reward_service.rewards import mask_bbox
from reward_service.segmenters import BaseSegmenter, ImageHandle
from runtime.images import decode_mask

SIZE = 112  # the policy's square image


class BoxSegmenter(BaseSegmenter):
    """A weight-free segmenter whose mask is exactly the prompt's box: IoUs are known in advance."""

    name = "box"

    def _encode_batch(self, images):
        return [ImageHandle(height=im.shape[0], width=im.shape[1]) for im in images]

    def _decode_batch(self, items):
        out = []
        for handle, prompts in items:
            masks = np.zeros((len(prompts), handle.height, handle.width), bool)
            for i, p in enumerate(prompts):
                x1, y1, x2, y2 = (round(v) for v in p.box)
                masks[i, y1:y2, x1:x2] = True
            out.append(masks)
        return out


class ScriptedRollout:
    """Answers with each sample's true box (in the policy's SIZE x SIZE pixels), except the ids in `bad`
    (an unparseable answer); records every request it was asked for."""

    def __init__(self, bad: set[str]):
        self.bad, self.seen = bad, []

    def generate(self, requests, *samples):
        groups = []
        for req, s in zip(requests, samples, strict=True):
            self.seen.append(req.sample_id)
            gt = decode_mask(s.mask)
            x1, y1, x2, y2 = mask_bbox(gt)
            sx, sy = SIZE / s.width, SIZE / s.height
            box = [round(x1 * sx), round(y1 * sy), round(x2 * sx), round(y2 * sy)]
            cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
            text = f"<think> it is there </think> <bbox>{box}</bbox>, <points>[[{cx},{cy}]]</points>, <labels>[1]</labels>"
            if s.id in self.bad:
                text = "I cannot tell."
            comp = Completion(text=text, token_ids=[1, 2], logprobs=[-0.1, -0.2])
            groups.append(
                RolloutGroup(
                    temperature=1.0,
                    max_tokens=64,
                    prompt_token_ids=[1, 2, 3],
                    group_id=req.request_id,
                    sample_id=s.id,
                    policy_version=0,
                    completions=[comp] * req.group_size,
                )
            )
        return groups


def _cfg() -> TrainConfig:
    return TrainConfig.model_validate(
        {"prompt": {"preset": "compact"}, "data": {"image_size": SIZE}, "rollout": {"engine": "hf"}}
    )


def _predictor(segmenter) -> Predictor:
    cfg = _cfg()
    return Predictor(cfg.policy_spec(), cfg.reward, segmenter=segmenter)


def test_every_sample_once_missing_is_empty_and_counted(tmp_path: Path) -> None:
    samples = list(generate_samples(7, seed=3, size=64, split="test"))
    bad = {samples[2].id}
    rollout = ScriptedRollout(bad)
    seg = BoxSegmenter()
    run = evaluate_samples(rollout, _predictor(seg), samples, batch_size=3)
    # one encode per answered sample and one prompt per group (G=2 identical completions segmented once),
    # plus the two constant baselines on every sample
    assert seg.encode_calls == 6 + 2 * 7 and seg.prompts_decoded == 6 + 2 * 7
    assert rollout.seen == [s.id for s in samples]  # every sample exactly once, in order
    assert [r.id for r in run.results] == [s.id for s in samples]
    by_id = {r.id: r for r in run.results}
    assert (
        by_id[samples[2].id].missing
        and by_id[samples[2].id].iou == 0.0
        and by_id[samples[2].id].mask_png is None
    )
    s = run.summary
    assert s["n"] == 7 and s["missing"] == 1 and s["parse_rate"] == pytest.approx(6 / 7)
    good = [r for r in run.results if r.id not in bad]
    assert all(r.box_iou > 0.85 for r in good) and by_id[samples[2].id].box_iou == 0.0
    # the box segmenter's whole-image mask is all ones: IoU = foreground fraction of each image
    fractions = [decode_mask(x.mask).mean() for x in samples]
    assert s["constant_baseline"]["whole_image"]["mean_iou"] == pytest.approx(np.mean(fractions))
    sets = s["datasets"]  # the synthetic set mixes foreground and referring rows: one entry per task
    assert sum(d["n"] for d in sets.values()) == 7 and sum(d["missing"] for d in sets.values()) == 1
    assert all(0 < d["s_measure"] < 1 for d in sets.values() if d["task"] == "foreground")
    assert {d["task"] for d in sets.values()} == {x.task for x in samples}

    out = write_outputs(run, samples, tmp_path / "eval")
    table = pq.read_table(out / "predictions.parquet")
    assert table.column("id").to_pylist() == [x.id for x in samples]
    assert json.loads((out / "metrics.json").read_text())["missing"] == 1
    assert "| synthetic/test" in (out / "metrics.md").read_text()
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_generation_counts_as_missing_not_as_another_prediction() -> None:
    samples = list(generate_samples(4, seed=4, size=64, split="test"))

    class Flaky(ScriptedRollout):
        def generate(self, requests, *chunk):
            if any(s.id == samples[1].id for s in chunk):
                raise RuntimeError("engine died")
            return super().generate(requests, *chunk)

    run = evaluate_samples(Flaky(set()), _predictor(BoxSegmenter()), samples, batch_size=2, baselines=False)
    missing = [r.id for r in run.results if r.missing]
    assert missing == [samples[0].id, samples[1].id]  # the failed chunk, not reused from a neighbour
    assert all(r.iou == 0.0 for r in run.results if r.missing)
    with pytest.raises(ValueError, match="appears twice"):
        evaluate_samples(Flaky(set()), _predictor(BoxSegmenter()), [samples[2], samples[2]])


def test_checkpoint_resolves_to_its_policy_folder(tmp_path: Path) -> None:
    from cluster.evaluation.inputs import resolve_checkpoint

    root = tmp_path / "checkpoints"
    for step in ("step-000002", "step-000010"):
        (root / step / "policy").mkdir(parents=True)
        (root / step / "policy" / "config.json").write_text("{}")
    latest = str(root / "step-000010" / "policy")
    from_root, from_step = resolve_checkpoint(root), resolve_checkpoint(root / "step-000010")
    assert (from_root.policy, from_root.name) == (latest, "checkpoints")  # a root: its latest step's policy
    assert (from_step.policy, from_step.name) == (latest, "step-000010")
    given_policy = resolve_checkpoint(latest)  # a policy folder is used as it is, named after its step
    assert (given_policy.policy, given_policy.name) == (latest, "step-000010")
    with pytest.raises(FileNotFoundError, match="step-\\*/policy/"):
        resolve_checkpoint(tmp_path / "nothing-here")


# ------------------------------------------------------------------------------------------------------------
# `segr1 eval` and `segr1 predict` on the tiny policy (random weights: its answers do not parse, which is fine:
# what is checked is the command's contract)

TINY = [
    "rollout.engine=hf",
    "prompt.preset=compact",
    f"data.image_size={SIZE}",
    "rollout.sampling.max_tokens=24",
    "eval.max_tokens.foreground=24",
    "eval.max_tokens.referring=24",
    "eval.max_tokens.reasoning=24",
    "reward.segmenter=grabcut",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_policy_dir) -> dict[str, Path]:
    from cluster.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("tiny")
    # a test split of its own: 5 samples in shards of 3 (two shards), SIZE px, for file-order and coverage checks
    write_synthetic(root / "data", n=5, seed=1, size=SIZE, split="test", shard_size=3)
    return {"policy": tiny_policy_dir, "data": root / "data", "root": root}


def test_segr1_eval_is_deterministic_and_covers_every_sample_once(tiny) -> None:
    from cluster.cli import main
    from cluster.evaluation.inputs import load_samples

    outs = []
    for k in range(2):
        out = tiny["root"] / f"eval{k}"
        argv = ["eval", "--checkpoint", str(tiny["policy"]), "--data", str(tiny["data"]), "--out", str(out)]
        assert main([*argv, "--local", "--no-progress", *TINY]) == 0
        outs.append(out)
    first, second = (json.loads((o / "metrics.json").read_text()) for o in outs)
    first.pop("settings"), second.pop("settings")
    assert first == second and first["n"] == 5
    ids = [s.id for s in load_samples(tiny["data"])]
    tables = [pq.read_table(o / "predictions.parquet") for o in outs]
    assert tables[0].column("id").to_pylist() == ids  # every sample once, in file order
    assert tables[0].column("text").to_pylist() == tables[1].column("text").to_pylist()
    assert all((o / name).is_file() for o in outs for name in ("metrics.md", "grid.png"))


def test_segr1_predict_writes_mask_overlay_and_completion(tiny, tmp_path: Path) -> None:
    import cv2

    from cluster.cli import main

    images = []
    for k, shape in enumerate([(80, 120), (100, 64)]):
        path = tmp_path / f"photo{k}.{'jpg' if k else 'png'}"
        cv2.imwrite(str(path), np.random.default_rng(k).integers(0, 256, (*shape, 3), dtype=np.uint8))
        images.append((path, shape))
    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(tiny["policy"]), "--out", str(out)]
    argv += [
        "--instruction",
        "Identify and segment the cat.",
        *[str(p) for p, _ in images],
        *TINY,
    ]  # overrides mix in
    assert main(argv) == 0
    for path, shape in images:
        mask = cv2.imread(str(out / f"{path.stem}_mask.png"), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(out / f"{path.stem}_overlay.png"))
        assert mask.shape == shape and overlay.shape == (*shape, 3)
        assert (out / f"{path.stem}.txt").read_text().endswith("\n")
    # --turns 2: every turn's answer and overlay (tests/integration/test_refine.py follows a turn 2 itself)
    assert main([*argv[:4], str(tmp_path / "turns"), "--turns", "2", *argv[5:]]) == 0
    for path, _ in images:
        text = (tmp_path / "turns" / f"{path.stem}.txt").read_text()
        assert (
            text.startswith("--- turn 1 ---\n")
            and (tmp_path / "turns" / f"{path.stem}_turn1_overlay.png").is_file()
        )
    assert main([*argv, "--turns", "0"]) == 2


@pytest.mark.slow
def test_ray_pools_give_the_in_process_results(tiny, ray_local) -> None:
    """The Ray path (rollout pool + eval-<i> scorer actors from cluster/pools/topology.py) matches the in-process one."""
    from actors.worker import RolloutWorker
    from cluster.config import load_config
    from cluster.evaluation.inputs import load_samples
    from cluster.evaluation.loop import settings_from_config
    from cluster.evaluation.on_ray import evaluate_on_ray

    cfg = load_config(None, [*TINY, f"model.policy={tiny['policy']}", "rollout.max_batch_groups=2"])
    cfg.placement.namespace = "segr1-test"
    samples = load_samples(tiny["data"])
    settings = settings_from_config(cfg)
    remote = evaluate_on_ray(cfg, samples, settings, progress=False)
    local = evaluate_samples(
        RolloutWorker(cfg.policy_spec("eval"), cfg.rollout),
        Predictor(cfg.policy_spec("eval"), cfg.reward),
        samples,
        **settings,
    )
    assert [r.id for r in remote.results] == [s.id for s in samples]
    assert [r.text for r in remote.results] == [r.text for r in local.results]
    assert remote.summary == local.summary
