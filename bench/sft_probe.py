"""Does a tiny-policy variant learn WHERE the object is by SFT? (The open question of the demo, docs/e2e.md.)

Builds the demo-preset Qwen2.5-VL with the architecture knobs below changed, writes a synthetic set (--kind; the
salient knobs change the salient kind), runs SFT for --seconds, and scores greedy answers on 64 held-out images by the IoU of the
written box against the true box, next to the mean-box constant (what an image-blind policy reaches).

    .venv/bin/python bench/sft_probe.py --out runs/probe/a --kind single --size 56
    .venv/bin/python bench/sft_probe.py --out runs/probe/b --kind salient --size 112 --merge 2   # the old demo

Exploration tool: it patches the tiny-model builder and the synthetic generator's module constants for the run.
Prints one JSON object (also written to <out>/result.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cluster.data.synth as synth  # noqa: E402
import cluster.dev.tiny_models as tiny  # noqa: E402
import learner.sft as sft  # noqa: E402


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=240.0, help="SFT time budget")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=112, help="data.image_size: what the policy sees")
    p.add_argument("--rope-theta", type=float, default=1e6, help="M-RoPE theta of the language model")
    p.add_argument("--merge", type=int, default=None, help="spatial_merge_size (default: the demo preset's)")
    p.add_argument("--patch", type=int, default=14, help="patch_size (processor and vision tower)")
    p.add_argument("--kind", default="single", choices=synth.KINDS, help="synthetic data kind")
    p.add_argument("--distractors", default="2,4", help="salient distractors per image, inclusive range")
    p.add_argument("--side", default="", help="object side range as fractions of the image, e.g. 0.25,0.5")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vision-lr", type=float, default=1.0, help="multiplier of the lr for the vision tower")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data", default="runs/probe-data", help="synthetic sets are cached here per data knobs")
    return p.parse_args(argv)


def patch_builders(a) -> None:
    build_config = tiny.policy_config

    if a.merge is not None:
        tiny.PRESETS["demo"] = dataclasses.replace(tiny.PRESETS["demo"], merge=a.merge)

    def policy_config(preset: str = "test"):
        c = build_config(preset)
        c.text_config.rope_parameters = {**c.text_config.rope_parameters, "rope_theta": a.rope_theta}
        c.vision_config.patch_size = a.patch
        return c

    tiny.policy_config = policy_config
    tiny.QWEN_PREPROCESSOR = {**tiny.QWEN_PREPROCESSOR, "patch_size": a.patch}
    synth.SALIENT_DISTRACTORS = tuple(int(x) for x in a.distractors.split(","))
    if a.side:
        synth.SIDE_RANGE = tuple(float(x) for x in a.side.split(","))


def vision_lr_optimizer(multiplier: float) -> None:
    """SftTrainer with the vision tower's parameters in their own AdamW group at lr * multiplier."""
    init = sft.SftTrainer.__init__

    def __init__(self, cfg, *args, **kw):
        init(self, cfg, *args, **kw)
        vision = [p for n, p in self.policy.model.named_parameters() if "visual" in n and p.requires_grad]
        ids = {id(p) for p in vision}
        rest = [p for p in self.policy.trainable_parameters() if id(p) not in ids]
        self.optimizer = torch.optim.AdamW(
            [{"params": rest, "mult": 1.0}, {"params": vision, "mult": multiplier}],
            lr=self.lr,
            weight_decay=cfg.learner.weight_decay,
        )
        step = self.optimizer.step

        def scaled_step(*aa, **kk):
            for g in self.optimizer.param_groups:  # SftTrainer.step sets every group's lr before stepping
                g["lr"] *= g["mult"]
            return step(*aa, **kk)

        self.optimizer.step = scaled_step

    sft.SftTrainer.__init__ = __init__


def box_iou_of_answers(answers: list[str], boxes: list[tuple[int, int, int, int]]) -> tuple[float, float]:
    from reward_service.rewards import box_iou

    ious, parsed = [], 0
    for ans, box in zip(answers, boxes, strict=True):
        m = re.search(r"<bbox>\[(\d+),(\d+),(\d+),(\d+)\]</bbox>", ans)
        parsed += m is not None
        ious.append(box_iou([float(v) for v in m.groups()], box) if m else 0.0)
    return float(np.mean(ious)), parsed / len(answers)


def prepare(a, out: Path):
    """The synthetic data set (cached per knob setting), the untrained tiny policy and the demo config on them."""
    from cluster.config import load_config
    from cluster.dev.demo import DEMO_CONFIG, _with

    knobs = f"d{a.distractors.replace(',', '-')}-s{a.side.replace(',', '-') or 'default'}"
    data = Path(a.data) / f"{a.kind}-{knobs}"
    if not any((data / "eval").glob("*.parquet")):
        synth.write_synthetic(data / "train", n=2048, seed=0, kind=a.kind, split="train")
        synth.write_synthetic(data / "eval", n=64, seed=10_000, kind=a.kind, split="val")
    tiny.build_tiny_policy(out / "policy0", seed=0, preset="demo")
    cfg = _with(
        load_config(DEMO_CONFIG, []),
        {
            "model.policy": str(out / "policy0"),
            "data.train": str(data / "train"),
            "data.eval": str(data / "eval"),
            "data.image_size": a.size,
        },
    )
    return cfg, data


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    patch_builders(a)
    if a.vision_lr != 1.0:
        vision_lr_optimizer(a.vision_lr)
    from cluster.data.reader import DatasetReader
    from cluster.dev.demo import _with
    from cluster.evaluation.inputs import load_samples
    from learner.policy import Policy
    from reward_service.rewards import box_iou

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, data = prepare(a, out)
    batches = DatasetReader.from_config(cfg).next_batch
    run = sft.run_sft(
        cfg.policy_spec(),
        cfg.learner,
        batches,
        1_000_000,
        out / "sft",
        lr=a.lr,
        batch_size=a.batch_size,
        time_limit_s=a.seconds,
    )
    tuned = _with(cfg, {"model.policy": str(out / "sft")})
    policy = Policy(tuned.policy_spec(), tuned.learner)
    samples = load_samples(data / "eval")
    answers: list[str] = []
    for i in range(0, len(samples), 16):
        answers += sft.greedy_answers(policy, samples[i : i + 16])
    boxes = [sft.sft_target(s, a.size).box for s in samples]
    iou, parse_rate = box_iou_of_answers(answers, boxes)
    mean_box = np.mean(np.array(boxes, dtype=float), axis=0)
    result = {
        "args": vars(a),
        "sft_steps": run.steps,
        "last_loss": run.last_loss,
        "box_iou": iou,
        "mean_box_constant_box_iou": float(np.mean([box_iou(mean_box, b) for b in boxes])),
        "parse_rate": parse_rate,
        "distinct_answers": len(set(answers)),
        "examples": answers[:4],
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
