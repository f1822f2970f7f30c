"""Segmenters behind one protocol (encode an image once, decode many prompts in batches).

- grabcut:  OpenCV GrabCut, weight-free (the default).
- hf-sam2:  transformers' Sam2Model from a Hugging Face folder.
- sam2:     Meta's sam2 package (SAM2ImagePredictor) from a .pt checkpoint + config name; needs torchvision.
"""

from __future__ import annotations

from reward_service.segmenters.protocol import (
    BaseSegmenter,
    ImageHandle,
    Segmenter,
    SegmenterUnavailable,
    union_mask,
)


def build_segmenter(
    kind: str,
    path: str | None = None,
    sam2_config: str | None = None,
    device: str = "auto",
    dummy: bool = False,
):
    """A Segmenter of `kind` (grabcut | hf-sam2 | sam2); heavy packages are imported only for the one built.
    `dummy` (segr1 preflight): SAM2 at its config's shape with random weights (hf-sam2: the folder's config.json;
    sam2: the config name, no checkpoint read)."""
    if kind == "grabcut":
        from reward_service.segmenters.grabcut import GrabCutSegmenter

        return GrabCutSegmenter()
    if kind == "hf-sam2":
        if not path:
            raise SegmenterUnavailable(
                "segmenter hf-sam2 needs a Hugging Face SAM2 folder (reward.segmenter_path)"
            )
        from reward_service.segmenters.hf_sam2 import HFSam2Segmenter

        if dummy:
            from reward_service.segmenters.hf_sam2 import random_model

            return HFSam2Segmenter(model=random_model(path), device=device)
        return HFSam2Segmenter(path, device=device)
    if kind == "sam2":
        if not path or not sam2_config:
            raise SegmenterUnavailable(
                "segmenter sam2 needs a .pt checkpoint (reward.segmenter_path) and a config name "
                "(reward.sam2_config, e.g. configs/sam2.1/sam2.1_hiera_l.yaml)"
            )
        from reward_service.segmenters.meta_sam2 import MetaSam2Segmenter

        return MetaSam2Segmenter(None if dummy else path, sam2_config, device=device)
    raise ValueError(f"unknown segmenter {kind!r}: use grabcut, hf-sam2 or sam2")


def build_segmenter_for(reward_cfg, device: str = "auto", dummy: bool = False):
    """build_segmenter from a RewardConfig."""
    cfg = reward_cfg
    return build_segmenter(cfg.segmenter, cfg.segmenter_path, cfg.sam2_config, device, dummy)


__all__ = [
    "BaseSegmenter",
    "ImageHandle",
    "Segmenter",
    "SegmenterUnavailable",
    "build_segmenter",
    "build_segmenter_for",
    "union_mask",
]
