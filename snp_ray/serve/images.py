"""Uploaded images -> the uint8 arrays a pack takes, with a typed error for anything that does
not decode. A pack's raw input is its dataset's image size (32x32 for CIFAR): fragments resize
from there to their own input size, as they did on the few-shot samples they were packed on."""
from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np

from snp_ray.data.tables import IMAGE_SHAPE
from snp_ray.errors import DataError

#: larger uploads are refused before they are decoded (a decompression bomb guard)
MAX_PIXELS = 40_000_000


def decode_image(data: bytes, name: str = "image", size: tuple[int, int] = IMAGE_SHAPE[:2]
                 ) -> np.ndarray:
    """PNG/JPEG (any format Pillow reads) bytes -> (H, W, 3) uint8 at ``size``."""
    from PIL import Image

    if not data:
        raise DataError(f"{name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise DataError(f"{name} is {img.width}x{img.height}: more than "
                                    f"{MAX_PIXELS:,} pixels")
                rgb = img.convert("RGB")
                if rgb.size != (size[1], size[0]):
                    rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                return np.asarray(rgb, dtype=np.uint8).copy()
    except DataError:
        raise
    except Exception as e:   # Pillow raises many types for a broken file
        raise DataError(f"{name} does not decode as an image ({type(e).__name__}: {e})") from None


def decode_base64(item: object, name: str) -> bytes:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> bytes."""
    if not isinstance(item, str):
        raise DataError(f"{name} must be a base64 string, got {type(item).__name__}")
    if item.startswith("data:"):
        item = item.split(",", 1)[-1]
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(f"{name} is not valid base64 ({e})") from None


def decode_batch(blobs: list[bytes], names: list[str]) -> np.ndarray:
    if not blobs:
        raise DataError("no images in the request")
    return np.stack([decode_image(b, n) for b, n in zip(blobs, names)])
