"""Noise schedules and the sigma lists that samplers walk.

Everything here is in the variance-exploding (VE) view used across the engine: a noisy latent is
``x = x0 + sigma * noise``. A variance-preserving (VP) DDPM step t with cumulative product
``alpha_bar_t`` has ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` (Karras et al. 2022, eq. 4 / table 1);
a rectified-flow time t (``x_t = (1 - t) x0 + t noise``) has ``sigma = t / (1 - t)``.

A sampler gets a descending tensor of sigmas, ``(steps + 1,)``, whose last entry is the level it ends at
(0 for a clean sample). This module builds those lists the way diffusers' schedulers define them so that
our samplers can be held to diffusers' numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "karras", "exponential", "beta", "kl_optimal",
                     "align_your_steps")
# spacings that place sigmas directly between the schedule's ends rather than through a timestep grid
SIGMA_SPACINGS = ("karras", "exponential", "beta", "kl_optimal")
# whose timestep lists a sampler reproduces: diffusers' EulerDiscrete-, DDIM- or DPMSolverMultistepScheduler
TIMESTEP_CONVENTIONS = ("euler", "ddim", "dpm", "lcm")
AYS_NOISE_LEVELS: dict[str, tuple[float, ...]] = {
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)}
"""Align Your Steps' noise levels (Sabour et al. 2024), optimised for 10 steps of Stable Diffusion 1.5 and of SDXL,
as NVIDIA's "how to" page publishes them (and diffusers' ``AysSchedules``, the A1111 web UI). Both run between SD's
sigma_max and sigma_min. ComfyUI uses SD's sigmas at the published timesteps instead (999, 850, 736, ...), which
differ from these by up to 0.3 %."""
LCM_ORIGINAL_STEPS = 50
"""The distillation schedule's length of latent consistency models (diffusers' ``original_inference_steps``)."""

# A zero-terminal-SNR schedule puts the first sigma at infinity; the VE view needs it finite. diffusers' Euler,
# Heun and DPM-Solver clip the terminal alpha_bar to 2^-24 (sigma ~ 4096); its DDIM and DDPM keep alpha_bar = 0
# in VP variables, which 2^-64 (sigma ~ 4.3e9, still exact in float32 ratios) reproduces to float precision.
ZERO_SNR_ALPHA_BAR = 2.0**-24
ZERO_SNR_ALPHA_BAR_EXACT = 2.0**-64


def make_betas(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> torch.Tensor:
    """Per-step betas, ``(T,)`` float32.

    - ``linear``: DDPM (Ho et al. 2020, sec. 4), betas linear in t.
    - ``scaled_linear``: Stable Diffusion's, sqrt(beta) linear in t.
    - ``squaredcos_cap_v2``: improved DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas capped at 0.999.
    """
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), 0.999)
                 for i in range(num_train_timesteps)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {schedule!r}; known: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last step has zero SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1): shift and scale sqrt(alpha_bar) so it ends at exactly 0 while
    keeping its first value."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()  # (T,)
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class DiscreteSchedule:
    """A VP schedule trained on integer timesteps 0..T-1, seen as sigmas (Karras et al. 2022, table 1)."""

    alphas_cumprod: torch.Tensor  # (T,) float32, decreasing

    @classmethod
    def from_config(cls, config: dict, terminal_alpha_bar: float = ZERO_SNR_ALPHA_BAR) -> "DiscreteSchedule":
        """Build from a diffusers scheduler config (``beta_schedule``, ``beta_start``, ``beta_end``,
        ``num_train_timesteps``, ``rescale_betas_zero_snr``, ``trained_betas``); a zero-SNR schedule's last
        alpha_bar is set to ``terminal_alpha_bar``."""
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
        else:
            betas = make_betas(config.get("beta_schedule", "linear"), config.get("num_train_timesteps", 1000),
                               config.get("beta_start", 0.0001), config.get("beta_end", 0.02))
        zero_snr = bool(config.get("rescale_betas_zero_snr", False))
        if zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_snr:
            alphas_cumprod[-1] = terminal_alpha_bar
        return cls(alphas_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def sigmas(self) -> torch.Tensor:
        """``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` for t = 0..T-1, increasing, ``(T,)``."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for a sigma, interpolating linearly in log-sigma between the two nearest
        training steps (as k-diffusion and diffusers' ``_sigma_to_t`` do); exact at training sigmas."""
        log_sigmas = self.sigmas.log().to(sigma.device)  # (T,)
        log_sigma = sigma.float().clamp(min=1e-10).log()
        low = (log_sigma[..., None] >= log_sigmas).sum(-1).sub(1).clamp(0, len(log_sigmas) - 2)
        w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
        return low + w

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a (possibly fractional) timestep, interpolating linearly in sigma (diffusers' Euler family)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        grid = torch.arange(self.num_train_timesteps, dtype=torch.float64)
        return torch.from_numpy(np.interp(t.numpy(), grid.numpy(), self.sigmas.double().numpy())).float()

    def timesteps(self, steps: int, spacing: str, steps_offset: int = 0, convention: str = "euler") -> np.ndarray:
        """The ``steps`` timesteps a sampler visits, descending, as diffusers' schedulers define them (Lin et al.
        2023, table 2): ``leading`` = k * (T // n) + offset, ``trailing`` = round(T - k * T / n) - 1, ``linspace``
        = linspace(0, T - 1, n), fractional for ``convention="euler"`` (EulerDiscreteScheduler), rounded for
        ``"ddim"`` (DDIMScheduler). ``"dpm"`` (DPMSolverMultistepScheduler) spaces n + 1 points and drops the
        last for ``leading`` (k * (T // (n + 1)) + offset) and ``linspace`` (rounded). ``"lcm"`` ignores the spacing
        and picks n of the distillation schedule's timesteps (:func:`lcm_timesteps`)."""
        T = self.num_train_timesteps
        if convention not in TIMESTEP_CONVENTIONS:
            raise ValueError(f"unknown timestep convention {convention!r}; known: {', '.join(TIMESTEP_CONVENTIONS)}")
        if convention == "lcm":
            return lcm_timesteps(steps, T)
        if spacing in ("leading", "trailing") and steps > T:  # leading would repeat t = 0, trailing other steps
            raise ValueError(f"num_inference_steps {steps} exceeds the schedule's {T} training steps with "
                             f"{spacing!r} spacing; use at most {T} (or 'linspace' / 'karras')")
        points = steps + 1 if convention == "dpm" else steps
        if spacing == "leading":
            ks = np.arange(points) * (T // points)
            return ks[::-1][:steps].astype(np.float64) + steps_offset
        if spacing == "trailing":
            # arange(T, 0, -T / n) would give n + 1 values for some n (61, 103, ...), as diffusers' does
            return np.round(T - np.arange(steps) * T / steps).astype(np.float64) - 1
        if spacing == "linspace":
            grid = np.linspace(0, T - 1, points, dtype=np.float64)[::-1][:steps]
            return grid.copy() if convention == "euler" else grid.round()
        raise ValueError(f"unknown timestep spacing {spacing!r}; known: {', '.join(TIMESTEP_SPACINGS)}")

    def sigma_list(self, steps: int, spacing: str = "leading", steps_offset: int = 0,
                   final_sigma: str = "zero", rho: float = 7.0, convention: str = "euler",
                   family: str = "sd1") -> torch.Tensor:
        """Descending sigmas ``(steps + 1,)`` for a sampler. ``spacing="karras"`` gives Karras et al. 2022
        eq. 5 between the schedule's sigma_max and sigma_min with ``rho``, ``"exponential"`` and ``"beta"`` the
        lists of :func:`spaced_sigmas` between the same ends, ``"align_your_steps"`` the levels
        :func:`align_your_steps_sigmas` made for ``family`` (``"sd1"`` or ``"sdxl"``; on a zero-terminal-SNR
        schedule the first level is its top, pure noise, instead of SD's sigma_max); other spacings are
        :meth:`timesteps` with ``convention``. ``final_sigma`` is ``"zero"`` (end on a clean sample) or
        ``"sigma_min"`` (end at the schedule's smallest sigma, like DDIM with ``set_alpha_to_one=False``)."""
        # DDIM / DDPM's stand-in for alpha_bar = 0 (sigma ~4e9) must not set where a ramp starts: from there 19
        # of 20 steps would sit above SD's sigma_max; start at Euler's stand-in (~4096) as diffusers
        top = min(self.sigma_max, ((1 - ZERO_SNR_ALPHA_BAR) / ZERO_SNR_ALPHA_BAR) ** 0.5)
        if spacing == "align_your_steps" and convention != "lcm":
            self.check_align_your_steps()
            sigmas = align_your_steps_sigmas(steps, family)
            if self.zero_terminal_snr:
                sigmas[0] = top
        elif spacing in SIGMA_SPACINGS and convention != "lcm":  # LCM keeps its own timesteps, as LCMScheduler
            sigmas = spaced_sigmas(spacing, steps, self.sigma_min, top, rho)
        else:
            sigmas = self.t_to_sigma(torch.from_numpy(self.timesteps(steps, spacing, steps_offset, convention)))
        # LCM ends on x0 whatever the folder's final_sigmas_type, as diffusers' LCMScheduler
        return append_final_sigma(sigmas, "zero" if convention == "lcm" else final_sigma, self.sigma_min)

    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the last timestep is pure noise (Lin et al. 2023), its alpha_bar a stand-in for 0."""
        return float(self.alphas_cumprod[-1]) <= ZERO_SNR_ALPHA_BAR

    def check_align_your_steps(self) -> None:
        """Align Your Steps' levels are absolute sigmas of Stable Diffusion's schedule; refuse another one (a
        zero-terminal-SNR rescaling of it keeps sigma_min and moves only the top to infinity)."""
        levels = AYS_NOISE_LEVELS["sd1"]
        top_differs = abs(self.sigma_max / levels[0] - 1) > 1e-2 and not self.zero_terminal_snr
        if top_differs or abs(self.sigma_min / levels[-1] - 1) > 1e-2:
            raise ValueError(f"align_your_steps' noise levels are Stable Diffusion's (sigma {levels[0]:.4g} to "
                             f"{levels[-1]:.3g}); this schedule runs from {self.sigma_max:.4g} to "
                             f"{self.sigma_min:.3g}: use karras or kl_optimal")


def align_your_steps_sigmas(steps: int, family: str = "sd1") -> torch.Tensor:
    """Align Your Steps (Sabour et al. 2024): the 10-step levels of :data:`AYS_NOISE_LEVELS`, for other step
    counts interpolated linearly in log sigma at ``steps + 1`` evenly spaced points (the paper's "how to"). Their
    last level (SD's sigma_min) is left for the final sigma, so 10 steps walk the published list with its end
    replaced by 0, as ComfyUI's AlignYourStepsScheduler and diffusers' ``AysSchedules`` do (the A1111 web UI
    interpolates ``steps`` levels and appends 0 after sigma_min, one level more). ``(steps,)`` descending."""
    if family not in AYS_NOISE_LEVELS:
        raise ValueError(f"align_your_steps has levels for {', '.join(AYS_NOISE_LEVELS)}, not {family!r}")
    levels = np.log(np.array(AYS_NOISE_LEVELS[family]))  # (11,) descending
    log_sigmas = np.interp(np.linspace(0, 1, steps + 1), np.linspace(0, 1, len(levels)), levels)
    return torch.from_numpy(np.exp(log_sigmas[:-1])).float()


def lcm_timesteps(steps: int, num_train_timesteps: int = 1000, original_steps: int = LCM_ORIGINAL_STEPS) -> np.ndarray:
    """Timesteps of latent consistency sampling (Luo et al. 2023, sec. 4.2; diffusers' ``LCMScheduler``): the model
    was distilled on the ``original_steps`` timesteps ``k T / original_steps - 1`` (k = 1 ... original_steps);
    sampling takes ``steps`` of them, evenly by index from the top: ``(steps,)`` descending, 999 first."""
    if not 1 <= steps <= original_steps:
        raise ValueError(f"the lcm sampler takes 1 to {original_steps} steps (its distillation schedule's), got {steps}")
    stride = num_train_timesteps // original_steps
    schedule = (np.arange(original_steps, 0, -1) * stride - 1).astype(np.float64)  # (original_steps,) descending
    return schedule[np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    ``(steps,)`` descending, without the final zero."""
    ramp = np.linspace(0, 1, steps)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.from_numpy((inv_max + ramp * (inv_min - inv_max)) ** rho).float()


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in log sigma (equal steps in lambda = -log sigma, the variable of DPM-Solver; diffusers'
    ``use_exponential_sigmas``, ComfyUI's "exponential"), ``(steps,)`` descending, without the final zero."""
    return torch.from_numpy(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))).float()


def beta_sigmas(steps: int, sigma_min: float, sigma_max: float, alpha: float = 0.6,
                beta: float = 0.6) -> torch.Tensor:
    """Lee et al. 2024 ("Beta Sampling is All You Need"): sigmas at the quantiles of a Beta(alpha, beta)
    distribution, ``sigma_min + ppf(1 - i / (n - 1)) (sigma_max - sigma_min)``; with alpha = beta = 0.6 the steps
    crowd at both ends (diffusers' ``use_beta_sigmas``, ComfyUI's "beta"). ``(steps,)`` descending, without the
    final zero."""
    from scipy.stats import beta as beta_distribution

    quantiles = beta_distribution.ppf(1 - np.linspace(0, 1, steps), alpha, beta)
    return torch.from_numpy(sigma_min + quantiles * (sigma_max - sigma_min)).float()


def kl_optimal_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in ``arctan(sigma)`` (the KL-optimal schedule of Sabour et al. 2024, "Align Your
    Steps"; ComfyUI's "kl_optimal"). For unit-variance Gaussian data an Euler step from sigma to sigma' shrinks the
    exact solution by ``cos(arctan sigma - arctan sigma')``, so among lists with the same ends this one makes
    Euler's result closest to the exact one. ``(steps,)`` descending, without the final zero."""
    angles = np.linspace(math.atan(sigma_max), math.atan(sigma_min), steps)
    return torch.from_numpy(np.tan(angles)).float()


def spaced_sigmas(spacing: str, steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """``(steps,)`` descending sigmas from ``sigma_max`` to ``sigma_min`` by one of :data:`SIGMA_SPACINGS`."""
    if spacing == "karras":
        return karras_sigmas(steps, sigma_min, sigma_max, rho)
    if spacing == "exponential":
        return exponential_sigmas(steps, sigma_min, sigma_max)
    if spacing == "beta":
        return beta_sigmas(steps, sigma_min, sigma_max)
    if spacing == "kl_optimal":
        return kl_optimal_sigmas(steps, sigma_min, sigma_max)
    raise ValueError(f"unknown sigma spacing {spacing!r}; known: {', '.join(SIGMA_SPACINGS)}")


def append_final_sigma(sigmas: torch.Tensor, final_sigma: str, sigma_min: float) -> torch.Tensor:
    """Append the level sampling ends at: 0 or ``sigma_min``; ``(n,) -> (n + 1,)`` float32."""
    if final_sigma not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
    last = 0.0 if final_sigma == "zero" else sigma_min
    return torch.cat([sigmas.float(), torch.tensor([last], dtype=torch.float32)])


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow ``x_t = (1 - t) x0 + t noise`` (Liu et al. 2022; Esser et al. 2024, SD3), with SD3's
    timestep shift ``t' = s t / (1 + (s - 1) t)`` (Esser et al. 2024, sec. 5.3.2). Seen as sigmas,
    ``sigma = t / (1 - t)``; t = 1 is clipped to ``1 - 2^-24`` so the first sigma (~1.7e7) is finite."""

    shift: float = 1.0
    num_train_timesteps: int = 1000

    T_MAX = 1.0 - 2.0**-24

    def shifted(self, t: np.ndarray) -> np.ndarray:
        return self.shift * t / (1 + (self.shift - 1) * t)

    @staticmethod
    def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).clamp(max=FlowSchedule.T_MAX)
        return (t / (1 - t)).float()

    @staticmethod
    def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
        return sigma / (1 + sigma)

    @property
    def sigma_min(self) -> float:
        return float(self.t_to_sigma(torch.tensor(self.shifted(np.float64(1 / self.num_train_timesteps)))))

    @property
    def sigma_max(self) -> float:
        return float(self.t_to_sigma(torch.tensor(1.0)))

    def flow_times(self, steps: int) -> np.ndarray:
        """The ``steps`` flow times visited, as diffusers' FlowMatchEulerDiscreteScheduler makes them:
        linspace from 1 to the shifted smallest training time, then shifted (so the low end is shifted twice)."""
        t_min = self.shifted(np.float64(1 / self.num_train_timesteps))
        return self.shifted(np.linspace(1.0, t_min, steps))

    def sigma_list(self, steps: int, spacing: str = "linspace", steps_offset: int = 0,
                   final_sigma: str = "zero", rho: float = 7.0, convention: str = "euler",
                   family: str = "sd1") -> torch.Tensor:
        """Descending sigmas ``(steps + 1,)``; ``spacing`` is ``"linspace"`` (in t, shifted) or one of
        :data:`SIGMA_SPACINGS` (e.g. Karras et al. 2022, eq. 5) over the flow times between the linspace list's
        ends, as diffusers' FlowMatchEulerDiscreteScheduler does (in VE sigma, whose top is ~1e7, nearly every
        step would sit at t > 0.99). Every sampler uses the same flow times, so ``convention`` is accepted and
        unused, as is ``family``."""
        if spacing in SIGMA_SPACINGS:
            times = self.flow_times(steps)
            sigmas = self.t_to_sigma(spaced_sigmas(spacing, steps, float(times[-1]), float(times[0]), rho).double())
        elif spacing in ("linspace", "leading", "trailing"):
            sigmas = self.t_to_sigma(torch.from_numpy(self.flow_times(steps)))
        elif spacing == "align_your_steps":
            raise ValueError("align_your_steps has noise levels for Stable Diffusion 1.x / 2.x and SDXL schedules, "
                             "not for rectified flow: use linspace, karras or kl_optimal")
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; known: {', '.join(TIMESTEP_SPACINGS)}")
        return append_final_sigma(sigmas, final_sigma, self.sigma_min)
