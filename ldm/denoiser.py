"""One interface for every network: ``denoiser(x, sigma, cond) -> x0``.

A network F trained with some parameterization is turned into a denoiser in the VE view
(``x = x0 + sigma * noise``) by four scalings of sigma (Karras et al. 2022, eq. 7):

    D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))

The scalings are data, one small function per parameterization, not branches in the sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ldm.schedules import DiscreteSchedule, FlowSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


@dataclass(frozen=True)
class Scalings:
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor


def vp_scalings(prediction_type: str, sigma: torch.Tensor) -> Scalings:
    """Scalings for a VP network fed ``x_vp = x / sqrt(1 + sigma^2)``.

    - epsilon (Ho et al. 2020): ``x0 = x - sigma * eps``.
    - v_prediction (Salimans & Ho 2022, sec. 4): ``x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v``.
    - sample: the network predicts x0 directly.
    """
    c_in = (sigma**2 + 1) ** -0.5
    if prediction_type == "epsilon":
        return Scalings(torch.ones_like(sigma), -sigma, c_in)
    if prediction_type == "v_prediction":
        return Scalings(c_in**2, -sigma * c_in, c_in)
    if prediction_type == "sample":
        return Scalings(torch.zeros_like(sigma), torch.ones_like(sigma), c_in)
    raise ValueError(f"unknown prediction type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")


def flow_scalings(sigma: torch.Tensor) -> Scalings:
    """Rectified flow (Esser et al. 2024, eq. 2-3): the network sees ``x_t = x / (1 + sigma)`` at
    ``t = sigma / (1 + sigma)`` and predicts ``v = noise - x0``, so ``x0 = x_t - t * v``."""
    c_in = 1 / (1 + sigma)
    return Scalings(c_in, -sigma * c_in, c_in)


class Denoiser:
    """Wraps ``model(x_in, timestep, cond) -> F`` (a diffusers UNet/transformer call) into ``D(x, sigma, cond)``.

    ``schedule`` maps sigma to the network's timestep: for a :class:`DiscreteSchedule` the continuous
    log-sigma-interpolated timestep (rounded to an integer when ``quantize_timesteps`` is set, as
    diffusers' DPM-Solver does with Karras sigmas); for a :class:`FlowSchedule`, ``1000 * t``.
    The network runs in its own dtype; the denoiser takes and returns float32.
    """

    def __init__(self, model: Callable, schedule: DiscreteSchedule | FlowSchedule, prediction_type: str,
                 quantize_timesteps: bool = False):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")
        if (prediction_type == "flow") != isinstance(schedule, FlowSchedule):
            raise ValueError("prediction_type 'flow' goes with a FlowSchedule and only with it")
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.quantize_timesteps = quantize_timesteps

    def scalings(self, sigma: torch.Tensor) -> Scalings:
        if self.prediction_type == "flow":
            return flow_scalings(sigma)
        return vp_scalings(self.prediction_type, sigma)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network's conditioning timestep for each sigma (``c_noise``), ``(B,)``."""
        if isinstance(self.schedule, FlowSchedule):
            return FlowSchedule.sigma_to_t(sigma) * self.schedule.num_train_timesteps
        t = self.schedule.sigma_to_t(sigma)
        return t.round() if self.quantize_timesteps else t

    def model_output(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        """The raw network output F for VE input ``x`` ``(B, C, H, W)`` at ``sigma`` ``(B,)``."""
        s = self.scalings(sigma)
        x_in = x * s.c_in.view(-1, 1, 1, 1)
        return self.model(x_in, self.timestep(sigma), cond).float()

    def to_x0(self, x: torch.Tensor, sigma: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Combine a network output into the x0 estimate: ``c_skip x + c_out F``."""
        s = self.scalings(sigma)
        return x * s.c_skip.view(-1, 1, 1, 1) + output * s.c_out.view(-1, 1, 1, 1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        sigma = sigma.float().expand(x.shape[0]) if sigma.dim() == 0 else sigma.float()  # (B,)
        return self.to_x0(x, sigma, self.model_output(x, sigma, cond))

    def noise_scale(self, sigma: float) -> float:
        """Factor turning unit-variance noise in the network's input space into VE noise at ``sigma``:
        ``1 / c_in`` (``sqrt(1 + sigma^2)`` for VP, ``1 + sigma`` for flow)."""
        return float(1 / self.scalings(torch.tensor(float(sigma), dtype=torch.float64)).c_in)

    def to_model_space(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """VE latents at ``sigma`` to the network's input space (what diffusers' schedulers keep as latents)."""
        return x / self.noise_scale(sigma)
