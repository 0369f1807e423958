"""Uploaded images -> the uint8 arrays a pack takes, with a typed error for anything that does
not decode. A pack's raw input is its dataset's image size (32x32 for CIFAR): fragments resize
from there to their own input size, as they did on the few-shot samples they were packed on."""
from __future__ import annotations

import base64
import binascii

import numpy as np

from snp_ray.data.tables import IMAGE_SHAPE, decode_image, open_image
from snp_ray.errors import DataError

#: the most pixels one image may have: a generous multiple of the size it is resized to (a
#: 32x32 pack input admits 2048x2048), never more than 4096x4096; checked from the header
PIXEL_MULTIPLE = 4096
MAX_PIXELS = 4096 * 4096
#: the most pixels one request may decode in all (sixteen 2048x2048 images)
MAX_REQUEST_PIXELS = 64 * 1024 * 1024


def pixel_cap(size: tuple[int, int]) -> int:
    return min(MAX_PIXELS, PIXEL_MULTIPLE * size[0] * size[1])


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


def decode_batch(blobs: list[bytes], names: list[str],
                 max_pixels: int = MAX_REQUEST_PIXELS) -> np.ndarray:
    """Every image of a request, after the request's pixel budget is checked from the headers
    (none is decoded when their sum is over it), by the one decoder
    (:func:`snp_ray.data.tables.decode_image`) under the service's per-image cap, resized to
    the pack's input."""
    if not blobs:
        raise DataError("no images in the request")
    total = 0
    for b, n in zip(blobs, names):
        with open_image(b, n, pixel_cap(IMAGE_SHAPE[:2])) as img:
            total += img.width * img.height
    if total > max_pixels:
        raise DataError(f"the request's images hold {total:,} pixels, more than the "
                        f"{max_pixels:,} one request may decode")
    size = IMAGE_SHAPE[:2]
    return np.stack([decode_image(b, n, size=size, max_pixels=pixel_cap(size), resize=True)
                     for b, n in zip(blobs, names)])
