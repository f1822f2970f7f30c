"""What the vLLM engines ask of vLLM beyond its defaults, and why: suppression and image processing.

Suppression: `logit_bias={id: -inf}` on exactly the ids the learner's softmax leaves out (`runtime.qwen_vl.suppress_token_ids`: the vision special tokens and the embedding rows past the
tokenizer; 5 + 271 = 276 ids for Qwen2.5-VL-3B's vocab_size 151,936, 5 + 399 = 404 for 7B's 152,064, against the
tokenizer's 151,665 ids).

Why this mechanism (vLLM 0.32 / 0.33):
- exact: V1's sampler (`LogitBiasLogitsProcessor`, the CPU machines) and Model Runner V2's (`LogitBiasState`, the
  GPUs wherever Triton is) add the bias to the logits before temperature, top-k/top-p and the processed logprobs;
  -inf + logit = -inf, so the behaviour logprobs are the learner's log-softmax over the same support. The front
  end checks only that the ids are in range (`SamplingParams._validate_logit_bias`) and keeps -inf (only
  `SamplingParams.from_optional`, the OpenAI server's path, clamps biases to +-100);
- within V2's per-request limits: V2 refuses more than `MAX_NUM_ALLOWED_TOKEN_IDS` (1024) `allowed_token_ids`,
  which a whitelist of a real model needs ~151,660 of, and takes `MAX_NUM_LOGIT_BIAS_TOKENS` (1024) bias ids
  (vllm/v1/worker/gpu/sample/logit_bias.py): `suppression_bias` refuses at engine start, naming the limit it
  reads from there, a set that would not fit;
- one mechanism for both kinds of id: `bad_words` are strings that vLLM re-tokenizes (with and without a leading
  space) and cannot name the padded ids; a mask in the model's compute_logits would need a model class of our own
  for the text-only Qwen2 as well.

Images (Qwen2.5-VL; the model registered by actors/vllm_plugin.py processes them with the learner's processor):
- `mm_processor_kwargs={"size": ...}` with max pixels = one `image_size` image after the processor's rounding
  (`runtime.qwen_vl.image_size_bounds`; 768 -> 756 x 756, 729 tokens): vLLM profiles the vision encoder and sizes
  its encoder cache at the processor's max_pixels, by default 12,845,056 (16,384 image tokens);
- `mm_device_do_normalize=False` where vLLM has the option (0.32 on): by default vLLM rescales and normalises on
  the device, in another order of float operations than the processor; off, the encoder gets the learner's
  pixels bit for bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from runtime.qwen_vl import image_size_bounds, suppress_token_ids, vision_token_ids


def suppression_bias(tokenizer, vocab_size: int, where: str) -> dict[int, float]:
    """`logit_bias` that suppresses exactly `suppress_token_ids(tokenizer, vocab_size)`; raises ValueError (naming
    `where`, the counts and vLLM's limit) when vLLM's GPU sampler could not take it."""
    from vllm.v1.worker.gpu.sample.logit_bias import MAX_NUM_LOGIT_BIAS_TOKENS

    ids = suppress_token_ids(tokenizer, vocab_size)
    if len(ids) > MAX_NUM_LOGIT_BIAS_TOKENS:
        vision, padded = len(vision_token_ids(tokenizer)), vocab_size - len(tokenizer)
        raise ValueError(
            f"{where}: {len(ids)} token ids to suppress ({vision} vision tokens + {padded} ids of vocab_size "
            f"{vocab_size} past the tokenizer's {len(tokenizer)}), but vLLM's GPU sampler takes at most "
            f"{MAX_NUM_LOGIT_BIAS_TOKENS} logit_bias ids per request (MAX_NUM_LOGIT_BIAS_TOKENS in "
            "vllm/v1/worker/gpu/sample/logit_bias.py); give the model folder the tokenizer it was trained with"
        )
    return dict.fromkeys(ids, float("-inf"))


def image_args(folder: Path, image_size: int) -> dict[str, Any]:
    """The engine arguments of a Qwen2.5-VL folder for images of `image_size` (module docstring)."""
    from transformers import Qwen2VLImageProcessorPil
    from vllm.engine.arg_utils import EngineArgs

    processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
    args: dict[str, Any] = {"mm_processor_kwargs": {"size": image_size_bounds(processor, image_size)}}
    if "mm_device_do_normalize" in {f.name for f in dataclasses.fields(EngineArgs)}:
        args["mm_device_do_normalize"] = False
    return args
