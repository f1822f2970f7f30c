"""`segr1 predict --checkpoint DIR IMAGE... --out DIR [--instruction TEXT]`: masks and overlays for your images.

For each IMAGE writes, in --out: `<stem>_mask.png` (0/255, the image's size), `<stem>_overlay.png` (the mask in
red, boxes yellow, foreground points green, background points magenta) and `<stem>.txt` (the raw completion).
`--turns N`: after each answer the policy sees the mask its prompts made and may refine them or stop
(cluster/evaluation/refine.py); the mask and overlay are the last turn's, `<stem>.txt` holds every turn's answer,
`<stem>_turn<t>_overlay.png` each turn's mask and `<stem>_turn<t>_shown.png` the picture turn t was given.
Runs the policy and the configured segmenter in this process (no Ray); greedy unless --sample, with the evaluation
prompts and limits (prompt.eval, eval.*) as `segr1 eval`.
"""

from __future__ import annotations

import argparse
import sys

from cluster.commands.common import CommandError, load_config_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="masks and overlays for your own images",
        description="Segment your own images with a checkpoint: mask PNG, overlay PNG and raw completion each.",
    )
    p.add_argument("--config", help="YAML config (see cluster/configs/); defaults when omitted")
    p.add_argument("--checkpoint", required=True, help="policy folder, step-* checkpoint, or checkpoint root")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE",
        help="image files; key.sub=value items are config overrides (e.g. reward.segmenter=grabcut)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--instruction",
        help="what to segment, e.g. 'Identify and segment the red car.' (default: the foreground instruction)",
    )
    p.add_argument(
        "--sample", action="store_true", help="configured sampling (rollout.sampling) instead of greedy"
    )
    p.add_argument(
        "--turns",
        type=int,
        default=1,
        help="answers per image: after each, the policy sees the mask its prompts made and may refine them or "
        "stop (default 1: one answer)",
    )
    p.set_defaults(func=run)


def _sample_for(path, instruction: str):
    """A Sample for an image file (the mask is an empty placeholder: nothing is scored)."""
    from pathlib import Path

    import numpy as np

    from protos import Sample
    from runtime.images import CorruptSampleError, decode_image, encode_png

    p = Path(path)
    try:
        data = p.read_bytes()
        rgb = decode_image(data, str(p))  # (H, W, 3) uint8
    except (OSError, CorruptSampleError) as err:
        raise CommandError(f"cannot read image {p}: {err}") from None
    h, w = rgb.shape[:2]
    if not (data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff"):
        data = encode_png(rgb)
    task = "foreground" if instruction.strip() == _foreground() else "referring"
    placeholder = encode_png(np.zeros((h, w), bool))
    sample = Sample(id=p.stem, source="predict", split="predict", task=task, instruction=instruction,
                    image=data, mask=placeholder, width=w, height=h)  # fmt: skip
    return sample, rgb


def _foreground() -> str:
    from protos.answer import default_instruction

    return default_instruction("foreground")


def _split_inputs(args: argparse.Namespace) -> None:
    """IMAGE... may be mixed with key.sub=value overrides: an existing file is an image, `a.b=c` an override."""
    from pathlib import Path

    args.images, args.overrides = [], []
    for item in args.inputs:
        if Path(item).is_file() or "=" not in item:
            args.images.append(item)
        else:
            args.overrides.append(item)
    if not args.images:
        raise CommandError("give at least one IMAGE file", exit_code=2)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cluster.evaluation.inputs import resolve_checkpoint
    from cluster.evaluation.loop import make_requests, settings_from_config

    if not 1 <= args.turns <= 16:
        raise CommandError(f"--turns {args.turns}: give 1 to 16 answers per image", exit_code=2)
    _split_inputs(args)
    cfg = load_config_from_args(args)
    try:
        cfg.model.policy = resolve_checkpoint(args.checkpoint).policy
    except FileNotFoundError as err:
        raise CommandError(str(err), exit_code=2) from None
    instruction = args.instruction or _foreground()
    stems = [Path(i).stem for i in args.images]
    if len(set(stems)) != len(stems):
        raise CommandError("two IMAGE files share a file name stem; their outputs would collide")
    pairs = [_sample_for(i, instruction) for i in args.images]
    samples = [s for s, _ in pairs]
    try:
        settings = settings_from_config(cfg, greedy=not args.sample)
    except ValueError as err:  # --sample with eval.generation_config
        raise CommandError(str(err), exit_code=2) from None

    from actors.worker import RolloutWorker, build_engine
    from cluster.evaluation.refine import refine
    from reward_service.predictor import Predictor

    policy = cfg.policy_spec("eval")
    engine = build_engine(policy, cfg.rollout, images_per_prompt=args.turns)
    rollout = RolloutWorker(policy, cfg.rollout, name="rollout-0", engine=engine)
    predictor = Predictor(policy, cfg.reward, name="eval-0")
    s = settings
    requests = make_requests(samples, 0, s["group_size"], s["sampling"], s["seed"], s["max_tokens"])
    groups = rollout.generate(requests, *samples)
    first = [per_group[0] for per_group in predictor.predict(groups, *samples)]
    rgbs = [rgb for _, rgb in pairs]
    episodes = refine(rollout, predictor, samples, rgbs, groups, first, args.turns, s["sampling"])
    _write(Path(args.out), samples, rgbs, episodes, args.turns)
    return 0


def _write(out, samples, rgbs, episodes, turns_asked: int) -> None:
    """Each sample's mask, overlay and transcript (and with several turns, every turn's pictures)."""
    import numpy as np

    from runtime.images import encode_png

    out.mkdir(parents=True, exist_ok=True)
    for sample, rgb, episode in zip(samples, rgbs, episodes, strict=True):
        pred = episode[-1].prediction
        mask = pred.mask if pred.mask is not None else np.zeros(rgb.shape[:2], bool)
        (out / f"{sample.id}.txt").write_text(_transcript(episode, turns_asked))
        (out / f"{sample.id}_mask.png").write_bytes(encode_png(mask.astype(np.uint8) * 255))
        (out / f"{sample.id}_overlay.png").write_bytes(encode_png(_picture(rgb, pred)))
        if turns_asked > 1:  # every turn's mask, and the picture each later answer was given
            for t, turn in enumerate(episode, start=1):
                (out / f"{sample.id}_turn{t}_overlay.png").write_bytes(
                    encode_png(_picture(rgb, turn.prediction))
                )
                if turn.picture is not None:
                    turn.picture.save(out / f"{sample.id}_turn{t}_shown.png")
        note = "" if pred.mask is not None else f" (no usable answer: {pred.failure}; empty mask)"
        turns = f", {len(episode)} turns{' (stopped)' if pred.stop else ''}" if turns_asked > 1 else ""
        print(
            f"{sample.id}: {int(mask.sum())} mask pixels{turns}{note}",
            file=sys.stderr if note else sys.stdout,
        )
    print(f"wrote {len(samples)} x (mask, overlay, completion) to {out}")


def _picture(rgb, pred):
    from runtime.overlay import overlay

    return overlay(rgb, pred.mask, pred.boxes, pred.points, pred.labels)


def _transcript(episode, turns: int) -> str:
    """The completion (one turn), or every turn's completion under a `turn t` heading."""
    if turns == 1:
        return episode[0].text + "\n"
    return "".join(f"--- turn {t} ---\n{turn.text}\n" for t, turn in enumerate(episode, start=1))
