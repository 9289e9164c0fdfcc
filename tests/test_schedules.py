"""Schedules and sigma lists equal diffusers' definitions."""
import math

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler,
                       FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler)

from ldm.samplers import sample_euler
from ldm.schedules import (SIGMA_SPACINGS, ZERO_SNR_ALPHA_BAR, ZERO_SNR_ALPHA_BAR_EXACT, DiscreteSchedule,
                           FlowSchedule, lcm_timesteps, make_betas, rescale_zero_terminal_snr, spaced_sigmas)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(beta_schedule, zero_snr):
    config = {**SD, "beta_schedule": beta_schedule, "rescale_betas_zero_snr": zero_snr}
    ours = DiscreteSchedule.from_config(config).alphas_cumprod
    theirs = EulerDiscreteScheduler(**config).alphas_cumprod
    torch.testing.assert_close(ours, theirs)


def test_zero_terminal_snr_rescale_ends_at_zero_and_keeps_the_start():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    rescaled = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    assert rescaled[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert rescaled[0].item() == pytest.approx(torch.cumprod(1 - betas, 0)[0].item(), rel=1e-6)


@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("steps", [7, 20, 50])
def test_euler_sigma_lists_match_diffusers(spacing, offset, steps):
    schedule = DiscreteSchedule.from_config(SD)
    theirs = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
    theirs.set_timesteps(steps)
    ours = schedule.sigma_list(steps, spacing, offset)
    torch.testing.assert_close(ours, theirs.sigmas, rtol=1e-5, atol=1e-6)
    t_ours = schedule.sigma_to_t(ours[:-1])
    torch.testing.assert_close(t_ours, theirs.timesteps.float(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("steps", [5, 20])
def test_karras_sigmas_match_diffusers_dpm(steps):
    schedule = DiscreteSchedule.from_config(SD)
    theirs = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    theirs.set_timesteps(steps)
    ours = schedule.sigma_list(steps, "karras")
    torch.testing.assert_close(ours, theirs.sigmas, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(schedule.sigma_to_t(ours[:-1]).round(), theirs.timesteps.float())


@pytest.mark.parametrize("spacing", ["exponential", "beta"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_exponential_and_beta_sigmas_match_diffusers_dpm_and_unipc(spacing, zero_snr):
    """diffusers' DPM-Solver and UniPC space these between the schedule's ends, as ours; they hand the network
    the timestep truncated to an integer (643.75 -> 643; 999 -> 998 at the top, after a float64 round trip),
    ours the exact one of each sigma, so the lists are compared, not the timesteps."""
    config = {**SD, "rescale_betas_zero_snr": zero_snr}
    ours = DiscreteSchedule.from_config(config).sigma_list(12, spacing)
    for scheduler in (DPMSolverMultistepScheduler, UniPCMultistepScheduler):
        theirs = scheduler(**config, **{f"use_{spacing}_sigmas": True})
        theirs.set_timesteps(12)
        torch.testing.assert_close(ours, theirs.sigmas, rtol=1e-5, atol=1e-6)
    steps = -torch.diff(ours[:-1].log())  # (11,) steps in lambda = -log sigma
    if spacing == "exponential":  # equal steps in lambda
        torch.testing.assert_close(steps, steps.mean().expand(11), rtol=1e-4, atol=1e-5)
    else:  # Beta(0.6, 0.6) quantiles crowd both ends: the middle steps in sigma are the largest
        gaps = -torch.diff(ours[:-1])
        assert gaps[5] > gaps[0] and gaps[5] > gaps[-1]


@pytest.mark.parametrize("spacing", ["exponential", "beta"])
def test_flow_exponential_and_beta_sigmas_match_diffusers(spacing):
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0, **{f"use_{spacing}_sigmas": True})
    theirs.set_timesteps(20)
    ours = FlowSchedule(shift=3.0).sigma_list(20, spacing)
    torch.testing.assert_close(FlowSchedule.sigma_to_t(ours), theirs.sigmas, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [7, 20])
def test_ddim_and_dpm_timesteps_match_diffusers(steps):
    """DDIM rounds linspace; DPM-Solver spaces n + 1 points and drops the last for leading and linspace."""
    for spacing, offset in (("leading", 1), ("trailing", 0), ("linspace", 0)):
        for convention, scheduler in (("ddim", DDIMScheduler), ("dpm", DPMSolverMultistepScheduler)):
            theirs = scheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
            theirs.set_timesteps(steps)
            ours = DiscreteSchedule.from_config(SD).timesteps(steps, spacing, offset, convention)
            np.testing.assert_array_equal(ours, theirs.timesteps.numpy())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_match_diffusers(shift):
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift)
    theirs.set_timesteps(12)
    ours = FlowSchedule(shift=shift).sigma_list(12)
    # our sigmas are VE (t / (1 - t)); t = 1 is held just below 1 so the first sigma is finite
    torch.testing.assert_close(FlowSchedule.sigma_to_t(ours), theirs.sigmas, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(ours).all() and ours[0] > 1e6


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_karras_sigmas_match_diffusers(shift):
    """Karras spacing of a flow model is eq. 5 over flow time t (as diffusers), not over the VE sigma t / (1 - t),
    which would crowd the steps at t > 0.99."""
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift, use_karras_sigmas=True)
    theirs.set_timesteps(20)
    ours = FlowSchedule(shift=shift).sigma_list(20, "karras")
    torch.testing.assert_close(FlowSchedule.sigma_to_t(ours), theirs.sigmas, rtol=1e-5, atol=1e-6)
    assert (FlowSchedule.sigma_to_t(ours[:-1]) > 0.99).sum() <= 2


@pytest.mark.parametrize("steps", [61, 103, 121])
def test_trailing_spacing_gives_exactly_the_steps_asked_for(steps):
    """diffusers' trailing arange(T, 0, -T / n) yields n + 1 timesteps for these n (the last one -1); ours gives its
    first n."""
    theirs = DDIMScheduler(**SD, timestep_spacing="trailing")
    theirs.set_timesteps(steps)
    ours = DiscreteSchedule.from_config(SD).timesteps(steps, "trailing")
    assert len(theirs.timesteps) == steps + 1 and len(ours) == steps
    np.testing.assert_array_equal(ours, theirs.timesteps.numpy()[:steps])


def test_karras_ramp_of_a_zero_snr_schedule_starts_at_eulers_stand_in():
    """DDIM's alpha_bar_T stand-in (2^-64, sigma ~4e9) would put the Karras ramp's top far above any trained
    sigma; every sampler's ramp starts at Euler's (2^-24, sigma ~4096), as diffusers' Euler / DPM-Solver."""
    config = {**SD, "rescale_betas_zero_snr": True}
    ddim = DiscreteSchedule.from_config(config, ZERO_SNR_ALPHA_BAR_EXACT).sigma_list(20, "karras")
    euler = DiscreteSchedule.from_config(config, ZERO_SNR_ALPHA_BAR).sigma_list(20, "karras")
    torch.testing.assert_close(ddim, euler)
    assert 4000 < float(ddim[0]) < 4200


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_lcm_timesteps_equal_diffusers_lcm_scheduler(steps):
    scheduler = LCMScheduler()
    scheduler.set_timesteps(steps)
    assert lcm_timesteps(steps).tolist() == scheduler.timesteps.tolist()
    if steps == 4:
        assert lcm_timesteps(steps).tolist() == [999, 759, 499, 259]


def test_lcm_takes_at_most_its_distillation_steps():
    with pytest.raises(ValueError, match="1 to 50 steps"):
        lcm_timesteps(51)


def test_lcm_keeps_its_timesteps_and_ends_on_x0_whatever_the_spacing_and_final_sigma():
    schedule = DiscreteSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                             "beta_end": 0.012})
    expected = schedule.sigma_list(4, "leading", convention="lcm")
    assert expected[-1] == 0 and torch.equal(expected[:-1], schedule.t_to_sigma(torch.tensor([999, 759, 499, 259])))
    for spacing, final in (("karras", "zero"), ("trailing", "sigma_min")):
        assert torch.equal(schedule.sigma_list(4, spacing, final_sigma=final, convention="lcm"), expected)


def test_kl_optimal_sigmas_bring_euler_closest_to_the_exact_answer_on_unit_gaussian_data():
    """Unit-variance Gaussian data: D(x, sigma) = x / (1 + sigma^2), and an Euler step from sigma to sigma'
    multiplies the exact solution x(sigma) ~ sqrt(1 + sigma^2) by cos(arctan sigma - arctan sigma'). Equal steps
    in arctan sigma (kl_optimal) maximise the product of the cosines for given ends: Euler's result there is
    cos(total / n)^n of the exact one, closer than on the Karras, exponential and beta lists."""
    def unit_gaussian(x, sigma):
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)

    steps, sigma_min, sigma_max = 8, 0.03, 14.6
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64) * sigma_max
    exact = math.sqrt(1 + sigma_min**2) / math.sqrt(1 + sigma_max**2) * sigma_max
    ratios = {}
    for spacing in SIGMA_SPACINGS:
        sigmas = spaced_sigmas(spacing, steps, sigma_min, sigma_max).double()
        ratios[spacing] = float(sample_euler(unit_gaussian, x, sigmas)) / exact
    total = math.atan(sigma_max) - math.atan(sigma_min)
    assert ratios["kl_optimal"] == pytest.approx(math.cos(total / (steps - 1)) ** (steps - 1), rel=1e-6)
    assert all(ratios["kl_optimal"] > ratio for spacing, ratio in ratios.items() if spacing != "kl_optimal"), ratios


@pytest.mark.parametrize("family, theirs", [("sd1", "StableDiffusionSigmas"), ("sdxl", "StableDiffusionXLSigmas")])
def test_align_your_steps_at_ten_steps_is_the_published_list_as_diffusers_ships_it(family, theirs):
    """diffusers' ``AysSchedules`` hold NVIDIA's 10-step lists, ending in 0."""
    from diffusers.schedulers import AysSchedules

    ours = DiscreteSchedule.from_config(SD).sigma_list(10, "align_your_steps", family=family)  # (11,)
    np.testing.assert_allclose(ours.numpy(), AysSchedules[theirs], rtol=1e-6)


def test_align_your_steps_interpolates_log_linearly_between_the_published_levels():
    """20 steps place 21 points on the same [0, 1] grid as the 11 published levels: every other one is a
    published level and those between are the geometric means of their neighbours."""
    ten = DiscreteSchedule.from_config(SD).sigma_list(10, "align_your_steps").double()
    twenty = DiscreteSchedule.from_config(SD).sigma_list(20, "align_your_steps").double()
    torch.testing.assert_close(twenty[:-1:2], ten[:-1])
    torch.testing.assert_close(twenty[1:-2:2], (twenty[:-3:2] * twenty[2:-1:2]).sqrt(), rtol=1e-6, atol=0)
    assert twenty[-2].item() == pytest.approx((0.152 * 0.029) ** 0.5, rel=1e-6)


def test_align_your_steps_starts_a_zero_terminal_snr_schedule_at_pure_noise_and_refuses_others():
    for terminal in (ZERO_SNR_ALPHA_BAR, ZERO_SNR_ALPHA_BAR_EXACT):
        zero_snr = DiscreteSchedule.from_config({**SD, "rescale_betas_zero_snr": True}, terminal)
        ours = zero_snr.sigma_list(10, "align_your_steps")
        assert ours[0].item() == pytest.approx(4096, rel=1e-3)  # Euler's stand-in for infinity, as for karras
        torch.testing.assert_close(ours[1:], DiscreteSchedule.from_config(SD).sigma_list(10, "align_your_steps")[1:])
    with pytest.raises(ValueError, match="Stable Diffusion's"):
        DiscreteSchedule.from_config({**SD, "beta_schedule": "linear", "beta_end": 0.02}).sigma_list(
            10, "align_your_steps")
    with pytest.raises(ValueError, match="rectified flow"):
        FlowSchedule(shift=3.0).sigma_list(10, "align_your_steps")
    with pytest.raises(ValueError, match="not 'svd'"):
        DiscreteSchedule.from_config(SD).sigma_list(10, "align_your_steps", family="svd")
