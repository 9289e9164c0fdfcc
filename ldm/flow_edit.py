"""FlowEdit: inversion-free editing by the difference of two sampling flows (Kulikov et al. 2024, "FlowEdit:
Inversion-Free Text-Based Editing Using Pre-Trained Flow Models", Algorithm 1).

The source image ``x_src`` is noised with fresh noise at every step, ``z_src = a x_src + b eps``; the edited state
``z_edit`` (starting at ``x_src``) is carried along as ``z_tar = z_edit + z_src - x_src``, and moves by the
difference of the two branches' sampler steps, target prompt minus source prompt:
``z_edit += step(z_tar | target) - step(z_src | source)``. Where both prompts predict the same, nothing moves, so
what the prompts share (layout, background) stays, and no inversion is needed. Each branch's step is the DDIM /
Euler step in the coordinates ``z = a(sigma) x0 + b(sigma) eps``, which equals the paper's Euler step of the
velocity ``eps - x0`` in flow time (``coupling="flow"``: ``a = 1 - t``, ``b = t``, ``t = sigma / (1 + sigma)``);
``coupling="ve"`` couples in the VE coordinates ``x = x0 + sigma eps`` (``a = 1``, ``b = sigma``) that
diffusion models' samplers use. The coupling is where the two differ: what ``z_tar - z_src`` is.
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm.samplers import apply_step_callback, randn_like

COUPLINGS = ("flow", "ve")


def coordinates(sigma: torch.Tensor, coupling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``z = a x0 + b eps`` at VE noise level ``sigma``: flow ``(1 - t, t)``, VE ``(1, sigma)``."""
    if coupling == "flow":
        return 1 / (1 + sigma), sigma / (1 + sigma)
    if coupling == "ve":
        return torch.ones_like(sigma), sigma
    raise ValueError(f"unknown coupling {coupling!r}; known: {', '.join(COUPLINGS)}")


def flow_edit(source_model: Callable, target_model: Callable, x_src: torch.Tensor, sigmas: torch.Tensor,
              coupling: str = "flow", generator=None, callback: Callable | None = None) -> torch.Tensor:
    """FlowEdit (Kulikov et al. 2024, Alg. 1 with n_avg = 1 and n_min = 0) from clean latents ``x_src`` ``(B, C,
    h, w)`` over a descending sigma list (``sigmas[0]`` plays the paper's ``t_{n_max}``, ending at 0).
    ``source_model(x, sigma)`` / ``target_model(x, sigma)``: x0-denoisers in VE coordinates (each with its own
    guidance). Returns the edited clean latents."""
    z_edit = x_src.clone()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        a, b = coordinates(sigma, coupling)
        a_next, b_next = coordinates(sigma_next, coupling)
        noise = randn_like(x_src, generator).to(x_src.device)
        z_src = a * x_src + b * noise
        z_tar = z_src + (z_edit - x_src)  # in this order, identical branches stay bit-identical
        sigma_batch = sigma.expand(x_src.shape[0])
        x0_src = source_model(z_src / a, sigma_batch)
        x0_tar = target_model(z_tar / a, sigma_batch)

        def displacement(z, x0):  # one DDIM step in z coordinates (to x0 when sigma_next = 0), minus z
            return a_next * x0 + b_next * (z - a * x0) / b - z

        z_edit = z_edit + (displacement(z_tar, x0_tar) - displacement(z_src, x0_src))
        z_edit = apply_step_callback(callback, i, sigma, z_edit, x0_tar)
    return z_edit
