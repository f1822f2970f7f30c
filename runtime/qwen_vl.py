"""Loading a Qwen2.5-VL policy folder and encoding prompts, without torchvision.

transformers' default Qwen2.5-VL processor builds a video processor that needs torchvision, which cannot be
installed on the CPU machines. `SegR1Processor` is the same processor with images only: the PIL image processor
(`Qwen2VLImageProcessorPil`), the folder's tokenizer and its chat template. It reads the files of a real
Qwen2.5-VL-7B folder (preprocessor_config.json, tokenizer.json / vocab.json + merges.txt, tokenizer_config.json,
chat_template.json or chat_template.jinja) as well as the tiny folders of `cluster.dev.tiny_models`.

Used by the HF rollout engine (`encode_prompts` -> `model.generate`) and by the learner (`encode_prompt_ids`
of the prompt ids a rollout group carries, `append_completions` -> forward over prompt + completion, logprobs
of the completion tokens). Always pass `mm_token_type_ids` with
`image_grid_thw` to the model: without them Qwen2.5-VL cannot compute its 3D (mrope) positions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from runtime.images import ImageLike, load_image
from runtime.turns import expand_images

VISION_TOKENS: tuple[str, ...] = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
STOP_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")
# Keys of an encoded batch that the model's forward / generate take.
MODEL_INPUT_KEYS: tuple[str, ...] = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "pixel_values",
    "image_grid_thw",
)


class SegR1Processor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images only (no video processor, hence no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def _read_chat_template(folder: Path, tokenizer) -> str:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = folder / "chat_template.json"
    if js.is_file():
        template = json.loads(js.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str) and template:
            return template
    if isinstance(getattr(tokenizer, "chat_template", None), str) and tokenizer.chat_template:
        return tokenizer.chat_template
    raise FileNotFoundError(
        f"{folder}: no chat template (looked for chat_template.jinja, chat_template.json and "
        "tokenizer_config.json's chat_template); copy chat_template.json from the Qwen2.5-VL release"
    )


def resolve_folder(path: str | Path) -> Path:
    """A local folder as is; otherwise a hub id resolved through the local Hugging Face cache (or a download
    where the hub is reachable and HF_HUB_OFFLINE is unset)."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    text = str(path)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise FileNotFoundError(f"{path}: no such model folder; build one with `segr1 models tiny --out DIR`")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text))
    except Exception as err:
        raise FileNotFoundError(
            f"{path}: not a local folder and not in the Hugging Face cache ({type(err).__name__}); "
            "download it where the hub is reachable, or pass a local folder"
        ) from err


def load_processor(path: str | Path, size: dict[str, int] | None = None) -> SegR1Processor:
    """The image-only processor of a Qwen2.5-VL folder (tiny or real) or cached hub id; tokenizer pads left.
    `size` ({"shortest_edge", "longest_edge"} in pixels) replaces the folder's (vLLM's `mm_processor_kwargs`)."""
    folder = resolve_folder(path)
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"{folder}/preprocessor_config.json not found: `path` must be a local Qwen2.5-VL folder "
            "(e.g. one written by `segr1 models tiny --out DIR`, then DIR/policy)"
        )
    # as min_pixels / max_pixels: a preprocessor_config.json that has those keys overrides a `size` argument
    keys = (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels"))
    bounds = {arg: (size or {}).get(edge) for edge, arg in keys}
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(
        str(folder), **{k: v for k, v in bounds.items() if v is not None}
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    missing = [t for t in (*VISION_TOKENS, *STOP_TOKENS) if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"{folder}: tokenizer lacks the Qwen2.5-VL special tokens {missing}")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    template = _read_chat_template(folder, tokenizer)
    return SegR1Processor(image_processor, tokenizer, chat_template=template)


# Files besides the weights that make a policy folder loadable by load_processor / vLLM / AutoProcessor.
PROCESSOR_FILES: tuple[str, ...] = (
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


def copy_processor_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer / processor / chat-template / generation files of policy folder `src` into `dst`
    (a checkpoint written with `model.save_pretrained(dst)`), so `dst` is a complete Hugging Face folder.
    Returns the names copied."""
    import shutil

    src_dir, dst_dir = resolve_folder(src), Path(dst)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in PROCESSOR_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
            copied.append(name)
    return copied


def vision_token_ids(tokenizer) -> list[int]:
    """Ids of the vision special tokens, to suppress while sampling (a random model would emit them)."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[t] for t in VISION_TOKENS if t in vocab)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a completion: <|im_end|> (the chat turn end) and <|endoftext|>."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in STOP_TOKENS if t in vocab]


def suppress_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Vision tokens plus the ids the model has but the tokenizer does not (Qwen pads its embedding matrix)."""
    return vision_token_ids(tokenizer) + list(range(len(tokenizer), vocab_size))


def image_size_bounds(image_processor, image_size: int) -> dict[str, int]:
    """The image processor's `size` (min pixels `shortest_edge`, max pixels `longest_edge`) for vLLM's
    `mm_processor_kwargs`: the processor's own minimum, and as maximum the pixels an `image_size` x `image_size`
    image (what `runtime.images.resize_for_policy` makes) has after the processor's rounding to whole merged
    patches (768 -> 756 x 756: 729 tokens with merge 2; a plain image_size**2 would shrink 770 -> 756 instead of
    784). Every image the policy sees keeps the grid the learner computes with the processor's defaults, and vLLM
    profiles the vision encoder at that image, not at the default maximum (12,845,056 pixels: 16,384 tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    size = image_processor.size
    lo, hi = int(size["shortest_edge"]), int(size["longest_edge"])
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)
    h, w = smart_resize(image_size, image_size, factor=factor, min_pixels=lo, max_pixels=hi)
    return {"shortest_edge": lo, "longest_edge": h * w}


RowImages = ImageLike | Sequence[ImageLike]
"""The images of one prompt row: one image, or several in the order their placeholders appear in the row (a
conversation that shows the policy a new picture in a later turn)."""


def _row_images(images: Sequence[RowImages], rows: int, what: str) -> tuple[list[Image.Image], list[int]]:
    """Every row's images flattened in order (PIL), and how many each row holds."""
    if len(images) != rows:
        raise ValueError(
            f"{len(images)} image entries but {rows} {what}; give one image (or list of images) per row"
        )
    if not rows:
        raise ValueError(f"no rows: give at least one of the {what}")
    flat, counts = [], []
    for entry in images:
        row = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        if not row:
            raise ValueError("a row with an empty list of images: give each row at least one image")
        flat += [load_image(im) for im in row]
        counts.append(len(row))
    return flat, counts


def encode_prompts(
    processor: SegR1Processor,
    images: Sequence[RowImages],
    messages_list: Sequence[list[dict]],
) -> dict[str, Any]:
    """One row per (images, messages), left-padded for generation.

    Returns a dict of tensors: input_ids (B, T), attention_mask (B, T), mm_token_type_ids (B, T),
    pixel_values (P, C*2*14*14) (the patches of all images, row after row), image_grid_thw (I, 3) (one per image),
    images_per_row (B,) and prompt_lengths (B,) (unpadded prompt length of each row). Images go in as given:
    resize them first with `runtime.images.resize_for_policy`. Pass `model_inputs(batch)` to the model.
    """
    pil, counts = _row_images(images, len(messages_list), "message lists")
    texts = [
        processor.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True)
        for m in messages_list
    ]
    enc = processor(images=pil, text=texts, padding=True, padding_side="left", return_tensors="pt")
    batch = {k: enc[k] for k in MODEL_INPUT_KEYS if k in enc}
    batch["images_per_row"] = torch.tensor(counts, dtype=torch.long)  # (B,)
    batch["prompt_lengths"] = batch["attention_mask"].sum(dim=1)  # (B,)
    return batch


def unpadded_ids(batch: dict[str, Any]) -> list[list[int]]:
    """The token ids of each row of an encoded batch without its padding (a group's prompt_token_ids)."""
    return [
        ids[mask.bool()].tolist()
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)  # (T,) each
    ]


def encode_prompt_ids(
    processor: SegR1Processor,
    images: Sequence[RowImages],
    prompt_ids: Sequence[Sequence[int]],
    *,
    collapsed: bool = False,
) -> dict[str, Any]:
    """`encode_prompts` for prompts a rollout engine already tokenized (RolloutGroup.prompt_token_ids: chat
    template applied, image tokens expanded): the ids left-padded as given, each row's images through the
    processor's image processor. Same keys and shapes as `encode_prompts`. Whether a row's image tokens match its
    images is the caller's check (`image_token_counts` vs `expected_row_image_tokens`). `collapsed`: the ids hold
    one placeholder per image (runtime.turns.next_turn_ids), expanded here to each image's token count."""
    pil, counts = _row_images(images, len(prompt_ids), "prompts")
    vision = processor.image_processor(images=pil, return_tensors="pt")
    if collapsed:
        per_image, bounds = expected_image_tokens(processor, vision["image_grid_thw"]), _offsets(counts)
        prompt_ids = [
            expand_images(ids, processor.image_token_id, per_image[bounds[r] : bounds[r + 1]])
            for r, ids in enumerate(prompt_ids)
        ]
    n, width = len(prompt_ids), max(len(p) for p in prompt_ids)
    input_ids = torch.full((n, width), int(processor.tokenizer.pad_token_id), dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((n, width), dtype=torch.long)  # (B, T)
    for r, ids in enumerate(prompt_ids):
        input_ids[r, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[r, width - len(ids) :] = 1
    types = torch.as_tensor(
        processor.create_mm_token_type_ids(input_ids.tolist()), dtype=torch.long
    )  # (B, T)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": types,
        "pixel_values": vision["pixel_values"],  # (P, C*2*14*14)
        "image_grid_thw": vision["image_grid_thw"],  # (I, 3)
        "images_per_row": torch.tensor(counts, dtype=torch.long),  # (B,)
        "prompt_lengths": attention_mask.sum(dim=1),  # (B,)
    }


def image_token_counts(processor: SegR1Processor, batch: dict[str, Any]) -> list[int]:
    """How many image tokens each row of an encoded batch holds."""
    return (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist()


def expected_image_tokens(processor: SegR1Processor, image_grid_thw: torch.Tensor) -> list[int]:
    """Image tokens the model needs for each image of image_grid_thw (B, 3): its patches / merge_size^2."""
    merge = int(processor.image_processor.merge_size)
    return [int(n) // merge**2 for n in image_grid_thw.prod(dim=1).tolist()]


def expected_row_image_tokens(processor: SegR1Processor, batch: dict[str, Any]) -> list[int]:
    """Image tokens each row of an encoded batch needs: the sum over its images (`expected_image_tokens`)."""
    per_image = expected_image_tokens(processor, batch["image_grid_thw"])
    bounds = _offsets(_images_per_row(batch))
    return [sum(per_image[bounds[r] : bounds[r + 1]]) for r in range(len(bounds) - 1)]


def model_inputs(batch: dict[str, Any], device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The keys of an encoded batch that the model takes (drops prompt_lengths, completion_mask, ...)."""
    out = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out


def _offsets(counts: Sequence[int]) -> list[int]:
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + int(c))
    return offsets


def _images_per_row(batch: dict[str, Any]) -> list[int]:
    """How many images each row holds (a batch without images_per_row: one each)."""
    if "images_per_row" in batch:
        return batch["images_per_row"].tolist()
    return [1] * int(batch["image_grid_thw"].shape[0])


def select_rows(batch: dict[str, Any], index: Sequence[int]) -> dict[str, Any]:
    """Rows `index` of an encoded prompt batch (repeats allowed, e.g. each prompt G times), with their images:
    image_grid_thw rows and pixel_values patches of each selected row's images, in row order."""
    idx = torch.as_tensor(list(index), dtype=torch.long)
    out: dict[str, Any] = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "prompt_lengths", "images_per_row"):
        if key in batch:
            out[key] = batch[key][idx]
    if "image_grid_thw" in batch:
        rows = _offsets(_images_per_row(batch))  # row r holds images rows[r] .. rows[r+1]-1
        images = [i for r in idx.tolist() for i in range(rows[r], rows[r + 1])]
        out["image_grid_thw"] = batch["image_grid_thw"][torch.as_tensor(images, dtype=torch.long)]
        if "pixel_values" in batch:
            patches = _offsets(batch["image_grid_thw"].prod(dim=1).tolist())
            out["pixel_values"] = torch.cat(
                [batch["pixel_values"][patches[i] : patches[i + 1]] for i in images]
            )
    return out


def append_completions(
    prompts: dict[str, Any],
    completions: Sequence[Sequence[int]],
    prompt_index: Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> dict[str, Any]:
    """Prompt + completion rows for recomputing logprobs (learner) or SFT, left-padded like generation.

    `prompts` is an `encode_prompts` batch; completion i belongs to prompt row `prompt_index[i]` (default: i).
    Returns input_ids (N, T), attention_mask (N, T), mm_token_type_ids (N, T), pixel_values, image_grid_thw
    (one row per image), images_per_row (N,), prompt_lengths (N,), completion_lengths (N,) and completion_mask
    (N, T) (1 on completion tokens).
    The logits predicting completion token t sit at position t-1: logits[:, :-1] vs input_ids[:, 1:] masked by
    completion_mask[:, 1:].
    """
    n = len(completions)
    index = list(range(n)) if prompt_index is None else list(prompt_index)
    if len(index) != n:
        raise ValueError(f"{n} completions but {len(index)} prompt_index entries; give one per completion")
    rows = select_rows(prompts, index)
    p_ids, p_mask, p_type = rows["input_ids"], rows["attention_mask"], rows.get("mm_token_type_ids")
    seqs, types = [], []
    for r, comp in enumerate(completions):
        keep = p_mask[r].bool()  # drop the prompt's left padding
        c = torch.as_tensor(list(comp), dtype=p_ids.dtype)
        seqs.append((p_ids[r][keep], c))
        if p_type is not None:
            types.append(p_type[r][keep])
    width = max(len(p) + len(c) for p, c in seqs)
    input_ids = torch.full((n, width), pad_token_id, dtype=p_ids.dtype)  # (N, T)
    attention_mask = torch.zeros((n, width), dtype=p_mask.dtype)  # (N, T)
    completion_mask = torch.zeros((n, width), dtype=p_mask.dtype)  # (N, T)
    mm_types = torch.zeros((n, width), dtype=p_type.dtype) if p_type is not None else None  # (N, T)
    for r, (p, c) in enumerate(seqs):
        start = width - len(p) - len(c)
        input_ids[r, start:] = torch.cat([p, c])
        attention_mask[r, start:] = 1
        completion_mask[r, start + len(p) :] = 1
        if mm_types is not None:
            mm_types[r, start : start + len(p)] = types[r]
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if mm_types is not None:
        out["mm_token_type_ids"] = mm_types
    for key in ("pixel_values", "image_grid_thw", "images_per_row", "prompt_lengths"):
        if key in rows:
            out[key] = rows[key]
    out["completion_lengths"] = torch.tensor([len(c) for _, c in seqs], dtype=torch.long)  # (N,)
    return out


def encode_episodes(
    processor: SegR1Processor,
    images: Sequence[RowImages],
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """`append_completions` for episodes of several turns (protos.Completion with a policy_mask): row r is
    prompt_ids[r] + completions[r] as the engine fed and generated them (every image's tokens expanded, the
    pictures shown between answers among the completion's tokens), with images[r] all of its images in order.
    completion_mask is 1 only where loss_masks[r] is (the policy's answers), completion_lengths the whole
    completion region, so the learner's right-aligned window covers every turn."""
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completions, strict=True)]
    out = encode_prompt_ids(processor, images, rows)
    width = out["input_ids"].shape[1]
    completion_mask = torch.zeros_like(out["attention_mask"])  # (N, W)
    for r, (comp, mask) in enumerate(zip(completions, loss_masks, strict=True)):
        if len(mask) != len(comp):
            raise ValueError(
                f"episode row {r}: {len(mask)} loss-mask entries for {len(comp)} completion tokens"
            )
        completion_mask[r, width - len(comp) :] = torch.as_tensor(list(mask), dtype=completion_mask.dtype)
    out["completion_mask"] = completion_mask
    out["prompt_lengths"] = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)  # (N,)
    out["completion_lengths"] = torch.tensor([len(c) for c in completions], dtype=torch.long)  # (N,)
    return out


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """'auto': bfloat16 on CUDA, float32 elsewhere; or one of float32 / bfloat16 / float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r} is not one of auto, {', '.join(names)}")
    return names[dtype]


def load_policy(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    dummy: bool = False,
    **kwargs: Any,
):
    """Qwen2_5_VLForConditionalGeneration.from_pretrained(path), the same call that loads Qwen2.5-VL-7B.

    `kwargs` go to from_pretrained (e.g. attn_implementation="sdpa"). Returned in eval mode on `device`; the
    learner calls `.train()` itself. `dummy`: built from config.json alone with random weights, directly on
    `device` (`segr1 preflight`: the real shapes without downloading the weights)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder = resolve_folder(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder}/config.json not found: the policy must be a local Hugging Face folder "
            "(`segr1 models tiny --out DIR` writes DIR/policy)"
        )
    if dummy:
        return build_from_config(folder, Qwen2_5_VLForConditionalGeneration, dtype, device, **kwargs)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(folder), dtype=resolve_dtype(dtype, device), **kwargs
    )
    return model.to(device).eval()


def build_from_config(folder: Path, model_cls: Any, dtype, device, **kwargs: Any):
    """`model_cls` from the folder's config.json with random weights, allocated on `device` (meta: shapes
    only). Seeded by torch's global generator, so two builds in one seeded process are equal."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    # a model class has _from_config, an Auto class from_config
    build = getattr(model_cls, "_from_config", None) or model_cls.from_config
    with torch.device(device):
        model = build(config, dtype=resolve_dtype(dtype, device), **kwargs)
    return model.eval()


def config_weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor the folder's checkpoint holds (or would hold), derived from config.json
    alone: the model built on the meta device, under the names save_pretrained writes (checkpoint_names).
    What a weight update must carry when the folder has no weights (dummy weights)."""
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration

    from runtime.weights.layout import checkpoint_names

    folder = resolve_folder(path)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cls = Qwen2_5_VLForConditionalGeneration if "vision_config" in config else AutoModelForCausalLM
    model = build_from_config(folder, cls, "float32", "meta")
    names = checkpoint_names(model)
    return {names[n]: tuple(p.shape) for n, p in model.named_parameters()}
