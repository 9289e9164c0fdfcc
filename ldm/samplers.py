"""Samplers: short functions over a denoiser ``model(x, sigma) -> x0`` and a descending sigma list.

Every function has the form ``sample_x(model, x, sigmas, generator=None, callback=None, **options) -> x`` where
``x`` ``(B, C, H, W)`` is the VE latent at ``sigmas[0]`` and ``sigmas`` ``(n + 1,)`` ends at the level to stop at.
All noise comes from ``generator``: one ``torch.Generator`` for the batch, or a list with one per batch element
(so image k of a batch equals the image generated alone from its own seed). ``callback(step, sigma, x, x0)``
runs after every step; it may return a replacement ``x`` (inpainting re-blends the known region this way).
The shape follows k-diffusion's ``sampling.py`` (Crowson), the maths the papers cited per function.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
import numpy.polynomial.polynomial as P
import torch
import torch.nn.functional as F

from ldm.schedules import ZERO_SNR_ALPHA_BAR, ZERO_SNR_ALPHA_BAR_EXACT, FlowSchedule, karras_sigmas

Generator = torch.Generator | Sequence[torch.Generator] | None


def randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn from one generator or one generator per batch element."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.cat([randn_like(x[i:i + 1], g) for i, g in enumerate(generator)])


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed, each in its seed's initial state (image k of a batch draws from seed k's)."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985, "Animating rotation with quaternion curves", sec. 5) from
    ``a`` to ``b`` ``(B, ...)``, per batch element: ``sin((1-t) w) / sin w * a + sin(t w) / sin w * b`` with ``w``
    the angle between them (0 gives ``a``, 1 gives ``b``). Two independent Gaussian noises in many dimensions are
    nearly orthogonal with equal norms, so every ``t`` gives a unit-variance draw, where the straight line
    ``(1-t) a + t b`` has variance ``(1-t)^2 + t^2`` (1/2 half-way). Nearly parallel pairs take the straight line."""
    cos = F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).clamp(-1, 1)  # (B,)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    parallel = sin < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    weight_a = torch.where(parallel, 1 - t, torch.sin((1 - t) * omega) / safe)
    weight_b = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    shape = (-1,) + (1,) * (a.dim() - 1)
    return weight_a.view(shape).to(a.dtype) * a + weight_b.view(shape).to(b.dtype) * b


def renoise(x: torch.Tensor, sigma: float, sigma_up: float, generator: Generator) -> torch.Tensor:
    """The forward process from ``sigma`` up to ``sigma_up`` >= ``sigma`` in VE variables: add independent noise of
    variance ``sigma_up^2 - sigma^2`` (Lugmayr et al. 2022, eq. 1 composed over the jump; the same in flow models'
    VE coordinates)."""
    if sigma_up < sigma:
        raise ValueError(f"renoise goes up: sigma_up {sigma_up} < sigma {sigma}")
    return x + (sigma_up**2 - sigma**2) ** 0.5 * randn_like(x, generator).to(x.device, x.dtype)


def repaint_path(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's resampling schedule (Lugmayr et al. 2022, sec. 4.2 and their ``get_schedule_jump``) over sigma
    indices ``0..steps`` (0 = noisiest): walk down one index at a time; on reaching an index ``k`` with
    ``(steps - k) % jump_length == 0`` and ``k > jump_length``, jump back up to ``k - jump_length`` and walk
    down again, ``jump_n_sample - 1`` times per such index. ``jump_n_sample=1`` is the plain walk ``0..steps``."""
    path, jumps = [0], {k: jump_n_sample - 1 for k in range(steps, jump_length, -jump_length)}
    k = 0
    while k < steps:
        k += 1
        path.append(k)
        if jumps.get(k, 0) > 0:
            jumps[k] -= 1
            k -= jump_length
            path.append(k)
    return path


def apply_step_callback(callback, i, sigma, x, x0):
    """Run the per-step callback; it may hand back a replacement x."""
    if callback is None:
        return x
    replaced = callback(i, sigma, x, x0)
    return x if replaced is None else replaced


def _sigma(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.to(x.device).expand(x.shape[0])  # (B,)


def log_midpoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sqrt(a b)``, halfway between two noise levels in log sigma (in lambda = -log sigma), via logs: no overflow
    of the product at a flow model's first sigma."""
    return (a.log() + b.log()).div(2).exp()


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split a step from ``sigma`` to ``sigma_next`` into a deterministic part down to ``sigma_down`` and fresh
    noise of std ``sigma_up``: ``sigma_up = eta * sigma_next * sqrt(sigma^2 - sigma_next^2) / sigma``. This is the
    DDIM noise level ``sigma_t(eta)`` (Song et al. 2021, eq. 16) seen in VE variables."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * sigma_next * (sigma**2 - sigma_next**2).sqrt() / sigma)
    return (sigma_next**2 - sigma_up**2).sqrt(), sigma_up


@torch.no_grad()
def sample_euler(model, x, sigmas, generator=None, callback=None):
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``
    (Karras et al. 2022, Algorithm 2 without the second-order correction). First order. Written as
    ``x' = x0 + sigma' d`` (equal to ``x + (sigma' - sigma) d``): at a flow model's first sigma (~1.7e7) the
    other form loses the image to float32 cancellation."""
    for i in range(len(sigmas) - 1):
        x0 = model(x, _sigma(sigmas[i], x))
        d = (x - x0) / sigmas[i]
        x = x0 + d * sigmas[i + 1]
        x = apply_step_callback(callback, i, sigmas[i], x, x0)
    return x


@torch.no_grad()
def sample_ddim(model, x, sigmas, generator=None, callback=None, eta: float = 0.0):
    """DDIM (Song et al. 2021, eq. 12): ``x' = x0 + sqrt(sigma'^2 - sigma_up^2) * eps + sigma_up * z`` with
    ``eps = (x - x0) / sigma`` and ``sigma_up`` from eq. 16 scaled by ``eta``. With ``eta = 0`` this is the
    deterministic DDIM update, which in VE variables equals an Euler step; ``eta = 1`` is ancestral DDPM."""
    for i in range(len(sigmas) - 1):
        x0 = model(x, _sigma(sigmas[i], x))
        eps = (x - x0) / sigmas[i]
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x0 + eps * sigma_down
        if sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
        x = apply_step_callback(callback, i, sigmas[i], x, x0)
    return x


@torch.no_grad()
def sample_ddpm(model, x, sigmas, generator=None, callback=None):
    """Ancestral DDPM sampling from the posterior q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 6-7), strided over
    the sigma list. In VP variables with ``a = alpha_bar_t, a' = alpha_bar_{t-1}``:
    mean = sqrt(a') (1 - a/a') / (1 - a) x0 + sqrt(a/a') (1 - a') / (1 - a) x_t,
    variance = (1 - a') / (1 - a) * (1 - a/a'). Equal in law to ``sample_ddim(eta=1)``."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, _sigma(sigma, x))
        a, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        beta = 1 - a / a_next
        x_vp = x * a.sqrt()
        mean = (a_next.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_next) * x_vp) / (1 - a)
        x_vp_next = mean
        if sigma_next > 0:
            x_vp_next = mean + randn_like(x, generator) * ((1 - a_next) / (1 - a) * beta).sqrt()
        x = x_vp_next / a_next.sqrt()
        x = apply_step_callback(callback, i, sigma, x, x0)
    return x


def sample_euler_ancestral(model, x, sigmas, generator=None, callback=None, eta: float = 1.0):
    """Ancestral Euler (k-diffusion's ``sample_euler_ancestral``): an Euler step down to ``sigma_down``, then
    fresh noise of std ``sigma_up`` (see :func:`ancestral_step`). In VE variables the Euler step to ``sigma_down``
    lands on ``x0 + sigma_down * eps``, so this is DDIM with the same eta, and is computed by it."""
    return sample_ddim(model, x, sigmas, generator, callback, eta=eta)


def ancestral_steps(model, x, sigmas, generator, callback, eta: float, step: Callable):
    """The ancestral loop (k-diffusion's): per sigma, x0, then ``step(model, x, x0, sigma, sigma_down)`` down to
    ``sigma_down``, then fresh noise of std ``sigma_up`` (:func:`ancestral_step`); a step to 0 returns x0."""
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        x0 = model(x, _sigma(sigma, x))
        sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], eta)
        x = x0 if sigma_down == 0 else step(model, x, x0, sigma, sigma_down)
        if sigma_up > 0:
            x = x + randn_like(x, generator) * sigma_up
        x = apply_step_callback(callback, i, sigma, x, x0)
    return x


def _dpmpp_2s_step(model, x, x0, sigma, sigma_down):
    """DPM-Solver++(2S)'s step from sigma to ``sigma_down`` (Lu et al. 2022, Algorithm 1 with r = 1/2): DDIM to the
    midpoint in ``lambda = -log sigma``, then the step from sigma taken with the midpoint's x0."""
    sigma_mid = log_midpoint(sigma, sigma_down)
    x0_mid = model(x0 + sigma_mid / sigma * (x - x0), _sigma(sigma_mid, x))
    return x0_mid + sigma_down / sigma * (x - x0_mid)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, generator=None, callback=None, eta: float = 1.0):
    """Ancestral DPM-Solver++(2S) (k-diffusion's ``sample_dpmpp_2s_ancestral``, A1111's "DPM++ 2S a"): a
    :func:`_dpmpp_2s_step` down to ``sigma_down``, then fresh noise (:func:`ancestral_steps`). Two network calls a
    step; ``eta = 0`` is DPM-Solver++(2S)."""
    return ancestral_steps(model, x, sigmas, generator, callback, eta, _dpmpp_2s_step)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, generator=None, callback=None, eta: float = 1.0):
    """DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``, A1111's "DPM++ SDE"): per step, an ancestral
    first-order step to the midpoint in ``lambda = -log sigma`` (``sigma_mid = sqrt(sigma sigma')``), then an
    ancestral step from sigma to sigma' with the midpoint's x0 (DPM-Solver++(2S) with ``r = 1/2``, Lu et al.
    2022, Algorithm 1, plus noise). The two noises are increments of one Brownian motion in sigma over
    ``[sigma_mid, sigma]`` and ``[sigma', sigma]`` (k-diffusion samples them from a Brownian tree): the second is
    ``(sqrt(a) z_1 + sqrt(b - a) z_2) / sqrt(b)`` of the first's ``z_1`` and a fresh ``z_2``, with ``a, b`` the
    intervals' lengths. Two network calls a step; a step to 0 returns x0."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, _sigma(sigma, x))
        if sigma_next == 0:
            x = x0
        else:
            sigma_mid = log_midpoint(sigma, sigma_next)
            first, second = randn_like(x, generator), randn_like(x, generator)
            down, up = ancestral_step(sigma, sigma_mid, eta)
            x_mid = x0 + down / sigma * (x - x0) + first * up
            x0_mid = model(x_mid, _sigma(sigma_mid, x))
            short, long = sigma - sigma_mid, sigma - sigma_next
            increment = (short / long).sqrt() * first + (1 - short / long).sqrt() * second
            down, up = ancestral_step(sigma, sigma_next, eta)
            x = x0_mid + down / sigma * (x - x0_mid) + increment * up
        x = apply_step_callback(callback, i, sigma, x, x0)
    return x


def heun_step(model, x, sigma, sigma_next):
    """One step of Heun's second-order method in sigma (Karras et al. 2022, Algorithm 1): an Euler predictor and
    a trapezoidal corrector averaging ``dx/dsigma``. The predictor ``x' = x0 + sigma' (x - x0) / sigma`` is exact
    for a constant x0, so the slopes at both ends differ by ``(x0 - x0') / sigma'`` and the corrector adds
    ``(sigma' - sigma) / sigma' * (x0 - x0') / 2`` to the predictor (written so, no float32 cancellation at a
    large sigma). A step to sigma = 0 is plain Euler. Returns the new x and the x0 estimate at ``sigma``."""
    x0 = model(x, _sigma(sigma, x))
    if sigma_next == 0:
        return x0, x0
    x_pred = x0 + (x - x0) / sigma * sigma_next
    x0_next = model(x_pred, _sigma(sigma_next, x))
    return x_pred + (sigma_next - sigma) / sigma_next * (x0 - x0_next) / 2, x0


@torch.no_grad()
def sample_heun(model, x, sigmas, generator=None, callback=None):
    """Heun's method (:func:`heun_step`) down the list (Karras et al. 2022, Algorithm 1; diffusers'
    HeunDiscreteScheduler)."""
    for i in range(len(sigmas) - 1):
        x, x0 = heun_step(model, x, sigmas[i], sigmas[i + 1])
        x = apply_step_callback(callback, i, sigmas[i], x, x0)
    return x


RESTART_LEVELS = (0.1, 2.0)
"""Restart's interval [t_min, t_max] in sigma (Xu et al. 2023; the A1111 web UI's choice for Stable Diffusion)."""


def restart_plan(steps: int) -> tuple[int, int, int]:
    """How the A1111 web UI's "Restart" spends ``steps`` Heun steps: ``(main, restart_steps, restart_times)``.
    From 20 steps on, 9 of them form one restart interval (from 36 on, two intervals of ``steps // 4``) and the
    main list has the rest; under 20 there is no restart."""
    if steps < 20:
        return steps, 0, 0
    if steps < 36:
        return steps - 9, 9, 1
    return steps - 2 * (steps // 4), steps // 4, 2


@torch.no_grad()
def sample_restart(model, x, sigmas, generator=None, callback=None, restart_steps: int = 9, restart_times: int = 1,
                   levels: tuple[float, float] = RESTART_LEVELS, first_step: str = "heun"):
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes", Algorithm 1, as
    the A1111 web UI runs it): Heun steps (:func:`heun_step`) down the list; on reaching the list's level nearest
    ``levels[0]``, ``restart_times`` times: fresh noise up to the list's level nearest ``levels[1]``
    (:func:`renoise`, the forward process) and ``restart_steps`` Heun steps back down a Karras list (rho 7)
    between the two. The noise contracts the errors the ODE steps made above (the paper's sec. 3). No restart
    when the list does not reach down from the upper level to the lower (e.g. a short img2img tail).
    ``first_step="euler"`` takes the first step with Euler (:data:`sample_restart_from_infinite_noise`)."""
    low = int(torch.argmin((sigmas - levels[0]).abs()))
    high = int(torch.argmin((sigmas - levels[1]).abs()))
    restart = None
    if restart_times > 0 and restart_steps > 0 and high < low:
        restart = karras_sigmas(restart_steps + 1, float(sigmas[low]), float(sigmas[high])).to(sigmas)  # (r + 1,)
    for i in range(len(sigmas) - 1):
        if i == 0 and first_step == "euler":
            x0 = model(x, _sigma(sigmas[0], x))
            x = x0 + (x - x0) / sigmas[0] * sigmas[1]
        else:
            x, x0 = heun_step(model, x, sigmas[i], sigmas[i + 1])
        if restart is not None and i + 1 == low:
            for _ in range(restart_times):
                x = renoise(x, float(sigmas[low]), float(restart[0]), generator)
                for sigma, sigma_next in zip(restart[:-1], restart[1:]):
                    x, _ = heun_step(model, x, sigma, sigma_next)
        x = apply_step_callback(callback, i, sigmas[i], x, x0)
    return x


def dpmpp_multistep_update(x, sigma, sigma_next, x0_history, h_history, eta: float = 0.0,
                           curvature_weight: float = 2.0, solver: str = "midpoint"):
    """The deterministic part of one DPM-Solver++ multistep update in VE variables from ``sigma`` to ``sigma_next``,
    of order ``len(x0_history)`` (1 to 3; the x0 estimates at this and the previous sigmas, newest last;
    ``h_history`` the previous steps' ``h = log(sigma / sigma')``, newest last). The exact update is
    ``x' = (sigma'/sigma) e^{-eta h} x + int (1 + eta) e^{-(1 + eta)(lambda' - u)} x0(u) du`` over
    ``lambda = -log sigma`` (Lu et al. 2022, "DPM-Solver++", eq. 8; eta = 1: the data-prediction SDE of sec. 5;
    ``h' = (1 + eta) h`` as in k-diffusion), with x0 expanded in lambda. Order 1 is DDIM; order 2 the midpoint
    form of DPM-Solver++(2M) (diffusers' default; the slope's integral ``(1 - e^{-h'}) / 2`` taken at the
    midpoint), or with ``solver="heun"`` its exact integral ``phi_2`` below (diffusers' and k-diffusion's "heun"
    solver type); order 3 DPM-Solver++(3M): with ``u = (lambda - lambda_i) / h``
    the x0 estimates fit ``x0 + d1 u + d2 u^2``, whose integral is ``phi_2 d1 - 2 phi_3 d2`` with
    ``phi_2 = (e^{-h'} - 1) / h' + 1`` and ``phi_3 = phi_2 / h' - 1/2`` (about -h'/6): exact when x0 is quadratic in
    lambda. diffusers' ``DPMSolverMultistepScheduler(solver_order=3)`` and k-diffusion's / ComfyUI's 3M and 3M SDE
    weigh ``d2`` by ``-phi_3``, half its integral, so their 3M converges at second order (tests/test_samplers.py);
    ``curvature_weight=1`` gives that weighting (for comparisons). (diffusers' third-order SDE update weighs ``d2``
    by ``-(1 + phi_3)``, which does not vanish as h -> 0: neither weight reproduces it.)"""
    h = sigma.log() - sigma_next.log()
    h_eta = h * (1 + eta)
    x0 = x0_history[-1]
    out = sigma_next / sigma * torch.exp(-eta * h) * x - torch.expm1(-h_eta) * x0
    if len(x0_history) == 2:
        r = h_history[-1] / h
        weight = -0.5 * torch.expm1(-h_eta) if solver == "midpoint" else torch.expm1(-h_eta) / h_eta + 1
        out = out + weight / r * (x0 - x0_history[-2])
    elif len(x0_history) == 3:
        r0, r1 = h_history[-1] / h, h_history[-2] / h
        d1_0 = (x0 - x0_history[-2]) / r0
        d1_1 = (x0_history[-2] - x0_history[-3]) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)  # h x0'(lambda)
        d2 = (d1_0 - d1_1) / (r0 + r1)  # h^2 x0''(lambda) / 2
        phi_2 = torch.expm1(-h_eta) / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        out = out + phi_2 * d1 - curvature_weight * phi_3 * d2
    return out


def _dpmpp_multistep(model, x, sigmas, generator, callback, max_order: int, eta: float, solver: str = "midpoint"):
    """DPM-Solver++ multistep of order up to ``max_order`` (Lu et al. 2022, Algorithm 2 and its third-order
    form): :func:`dpmpp_multistep_update`, plus for ``eta > 0`` fresh noise ``sigma' sqrt(1 - e^{-2 eta h})`` (the
    data-prediction SDE's, sec. 5). The order grows by one a step while the history fills; on a sigma list of
    fewer than 15 steps its last two steps drop to orders 2 and 1 (diffusers' ``lower_order_final``, which counts
    the whole run's steps: an img2img piece of a longer run drops where diffusers does not); a step to sigma = 0
    returns x0."""
    x0_history, h_history = [], []
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, _sigma(sigma, x))
        x0_history = (x0_history + [x0])[-max_order:]
        if sigma_next == 0:
            x = x0
        else:
            order = min(len(x0_history), steps - i if steps < 15 else max_order)
            x = dpmpp_multistep_update(x, sigma, sigma_next, x0_history[-order:], h_history, eta, solver=solver)
            h = sigma.log() - sigma_next.log()
            if eta > 0:
                x = x + randn_like(x, generator) * sigma_next * (-torch.expm1(-2 * eta * h)).sqrt()
            h_history = (h_history + [h])[-2:]
        x = apply_step_callback(callback, i, sigma, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2; diffusers' ``DPMSolverMultistepScheduler``): second-order
    multistep in ``lambda = -log(sigma)``, one network call a step."""
    return _dpmpp_multistep(model, x, sigmas, generator, callback, max_order=2, eta=0.0)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, generator=None, callback=None, eta: float = 1.0):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, sec. 5; k-diffusion's midpoint variant, diffusers'
    ``sde-dpmsolver++``): the data-prediction SDE solver at second order."""
    return _dpmpp_multistep(model, x, sigmas, generator, callback, max_order=2, eta=eta)


ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
"""Adams-Bashforth weights of the newest slope first, by order."""


@torch.no_grad()
def sample_plms(model, x, sigmas, generator=None, callback=None):
    """Pseudo linear multistep (PLMS; Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
    Manifolds", eq. 12 with the transfer function of eq. 11, which is DDIM's step; the original Stable Diffusion
    release's sampler; diffusers' ``PNDMScheduler(skip_prk_steps=True)``). In VE variables DDIM's step moves x
    along the noise direction ``eps = (x - x0) / sigma``: ``x' = x + (sigma' - sigma) e``, where ``e`` is the
    Adams-Bashforth combination of this step's eps and up to three earlier ones (:data:`ADAMS_BASHFORTH`, the
    constant weights of equal steps, as the paper uses them; on the uneven steps of a sigma list that makes it
    second order, tested). The first step has no history: it averages eps at both ends of a trial DDIM step (a
    Heun step, two network calls). Flow models and zero-terminal-SNR schedules run it in flow time
    (:data:`sample_flow_plms`)."""
    history = []  # eps of earlier steps, newest last
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, _sigma(sigma, x))
        eps = (x - x0) / sigma
        history = (history + [eps])[-4:]
        if len(history) == 1 and sigma_next > 0:
            trial = x + (sigma_next - sigma) * eps
            slope = (eps + (trial - model(trial, _sigma(sigma_next, x))) / sigma_next) / 2
        else:
            weights = ADAMS_BASHFORTH[len(history)]
            slope = sum(w * e for w, e in zip(weights, reversed(history)))
        x = x + (sigma_next - sigma) * slope
        x = apply_step_callback(callback, i, sigma, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(model, x, sigmas, generator=None, callback=None, eta: float = 1.0):
    """DPM-Solver++(2M) SDE with the slope term integrated exactly (the "heun" solver type of k-diffusion and
    diffusers; the A1111 web UI's "DPM++ 2M SDE Heun")."""
    return _dpmpp_multistep(model, x, sigmas, generator, callback, max_order=2, eta=eta, solver="heun")


@torch.no_grad()
def sample_dpmpp_3m(model, x, sigmas, generator=None, callback=None):
    """DPM-Solver++(3M): third-order multistep, one network call a step, with the curvature term integrated
    exactly (diffusers' ``solver_order=3`` weighs it by half; see :func:`dpmpp_multistep_update`)."""
    return _dpmpp_multistep(model, x, sigmas, generator, callback, max_order=3, eta=0.0)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, generator=None, callback=None, eta: float = 1.0):
    """DPM-Solver++(3M) SDE (Lu et al. 2022, sec. 5, at third order; ComfyUI's ``dpmpp_3m_sde`` but for the
    curvature weight and its order-2 warm-up step, here diffusers' midpoint form)."""
    return _dpmpp_multistep(model, x, sigmas, generator, callback, max_order=3, eta=eta)


def lms_coefficients(nodes: Sequence[float], sigma_next: float) -> list[float]:
    """The weights of a linear multistep step from ``nodes[0]`` to ``sigma_next``: the integrals
    ``int_{nodes[0]}^{sigma_next} l_j(s) ds`` of the Lagrange basis polynomials ``l_j`` over ``nodes`` (the sigmas
    of the stored slopes, newest first), so ``x' = x + sum_j w_j d_j`` integrates the polynomial through the slopes
    (Adams-Bashforth with variable steps; Hairer, Norsett & Wanner, "Solving ODEs I", sec. III.5). Computed
    exactly in float64 in the variable ``s - nodes[0]`` (diffusers
    integrates the same polynomials by quadrature)."""
    shifted = np.asarray(nodes, dtype=np.float64) - float(nodes[0])  # the newest node at 0
    h = float(sigma_next) - float(nodes[0])
    weights = []
    for j in range(len(shifted)):
        others = np.delete(shifted, j)
        basis = P.polyfromroots(others) / np.prod(shifted[j] - others)
        weights.append(float(P.polyval(h, P.polyint(basis))))
    return weights


@torch.no_grad()
def sample_lms(model, x, sigmas, generator=None, callback=None, order: int = 4):
    """Linear multistep (k-diffusion's ``sample_lms``; diffusers' ``LMSDiscreteScheduler``, A1111's "LMS") on
    ``dx/dsigma = (x - D(x, sigma)) / sigma``: the slope is the polynomial through the last ``order`` slopes,
    integrated over the step (:func:`lms_coefficients`); the first steps use the slopes there are (the first is
    Euler, written as in :func:`sample_euler`). Fourth order on a smooth path once ``order`` slopes are stored; the
    Euler start keeps the global error's leading term at second order."""
    slopes, nodes = [], []  # newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, _sigma(sigma, x))
        slopes, nodes = ([(x - x0) / sigma] + slopes)[:order], ([float(sigma)] + nodes)[:order]
        if len(slopes) == 1:
            x = x0 + slopes[0] * sigma_next
        else:
            x = x + sum(w * d for w, d in zip(lms_coefficients(nodes, float(sigma_next)), slopes))
        x = apply_step_callback(callback, i, sigma, x, x0)
    return x


DPM_2_TIMES = ("sigma", "flow")


def _dpm_2_midpoint(model, x, x0, sigma, sigma_down, time: str = "sigma"):
    """DPM2's step from ``sigma`` to ``sigma_down`` given ``x0 = D(x, sigma)``: the midpoint rule in the time
    variable s, ``x' = x0 + s' d + (s' - s) / s_mid (x0 - x0_mid)`` with ``d = (x - x0) / s``, the midpoint
    ``x_mid = x0 + s_mid d`` at ``s_mid = sqrt(s s')`` (no float32 cancellation at a large s). ``time="sigma"``:
    s = sigma on x; ``"flow"``: s = t = sigma / (1 + sigma) on ``x_t = x / (1 + sigma)``, as :func:`in_flow_time`
    runs whole samplers (ancestral DPM2 needs it per step: its noise is added in VE variables)."""
    flow = time == "flow"
    s, s_down = (FlowSchedule.sigma_to_t(sigma), FlowSchedule.sigma_to_t(sigma_down)) if flow else (sigma, sigma_down)
    x = x / (1 + sigma) if flow else x
    d = (x - x0) / s
    s_mid = log_midpoint(s, s_down)
    x_mid = x0 + d * s_mid
    sigma_mid = s_mid / (1 - s_mid) if flow else s_mid
    x0_mid = model(x_mid * (1 + sigma_mid) if flow else x_mid, _sigma(sigma_mid, x))
    x_down = x0 + d * s_down + (s_down - s) / s_mid * (x0 - x0_mid)
    return x_down * (1 + sigma_down) if flow else x_down


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, generator=None, callback=None, eta: float = 1.0, time: str = "sigma"):
    """Ancestral DPM2 (k-diffusion's ``sample_dpm_2_ancestral``; diffusers' ``KDPM2AncestralDiscreteScheduler``,
    A1111's "DPM2 a"): a DPM2 step (:func:`_dpm_2_midpoint`, in ``time``) down to ``sigma_down``, then fresh
    noise (:func:`ancestral_steps`)."""
    if time not in DPM_2_TIMES:
        raise ValueError(f"unknown DPM2 time variable {time!r}; known: {', '.join(DPM_2_TIMES)}")

    def step(model, x, x0, sigma, sigma_down):
        return _dpm_2_midpoint(model, x, x0, sigma, sigma_down, time)
    return ancestral_steps(model, x, sigmas, generator, callback, eta, step)


@torch.no_grad()
def sample_flow_dpm_2_ancestral(model, x, sigmas, generator=None, callback=None, eta: float = 1.0):
    """Ancestral DPM2 with its DPM2 steps in flow time: from a flow model's or zero-terminal-SNR schedule's first
    sigma, where in sigma the midpoint slope multiplies the difference of its two x0 estimates by
    ``(sigma - sigma') / sqrt(sigma sigma')``."""
    return sample_dpm_2_ancestral(model, x, sigmas, generator, callback, eta, time="flow")


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, generator=None, callback=None):
    """DPM2 (k-diffusion's ``sample_dpm_2``, after DPM-Solver-2, Lu et al. 2022, Alg. 1 with r = 1/2; diffusers'
    ``KDPM2DiscreteScheduler``, A1111's "DPM2"): the explicit midpoint rule on ``dx/dsigma`` with the midpoint
    halfway in log sigma. Second order, two network calls a step. Ancestral DPM2 without noise, and computed by
    it."""
    return sample_dpm_2_ancestral(model, x, sigmas, generator, callback, eta=0.0)


@torch.no_grad()
def sample_lcm(model, x, sigmas, generator=None, callback=None):
    """Multistep latent consistency sampling (Luo et al. 2023, Algorithm 1; Song et al. 2023, Algorithm 1;
    diffusers' ``LCMScheduler``): take the model's x0 and noise it afresh to the next level, ``x' = x0 + sigma' z``
    (in VP variables ``sqrt(a') x0 + sqrt(1 - a') z``); the last step returns x0. For a consistency-distilled
    model (LCM, LCM-LoRA) on its ``"lcm"`` timesteps. The consistency parameterisation's boundary scalings
    (``c_skip = 0.25 / ((10 t)^2 + 0.25)``, ``c_out``) are within 7e-6 of (0, 1) at every timestep it visits
    (t >= 19), so x0 is used as it is."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, _sigma(sigma, x))
        x = x0 if sigma_next == 0 else x0 + randn_like(x, generator) * sigma_next
        x = apply_step_callback(callback, i, sigma, x, x0)
    return x


def in_flow_time(sampler: Callable) -> Callable:
    """A sampler run in flow time ``t = sigma / (1 + sigma)`` on ``x_t = x / (1 + sigma)`` (ComfyUI's sampling of
    flow models, sigma = t; any VE path maps there): ``dx_t/dt = (x_t - x0) / t``, the VE ODE's form, so the
    sampler's steps apply unchanged (rectified flow: Liu et al. 2022). Trapezoid and midpoint rules then
    interpolate in t, which stays in [0, 1], instead of in sigma, whose first value is ~1.7e7 on a flow model and
    4096 on a zero-terminal-SNR schedule.
    Times keep the sigmas' dtype (t = 1 - 2^-24 at a flow model's first sigma is exact in float32; mps has no
    float64), converted through float64 on the CPU; the callback sees VE variables."""

    def sample(model, x, sigmas, generator=None, callback=None, **options):
        sigmas64 = sigmas.detach().cpu().double()
        times = FlowSchedule.sigma_to_t(sigmas64).to(sigmas.device, sigmas.dtype)  # (n + 1,)

        def model_t(x_t, t):  # t (B,)
            sigma = t / (1 - t)
            return model(x_t * (1 + sigma).view(-1, 1, 1, 1).to(x_t.dtype), sigma)

        def callback_t(i, t, x_t, x0):
            scale = float(1 + sigmas64[i + 1])
            replaced = callback(i, sigmas[i], x_t * scale, x0)
            return None if replaced is None else replaced / scale

        x_t = sampler(model_t, x / float(1 + sigmas64[0]), times, generator,
                      None if callback is None else callback_t, **options)
        return x_t * float(1 + sigmas64[-1])

    sample.__name__ = sample.__qualname__ = f"{sampler.__name__}_in_flow_time"
    sample.__doc__ = f"{sampler.__name__} in flow time; see :func:`in_flow_time`."
    return sample


def _unipc_update(x, x0_history, lambdas, lambda_next, variant: str, x0_new=None):
    """One UniPC update (Zhao et al. 2023, Algorithm 1 predictor / Algorithm 2 corrector, data prediction) from
    the state ``x`` at ``lambdas[-1]`` to ``lambda_next``, ``lambda = -log(sigma)``, in VE variables (the VP
    factor ``alpha_t`` of the paper divides out). ``x0_history`` holds the x0 estimates at ``lambdas``, oldest
    first (at most two, the order-2 predictor's); their divided difference against the newest one,
    ``D_1 = (x0_1 - x0_0) / r_1`` with ``r_1 = (lambda_1 - lambda_0) / h``, enters with weight ``rho``. The
    corrector (``x0_new``, the estimate at the predicted point) adds the difference ``x0_new - x0_0`` at ``r = 1``.
    With one difference ``rho = 1/2`` in closed form; with two the weights solve the 2 x 2 system ``R rho = b``
    (eq. 8), here by Cramer's rule. ``variant`` is ``B(h)``: ``"bh1"`` = ``h``, ``"bh2"`` = ``e^h - 1``
    (sec. 3.3)."""
    lambda_0, x0_0 = lambdas[-1], x0_history[-1]
    h = lambda_next - lambda_0
    ratios = [(lam - lambda_0) / h for lam in reversed(lambdas[:-1])]  # newest first
    differences = [(x0 - x0_0) / r for x0, r in zip(reversed(x0_history[:-1]), ratios)]
    if x0_new is not None:
        ratios.append(torch.ones_like(h))
        differences.append(x0_new - x0_0)
    order = len(differences)
    hh = -h  # the data-prediction form integrates in -lambda
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    x_next = torch.exp(hh) * x - h_phi_1 * x0_0
    if order == 0:
        return x_next
    if order == 1:
        rhos = (0.5,)
    else:
        # b_k = k! h phi_{k+1}(h) / B(h) for k = 1, 2, with h phi_2 = h phi_1 / hh - 1 and
        # h phi_3 = h phi_2 / hh - 1/2 (the paper's phi recursion); R = [[1, 1], [r_1, 1]]
        h_phi_2 = h_phi_1 / hh - 1
        b_1, b_2 = h_phi_2 / b_h, 2 * (h_phi_2 / hh - 0.5) / b_h
        r_1 = ratios[0]
        rho_2 = (b_2 - r_1 * b_1) / (1 - r_1)
        rhos = (b_1 - rho_2, rho_2)
    return x_next - b_h * sum(rho * d for rho, d in zip(rhos, differences))


def _unipc(model, x, sigmas, callback, variant: str):
    """UniPC multistep with predictor order 2 (first order on the first step, while the history fills) and the
    UniC corrector after every step but the last. The corrector reuses the network call at the predicted
    point, so each step costs one call. A step to sigma = 0 returns x0, the limit of every order (diffusers'
    ``lower_order_final`` also drops to first order on a last step that ends above zero; we keep the order)."""
    lambdas, x0_history = [], []  # the last two steps' lambda and x0, oldest first
    x_before = x_predicted = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, _sigma(sigma, x))
        lam = -sigma.log()
        if x_before is not None:  # UniC: correct the predicted x with the x0 estimated there; a change the
            # callback made to the prediction (inpainting's blend) is kept as an offset
            corrected = _unipc_update(x_before, x0_history, lambdas, lam, variant, x0_new=x0)
            x = corrected if x is x_predicted else x + (corrected - x_predicted)
        lambdas, x0_history = (lambdas + [lam])[-2:], (x0_history + [x0])[-2:]
        x_before = x
        if sigma_next == 0:
            x = x0
        else:
            x = _unipc_update(x, x0_history, lambdas, -sigma_next.log(), variant)
        x_predicted = x
        x = apply_step_callback(callback, i, sigma, x, x0)
    return x


@torch.no_grad()
def sample_unipc(model, x, sigmas, generator=None, callback=None):
    """UniPC (Zhao et al. 2023) with B(h) = e^h - 1 ("bh2"), predictor order 2 plus the UniC corrector:
    diffusers' ``UniPCMultistepScheduler`` default. Third order away from the ends for one call per step."""
    return _unipc(model, x, sigmas, callback, variant="bh2")


@torch.no_grad()
def sample_unipc_bh1(model, x, sigmas, generator=None, callback=None):
    """UniPC with B(h) = h ("bh1", the variant the paper recommends for unconditional sampling below 10 steps),
    predictor order 2 plus the UniC corrector."""
    return _unipc(model, x, sigmas, callback, variant="bh1")


@torch.no_grad()
def sample_flow_euler(model, x, sigmas, generator=None, callback=None):
    """Euler on the rectified-flow ODE ``dx_t/dt = v = noise - x0`` (Liu et al. 2022; SD3's sampler). With
    ``x_t = x / (1 + sigma)`` and ``t = sigma / (1 + sigma)`` the step ``x_t' = x_t + (t' - t) v`` lands on
    ``x0 + sigma' (x - x0) / sigma``: the same update as :func:`sample_euler` in VE variables, so it is that."""
    return sample_euler(model, x, sigmas, generator, callback)


sample_flow_heun = in_flow_time(sample_heun)
"""Heun in flow time (diffusers' FlowMatchHeunDiscreteScheduler, ComfyUI): bounded from a flow model's first sigma,
where the trapezoid in sigma multiplies ``x0 - x0'`` by about ``sigma / sigma'``."""
sample_restart_from_infinite_noise = partial(sample_restart, first_step="euler")
"""Restart from a flow model's or a zero-terminal-SNR schedule's first sigma (~1.7e7, 4096): there Heun's
trapezoid in sigma would multiply the first x0 estimate's error by about ``sigma / sigma'``, so the first step is
Euler's; the restart interval (sigma 0.1 to 2) and the noise it adds are the same in those models' VE coordinates."""
sample_flow_plms = in_flow_time(sample_plms)
"""PLMS in flow time: there ``(x_t - x0) / t`` is the velocity, so it is the Adams-Bashforth method on the flow
ODE; in sigma its eps steps from a flow model's first sigma (~1.7e7) would cancel in float32."""
sample_flow_dpm_2 = in_flow_time(sample_dpm_2)
"""DPM2 in flow time: in sigma its midpoint slope multiplies the difference of its two x0 estimates by
``(sigma - sigma') / sqrt(sigma sigma')``, about 24 from a zero-SNR schedule's first sigma (4096) to 7."""


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, order, whether it draws noise, whether the network gets integer
    timesteps for Karras sigmas (diffusers' DPM-Solver and UniPC round them), the alpha_bar standing for zero at
    the end of a zero-terminal-SNR schedule (see ``ldm.schedules``), and whose timestep lists it follows
    (``ldm.schedules.TIMESTEP_CONVENTIONS``: the diffusers scheduler of the same method). ``flow_time_fn``, where
    set, replaces ``fn`` on models whose full-strength sampling starts at infinite noise's stand-in (flow models,
    sigma ~1.7e7, and zero-terminal-SNR schedules, sigma = 4096), img2img pieces included: from there the method
    in sigma amplifies the error of the network's first, least reliable x0 estimate by about ``sigma / sigma'``,
    and in flow time it does not. LMS has none: its polynomial in flow time extrapolates the velocity from that
    first estimate, and in sigma it does not (see README, "Samplers")."""

    fn: Callable
    order: int
    stochastic: bool
    quantize_karras_timesteps: bool = False
    terminal_alpha_bar: float = ZERO_SNR_ALPHA_BAR
    flow_time_fn: Callable | None = None
    timestep_convention: str = "euler"

    def function(self, infinite_noise_start: bool) -> Callable:
        """The sampling function for a flow model or a zero-terminal-SNR schedule (``infinite_noise_start=True``)
        or another schedule."""
        return self.flow_time_fn if infinite_noise_start and self.flow_time_fn is not None else self.fn


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, 1, True, terminal_alpha_bar=ZERO_SNR_ALPHA_BAR_EXACT,
                        timestep_convention="ddim"),
    "ddim": SamplerSpec(sample_ddim, 1, False, terminal_alpha_bar=ZERO_SNR_ALPHA_BAR_EXACT,
                        timestep_convention="ddim"),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, 2, False, quantize_karras_timesteps=True, timestep_convention="dpm"),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, 2, True, quantize_karras_timesteps=True,
                                timestep_convention="dpm"),
    "dpmpp_2m_sde_heun": SamplerSpec(sample_dpmpp_2m_sde_heun, 2, True, quantize_karras_timesteps=True,
                                     timestep_convention="dpm"),
    "dpmpp_3m": SamplerSpec(sample_dpmpp_3m, 3, False, quantize_karras_timesteps=True, timestep_convention="dpm"),
    "dpmpp_3m_sde": SamplerSpec(sample_dpmpp_3m_sde, 3, True, quantize_karras_timesteps=True,
                                timestep_convention="dpm"),
    "euler": SamplerSpec(sample_euler, 1, False),
    "euler_a": SamplerSpec(sample_euler_ancestral, 1, True),
    "dpmpp_2s_a": SamplerSpec(sample_dpmpp_2s_ancestral, 2, True),
    "dpmpp_sde": SamplerSpec(sample_dpmpp_sde, 2, True),
    "heun": SamplerSpec(sample_heun, 2, False, flow_time_fn=sample_flow_heun),
    "restart": SamplerSpec(sample_restart, 2, True, flow_time_fn=sample_restart_from_infinite_noise),
    "lms": SamplerSpec(sample_lms, 4, False),
    "plms": SamplerSpec(sample_plms, 2, False, timestep_convention="ddim", flow_time_fn=sample_flow_plms),
    "dpm_2": SamplerSpec(sample_dpm_2, 2, False, flow_time_fn=sample_flow_dpm_2),
    "dpm_2_a": SamplerSpec(sample_dpm_2_ancestral, 2, True, flow_time_fn=sample_flow_dpm_2_ancestral),
    "lcm": SamplerSpec(sample_lcm, 1, True, terminal_alpha_bar=ZERO_SNR_ALPHA_BAR_EXACT, timestep_convention="lcm"),
    "flow_euler": SamplerSpec(sample_flow_euler, 1, False),
    "unipc": SamplerSpec(sample_unipc, 3, False, quantize_karras_timesteps=True, timestep_convention="dpm"),
    "unipc_bh1": SamplerSpec(sample_unipc_bh1, 3, False, quantize_karras_timesteps=True, timestep_convention="dpm"),
}


def get_sampler(name: str) -> SamplerSpec:
    """Look up a sampler by name; an unknown name lists the known ones."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
