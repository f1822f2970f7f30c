"""Model shapes for the memory plan (cluster/plan/memory.py): a policy's dimensions read from its config.json, or
from a small built-in table when model.policy is not a local folder (the shipped configs name folders on a cluster
volume that this machine cannot read), and the parameter counts computed from those shapes. No weights are read.

The table holds the numbers of the public config.json files of the models the shipped configs name
(Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct) and the tiny presets `segr1 models tiny` builds
(cluster/dev/tiny_models.py). Parameter counts follow the layout of transformers' Qwen2_5_VLForConditionalGeneration:
3.75e9 and 8.29e9 for the 3B and 7B models (tests/unit/cluster/plan/test_memory_plan.py checks the tiny ones against a real
model's numel).

SAM2 (the reward's segmenter): parameter counts of Meta's SAM2.1 releases by variant (tiny, small, base+, large),
recognised from a Hugging Face folder's config.json (the Hiera backbone's widths and depths), the sam2 config name
(configs/sam2.1/sam2.1_hiera_l.yaml) or the checkpoint's file name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ShapesError(ValueError):
    """The model's shapes cannot be found; the message says how to give them."""


@dataclass(frozen=True)
class PolicyShapes:
    """The dimensions of a Qwen2.5-VL policy that memory depends on (config.json names in comments)."""

    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    intermediate: int  # intermediate_size
    vocab: int  # vocab_size
    tie_embeddings: bool  # tie_word_embeddings
    vision_depth: int  # vision_config.depth
    vision_hidden: int  # vision_config.hidden_size
    vision_intermediate: int  # vision_config.intermediate_size
    patch: int = 14  # vision_config.patch_size
    merge: int = 2  # vision_config.spatial_merge_size
    temporal_patch: int = 2  # vision_config.temporal_patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _tiny(hidden, layers, heads, kv_heads, inter, vdepth, vhidden, vinter, merge=2) -> PolicyShapes:
    return PolicyShapes(
        hidden, layers, heads, kv_heads, inter, 512, False, vdepth, vhidden, vinter, merge=merge
    )


# The public config.json numbers (hub ids as keys); the tiny presets of cluster/dev/tiny_models.py PRESETS.
SHIPPED_SHAPES: dict[str, PolicyShapes] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": PolicyShapes(2048, 36, 16, 2, 11008, 151936, True, 32, 1280, 3420),
    "Qwen/Qwen2.5-VL-7B-Instruct": PolicyShapes(3584, 28, 28, 4, 18944, 152064, False, 32, 1280, 3420),
    "segr1/tiny-test": _tiny(64, 2, 2, 1, 128, 2, 32, 64),
    "segr1/tiny-demo": _tiny(128, 4, 4, 2, 256, 2, 64, 128, merge=4),
}


def from_config_json(cfg: dict) -> PolicyShapes:
    """PolicyShapes from a Qwen2.5-VL config.json (keys at the top level, or under text_config as transformers 5
    writes them)."""
    text = {**cfg, **cfg.get("text_config", {})}
    vision = cfg["vision_config"]
    return PolicyShapes(
        hidden=int(text["hidden_size"]),
        layers=int(text["num_hidden_layers"]),
        heads=int(text["num_attention_heads"]),
        kv_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
        intermediate=int(text["intermediate_size"]),
        vocab=int(text["vocab_size"]),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        vision_depth=int(vision["depth"]),
        vision_hidden=int(vision["hidden_size"]),
        vision_intermediate=int(vision["intermediate_size"]),
        patch=int(vision.get("patch_size", 14)),
        merge=int(vision.get("spatial_merge_size", 2)),
        temporal_patch=int(vision.get("temporal_patch_size", 2)),
    )


def _lookup(name: str) -> str | None:
    """The table key `name` (a hub id, its last part, or a path ending in it) stands for, or None."""
    wanted = name.rstrip("/").lower()
    for key in SHIPPED_SHAPES:
        short = key.split("/")[-1].lower()
        if wanted in (key.lower(), short) or wanted.endswith("/" + short):
            return key
    return None


def load_policy_shapes(path: str, assume: str | None = None) -> tuple[PolicyShapes, str]:
    """(shapes, where they came from): `path`/config.json when it is a local folder; else the built-in table entry
    `assume` names, or the one `path` names (a hub id or a folder called like one)."""
    config = Path(path) / "config.json"
    if assume is None and config.is_file():
        return from_config_json(json.loads(config.read_text())), f"{config}"
    key = _lookup(assume or path)
    if key is None:
        known = ", ".join(SHIPPED_SHAPES)
        if assume is not None:
            raise ShapesError(f"--model-shapes {assume!r} is none of the built-in shapes ({known})")
        raise ShapesError(
            f"model.policy={path} is not a local folder with a config.json and names none of the built-in "
            f"shapes ({known}); run where the folder is, or pass --model-shapes NAME (the model it holds, e.g. "
            "Qwen2.5-VL-7B-Instruct for a checkpoint of it)"
        )
    what = (
        "a tiny preset of cluster/dev/tiny_models.py"
        if key.startswith("segr1/")
        else "its public config.json"
    )
    return SHIPPED_SHAPES[key], f"built-in shapes of {key} ({what}; no local folder read)"


def param_counts(s: PolicyShapes) -> dict[str, int]:
    """Parameter counts by part: vision tower, decoder layers, embeddings (+ untied lm_head), the largest single
    block (what FSDP2 gathers at once) and the root (what no block holds), from the shapes alone."""
    h, i, kv = s.hidden, s.intermediate, s.kv_dim
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h  # q,k,v (bias), o, mlp, 2 norms
    vh, vi = s.vision_hidden, s.vision_intermediate
    block = (vh * 3 * vh + 3 * vh) + (vh * vh + vh) + 3 * (vh * vi) + 2 * vi + vh + 2 * vh
    merged = vh * s.merge**2
    patch_embed = 3 * s.temporal_patch * s.patch * s.patch * vh
    merger = vh + (merged * merged + merged) + (merged * h + h)
    vision = patch_embed + s.vision_depth * block + merger
    embed = s.vocab * h
    head = 0 if s.tie_embeddings else s.vocab * h
    out = {
        "vision": vision,
        "decoder_layers": s.layers * layer,
        "embeddings": embed + head + h,  # embed_tokens, lm_head (untied), final norm
        "max_block": max(layer, block),
        "root": embed + head + h + patch_embed + merger,  # outside every decoder layer and vision block
    }
    out["total"] = out["vision"] + out["decoder_layers"] + out["embeddings"]
    return out


def image_tokens(s: PolicyShapes, image_size: int) -> tuple[int, int]:
    """(patches the vision tower sees, image tokens the language model sees) for an image_size x image_size
    image, after the processor rounds each side to a multiple of patch x merge (Qwen's smart_resize)."""
    factor = s.patch * s.merge
    side = max(factor, round(image_size / factor) * factor)
    patches = (side // s.patch) ** 2
    return patches, patches // s.merge**2


# ----------------------------------------------------------------------------------------------------------------
# SAM2


@dataclass(frozen=True)
class Sam2Shapes:
    variant: str
    params: int  # Meta's SAM2.1 model card
    stage1_dim: int  # Hiera's first-stage width (stride 4)
    image_size: int = 1024


SAM2_VARIANTS: dict[str, Sam2Shapes] = {
    "tiny": Sam2Shapes("tiny", 38_900_000, 96),
    "small": Sam2Shapes("small", 46_000_000, 96),
    "base_plus": Sam2Shapes("base_plus", 80_800_000, 112),
    "large": Sam2Shapes("large", 224_400_000, 144),
}
# (first-stage width, blocks per stage) of each Hiera backbone, as the HF config.json writes them
_HIERA = {(96, (1, 2, 7, 2)): "tiny", (96, (1, 2, 11, 2)): "small", (112, (2, 3, 16, 3)): "base_plus"}
_HIERA[(144, (2, 6, 36, 4))] = "large"
_NAME_HINTS = (("hiera_t", "tiny"), ("tiny", "tiny"), ("hiera_s", "small"), ("small", "small"))
_NAME_HINTS += (("b+", "base_plus"), ("base", "base_plus"), ("hiera_l", "large"), ("large", "large"))


def _sam2_from_folder(folder: Path) -> Sam2Shapes | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    backbone = json.loads(config.read_text()).get("vision_config", {}).get("backbone_config", {})
    dims, blocks = backbone.get("embed_dim_per_stage"), backbone.get("blocks_per_stage")
    if not dims or not blocks:
        return None
    variant = _HIERA.get((int(dims[0]), tuple(int(b) for b in blocks)))
    if variant is not None:
        return SAM2_VARIANTS[variant]
    # not a released variant (the tiny test model): count what the config describes, roughly (Hiera blocks of
    # 12 d^2 parameters at each stage's width d)
    params = sum(12 * int(d) ** 2 * int(b) for d, b in zip(dims, blocks, strict=False))
    size = backbone.get("image_size", [1024])
    return Sam2Shapes("custom", params, int(dims[0]), int(size[0] if isinstance(size, list) else size))


def sam2_shapes(segmenter_path: str | None, sam2_config: str | None) -> tuple[Sam2Shapes, str]:
    """(shapes, where they came from) of the reward's SAM2."""
    if segmenter_path and (found := _sam2_from_folder(Path(segmenter_path))) is not None:
        return found, f"{segmenter_path}/config.json"
    for text in (sam2_config, segmenter_path):
        name = Path(text or "").name.lower()
        for hint, variant in _NAME_HINTS:
            if hint in name:
                return SAM2_VARIANTS[variant], f"SAM2.1 {variant} (named by {text})"
    raise ShapesError(
        f"reward.segmenter_path={segmenter_path} / reward.sam2_config={sam2_config}: cannot tell which SAM2 "
        "variant this is (tiny, small, base_plus, large); name it in the path or run where the folder is"
    )


def sam2_embedding_bytes(s: Sam2Shapes, dtype_bytes: int) -> int:
    """One image's cached features: the 256-channel embedding at stride 16 and the two high-resolution maps
    (32 channels at stride 4, 64 at stride 8) SAM2's decoder reads."""
    g = s.image_size
    elems = 256 * (g // 16) ** 2 + 32 * (g // 4) ** 2 + 64 * (g // 8) ** 2
    return elems * dtype_bytes


def sam2_encoder_working_bytes(s: Sam2Shapes, dtype_bytes: int) -> int:
    """The image encoder's largest transient for one image (no grad): the first Hiera stage's tokens at stride
    4, each holding its input, attention output and 4x MLP hidden (6 x width), plus the FPN's 256-channel map."""
    tokens = (s.image_size // 4) ** 2
    return tokens * (6 * s.stage1_dim + 256) * dtype_bytes
