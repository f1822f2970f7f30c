"""The image codec of every worker: dataset images and masks (OpenCV) with one error type for bad bytes, and the
policy's view of an image (Pillow: RGB, NxN).

Conventions used everywhere in the project:
- an image is a `(H, W, 3)` uint8 array in **RGB** order (OpenCV decodes to BGR; it is converted here, once);
- a mask is a `(H, W)` bool array;
- masks are stored as one-channel PNGs with values 0/1 (`encode_png(mask)`);
- EXIF orientation is ignored (the stored pixel grid is used as it is, as for the mask), so a JPEG with an
  orientation tag still lines up with its mask.

Mask binarisation rule (`decode_mask`), applied to the decoded pixel values `v`:
1. colour masks (3 or 4 channels) are reduced to one channel by taking the maximum over the colour channels
   (alpha is ignored);
2. if the largest value is at most 1 (a 0/1 mask, the project's own format), foreground is `v > 0`;
3. otherwise foreground is `v >= half the range`: `v >= 128` for 8-bit masks (0/255 masks, including
   anti-aliased edges), `v >= 32768` for 16-bit ones.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

# Fixed PNG parameters: the same array always encodes to the same bytes (with the same OpenCV/zlib build).
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


class CorruptSampleError(ValueError):
    """Bytes that do not decode to a usable image or mask; the message says what is wrong."""


def _decode(data: bytes, flags: int, what: str) -> np.ndarray:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CorruptSampleError(f"{what}: expected encoded bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise CorruptSampleError(f"{what}: empty bytes (no encoded image)")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        arr = cv2.imdecode(buf, flags)
    except cv2.error as err:  # OpenCV raises on some truncated files instead of returning None
        raise CorruptSampleError(f"{what}: OpenCV cannot decode {len(data)} bytes ({err.msg})") from None
    if arr is None or arr.size == 0:
        head = bytes(data[:8])
        raise CorruptSampleError(
            f"{what}: {len(data)} bytes starting {head!r} are not a decodable PNG/JPEG/BMP/WebP image"
        )
    return arr


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """PNG/JPEG/... bytes -> `(H, W, 3)` uint8 RGB. Grey images are expanded, alpha is dropped, 16-bit scaled."""
    bgr = _decode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION, what)  # (H, W, 3) uint8 BGR
    if bgr.ndim != 3 or bgr.shape[2] != 3:
        raise CorruptSampleError(f"{what}: decoded to shape {bgr.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def binarise_mask(values: np.ndarray, what: str = "mask") -> np.ndarray:
    """Decoded mask pixel values -> `(H, W)` bool, by the rule in this module's docstring."""
    if values.ndim == 3:
        if values.shape[2] not in (3, 4):
            raise CorruptSampleError(f"{what}: {values.shape[2]} channels; expected 1, 3 or 4")
        values = values[:, :, :3].max(axis=2)
    if values.ndim != 2:
        raise CorruptSampleError(f"{what}: decoded to shape {values.shape}, expected (H, W)")
    if values.dtype == np.bool_:
        return values.copy()
    if values.dtype not in (np.uint8, np.uint16):
        raise CorruptSampleError(f"{what}: pixel type {values.dtype}; expected 8- or 16-bit integers")
    if int(values.max(initial=0)) <= 1:
        return values > 0
    half = 128 if values.dtype == np.uint8 else 32768
    return values >= half


def decode_mask(data: bytes, what: str = "mask") -> np.ndarray:
    """PNG bytes (one channel 0/1 or 0/255; colour masks accepted) -> `(H, W)` bool (see module docstring)."""
    values = _decode(data, cv2.IMREAD_UNCHANGED, what)  # (H, W) or (H, W, C), uint8/uint16
    return binarise_mask(values, what)


def encode_png(array: np.ndarray) -> bytes:
    """Array -> PNG bytes, deterministically.

    `(H, W, 3)` uint8 is taken as RGB; `(H, W)` bool becomes a one-channel 0/1 mask; `(H, W)` uint8 is written
    as it is (one channel).
    """
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png: expected uint8 or bool pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]  # RGB -> BGR for OpenCV
    elif arr.ndim != 2:
        raise ValueError(f"encode_png: expected shape (H, W) or (H, W, 3), got {arr.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), _PNG_PARAMS)
    if not ok:
        raise ValueError(f"encode_png: OpenCV could not encode an array of shape {arr.shape}")
    return buf.tobytes()


def decode_sample_arrays(
    image: bytes, mask: bytes, width: int, height: int, what: str = "sample"
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a row's image and mask and check both against the row's width/height.

    Returns `(image (H, W, 3) uint8 RGB, mask (H, W) bool)`; raises CorruptSampleError naming the mismatch.
    """
    img = decode_image(image, f"{what}: image")
    msk = decode_mask(mask, f"{what}: mask")
    if img.shape[:2] != (height, width):
        raise CorruptSampleError(
            f"{what}: image is {img.shape[1]}x{img.shape[0]} (WxH) but the row says width={width}, height={height}"
        )
    if msk.shape != (height, width):
        raise CorruptSampleError(
            f"{what}: mask is {msk.shape[1]}x{msk.shape[0]} (WxH) but the image is {width}x{height}"
        )
    return img, msk


# --------------------------------------------------------------------------------------------------------------
# The policy's view


ImageLike = bytes | bytearray | memoryview | Image.Image


def load_image(image: ImageLike) -> Image.Image:
    """Decode encoded bytes (PNG/JPEG/...) or take a PIL image; returns an RGB PIL image."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, bytes | bytearray | memoryview):
        try:
            img = Image.open(io.BytesIO(bytes(image)))
            img.load()
        except Exception as err:  # PIL raises several types for bad data
            raise ValueError(f"cannot decode image bytes ({len(image)} bytes): {err}") from err
    else:
        try:  # numpy arrays (H, W, 3) uint8 without importing numpy here
            img = Image.fromarray(image)
        except Exception as err:
            raise TypeError(
                f"expected encoded image bytes, a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}"
            ) from err
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_for_policy(image: ImageLike, size: int) -> Image.Image:
    """The image the policy sees: RGB, size x size, aspect ratio not kept (bicubic), as in the paper."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} must be a positive int")
    img = load_image(image)
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC)
