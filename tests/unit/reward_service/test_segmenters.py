"""The Segmenter contract on CPU: GrabCut, transformers Sam2Model (tiny, random), Meta sam2 (its clear error)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from protos import MaskPrompt
from reward_service.segmenters import (
    ImageHandle,
    Segmenter,
    SegmenterUnavailable,
    build_segmenter,
    union_mask,
)
from reward_service.segmenters.grabcut import GrabCutSegmenter

H, W = 90, 130


@pytest.fixture(scope="module")
def scene():
    """A textured grey image with a red disk (the object) and its mask."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(110, 12, (H, W, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    disk = (yy - 45) ** 2 + (xx - 70) ** 2 < 25**2
    image[disk] = np.clip(rng.normal((200, 40, 40), 8, (int(disk.sum()), 3)), 0, 255).astype(np.uint8)
    return image, disk


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """SAM2 on one torch thread, as the tests were measured (the session's tiny SAM2 is in tests/conftest.py)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def hf_segmenter(tiny_sam2_dir):
    from reward_service.segmenters.hf_sam2 import HFSam2Segmenter

    return HFSam2Segmenter(str(tiny_sam2_dir), device="cpu")


PROMPTS = [
    MaskPrompt(box=(40, 15, 100, 75)),
    MaskPrompt(box=(40, 15, 100, 75), points=[(70, 45)], labels=[1]),
    MaskPrompt(box=(40, 15, 100, 75), points=[(70, 45), (42, 17)], labels=[1, 0]),
    MaskPrompt(points=[(70, 45), (5, 5)], labels=[1, 0]),
    MaskPrompt(box=(0, 0, W, H), points=[(10, 80)], labels=[1]),
]


def _check_contract(seg, image):
    assert isinstance(seg, Segmenter)
    handle = seg.encode(image)
    assert isinstance(handle, ImageHandle) and (handle.height, handle.width) == image.shape[:2]
    masks = seg.decode(handle, PROMPTS)
    assert masks.shape == (len(PROMPTS), H, W) and masks.dtype == bool
    empty = seg.decode(handle, [])
    assert empty.shape == (0, H, W)
    # several images in one batched call, each with its own prompts and size
    other = np.ascontiguousarray(image[:60, :80])
    handles = seg.encode_batch([image, other])
    out = seg.decode_batch(
        [(handles[0], PROMPTS[:2]), (handles[1], [MaskPrompt(box=(5, 5, 50, 40))]), (handles[0], [])]
    )
    assert [o.shape for o in out] == [(2, H, W), (1, 60, 80), (0, H, W)]
    assert (out[0] == masks[:2]).all()
    return masks


def test_grabcut_contract_and_quality(scene):
    image, disk = scene
    seg = GrabCutSegmenter()
    masks = _check_contract(seg, image)
    inter = (masks[1] & disk).sum()
    assert inter / (masks[1] | disk).sum() > 0.8  # box + a foreground seed on a clear object
    assert masks[3][45, 70] and not masks[3][5, 5]  # points only: the seeds are respected
    assert seg.encode_calls == 3


def test_grabcut_is_deterministic_and_handles_degenerate_prompts(scene):
    image, _ = scene
    seg = GrabCutSegmenter()
    h = seg.encode(image)
    a, b = seg.decode(h, PROMPTS), seg.decode(h, PROMPTS)
    assert (a == b).all()
    only_bg = seg.decode(h, [MaskPrompt(points=[(3, 3)], labels=[0])])
    assert not only_bg.any()  # no foreground anywhere: an empty mask
    tiny = seg.decode(h, [MaskPrompt(box=(10.2, 10.2, 10.6, 10.9))])  # too few pixels for GrabCut's models
    assert tiny.shape == (1, H, W) and tiny.sum() <= 4


def test_grabcut_downscales_large_images_and_upsamples_masks():
    rng = np.random.default_rng(1)
    big = rng.integers(0, 255, (700, 1000, 3), dtype=np.uint8)
    seg = GrabCutSegmenter(max_side=200)
    h = seg.encode(big)
    assert h.payload.shape[:2] == (140, 200)
    m = seg.decode(h, [MaskPrompt(box=(100, 100, 600, 500))])
    assert m.shape == (1, 700, 1000)
    assert not m[0, :90].any() and not m[0, :, 610:].any()  # nothing outside the box


def test_grabcut_box_band_does_not_pay_for_loose_boxes():
    """A box that cuts the object (too tight, or off-centre by a policy's localisation error): without the band,
    GrabCut fixes the cut-off object pixels as background, so the IoU reward pays for loose boxes that hedge
    (RL learned to draw them). With the default band they are only probable background and come back: a tight box
    scores as well as a loose one wherever it sits, and a box much too loose costs."""
    from cluster.data.synth import generate_item

    items = [generate_item(0, i, "single", 128) for i in range(12)]
    offsets = np.random.default_rng(0).normal(0.0, 0.15, size=(len(items), 2))  # x, y; fractions of the side

    def mean_iou(segmenter, grow: float, shift: bool = False) -> float:
        ious = []
        for item, (ox, oy) in zip(items, offsets if shift else np.zeros_like(offsets), strict=True):
            x1, y1, x2, y2 = item.target.bbox
            side = max(x2 - x1 + 1, y2 - y1 + 1)
            g, dx, dy = grow * side, ox * side, oy * side
            box = (x1 - g + dx, y1 - g + dy, x2 + 1 + g + dx, y2 + 1 + g + dy)
            mask = segmenter.segment(item.image, [MaskPrompt(box=box)])[0]
            ious.append((mask & item.mask).sum() / (mask | item.mask).sum())
        return float(np.mean(ious))

    banded, unbanded = GrabCutSegmenter(), GrabCutSegmenter(box_band=0.0)
    assert mean_iou(banded, -0.05) > 0.95 > mean_iou(unbanded, -0.05) + 0.03
    assert (
        mean_iou(banded, 0.0) > 0.95 and mean_iou(banded, 0.1) > 0.95
    )  # exact and slightly loose boxes work
    # off-centre boxes: tight ones are not worse than loose ones, so hedging with a loose box earns nothing
    tight, loose = mean_iou(banded, 0.0, shift=True), mean_iou(banded, 0.1, shift=True)
    assert tight > 0.95 and tight >= loose - 0.01, (tight, loose)
    assert mean_iou(unbanded, 0.0, shift=True) < tight - 0.1
    assert mean_iou(banded, 0.4) < 0.85  # a box far too loose takes in background and costs
    with pytest.raises(ValueError, match="box_band"):
        GrabCutSegmenter(box_band=1.5)


def test_hf_sam2_contract(scene, hf_segmenter):
    image, _ = scene
    before = hf_segmenter.encode_calls
    _check_contract(hf_segmenter, image)
    assert hf_segmenter.encode_calls - before == 3


def test_hf_sam2_batched_decode_equals_one_prompt_at_a_time(scene, hf_segmenter):
    image, _ = scene
    h = hf_segmenter.encode(image)
    calls = hf_segmenter.decode_calls
    batched = hf_segmenter.decode(h, PROMPTS * 3)
    assert hf_segmenter.decode_calls - calls == 4  # one call per token layout, not per prompt
    singles = np.stack([hf_segmenter.decode(h, [p])[0] for p in PROMPTS * 3])
    assert (batched == singles).mean() > 0.999


def test_hf_sam2_equals_the_full_model_forward(scene, hf_segmenter):
    """Grouped (cached embedding, our pre/post-processing) == one Sam2Model forward per prompt."""
    import torch
    import torch.nn.functional as F

    image, _ = scene
    seg = hf_segmenter
    masks = seg.decode(seg.encode(image), PROMPTS)
    s = seg.size
    sx, sy = s / W, s / H
    with torch.inference_mode():
        pixels = seg._preprocess(image)  # (1, 3, S, S)
        for prompt, mask in zip(PROMPTS, masks, strict=True):
            kw = {}
            if prompt.points:
                kw["input_points"] = torch.tensor([[[[x * sx, y * sy] for x, y in prompt.points]]])
                kw["input_labels"] = torch.tensor([[prompt.labels]])
            if prompt.box is not None:
                x1, y1, x2, y2 = prompt.box
                kw["input_boxes"] = torch.tensor([[[x1 * sx, y1 * sy, x2 * sx, y2 * sy]]])
            out = seg.model(pixel_values=pixels, multimask_output=False, **kw)
            logits = F.interpolate(out.pred_masks[:, 0], size=(H, W), mode="bilinear", align_corners=False)
            assert ((logits[0, 0] > 0).numpy() == mask).mean() > 0.999


def test_hf_sam2_preprocessing_is_rgb_resized_and_normalised(hf_segmenter):
    seg = hf_segmenter
    red = np.zeros((50, 70, 3), np.uint8)
    red[..., 0] = 255
    x = seg._preprocess(red)
    assert tuple(x.shape) == (1, 3, seg.size, seg.size)
    want = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]  # channel 0 is red
    assert x.mean(dim=(0, 2, 3)).tolist() == pytest.approx(want, abs=1e-4)


def test_hf_sam2_decode_tensors_match_numpy(scene, hf_segmenter):
    image, _ = scene
    h = hf_segmenter.encode(image)
    tensors = hf_segmenter.decode_batch_tensors([(h, PROMPTS)])
    assert (tensors[0].numpy() == hf_segmenter.decode(h, PROMPTS)).all()


def test_hf_sam2_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SegmenterUnavailable, match="no config.json"):
        build_segmenter("hf-sam2", str(tmp_path))
    with pytest.raises(SegmenterUnavailable, match="needs a Hugging Face SAM2 folder"):
        build_segmenter("hf-sam2", None)


@pytest.mark.skipif(importlib.util.find_spec("sam2") is not None, reason="Meta's sam2 is installed here")
def test_meta_sam2_without_the_package_says_how_to_install():
    with pytest.raises(SegmenterUnavailable) as err:
        build_segmenter("sam2", "sam2.1_hiera_large.pt", "configs/sam2.1/sam2.1_hiera_l.yaml")
    msg = str(err.value)
    assert (
        "pip install --no-build-isolation 'segr1[sam2]'" in msg and "torchvision" in msg and "hf-sam2" in msg
    )
    with pytest.raises(SegmenterUnavailable, match="reward.sam2_config"):
        build_segmenter("sam2", "x.pt", None)


@pytest.mark.skipif(importlib.util.find_spec("sam2") is None, reason="Meta's sam2 package is not installed")
def test_meta_sam2_imports_when_installed():
    from reward_service.segmenters.meta_sam2 import import_sam2

    build_sam2, predictor = import_sam2()
    assert callable(build_sam2) and hasattr(predictor, "predict")


def test_unknown_segmenter_and_bad_images():
    with pytest.raises(ValueError, match="unknown segmenter"):
        build_segmenter("sam3")
    seg = GrabCutSegmenter()
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB"):
        seg.encode(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB"):
        seg.encode(np.zeros((10, 10, 3), np.float32))


def test_union_mask():
    masks = np.zeros((3, 4, 5), bool)
    masks[0, 0, 0] = masks[2, 3, 4] = True
    u = union_mask(masks, 4, 5)
    assert u.sum() == 2 and u[0, 0] and u[3, 4]
    assert union_mask(masks[:0], 4, 5).shape == (4, 5)


@pytest.mark.gpu
def test_hf_sam2_on_cuda_bf16_matches_cpu(scene, tiny_sam2_dir):
    import torch

    from reward_service.segmenters.hf_sam2 import HFSam2Segmenter

    image, _ = scene
    gpu = HFSam2Segmenter(str(tiny_sam2_dir), device="cuda")
    cpu = HFSam2Segmenter(str(tiny_sam2_dir), device="cpu")
    assert gpu.amp_dtype == torch.bfloat16 and gpu.model.config._attn_implementation == "sdpa"
    batch = [image, np.ascontiguousarray(image[:, ::-1])]
    g = gpu.decode_batch(list(zip(gpu.encode_batch(batch), [PROMPTS, PROMPTS], strict=True)))
    c = cpu.decode_batch(list(zip(cpu.encode_batch(batch), [PROMPTS, PROMPTS], strict=True)))
    for a, b in zip(g, c, strict=True):
        assert a.shape == b.shape and (a == b).mean() > 0.97  # bf16 moves only pixels near the boundary
