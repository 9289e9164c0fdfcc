"""DDIM inversion against the exact probability-flow ODE of Gaussian data, and its round trip."""
import math

import pytest
import torch

from ldm.inversion import invert_ddim
from ldm.samplers import sample_ddim
from ldm.schedules import DiscreteSchedule

MU, S = 0.3, 0.5
SCHEDULE = DiscreteSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})


def gaussian_denoiser(x, sigma):
    sigma = sigma.view(-1, 1, 1, 1)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def vp_noise_scale(sigma):
    return math.sqrt(1 + sigma**2)


def clean(seed=0):
    return MU + S * torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_inversion_converges_to_the_exact_ode_at_first_order():
    """Inverting from sigma_min to sigma_max lands on mu + (x0 - mu) sqrt(S^2 + hi^2) / sqrt(S^2 + lo^2)."""
    x0 = clean()
    errors = []
    for steps in (50, 100, 200, 400):
        sigmas = SCHEDULE.sigma_list(steps, "karras")
        lo, hi = float(sigmas[-2]), float(sigmas[0])
        trajectory = invert_ddim(gaussian_denoiser, x0, sigmas[:-1], vp_noise_scale)  # start at sigma_min
        exact = MU + (x0 - MU) * math.sqrt(S**2 + hi**2) / math.sqrt(S**2 + lo**2)
        assert len(trajectory) == steps
        errors.append(((trajectory[-1] - exact).abs().max() / hi).item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(1.8 < r < 2.2 for r in ratios), (errors, ratios)


@pytest.mark.parametrize("iterations, tolerance", [(0, 0.15 * S), (5, 1e-4)])
def test_sampling_back_from_the_inversion_reconstructs_the_input(iterations, tolerance):
    """Plain DDIM inversion round-trips approximately; with fixed-point refinement, exactly."""
    x0 = clean(1)
    sigmas = SCHEDULE.sigma_list(50, "trailing")  # ends at sigma = 0: the clean latents
    trajectory = invert_ddim(gaussian_denoiser, x0, sigmas, vp_noise_scale, fixed_point_iterations=iterations)
    states = []
    back = sample_ddim(gaussian_denoiser, trajectory[-1], sigmas, callback=lambda i, s, x, x0_: states.append(x))
    assert (back - x0).abs().max() < tolerance
    if iterations:  # every sampling state sits on the inversion trajectory
        for i, state in enumerate(states):
            assert (state - trajectory[-2 - i]).abs().max() < tolerance * max(1.0, float(sigmas[i + 1]))


def test_fixed_point_iterations_shrink_the_round_trip_error():
    x0 = clean(2)
    sigmas = SCHEDULE.sigma_list(10, "trailing")
    errors = []
    for iterations in (0, 1, 2, 5):
        trajectory = invert_ddim(gaussian_denoiser, x0, sigmas, vp_noise_scale, fixed_point_iterations=iterations)
        errors.append((sample_ddim(gaussian_denoiser, trajectory[-1], sigmas) - x0).abs().max().item())
    assert all(a > 2 * b for a, b in zip(errors, errors[1:])), errors
