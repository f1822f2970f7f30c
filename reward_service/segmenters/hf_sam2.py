"""transformers' Sam2Model as a Segmenter: any Hugging Face SAM2 folder (a tiny one in tests, SAM2.1-large on a
cluster). Sam2Processor needs torchvision, so the pre- and post-processing are done here, on the model's device:

- image: (H, W, 3) uint8 RGB -> float, bilinear (antialiased) resize to S x S (S = the model's input size, 1024
  for SAM2.1, aspect ratio not kept, as SAM2 does), / 255, normalised with the folder's image_mean / image_std
  (ImageNet's by default);
- prompts: x * S / W, y * S / H for points and box corners; labels 1 / 0;
- masks: the decoder's low-resolution logits, bilinearly upsampled to (H, W), > mask_threshold (0.0).

Batching: `encode_batch` runs the image encoder on up to `encode_batch_size` images at a time; `decode_batch`
decodes every prompt of every image together, `decode_batch_size` prompts per decoder call. Prompts are grouped by
their token layout (number of points, box or not) so that no padding token is ever added: a padded prompt would
get a (slightly) different mask than the same prompt alone, and a completion's reward must not depend on the
other completions of its group.

On CUDA the encoder and decoder run under bf16 autocast with SDPA attention (attn_implementation="sdpa") and
torch.inference_mode; on CPU in float32.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from protos import MaskPrompt
from reward_service.segmenters.protocol import BaseSegmenter, ImageHandle, SegmenterUnavailable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HFSam2Segmenter(BaseSegmenter):
    name = "hf-sam2"

    def __init__(
        self,
        path: str | None = None,
        *,
        model=None,
        device: str = "auto",
        dtype: str = "auto",
        encode_batch_size: int | None = None,
        decode_batch_size: int | None = None,
        mask_threshold: float = 0.0,
    ):
        super().__init__()
        import torch

        if (path is None) == (model is None):
            raise ValueError(
                "HFSam2Segmenter needs exactly one of path (a Hugging Face SAM2 folder) or model"
            )
        self.device = torch.device(_resolve_device(device))
        cuda = self.device.type == "cuda"
        self.amp_dtype = _resolve_amp_dtype(dtype, cuda)
        self.model = model if model is not None else _load_model(path)
        self.model.to(self.device).eval()
        self.size = int(self.model.config.prompt_encoder_config.image_size)
        mean, std = _normalisation(path)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)  # (1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.encode_batch_size = encode_batch_size or (16 if cuda else 1)
        self.decode_batch_size = decode_batch_size or (128 if cuda else 16)
        self.mask_threshold = mask_threshold

    # -- encode --------------------------------------------------------------------------------------------------
    def _encode_batch(self, images: list[np.ndarray]) -> list[ImageHandle]:
        import torch

        handles: list[ImageHandle] = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(images), self.encode_batch_size):
                chunk = images[start : start + self.encode_batch_size]
                pixels = torch.cat([self._preprocess(im) for im in chunk])  # (B, 3, S, S)
                feats = self.model.get_image_embeddings(pixels)  # 3 levels, (B, C_l, h_l, w_l)
                for i, im in enumerate(chunk):
                    levels = [f[i : i + 1] for f in feats]  # (1, C_l, h_l, w_l) each
                    handles.append(ImageHandle(height=im.shape[0], width=im.shape[1], payload=levels))
        return handles

    def _preprocess(self, image: np.ndarray):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)  # (H, W, 3) uint8
        x = x.permute(2, 0, 1).unsqueeze(0).float()  # (1, 3, H, W)
        x = F.interpolate(
            x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        )
        return (x / 255.0 - self._mean) / self._std  # (1, 3, S, S)

    # -- decode --------------------------------------------------------------------------------------------------
    def _decode_batch(self, items: list[tuple[ImageHandle, list[MaskPrompt]]]) -> list[np.ndarray]:
        return [t.cpu().numpy() for t in self._decode_tensors(items)]

    def decode_batch_tensors(self, items) -> list:
        """decode_batch, but the masks stay torch bool tensors `(N_i, H_i, W_i)` on the model's device (so the
        reward worker can score them there without copying full-resolution masks to the host)."""
        import torch

        items = [(h, list(p)) for h, p in items]
        self.prompts_decoded += sum(len(p) for _, p in items)
        if not any(p for _, p in items):
            return [
                torch.zeros((0, h.height, h.width), dtype=torch.bool, device=self.device) for h, _ in items
            ]
        return self._decode_tensors(items)

    def _decode_tensors(self, items: list[tuple[ImageHandle, list[MaskPrompt]]]) -> list:
        import torch

        buckets: dict[tuple[int, bool], list[tuple[int, int]]] = defaultdict(list)
        for i, (_, prompts) in enumerate(items):
            for j, prompt in enumerate(prompts):
                buckets[(len(prompt.points), prompt.box is not None)].append((i, j))
        with torch.inference_mode(), self._autocast():
            out = [
                torch.zeros((len(p), h.height, h.width), dtype=torch.bool, device=self.device)
                for h, p in items
            ]
            levels = [torch.cat([h.payload[lv] for h, _ in items]) for lv in range(3)]  # (I, C_l, h_l, w_l)
            for (n_points, has_box), refs in buckets.items():
                for start in range(0, len(refs), self.decode_batch_size):
                    chunk = refs[start : start + self.decode_batch_size]
                    logits = self._decode_chunk(items, levels, chunk, n_points, has_box)  # (M, h, w)
                    self._write_masks(items, chunk, logits, out)
                    self.decode_calls += 1
        return out

    def _decode_chunk(self, items, levels, chunk, n_points: int, has_box: bool):
        import torch

        idx = torch.tensor([i for i, _ in chunk], device=self.device)
        embeddings = [lv.index_select(0, idx) for lv in levels]  # (M, C_l, h_l, w_l)
        points = labels = boxes = None
        if n_points:
            pts, lbl = [], []
            for i, j in chunk:
                h, prompt = items[i][0], items[i][1][j]
                pts.append([[x * self.size / h.width, y * self.size / h.height] for x, y in prompt.points])
                lbl.append(list(prompt.labels))
            points = torch.tensor(pts, dtype=torch.float32, device=self.device).unsqueeze(1)  # (M, 1, n, 2)
            labels = torch.tensor(lbl, dtype=torch.int64, device=self.device).unsqueeze(1)  # (M, 1, n)
        if has_box:
            bxs = []
            for i, j in chunk:
                h, (x1, y1, x2, y2) = items[i][0], items[i][1][j].box
                sx, sy = self.size / h.width, self.size / h.height
                bxs.append([x1 * sx, y1 * sy, x2 * sx, y2 * sy])
            boxes = torch.tensor(bxs, dtype=torch.float32, device=self.device).unsqueeze(1)  # (M, 1, 4)
        result = self.model(
            image_embeddings=embeddings,
            input_points=points,
            input_labels=labels,
            input_boxes=boxes,
            multimask_output=False,
        )
        return result.pred_masks[:, 0, 0]  # (M, h, w) low-resolution logits

    def _write_masks(self, items, chunk, logits, out: list) -> None:
        import torch.nn.functional as F

        by_image: dict[int, list[int]] = defaultdict(list)
        for k, (i, _) in enumerate(chunk):
            by_image[i].append(k)
        for i, ks in by_image.items():
            h = items[i][0]
            sel = logits[ks].float().unsqueeze(1)  # (k, 1, h, w)
            up = F.interpolate(
                sel, size=(h.height, h.width), mode="bilinear", align_corners=False
            )  # (k, 1, H, W)
            masks = up[:, 0] > self.mask_threshold  # (k, H, W) bool
            rows = [chunk[k][1] for k in ks]
            out[i][rows] = masks

    def _autocast(self):
        import contextlib

        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SegmenterUnavailable(
            f"device={device!r} asked for, but torch sees no CUDA GPU; use device='cpu'"
        )
    return device


def _resolve_amp_dtype(dtype: str, cuda: bool):
    import torch

    choices = {"auto": torch.bfloat16 if cuda else None, "float32": None, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise ValueError(f"HFSam2Segmenter dtype={dtype!r}: use auto, float32 or bfloat16")
    return choices[dtype]


def _load_model(path: str):
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise SegmenterUnavailable(
            f"reward.segmenter_path={path!r} is not a Hugging Face SAM2 folder (no config.json there); "
            "build a tiny one with `segr1 models tiny --out DIR` or download e.g. facebook/sam2.1-hiera-large"
        )
    from transformers import Sam2Model

    try:
        return Sam2Model.from_pretrained(str(folder), attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise SegmenterUnavailable(f"cannot load a Sam2Model from {path!r}: {err}") from err


def random_model(path: str):
    """A Sam2Model at the shape of the folder's config.json with random weights (no weight file read)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise SegmenterUnavailable(
            f"reward.segmenter_path={path!r} has no config.json: dummy weights build SAM2 from its config "
            "(download only the folder's *.json files, e.g. of facebook/sam2.1-hiera-large)"
        )
    from transformers import Sam2Config, Sam2Model

    return Sam2Model._from_config(Sam2Config.from_pretrained(str(folder)), attn_implementation="sdpa")


def _normalisation(path: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from the folder's preprocessor_config.json, else ImageNet's."""
    if path is not None:
        cfg_file = Path(path) / "preprocessor_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text())
                mean, std = cfg.get("image_mean", IMAGENET_MEAN), cfg.get("image_std", IMAGENET_STD)
                if len(mean) == 3 and len(std) == 3:
                    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
            except (ValueError, TypeError, AttributeError):
                pass
    return IMAGENET_MEAN, IMAGENET_STD
