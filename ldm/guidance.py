"""Classifier-free guidance as a wrapper around a denoiser, so samplers never see it.

``x0_cfg = x0_uncond + w * (x0_cond - x0_uncond)`` (Ho & Salimans 2022, eq. 6, written with the guidance
scale w of Stable Diffusion: w = 1 is the conditional model). Because every parameterization is affine in the
network output at fixed (x, sigma), guiding x0 equals guiding eps or v. The conditional and unconditional
halves run as one batch of 2B.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ldm.denoiser import Denoiser


def check_guidance_scale(scale: float) -> float:
    """A guidance scale must be a finite, non-negative number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4, eq. 15-16): scale the guided prediction to the per-sample
    std of the conditional one, then mix ``phi`` of that with ``1 - phi`` of the plain guided prediction."""
    dims = list(range(1, guided.dim()))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    return phi * guided * (std_cond / std_guided) + (1 - phi) * guided


def concat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors, or dicts of tensors (SDXL's added conditions)."""
    if isinstance(a, dict):
        return {k: concat_cond(a[k], b[k]) for k in a}
    return torch.cat([a, b])


class CFGDenoiser:
    """``model(x, sigma) -> x0`` with classifier-free guidance over a :class:`Denoiser`.

    ``cond``/``uncond`` are the text conditionings ``(B, L, D)`` (or dicts of them). With ``scale <= 1`` only the
    conditional pass runs (diffusers' rule). ``rescale`` (phi) is applied to the network outputs, as
    Lin et al. and diffusers do; ``phi = 0`` leaves plain CFG.
    """

    def __init__(self, denoiser: Denoiser, cond: Any, uncond: Any = None, scale: float = 7.5, rescale: float = 0.0):
        self.denoiser = denoiser
        self.cond = cond
        self.uncond = uncond
        self.scale = check_guidance_scale(scale)
        if not (isinstance(rescale, (int, float)) and 0.0 <= rescale <= 1.0):
            raise ValueError(f"guidance_rescale must be in [0, 1], got {rescale!r}")
        self.rescale = float(rescale)
        if self.guided and uncond is None:
            raise ValueError("guidance_scale > 1 needs an unconditional embedding")

    @property
    def guided(self) -> bool:
        return self.scale > 1.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return self.denoiser(x, sigma, self.cond)
        out = self.denoiser.model_output(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                         concat_cond(self.uncond, self.cond))  # (2B, C, H, W)
        out_uncond, out_cond = out.chunk(2)
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        if self.rescale > 0:
            guided = rescale_guidance(guided, out_cond, self.rescale)
        return self.denoiser.to_x0(x, sigma, guided)
