"""Meta's `sam2` package (SAM2ImagePredictor, a .pt checkpoint + a config name) as a Segmenter.

For users with the original checkpoints (e.g. sam2.1_hiera_large.pt + configs/sam2.1/sam2.1_hiera_l.yaml). The
package is imported only when this segmenter is built; it needs torchvision, which the CPU machines must not have,
so there it fails with SegmenterUnavailable saying how to install it. transformers' Sam2Model (hf-sam2) runs the
same network without that dependency.

- encode_batch: `predictor.set_image_batch(images)` (RGB, HWC uint8; SAM2's own resize and normalisation), then
  the features of each image are kept in its handle;
- decode: the predictor's state is pointed at one handle, and its prompts go through `predictor.predict` in one
  call per token layout (same number of points, box or not: no padding), multimask_output=False, masks at the
  image's resolution thresholded at 0.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from protos import MaskPrompt
from reward_service.segmenters.protocol import BaseSegmenter, ImageHandle, SegmenterUnavailable

INSTALL_HINT = (
    "install it with `pip install --no-build-isolation 'segr1[sam2]'` on a machine with a working torchvision "
    "(a GPU machine; SAM2_BUILD_CUDA=0 skips its optional CUDA extension); on CPU-only machines, where torchvision "
    "breaks the CPU torch, use reward.segmenter=hf-sam2 (transformers' Sam2Model, no torchvision needed) or "
    "reward.segmenter=grabcut"
)


def import_sam2():
    """(build_sam2, SAM2ImagePredictor) from Meta's package, or SegmenterUnavailable naming the fix."""
    try:
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor
    except Exception as err:  # ImportError, or torchvision's own errors on a CPU torch
        raise SegmenterUnavailable(
            f"reward.segmenter=sam2 needs Meta's sam2 package, which cannot be imported here "
            f"({type(err).__name__}: {err}); {INSTALL_HINT}"
        ) from err
    return build_sam2, SAM2ImagePredictor


class MetaSam2Segmenter(BaseSegmenter):
    name = "sam2"

    def __init__(self, checkpoint: str | None, config_name: str, *, device: str = "auto"):
        """`checkpoint`: a .pt file; None builds the config's network with random weights (benchmarks)."""
        super().__init__()
        build_sam2, predictor_cls = import_sam2()
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model = build_sam2(config_name, checkpoint, device=device)
        except Exception as err:
            raise SegmenterUnavailable(
                f"cannot build SAM2 from reward.sam2_config={config_name!r} and "
                f"reward.segmenter_path={checkpoint!r}: {err}"
            ) from err
        self.device = device
        self.predictor = predictor_cls(model)

    def _autocast(self):
        import contextlib

        import torch

        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _encode_batch(self, images: list[np.ndarray]) -> list[ImageHandle]:
        import torch

        with torch.inference_mode(), self._autocast():
            self.predictor.set_image_batch([np.ascontiguousarray(im) for im in images])
        feats = self.predictor._features
        handles = []
        for i, im in enumerate(images):
            one = {
                "image_embed": feats["image_embed"][i : i + 1],
                "high_res_feats": [f[i : i + 1] for f in feats["high_res_feats"]],
            }
            handles.append(ImageHandle(height=im.shape[0], width=im.shape[1], payload=one))
        self.predictor.reset_predictor()
        return handles

    def _decode_batch(self, items: list[tuple[ImageHandle, list[MaskPrompt]]]) -> list[np.ndarray]:
        import torch

        out = []
        for handle, prompts in items:
            masks = np.zeros((len(prompts), handle.height, handle.width), dtype=bool)  # (N, H, W)
            buckets: dict[tuple[int, bool], list[int]] = defaultdict(list)
            for j, p in enumerate(prompts):
                buckets[(len(p.points), p.box is not None)].append(j)
            self._select(handle)
            with torch.inference_mode(), self._autocast():
                for (n_points, has_box), js in buckets.items():
                    masks[js] = self._predict([prompts[j] for j in js], n_points, has_box, handle)
                    self.decode_calls += 1
            self.predictor.reset_predictor()
            out.append(masks)
        return out

    def _select(self, handle: ImageHandle) -> None:
        p = self.predictor
        p.reset_predictor()
        p._features = handle.payload
        p._orig_hw = [(handle.height, handle.width)]
        p._is_image_set = True
        p._is_batch = False

    def _predict(
        self, prompts: list[MaskPrompt], n_points: int, has_box: bool, handle: ImageHandle
    ) -> np.ndarray:
        coords = np.array([p.points for p in prompts], dtype=np.float32) if n_points else None  # (M, n, 2)
        labels = np.array([p.labels for p in prompts], dtype=np.int32) if n_points else None  # (M, n)
        boxes = np.array([p.box for p in prompts], dtype=np.float32) if has_box else None  # (M, 4)
        masks, _, _ = self.predictor.predict(
            point_coords=coords, point_labels=labels, box=boxes, multimask_output=False, normalize_coords=True
        )
        return np.asarray(masks).reshape(len(prompts), handle.height, handle.width) > 0
