"""Images and masks from users (paths, PIL images, arrays) to tensors, with the conversions said out loud."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image


def load_image(image, what: str = "image") -> Image.Image:
    """A PIL image from a path, a PIL image or an array (``(H, W[, C])``, uint8 or float in [0, 1])."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened.copy()
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {what} {image}: {err}") from None
    if isinstance(image, np.ndarray):
        array = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(array)
    if isinstance(image, Image.Image):
        return image
    raise ValueError(f"{what} must be a path, a PIL image or a numpy array, got {type(image).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, whatever the mode: RGBA is composited on white, L/P/CMYK are converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def fit_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """Resize down to the nearest size that is a multiple of ``multiple`` (the VAE's factor), with a warning."""
    width, height = image.size
    fitted = (max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple))
    if fitted != (width, height):
        warnings.warn(f"image size {width}x{height} is not a multiple of {multiple}: resized to "
                      f"{fitted[0]}x{fitted[1]}", stacklevel=3)
        image = image.resize(fitted, Image.Resampling.LANCZOS)
    return image


def image_tensor(image, multiple: int) -> torch.Tensor:
    """``(1, 3, H, W)`` float32 in [-1, 1]; RGB, sides a multiple of ``multiple``."""
    pil = fit_to_multiple(to_rgb(load_image(image)), multiple)
    array = np.asarray(pil, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def mask_tensor(mask, size: tuple[int, int]) -> torch.Tensor:
    """``(1, 1, H, W)`` float32 in [0, 1] (white = 1 = repaint; grey levels are kept as a soft mask), resized to
    ``size`` (width, height) with a warning when it differs."""
    pil = load_image(mask, "mask")
    if pil.mode in ("RGBA", "LA"):
        pil = to_rgb(pil)
    pil = pil.convert("L")
    if pil.size != tuple(size):
        warnings.warn(f"mask size {pil.size[0]}x{pil.size[1]} differs from the image's {size[0]}x{size[1]}: "
                      "mask resized", stacklevel=3)
        pil = pil.resize(tuple(size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None, None]
