"""Control images for ControlNets: named extractors, pluggable through :data:`CONTROL_TYPES`.

An extractor takes an RGB PIL image (and, for the rendered shapes world, its ``Scene``, which gives exact object
masks) and returns the control image: white features on black, RGB, the same size, as the ControlNets users have
expect. ``canny`` works on any image; ``mask`` needs a scene (training on the shapes world) or takes a mask the
user drew as it is. Register another with ``CONTROL_TYPES["name"] = function``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage


def canny_edges(grey: np.ndarray, low: float = 0.1, high: float = 0.2, sigma: float = 1.0) -> np.ndarray:
    """Canny's edge detector (Canny 1986): Gaussian smoothing, Sobel gradients, non-maximum suppression across
    the gradient direction (quantised to 0/45/90/135 degrees), then hysteresis — weak edges (>= ``low`` times the
    largest gradient) are kept when 8-connected to a strong one (>= ``high`` times it). ``grey`` ``(H, W)`` float;
    returns a bool ``(H, W)`` edge map."""
    smooth = ndimage.gaussian_filter(grey.astype(np.float64), sigma)
    gx, gy = ndimage.sobel(smooth, axis=1), ndimage.sobel(smooth, axis=0)  # x right, y down
    magnitude = np.hypot(gx, gy)
    if magnitude.max() <= 1e-12:
        return np.zeros(grey.shape, dtype=bool)
    sector = (((np.rad2deg(np.arctan2(gy, gx)) % 180) + 22.5) // 45).astype(int) % 4
    padded = np.pad(magnitude, 1)
    height, width = magnitude.shape
    is_max = np.zeros(magnitude.shape, dtype=bool)
    for k, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):  # neighbours along the gradient direction
        ahead = padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        behind = padded[1 - dy:1 - dy + height, 1 - dx:1 - dx + width]
        is_max |= (sector == k) & (magnitude >= ahead) & (magnitude >= behind)
    thin = np.where(is_max, magnitude, 0.0) / magnitude.max()
    labels, _ = ndimage.label(thin >= low, structure=np.ones((3, 3), dtype=bool))
    strong = np.unique(labels[thin >= high])
    return np.isin(labels, strong[strong > 0])


def canny_control(image: Image.Image, scene=None) -> Image.Image:
    """White Canny edges on black."""
    grey = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    edges = canny_edges(grey)
    return Image.fromarray(np.repeat(edges[..., None] * np.uint8(255), 3, axis=2))


def mask_control(image: Image.Image, scene=None) -> Image.Image:
    """White object pixels on black: from the shapes-world scene when given (exact), else the image itself is
    taken to be a drawn mask (thresholded at half grey)."""
    if scene is not None:
        from train.shapes import render_masks

        mask = render_masks(scene, image.size[0]).any(axis=0)
    else:
        mask = np.asarray(image.convert("L")) >= 128
    return Image.fromarray(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2))


CONTROL_TYPES: dict[str, Callable] = {"canny": canny_control, "mask": mask_control}


def make_control(kind: str, image: Image.Image, scene=None) -> Image.Image:
    if kind not in CONTROL_TYPES:
        raise ValueError(f"unknown control type {kind!r}; known: {', '.join(CONTROL_TYPES)}")
    return CONTROL_TYPES[kind](image.convert("RGB"), scene)
