"""Test images for the VLM service tests: seeded noise PNGs and broken files."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from svp.contract import ImageInput


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_input(image: Image.Image) -> ImageInput:
    return ImageInput.from_bytes(png_bytes(image))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
