"""DDIM inversion: the sampler's sigma list walked upwards (Song et al. 2021, sec. 4.3; Mokady et al. 2022, sec. 3).

Sampling steps from sigma to sigma' < sigma with ``eps = (x - D(x, sigma)) / sigma``. Inversion runs the same
update the other way, from sigma' up to sigma, with the one quantity it cannot know, eps at the level it is going
to, taken from the network evaluated at the target level on the current sample (the approximation every DDIM
inversion makes). In VP terms the network sees the current VP latent ``x_vp`` with timestep t_next; in the VE view
that is the current VE latent rescaled by ``noise_scale(sigma_next) / noise_scale(sigma_cur)``.

That step is only approximately undone by the sampler. With ``fixed_point_iterations = k > 0`` each step is then
refined by k fixed-point iterations of ``x_next = x_cur + (sigma_next - sigma_cur) * eps(x_next, sigma_next)``,
whose solution the DDIM sampling step maps back to ``x_cur`` exactly (the fixed-point inversion of Pan et al.
2023, "Effective Real Image Editing with Accelerated Iterative Diffusion Inversion"; Garibi et al. 2024, ReNoise).
"""
from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def invert_ddim(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, noise_scale: Callable[[float], float],
                fixed_point_iterations: int = 0, callback: Callable | None = None) -> list[torch.Tensor]:
    """Walk a descending sampling sigma list ``(n + 1,)`` upwards from its last entry.

    ``x``: VE latents ``(B, C, h, w)`` at ``sigmas[-1]`` (the clean image latents when that is 0);
    ``model(x, sigma) -> x0``; ``noise_scale(sigma)`` turns network-input units into VE units (``1 / c_in``).
    Returns the trajectory ``[x at sigmas[-1], x at sigmas[-2], ..., x at sigmas[0]]`` (n + 1 entries): entry
    k is where sampling should be after step ``n - k``. ``callback(k, sigma, x)`` runs after each step.
    Network calls: ``n * (1 + fixed_point_iterations)``.
    """
    trajectory = [x]
    levels = sigmas.flip(0)  # ascending
    for k in range(len(levels) - 1):
        sigma, sigma_next = float(levels[k]), float(levels[k + 1])
        x_in = x * (noise_scale(sigma_next) / noise_scale(sigma))
        sigma_batch = torch.full((x.shape[0],), sigma_next, device=x.device)
        eps = (x_in - model(x_in, sigma_batch)) / sigma_next
        x = refine_fixed_point(model, x, x + (sigma_next - sigma) * eps, sigma, sigma_next, fixed_point_iterations)
        trajectory.append(x)
        if callback is not None:
            callback(k, sigma_next, x)
    return trajectory


def refine_fixed_point(model: Callable, x: torch.Tensor, x_next: torch.Tensor, sigma: float, sigma_next: float,
                       iterations: int) -> torch.Tensor:
    """Iterate ``x_next <- x + (sigma_next - sigma) * eps(x_next, sigma_next)``; stop early when the update stops
    shrinking (the map is not a contraction for a rough network) and return the iterate with the smallest update."""
    sigma_batch = torch.full((x.shape[0],), sigma_next, device=x.device)
    best, best_change = x_next, float("inf")
    for _ in range(iterations):
        update = x + (sigma_next - sigma) * (x_next - model(x_next, sigma_batch)) / sigma_next
        change = float((update - x_next).abs().max())
        if change >= best_change:
            break
        best, best_change, x_next = update, change, update
    return best


def null_text_optimization(denoiser, trajectory: list[torch.Tensor], sigmas: torch.Tensor, cond: torch.Tensor,
                           uncond: torch.Tensor, scale: float, inner_steps: int = 10, lr: float = 1e-2,
                           tolerance: float = 1e-5, callback: Callable | None = None) -> list[torch.Tensor]:
    """Null-text inversion (Mokady et al. 2022, Algorithm 1): for each DDIM step i, optimise the unconditional
    embedding so that the guided step from the current latent lands on the pivot trajectory (the inversion at
    guidance 1), then take that step. ``denoiser`` is a :class:`ldm.denoiser.Denoiser`; ``cond``/``uncond``
    ``(1, L, D)`` (or SDXL's dicts, whose ``hidden`` part is optimised). Adam with the paper's schedule for its
    50 steps, stretched over any step count: with ``k = 50 i / steps``, lr ``lr * (1 - k / 100)`` and early stop at
    ``tolerance + 2e-5 * k`` (the paper's own ``i`` would make the lr negative past step 100). Returns one
    embedding per step; ``callback(i, loss)`` runs after each step."""
    embeddings = []
    x = trajectory[-1]
    as_cond = (lambda h: {**uncond, "hidden": h}) if isinstance(uncond, dict) else (lambda h: h)
    null = (uncond["hidden"] if isinstance(uncond, dict) else uncond).detach().clone()
    steps = len(sigmas) - 1
    for i in range(steps):
        paper_step = 50.0 * i / steps  # the paper's step index for its 50-step schedule
        sigma = sigmas[i].expand(x.shape[0])
        sigma_next = float(sigmas[i + 1])
        target = trajectory[-2 - i] / denoiser.noise_scale(sigma_next)  # in the network's units, as the paper
        with torch.no_grad():
            out_cond = denoiser.model_output(x, sigma, cond)
        null = null.detach().requires_grad_(True)
        optimizer = torch.optim.Adam([null], lr=lr * (1.0 - paper_step / 100.0))
        loss = torch.tensor(0.0)
        for _ in range(inner_steps):
            x_next = _guided_ddim_step(denoiser, x, sigma, sigma_next, out_cond, as_cond(null), scale)
            loss = torch.nn.functional.mse_loss(x_next / denoiser.noise_scale(sigma_next), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < tolerance + 2e-5 * paper_step:
                break
        null = null.detach()
        embeddings.append(null.clone())
        with torch.no_grad():
            x = _guided_ddim_step(denoiser, x, sigma, sigma_next, out_cond, as_cond(null), scale)
        if callback is not None:
            callback(i, loss.item())
    return embeddings


def _guided_ddim_step(denoiser, x, sigma, sigma_next: float, out_cond, null, scale: float) -> torch.Tensor:
    """One deterministic DDIM step from ``sigma`` to ``sigma_next`` with CFG on the network outputs."""
    out_uncond = denoiser.model_output(x, sigma, null)
    x0 = denoiser.to_x0(x, sigma, out_uncond + scale * (out_cond - out_uncond))
    return x0 + sigma_next * (x - x0) / sigma.view(-1, 1, 1, 1)
