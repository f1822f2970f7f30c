"""The policy wrapper: log-probabilities of completion tokens given image + prompt, for a Qwen2.5-VL HF folder.

GRPO prompts are the token ids the rollout engine generated after (RolloutGroup.prompt_token_ids), so the
learner scores each completion after exactly the prompt it was sampled from; only the image is processed again
(resized to NxN, PolicySpec.image_size, for pixel_values / image_grid_thw). A prompt whose image tokens do not
match its image is refused with an error naming the sample. Where no rollout made the prompt (SFT, synthetic
groups) it is rendered as the rollout workers render it (protos/answer.py + runtime/qwen_vl.py):
`PolicySpec.prompt.messages(instruction, task, answer_format, image_size)` and the folder's chat template. Tokens
are scored at the temperature they were sampled at (log softmax(logits / T), T carried by each RolloutGroup), over
the tokens the rollout engines may sample (the vision special tokens and the ids the tokenizer lacks are
suppressed, as in actors/engine.py), so the learner's logprobs and the engine's behaviour logprobs compare like
with like.

Precision: the trained parameters are float32 master weights; on a GPU the forward runs under bf16 autocast
(learner.precision auto|bf16), so a 1e-6 update is not lost to bf16 rounding. The frozen reference (only loaded
when grpo.beta > 0) is kept in model.dtype (bf16 on GPU). Weights are exported to the rollout workers in the
rollout engine's dtype. Vision features are computed once per image and shared by the G completions of a group
(when the installed transformers supports `mm_encoder_outputs`; not under FSDP2, see `shard`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from learner.config import LearnerConfig
from learner.grpo import masked_logprobs_from_logits
from learner.sharding import shard_model
from learner.weights_io import iter_weights
from protos import Completion, Sample
from protos.config import PolicySpec
from runtime.images import resize_for_policy
from runtime.qwen_vl import (
    append_completions,
    encode_episodes,
    encode_prompt_ids,
    encode_prompts,
    expected_row_image_tokens,
    image_token_counts,
    load_policy,
    load_processor,
    resolve_dtype,
    suppress_token_ids,
    unpadded_ids,
)
from runtime.weights.layout import checkpoint_names

LORA_TARGETS_DEFAULT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def learner_device(learner: LearnerConfig, local_rank: int = 0) -> torch.device:
    if learner.num_gpus > 0:
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"learner.num_gpus={learner.num_gpus} but CUDA is not available in the learner process; "
                "set learner.num_gpus=0 to train on CPU, or give the learner actor a GPU (learner.resources.num_gpus)"
            )
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def compute_dtype(learner: LearnerConfig, device: torch.device) -> torch.dtype:
    """Autocast dtype of the forward: bf16 on GPU (auto|bf16), float32 on CPU (auto) or when asked (fp32)."""
    if learner.precision == "fp32":
        return torch.float32
    if learner.precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def render_prompt(sample: Sample, policy: PolicySpec) -> tuple[Any, list[dict]]:
    """(image, messages) exactly as the rollout workers render them (the policy's prompt set, the sample's task)."""
    size = policy.image_size
    messages = policy.prompt.messages(sample.instruction, sample.task, policy.answer_format, size)
    return resize_for_policy(sample.image, size), messages


def right_align(rows: Sequence[Sequence[float]], width: int, fill: float = 0.0) -> torch.Tensor:
    """Per-completion values (e.g. behaviour logprobs) right-aligned in (N, width), like completion tokens."""
    out = torch.full((len(rows), width), fill, dtype=torch.float32)  # (N, T)
    for r, vals in enumerate(rows):
        if len(vals):
            out[r, width - len(vals) :] = torch.as_tensor(list(vals), dtype=torch.float32)
    return out


def _has_mm_encoder_outputs(model) -> bool:
    return "mm_encoder_outputs" in inspect.signature(model.forward).parameters


class Policy:
    """The trained model (+ optional frozen reference) and how to score completions with it."""

    def __init__(
        self,
        spec: PolicySpec,
        learner: LearnerConfig | None = None,
        device: torch.device | None = None,
        load_reference: bool = False,
        load_device: torch.device | None = None,
    ):
        """load_device: where the weights are loaded (default: device). A sharded learner loads on the CPU and
        fully_shard moves each unit's shards to `device`, so a GPU never holds the whole model (see shard)."""
        learner = learner or LearnerConfig()
        self.spec = spec
        self.device = device if device is not None else learner_device(learner)
        self.compute_dtype = compute_dtype(learner, self.device)
        self.processor = load_processor(spec.path)
        self.pad_token_id = int(self.processor.tokenizer.pad_token_id)
        load_device = load_device or self.device
        dummy = spec.dummy_weights  # segr1 preflight: random weights at the config's shapes (seeded)
        if dummy:
            torch.manual_seed(spec.seed)
        self.model = load_policy(spec.path, dtype=torch.float32, device=load_device, dummy=dummy).train()
        self.model.config.use_cache = False
        if learner.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._names = checkpoint_names(self.model)  # in-memory -> checkpoint names, taken before LoRA wraps
        self.lora = learner.lora_rank > 0
        if self.lora:
            self.model = _apply_lora(self.model, learner)
        self.reference = None
        if load_reference and not (
            self.lora and spec.reference is None
        ):  # LoRA: the base model IS the reference
            ref_dtype = resolve_dtype(spec.dtype, self.device)
            if dummy:
                torch.manual_seed(spec.seed)
            ref = spec.reference or spec.path
            self.reference = load_policy(ref, dtype=ref_dtype, device=load_device, dummy=dummy)
            self.reference.requires_grad_(False)
        self.share_vision = _has_mm_encoder_outputs(self.model)
        # the ids the rollout engines never sample (actors/engine.py): scoring over the same support keeps the
        # behaviour weights pi_old / pi_behaviour free of the probability mass a policy puts on them
        vocab = self.model.config.get_text_config().vocab_size
        suppress = suppress_token_ids(self.processor.tokenizer, vocab)
        self.suppress_ids = torch.tensor(suppress, dtype=torch.long, device=self.device)  # (S,)

    # -- prompts ---------------------------------------------------------------------------------------------
    def encode(
        self, samples: Sequence[Sample], prompt_ids: Sequence[Sequence[int]] | None = None
    ) -> dict[str, Any]:
        """One prompt row per sample (encode_prompts' keys), images resized as the rollout workers do.

        `prompt_ids[i]`: the token ids sample i's completions were sampled after (its group's
        prompt_token_ids); None renders the prompts here (SFT, synthetic groups)."""
        if prompt_ids is None:
            rendered = [render_prompt(s, self.spec) for s in samples]
            return encode_prompts(self.processor, [r[0] for r in rendered], [r[1] for r in rendered])
        images = [resize_for_policy(s.image, self.spec.image_size) for s in samples]
        batch = encode_prompt_ids(self.processor, images, prompt_ids)
        self._check_image_tokens(samples, batch)
        return batch

    def prompt_ids(self, samples: Sequence[Sample]) -> list[list[int]]:
        """The prompt token ids this learner renders for each sample (what a rollout worker on the same policy
        folder and image_size stamps on its groups)."""
        return unpadded_ids(self.encode(samples))

    def _check_image_tokens(self, samples: Sequence[Sample], batch: dict[str, Any]) -> None:
        found = image_token_counts(self.processor, batch)
        needed = expected_row_image_tokens(self.processor, batch)
        for s, f, n in zip(samples, found, needed, strict=True):
            if f != n:
                raise ValueError(
                    f"sample {s.id!r}: the rollout prompt holds {f} image tokens but the learner's processor "
                    f"makes {n} for its image ({self.spec.path} at image_size {self.spec.image_size}); the "
                    "rollout workers and the learner must load the same policy folder (model.policy) and "
                    "resize images to the same data.image_size"
                )

    def batch(self, prompts: dict, completions: Sequence[Sequence[int]], prompt_index: Sequence[int]) -> dict:
        """Prompt + completion rows (N, W), left-padded; completion tokens are the last ones of each row."""
        out = append_completions(prompts, completions, prompt_index, pad_token_id=self.pad_token_id)
        if "images_per_row" not in out or bool((out["images_per_row"] == 1).all()):  # vision shared per image
            out["image_key"] = torch.as_tensor(
                list(prompt_index), dtype=torch.long
            )  # (I,) which prompt's image
        return out

    def episode_batch(
        self,
        samples: Sequence[Sample],
        prompt_ids: Sequence[Sequence[int]],
        completions: Sequence[Completion],
    ) -> dict:
        """`batch` for episodes of several turns (runtime.qwen_vl.encode_episodes): row r is completion r after
        its group's prompt (`prompt_ids[r]`, sample r's image), with the pictures the episode showed; the loss
        mask covers the policy's answers only."""
        size = self.spec.image_size
        images = [
            [resize_for_policy(s.image, size), *c.pictures] for s, c in zip(samples, completions, strict=True)
        ]
        batch = encode_episodes(
            self.processor,
            images,
            prompt_ids,
            [c.token_ids for c in completions],
            [c.loss_mask for c in completions],
        )
        self._check_image_tokens(samples, batch)
        # the vision tower once per distinct image: a group's rows share their sample's image (a negative key),
        # each picture shown is its own
        sample_key = {s.id: -1 - k for k, s in enumerate(samples)}
        keys: list[int] = []
        for s, row in zip(samples, images, strict=True):
            keys += [sample_key[s.id], *range(len(keys), len(keys) + len(row) - 1)]
        batch["image_key"] = torch.as_tensor(keys, dtype=torch.long)  # (I,)
        return batch

    # -- scoring ---------------------------------------------------------------------------------------------
    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def logprobs(
        self, batch: dict, model=None, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs (N, T), mask (N, T)) of the completion tokens of `batch` at the sampling `temperature`,
        right-aligned, T = longest completion. Gradients flow when called outside no_grad. A batch of episodes
        (`episode_slots`) runs the lm_head only where the policy answered: its pictures and user turns, most of
        an episode's tokens, never become vocab-wide logits."""
        model = self.model if model is None else model
        t = int(batch["completion_lengths"].max()) if len(batch["completion_lengths"]) else 0
        n = batch["input_ids"].shape[0]
        if t == 0:
            empty = torch.zeros((n, 0), device=self.device)
            return empty, empty
        inputs = self._model_inputs(batch, model)
        mask = batch["completion_mask"][:, -t:].to(self.device, torch.float32)  # (N, T)
        tokens = inputs["input_ids"][:, -t:]  # (N, T)
        slots = episode_slots(mask)  # (N, K) or None
        with self.autocast(), _lm_head_at(model, slots):
            out = model(**inputs, logits_to_keep=t + 1, use_cache=False)
        if slots is None:
            logits = out.logits[:, :-1]  # (N, T, V): position W-T-1+j predicts completion slot j
            logp = masked_logprobs_from_logits(logits, tokens, temperature, self.suppress_ids)  # (N, T)
        else:  # out.logits (N, K, V): slot slots[r, k]'s
            picked = masked_logprobs_from_logits(
                out.logits, tokens.gather(1, slots), temperature, self.suppress_ids
            )
            keep = mask.gather(1, slots) > 0  # (N, K): the padding of rows with fewer answer tokens adds 0
            logp = torch.zeros_like(mask).scatter_add(
                1, slots, torch.where(keep, picked, torch.zeros_like(picked))
            )
        # padding slots hold -inf (a suppressed pad id) or NaN (a fully masked attention row): zero them, so a
        # masked sum (x * mask) is the sum over real tokens, not NaN (their gradient was already 0)
        return torch.where(mask > 0, logp, torch.zeros_like(logp)), mask

    @torch.no_grad()
    def reference_logprobs(self, batch: dict, temperature: float = 1.0) -> torch.Tensor:
        """(N, T) logprobs under the frozen reference (the LoRA base model when LoRA is on)."""
        if self.reference is not None:
            return self.logprobs(batch, self.reference, temperature)[0]
        if self.lora:
            with self.model.disable_adapter():
                return self.logprobs(batch, temperature=temperature)[0]
        raise RuntimeError("reference_logprobs: no reference model was loaded (grpo.beta == 0)")

    def _model_inputs(self, batch: dict, model) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")
        inputs = {k: batch[k].to(self.device) for k in keys if k in batch}
        if "pixel_values" not in batch:
            return inputs
        pixels = batch["pixel_values"].to(self.device)
        if not (self.share_vision and "image_key" in batch):
            inputs["pixel_values"] = pixels
            return inputs
        inputs["mm_encoder_outputs"] = {"image": self._shared_image_features(batch, pixels, model)}
        return inputs

    def _shared_image_features(self, batch: dict, pixels: torch.Tensor, model):
        """Vision tower once per distinct image of the micro-batch (`image_key`, one per image: the rows of one
        group share their sample's image); every image gets its features, in the batch's order."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        grid = batch["image_grid_thw"].to(self.device)  # (I, 3)
        counts = grid.prod(dim=1).tolist()
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + int(c))
        first: dict[int, int] = {}
        for image, key in enumerate(batch["image_key"]):
            first.setdefault(int(key), image)
        picked = list(first.values())
        uniq_pixels = torch.cat([pixels[offsets[i] : offsets[i + 1]] for i in picked])  # (P', C*2*14*14)
        with self.autocast():
            feats = model.get_image_features(uniq_pixels, grid[picked], return_dict=True).pooler_output
        by_key = {key: feats[j] for j, key in enumerate(first)}
        return BaseModelOutputWithPooling(pooler_output=tuple(by_key[int(k)] for k in batch["image_key"]))

    # -- weights ---------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def hf_model(self):
        """The transformers model itself (under LoRA: the base model, adapters injected; see named_weights)."""
        return self.model.get_base_model() if self.lora else self.model

    def checkpoint_name(self, name: str) -> str:
        """The saved model.safetensors name of an in-memory parameter name (of the model before LoRA)."""
        return self._names[name]

    def named_weights(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, full tensor in `dtype`) of every parameter, one at a time (learner/weights_io.py:
        a collective under FSDP2, every rank must exhaust it). LoRA: the adapters merged in."""
        return iter_weights(self, dtype)

    def shard(self, world_size: int) -> None:
        """FSDP2 over the default process group (learner/sharding.py): the policy and the reference."""
        mixed = self.device.type == "cuda" and self.compute_dtype == torch.bfloat16
        shard_model(self.model, self.device, world_size, mixed_precision=mixed)
        # the vision tower then runs inside the root forward, once per row: FSDP2 must see the root's forward
        # first (its lazy init, and on CUDA its stream waits on the optimiser step) before any unit's forward
        self.share_vision = False
        if self.reference is not None:
            shard_model(self.reference, self.device, world_size, mixed_precision=False)


# ------------------------------------------------------------------------------------------------------------
# Optional LoRA (peft), imported lazily


def _require_peft():
    try:
        import peft
    except ImportError as err:
        raise RuntimeError(
            "learner.lora_rank > 0 needs the `peft` package, which is not installed; "
            "`pip install -c constraints.txt peft`, or set learner.lora_rank=0 for full fine-tuning"
        ) from err
    return peft


def _apply_lora(model, learner: LearnerConfig):
    peft = _require_peft()
    lcfg = peft.LoraConfig(
        r=learner.lora_rank,
        lora_alpha=learner.lora_alpha,
        target_modules=list(LORA_TARGETS_DEFAULT),
        lora_dropout=0.0,
        bias="none",
    )
    return peft.get_peft_model(model, lcfg)


def episode_slots(mask: torch.Tensor) -> torch.Tensor | None:
    """The completion slots a batch's logits are needed at, when that saves work: (N, K) slot indices, each row's
    loss-masked slots first in order (then slots it does not need, as padding), K = the most any row needs; None
    when the masked slots fill each row's completion (answers of one turn): every slot is scored."""
    m = mask > 0  # (N, T)
    counts = m.sum(1)
    span = m.int().cumsum(1).gt(0).sum(1)  # slots from each row's first masked one to the window's end
    if bool((counts == span).all()):
        return None
    k = int(counts.max())
    return torch.argsort((~m).int(), dim=1, stable=True)[:, :k]  # (N, K)


@contextlib.contextmanager
def _lm_head_at(model, slots: torch.Tensor | None):
    """While active, the model's lm_head sees only the hidden states of `slots` (N, K) (None: all of them)."""
    if slots is None:
        yield
        return

    def pick(_module, args):
        hidden = args[0]  # (N, T + 1, H): the window logits_to_keep kept
        return (hidden.gather(1, slots[..., None].expand(-1, -1, hidden.shape[-1])), *args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()
