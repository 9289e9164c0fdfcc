"""Classifier-free guidance as a wrapper around a denoiser, so samplers never see it.

``x0_cfg = x0_uncond + w * (x0_cond - x0_uncond)`` (Ho & Salimans 2022, eq. 6, written with the guidance
scale w of Stable Diffusion: w = 1 is the conditional model). Because every parameterization is affine in the
network output at fixed (x, sigma), guiding x0 equals guiding eps or v. The conditional and unconditional
halves run as one batch of 2B. A composed prompt (several sub-prompts with weights, the A1111 web UI's ``AND``)
guides by the weighted sum of its parts' differences from the unconditional prediction (Liu et al. 2022, eq. 10).
Perturbed-attention guidance (Ahn et al. 2024, eq. 11) adds ``s * (x0_cond - x0_perturbed)``, where the perturbed
prediction is the conditional one with chosen self-attention maps replaced by the identity. Adaptive projected
guidance (Sadat et al. 2024) projects the guidance difference of the x0 predictions before scaling it, which is
not affine, so it acts on x0 (:class:`ProjectedGuidance`). CFG-Zero* (Fan et al. 2025) scales the unconditional
prediction by its least-squares fit to the conditional one (:class:`ZeroStarGuidance`).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ldm.denoiser import Denoiser


def check_guidance_scale(scale: float, name: str = "guidance_scale") -> float:
    """A guidance scale must be a finite, non-negative number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {scale!r}")
    return float(scale)


def guidance_scale_embedding(scale: float, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of a guidance scale that a guidance-distilled network takes instead of running
    CFG (Meng et al. 2023, "On Distillation of Guided Diffusion Models"; the w-condition of latent consistency
    models, Luo et al. 2023): ``[sin(1000 (w - 1) f_k), cos(1000 (w - 1) f_k)]`` with
    ``f_k = 10000^(-k / (dim/2 - 1))``, zero-padded to an odd ``dim``; diffusers' ``get_guidance_scale_embedding``
    of ``w - 1``. ``(1, dim)`` float32."""
    half = dim // 2
    rate = torch.tensor(10000.0).log() / (half - 1)  # float32, rounded as diffusers rounds it
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -rate)  # (half,)
    angles = 1000.0 * (check_guidance_scale(scale) - 1.0) * frequencies
    embedding = torch.cat([angles.sin(), angles.cos()])
    return torch.nn.functional.pad(embedding, (0, dim % 2))[None]


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


def batch_rows(cond: Any) -> int:
    """Rows of a conditioning: a tensor's first dimension, or a dict's (SDXL, SD3)."""
    return len(next(iter(cond.values()))) if isinstance(cond, dict) else len(cond)


def check_part_weights(part_weights: torch.Tensor, cond: Any, uncond: Any) -> None:
    """A composed prompt's weights ``(B, K)`` must be finite and fit ``cond`` ``(K * B, ...)`` and ``uncond``
    ``(B, ...)``."""
    if part_weights.dim() != 2 or not torch.isfinite(part_weights).all():
        raise ValueError(f"part_weights must be a finite (B, K) tensor, got shape {tuple(part_weights.shape)}")
    batch, parts = part_weights.shape
    if batch_rows(cond) != batch * parts or batch_rows(uncond) != batch:
        raise ValueError(f"part_weights {tuple(part_weights.shape)} need {batch * parts} conditioning rows and "
                         f"{batch} unconditional ones, got {batch_rows(cond)} and {batch_rows(uncond)}")


GUIDANCE_METHODS = ("cfg", "apg", "cfg_zero_star")


class ProjectedGuidance:
    """Adaptive projected guidance, APG (Sadat, Hilliges & Weber 2024, "Eliminating Oversaturation and Artifacts of
    High Guidance Scales in Diffusion Models", sec. 4 and Alg. 1), on the denoised (x0) predictions: the guided x0
    is ``x0_c + (w - 1) * (d_orth + eta * d_par)``, where ``d = x0_c - x0_u`` (rescaled to norm at most
    ``norm_threshold`` when that is > 0; first replaced by the running sum ``d_k + momentum * d_(k-1) + ...`` when
    ``momentum`` != 0, the paper's reverse momentum being negative) is split into its component along ``x0_c``
    (``d_par``, which the paper finds drives oversaturation) and the rest, per image. ``eta = 1``, no threshold
    and no momentum is plain CFG; the paper's choice drops the parallel part (``eta = 0``). The running sum
    starts again when sigma rises (a new sampling pass, or RePaint's jumps)."""

    def __init__(self, eta: float = 0.0, norm_threshold: float = 0.0, momentum: float = 0.0):
        checks = (("apg_eta", eta, -10.0, 10.0), ("apg_norm_threshold", norm_threshold, 0.0, math.inf),
                  ("apg_momentum", momentum, -1.0, 0.999))
        for name, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not low <= value <= high:
                raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {value!r}")
        self.eta, self.norm_threshold, self.momentum = float(eta), float(norm_threshold), float(momentum)
        self.running: torch.Tensor | None = None
        self.last_sigma = math.inf

    def update(self, difference: torch.Tensor, x0_cond: torch.Tensor, sigma: float) -> torch.Tensor:
        """The projected guidance direction for ``difference = x0_c - x0_u`` ``(B, C, H, W)`` at ``sigma``."""
        if sigma > self.last_sigma:
            self.running = None
        self.last_sigma = sigma
        if self.momentum:
            self.running = difference if self.running is None else difference + self.momentum * self.running
            difference = self.running
        flat = difference.flatten(1).double()  # (B, N)
        if self.norm_threshold > 0:
            flat = flat * (self.norm_threshold / flat.norm(dim=1, keepdim=True)).clamp(max=1.0)
        unit = torch.nn.functional.normalize(x0_cond.flatten(1).double(), dim=1)
        parallel = (flat * unit).sum(1, keepdim=True) * unit
        return ((flat - parallel) + self.eta * parallel).view_as(difference).to(difference.dtype)


class ZeroStarGuidance:
    """CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow Matching Models", sec.
    4.1-4.2) on the network's prediction (a flow model's velocity, as in the paper; ε or v of a diffusion model, as
    diffusers applies it): the unconditional prediction is scaled by ``s* = <c, u> / |u|^2`` per image, the
    least-squares fit of ``c`` by ``u``, and ``out = s* u + w (c - s* u)``. ``c`` parallel to ``u`` gives ``c`` at
    every scale; ``c`` orthogonal to ``u``, ``w c``. (The paper's zero-init of the first steps is a sampling
    matter: ``TextToImagePipeline.denoise``.)"""

    @staticmethod
    def combine(out_uncond: torch.Tensor, out_cond: torch.Tensor, scale: float) -> torch.Tensor:
        """``s* u + w (c - s* u)`` for predictions ``(B, C, H, W)``."""
        u, c = out_uncond.flatten(1).double(), out_cond.flatten(1).double()  # (B, N)
        fit = (c * u).sum(1) / (u * u).sum(1).clamp(min=1e-12)  # (B,)
        fitted = fit.view(-1, *[1] * (out_uncond.dim() - 1)).to(out_uncond.dtype) * out_uncond
        return fitted + scale * (out_cond - fitted)


class CFGDenoiser:
    """``model(x, sigma) -> x0`` with classifier-free guidance over a :class:`Denoiser`.

    ``cond``/``uncond`` are the text conditionings ``(B, L, D)`` (or dicts of them). With ``scale <= 1`` only the
    conditional pass runs (diffusers' rule). ``rescale`` (phi) is applied to the network outputs, as
    Lin et al. and diffusers do; ``phi = 0`` leaves plain CFG.

    ``part_weights`` ``(B, K)`` composes K sub-prompts per image (Liu et al. 2022, eq. 10, as the A1111 web UI
    weighs them): ``cond`` is then ``(K * B, L, D)``, part-major (part k of image b at row ``k * B + b``), and
    ``out = out_u + w * sum_k weight_bk * (out_k - out_u)`` at every scale, as in the web UI (the unconditional
    pass always runs); a weight 0 pads an image with fewer parts. Rescale matches the std of the composition at
    w = 1, ``out_u + sum_k weight_bk * (out_k - out_u)``.

    ``pag_scale`` s > 0 adds perturbed-attention guidance: ``perturbed(x, sigma, cond)`` is the network output
    with the perturbation applied (see ``TextToImagePipeline.guided``), one more pass per step; rescale then acts
    on the sum, as diffusers' PAG pipelines apply it.

    ``projection`` (a :class:`ProjectedGuidance`) replaces the guided combination by APG's on x0, ``zero_star``
    (a :class:`ZeroStarGuidance`) by CFG-Zero*'s; either takes a plain prompt without PAG, and APG no rescale.

    ``cond_schedule`` ``[(last_step, cond, uncond), ...]`` (the A1111 web UI's prompt editing): :meth:`at_step`
    makes sampler step k (0-based) use the first entry with ``last_step >= k``.
    """

    def __init__(self, denoiser: Denoiser, cond: Any, uncond: Any = None, scale: float = 7.5, rescale: float = 0.0,
                 part_weights: torch.Tensor | None = None, pag_scale: float = 0.0,
                 perturbed: Callable | None = None, projection: ProjectedGuidance | None = None,
                 zero_star: ZeroStarGuidance | None = None, cond_schedule: list | None = None):
        self.denoiser = denoiser
        self.cond = cond
        self.uncond = uncond
        self.scale = check_guidance_scale(scale)
        if not (isinstance(rescale, (int, float)) and 0.0 <= rescale <= 1.0):
            raise ValueError(f"guidance_rescale must be in [0, 1], got {rescale!r}")
        self.rescale = float(rescale)
        self.part_weights = part_weights
        if (self.guided or part_weights is not None) and uncond is None:
            raise ValueError("guidance_scale > 1 or a composed prompt needs an unconditional embedding")
        if part_weights is not None:
            check_part_weights(part_weights, cond, uncond)
        self.pag_scale = check_guidance_scale(pag_scale, "pag_scale")
        if self.pag_scale > 0 and perturbed is None:
            raise ValueError("pag_scale > 0 needs the perturbed network pass")
        if self.pag_scale > 0 and part_weights is not None:
            raise ValueError("perturbed-attention guidance runs on a plain prompt, not one composed with AND")
        self.perturbed = perturbed
        if projection is not None and (part_weights is not None or self.rescale > 0 or self.pag_scale > 0):
            raise ValueError("adaptive projected guidance takes a plain prompt, without guidance rescale or PAG")
        self.projection = projection
        if zero_star is not None and (part_weights is not None or self.pag_scale > 0 or projection is not None):
            raise ValueError("CFG-Zero* takes a plain prompt, without PAG or APG")
        self.zero_star = zero_star
        self.cond_schedule = cond_schedule if cond_schedule is not None and len(cond_schedule) > 1 else None

    def at_step(self, step: int) -> None:
        """Use the conditioning the schedule gives sampler step ``step`` (no schedule: nothing changes)."""
        if self.cond_schedule is not None:
            _, self.cond, self.uncond = next((entry for entry in self.cond_schedule if entry[0] >= step),
                                             self.cond_schedule[-1])

    @property
    def guided(self) -> bool:
        return self.scale > 1.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.part_weights is not None:
            return self.composed(x, sigma)
        out_perturbed = self.perturbed(x, sigma, self.cond) if self.pag_scale > 0 else None
        if not self.guided:
            if out_perturbed is None:
                return self.denoiser(x, sigma, self.cond)
            out_cond = self.denoiser.model_output(x, sigma, self.cond)  # PAG alone, as diffusers: no rescale
            return self.denoiser.to_x0(x, sigma, out_cond + self.pag_scale * (out_cond - out_perturbed))
        out = self.denoiser.model_output(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                         concat_cond(self.uncond, self.cond))  # (2B, C, H, W)
        out_uncond, out_cond = out.chunk(2)
        if self.projection is not None:
            x0_uncond, x0_cond = self.denoiser.to_x0(x, sigma, out_uncond), self.denoiser.to_x0(x, sigma, out_cond)
            update = self.projection.update(x0_cond - x0_uncond, x0_cond, float(sigma.max()))
            return x0_cond + (self.scale - 1) * update
        if self.zero_star is not None:
            guided = self.zero_star.combine(out_uncond, out_cond, self.scale)
            if self.rescale > 0:
                guided = rescale_guidance(guided, out_cond, self.rescale)
            return self.denoiser.to_x0(x, sigma, guided)
        return self.denoiser.to_x0(x, sigma, self.guide(out_uncond, out_cond, out_perturbed))

    def composed(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Guidance of a composed prompt: the unconditional pass and every part's in one batch of (1 + K) B."""
        parts = self.part_weights.shape[1]
        out = self.denoiser.model_output(x.repeat(1 + parts, *[1] * (x.dim() - 1)), sigma.repeat(1 + parts),
                                         concat_cond(self.uncond, self.cond))  # ((1 + K) B, C, H, W)
        out_uncond, out_parts = out[:len(x)], out[len(x):].unflatten(0, (parts, len(x)))  # (B, ...), (K, B, ...)
        weights = self.part_weights.T.to(out).reshape(parts, len(x), *[1] * (x.dim() - 1))  # (K, B, 1, 1, 1)
        out_cond = out_uncond + (weights * (out_parts - out_uncond)).sum(0)  # the composition at w = 1
        return self.denoiser.to_x0(x, sigma, self.guide(out_uncond, out_cond))

    def guide(self, out_uncond: torch.Tensor, out_cond: torch.Tensor,
              out_perturbed: torch.Tensor | None = None) -> torch.Tensor:
        """``out_u + w (out_c - out_u)`` (plus ``s (out_c - out_p)`` with PAG), then rescaled towards ``out_c``'s
        std by phi."""
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        if out_perturbed is not None:
            guided = guided + self.pag_scale * (out_cond - out_perturbed)
        if self.rescale > 0:
            guided = rescale_guidance(guided, out_cond, self.rescale)
        return guided
