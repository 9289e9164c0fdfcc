"""Samplers against known answers: with Gaussian data x0 ~ N(mu, s^2) the optimal denoiser is
D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE has the exact solution
x(sigma) = mu + (x(sigma_T) - mu) * sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2)."""
import math

import pytest
import torch

from ldm.samplers import (SAMPLERS, ancestral_step, dpmpp_multistep_update, get_sampler, in_flow_time,
                          lms_coefficients, renoise, repaint_path, sample_ddim, sample_ddpm, sample_dpm_2,
                          sample_dpm_2_ancestral, sample_dpmpp_2s_ancestral, sample_dpmpp_3m, sample_dpmpp_sde,
                          sample_euler, sample_euler_ancestral, sample_flow_heun, sample_heun, sample_lcm,
                          restart_plan, sample_restart)
from ldm.schedules import DiscreteSchedule, FlowSchedule, karras_sigmas

MU, S = 0.3, 0.5


def gaussian_denoiser(x, sigma):
    sigma = sigma.view(-1, 1, 1, 1)
    return MU + S**2 / (S**2 + sigma**2) * (x - MU)


def exact_ode(x_start, sigma_start, sigma_end):
    return MU + (x_start - MU) * math.sqrt(S**2 + sigma_end**2) / math.sqrt(S**2 + sigma_start**2)


def start_noise(sigma_max, shape=(2, 4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(shape, generator=g) * math.sqrt(S**2 + sigma_max**2)


DETERMINISTIC = {name: spec for name, spec in SAMPLERS.items() if not spec.stochastic}


def ode_error(name, steps, sigma_min=0.05, sigma_max=20.0):
    """Max error against the exact ODE solution, stopping at sigma_min (no final jump to zero)."""
    sigmas = karras_sigmas(steps + 1, sigma_min, sigma_max)
    x = start_noise(sigma_max)
    out = SAMPLERS[name].fn(gaussian_denoiser, x, sigmas)
    return (out - exact_ode(x, sigma_max, sigma_min)).abs().max().item()


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_ode_samplers_converge_at_their_order(name):
    errors = [ode_error(name, n) for n in (8, 16, 32, 64)]
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    order = SAMPLERS[name].order
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # doubling the steps divides the error by ~2^order
    assert 2 ** order * 0.75 < ratios[-1] < 2 ** order * 1.35, (errors, ratios)


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_ode_samplers_land_on_the_data_mean_and_scale(name):
    """Ending at sigma = 0 with many steps reproduces the exact transport map to the data distribution."""
    sigmas = torch.cat([karras_sigmas(200, 0.002, 20.0), torch.zeros(1)])
    x = start_noise(20.0)
    out = SAMPLERS[name].fn(gaussian_denoiser, x, sigmas)
    tolerance = 0.05 if SAMPLERS[name].order == 1 else 2e-3  # |x| ~ 20 at the start
    assert (out - exact_ode(x, 20.0, 0.0)).abs().max() < tolerance


def test_flow_heun_is_second_order_and_bounded_from_a_flow_models_first_sigma():
    """Heun in flow time converges at order 2 on the Gaussian ODE; from sigma ~ 1e7 (t = 1 - 1e-7) in 8 equal
    flow-time steps it lands near the exact answer, where Heun's trapezoid in sigma explodes."""
    errors = []
    for n in (8, 16, 32, 64):
        sigmas, x = karras_sigmas(n + 1, 0.05, 20.0), start_noise(20.0)
        errors.append((sample_flow_heun(gaussian_denoiser, x, sigmas) - exact_ode(x, 20.0, 0.05)).abs().max().item())
    assert 3.0 < errors[-2] / errors[-1] < 5.4, errors
    t = torch.linspace(1 - 1e-7, 0, 9, dtype=torch.float64)
    sigmas = t / (1 - t)  # (9,) from ~1e7 to 0
    x = start_noise(float(sigmas[0])).double()
    exact = exact_ode(x, float(sigmas[0]), 0.0)
    error = {name: (f(gaussian_denoiser, x, sigmas) - exact).abs().max().item()
             for name, f in (("sample_flow_heun", sample_flow_heun), ("sample_heun", sample_heun),
                             ("sample_euler", sample_euler))}
    assert error["sample_flow_heun"] < 0.1 and error["sample_flow_heun"] < error["sample_euler"] / 3, error
    assert error["sample_heun"] > 100, error


@pytest.mark.parametrize("nodes, expected", [
    ((2.0,), (1.0,)),  # Euler
    ((2.0, 3.0), (1.5, -0.5)),  # Adams-Bashforth 2 with equal steps: h (3/2, -1/2)
    ((2.0, 3.0, 4.0, 5.0), (55 / 24, -59 / 24, 37 / 24, -9 / 24)),  # Adams-Bashforth 4
])
def test_lms_coefficients_are_adams_bashforth_on_equal_steps(nodes, expected):
    """Stepping from sigma 2 to 1 (h = -1) with the slopes at the nodes, newest first: the classical
    Adams-Bashforth weights times h."""
    assert lms_coefficients(nodes, 1.0) == pytest.approx([-w for w in expected], rel=1e-12)


def test_lms_coefficients_integrate_the_polynomial_through_unequal_nodes():
    """With slopes d(s) = s^2 at three unequal nodes the quadratic is exact: sum w_j d_j = int s^2 ds."""
    nodes, target = (0.9, 2.5, 7.0), 0.2
    weights = lms_coefficients(nodes, target)
    assert sum(w * n**2 for w, n in zip(weights, nodes)) == pytest.approx((target**3 - nodes[0] ** 3) / 3, rel=1e-12)


def test_in_flow_time_keeps_euler_and_shows_the_callback_ve_variables():
    """Euler is the same step in sigma and in flow time, with the callback seeing (and replacing) the VE state."""
    t = torch.linspace(1 - 1e-6, 0, 9, dtype=torch.float64)
    sigmas = (t / (1 - t)).float()  # (9,) from ~1e6 to 0
    x = start_noise(float(sigmas[0]))

    def pin_first_channel(i, sigma, x_i, x0):
        x_i = x_i.clone()
        x_i[:, 0] = 1.0
        return x_i

    for callback in (None, pin_first_channel):
        torch.testing.assert_close(in_flow_time(sample_euler)(gaussian_denoiser, x, sigmas, callback=callback),
                                   sample_euler(gaussian_denoiser, x, sigmas, callback=callback),
                                   atol=1e-4, rtol=1e-4)


def test_ancestral_dpm_2_steps_in_flow_time_as_in_flow_time_runs_dpm_2():
    """Without noise, ancestral DPM2 with its steps in flow time (the midpoint rule written in t) equals DPM2 run
    by the generic :func:`in_flow_time` (the registered flow-time DPM2); an unknown time variable is refused."""
    t = torch.linspace(1 - 1e-7, 0, 9, dtype=torch.float64)
    sigmas = t / (1 - t)
    x = start_noise(float(sigmas[0])).double()
    torch.testing.assert_close(SAMPLERS["dpm_2_a"].flow_time_fn(gaussian_denoiser, x, sigmas, eta=0.0),
                               SAMPLERS["dpm_2"].flow_time_fn(gaussian_denoiser, x, sigmas), atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="unknown DPM2 time variable 'flows'"):
        sample_dpm_2_ancestral(gaussian_denoiser, x, sigmas, time="flows")


def test_dpm_2_in_flow_time_converges_from_a_flow_models_first_sigma():
    """In flow time (how ComfyUI samples flow models) DPM2 lands near the exact answer from sigma ~1e7
    (t = 1 - 1e-7) in 8 equal steps, and converges at second order in t (a midpoint rule)."""
    sampler = SAMPLERS["dpm_2"].flow_time_fn
    t = torch.linspace(1 - 1e-7, 0, 9, dtype=torch.float64)
    sigmas = t / (1 - t)
    x = start_noise(float(sigmas[0])).double()
    assert (sampler(gaussian_denoiser, x, sigmas) - exact_ode(x, float(sigmas[0]), 0.0)).abs().max() < 0.05
    errors = []
    for n in (32, 64):
        t = torch.linspace(1 - 1e-3, 1e-3, n + 1, dtype=torch.float64)
        sigmas = t / (1 - t)
        x = start_noise(float(sigmas[0])).double()
        errors.append((sampler(gaussian_denoiser, x, sigmas)
                       - exact_ode(x, float(sigmas[0]), float(sigmas[-1]))).abs().max().item())
    assert 3.0 < errors[0] / errors[1] < 5.4, errors


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_dpmpp_multistep_update_integrates_a_quadratic_x0_exactly(eta):
    """With x0(lambda) = a + b lambda + c lambda^2 the third-order update equals the exact
    ``(sigma'/sigma) e^{-eta h} x + int (1 + eta) e^{-(1 + eta)(lambda' - u)} x0(u) du`` (quadrature in float64);
    diffusers' / k-diffusion's weight of the curvature term (``curvature_weight=1``) misses it."""
    def x0_at(lam):
        return 0.3 - 0.7 * lam + 0.45 * lam**2

    sigmas = torch.tensor([2.0, 1.3, 0.9, 0.5], dtype=torch.float64)
    lambdas = -sigmas.log()
    history = [torch.full((3,), x0_at(float(lam)), dtype=torch.float64) for lam in lambdas[:3]]
    steps = [lambdas[1] - lambdas[0], lambdas[2] - lambdas[1]]
    x = torch.tensor([1.7, -0.4, 0.0], dtype=torch.float64)
    u = torch.linspace(float(lambdas[2]), float(lambdas[3]), 20001, dtype=torch.float64)
    weights = (1 + eta) * torch.exp(-(1 + eta) * (lambdas[3] - u)) * x0_at(u)
    integral = torch.trapezoid(weights, u)
    exact = sigmas[3] / sigmas[2] * math.exp(-eta * float(lambdas[3] - lambdas[2])) * x + integral
    ours = dpmpp_multistep_update(x, sigmas[2], sigmas[3], history, steps, eta)
    torch.testing.assert_close(ours, exact, atol=1e-8, rtol=0)
    theirs = dpmpp_multistep_update(x, sigmas[2], sigmas[3], history, steps, eta, curvature_weight=1.0)
    assert (theirs - exact).abs().max() > 1e-3


def test_dpmpp_3m_converges_at_third_order_and_diffusers_3m_at_second():
    """On diffusers' own Karras sigma lists (16 to 128 steps, stopping at sigma_min), Gaussian ODE: ours divides
    the error by ~8 per doubling, diffusers' ``DPMSolverMultistepScheduler(solver_order=3)`` by ~4."""
    from diffusers import DPMSolverMultistepScheduler

    errors = {"ours": [], "diffusers": []}
    for steps in (16, 32, 64, 128):
        scheduler = DPMSolverMultistepScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, solver_order=3,
            algorithm_type="dpmsolver++", timestep_spacing="linspace", use_karras_sigmas=True)
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas[:-1].double()  # (steps,): the last step, to zero, left out
        x = start_noise(float(sigmas[0])).double()
        exact = exact_ode(x, float(sigmas[0]), float(sigmas[-1]))
        sample = (x / math.sqrt(1 + float(sigmas[0]) ** 2)).float()  # diffusers' VP-scaled latents
        for i, t in enumerate(scheduler.timesteps[:-1]):
            sigma = float(sigmas[i])
            x_ve = sample.double() * math.sqrt(1 + sigma**2)
            eps = (x_ve - gaussian_denoiser(x_ve, torch.tensor([sigma], dtype=torch.float64))) / sigma
            sample = scheduler.step(eps.float(), t, sample).prev_sample
        theirs = sample.double() * math.sqrt(1 + float(sigmas[-1]) ** 2)
        errors["diffusers"].append((theirs - exact).abs().max().item())
        errors["ours"].append((sample_dpmpp_3m(gaussian_denoiser, x, sigmas) - exact).abs().max().item())
    ratios = {name: [a / b for a, b in zip(e, e[1:])] for name, e in errors.items()}
    assert all(6.5 < r < 10 for r in ratios["ours"][1:]), (errors, ratios)
    assert all(3 < r < 5 for r in ratios["diffusers"]), (errors, ratios)
    assert errors["ours"][-1] < errors["diffusers"][-1] / 4


def terminal_error_shift(sampler, schedule, convention="euler", steps=5):
    """How far a sampler's result moves when the network's x0 estimate at the list's first sigma (the stand-in
    for infinite noise, where a network is least reliable) is off by 0.1, on the Gaussian denoiser."""
    sigmas = schedule.sigma_list(steps, "trailing", 0, "zero", convention=convention).double()  # (steps + 1,)
    assert sigmas[0] > 1000

    def off_at_the_start(x, sigma):
        return gaussian_denoiser(x, sigma) + 0.1 * (sigma > 1000).view(-1, 1, 1, 1)

    x = start_noise(float(sigmas[0]), shape=(2, 4, 16, 16)).double()
    results = [sampler(denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))  # the same noise in both
               for denoiser in (off_at_the_start, gaussian_denoiser)]
    return (results[0] - results[1]).abs().max().item()


INFINITE_NOISE_SCHEDULES = {
    "zero_snr": lambda terminal: DiscreteSchedule.from_config(dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True), terminal),
    "flow": lambda terminal: FlowSchedule(shift=3.0),
}


@pytest.mark.parametrize("schedule", sorted(INFINITE_NOISE_SCHEDULES))
@pytest.mark.parametrize("name", sorted(set(DETERMINISTIC) - {"unipc_bh1"} | {"dpm_2_a", "dpmpp_2s_a", "dpmpp_sde",
                                                                              "restart"}))
def test_samplers_from_infinite_noise_do_not_amplify_the_first_x0_error(name, schedule):
    """From a zero-terminal-SNR schedule's or a flow model's first sigma (4096, 1.7e7), 5 steps: an x0 error of
    0.1 there moves the result of every deterministic sampler, ancestral DPM2, DPM++ 2S a, DPM++ SDE and Restart, as the
    pipeline picks them (the same noise in both runs), by under 0.02 (Euler 0.004; PLMS, whose Adams-Bashforth
    weights carry that first velocity into three more steps, 0.032 on the flow list). In sigma, Heun's trapezoid,
    DPM2's midpoint and ancestral DPM2's amplify it to 1.26, 0.10 and 0.50 on the zero-SNR list (the shapes model
    drew 0 % and 46 % of its single objects right with Heun and DPM2 at 5 steps and CFG 7.5, 58 % and 65 % in flow
    time); in flow time LMS's polynomial extrapolates the velocity from it (0.08; 0 % against 54 % in sigma), so
    LMS stays in sigma. (unipc_bh1 is unstable on flow models: see its README row.)"""
    spec = SAMPLERS[name]
    schedule = INFINITE_NOISE_SCHEDULES[schedule](spec.terminal_alpha_bar)
    bound = 0.04 if name == "plms" else 0.02  # its weights carry the first velocity three more steps: 0.032 on flow
    assert terminal_error_shift(spec.function(infinite_noise_start=True), schedule, spec.timestep_convention) < bound
    if isinstance(schedule, DiscreteSchedule) and name in ("heun", "dpm_2", "dpm_2_a", "plms", "restart"):
        assert terminal_error_shift(spec.fn, schedule) > 0.05
    if isinstance(schedule, DiscreteSchedule) and name == "lms":
        assert terminal_error_shift(in_flow_time(spec.fn), schedule) > 0.05


STOCHASTIC = {name: spec for name, spec in SAMPLERS.items() if spec.stochastic and name != "lcm"} | {"ddim_eta1": None}


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_sample_the_data_distribution(name):
    sigmas = torch.cat([karras_sigmas(300, 0.01, 40.0), torch.zeros(1)])
    x = start_noise(40.0, shape=(16, 4, 32, 32), seed=1)
    g = torch.Generator().manual_seed(2)
    if name == "ddim_eta1":
        out = sample_ddim(gaussian_denoiser, x, sigmas, generator=g, eta=1.0)
    else:
        out = SAMPLERS[name].fn(gaussian_denoiser, x, sigmas, generator=g)
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() / S - 1) < 0.03
    # the result is not the deterministic transport map: fresh noise really entered
    assert (out - exact_ode(x, 40.0, 0.0)).abs().mean() > 0.05


def test_dpmpp_2s_without_noise_is_second_order():
    """Ancestral DPM-Solver++(2S) with eta = 0 is DPM-Solver++(2S): its error falls ~4x per doubling of steps."""
    errors = []
    for steps in (8, 16, 32, 64):
        sigmas, x = karras_sigmas(steps + 1, 0.05, 20.0), start_noise(20.0)
        out = sample_dpmpp_2s_ancestral(gaussian_denoiser, x, sigmas, eta=0.0)
        errors.append((out - exact_ode(x, 20.0, 0.05)).abs().max().item())
    assert 3.0 < errors[-2] / errors[-1] < 5.4, errors


def test_dpmpp_sde_noises_are_increments_of_one_brownian_motion():
    """DPM++ SDE's two noises per step are Brownian increments over [sigma_mid, sigma] and [sigma', sigma]: their
    correlation is sqrt((sigma - sigma_mid) / (sigma - sigma')). Without noise it is DPM-Solver++(2S)."""
    sigmas = torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64)
    seen = []

    def zero(x, sigma):  # x0 = 0: the state is the scaled start plus the noise
        seen.append(x.clone())
        return torch.zeros_like(x)

    x = torch.zeros(1, 1, 400, 400, dtype=torch.float64)
    sample_dpmpp_sde(zero, x, sigmas, generator=torch.Generator().manual_seed(0))
    first, second = seen[1], seen[2]  # the midpoint's input (up_1 z_1), then the next step's (up_2 z_2)
    sigma_mid = 2.0
    correlation = torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1].item()
    assert correlation == pytest.approx(math.sqrt((4.0 - sigma_mid) / (4.0 - 1.0)), abs=0.01)
    x = start_noise(20.0).double()
    sigmas = karras_sigmas(9, 0.05, 20.0).double()
    torch.testing.assert_close(sample_dpmpp_sde(gaussian_denoiser, x, sigmas, eta=0.0),
                               sample_dpmpp_2s_ancestral(gaussian_denoiser, x, sigmas, eta=0.0))


def test_dpmpp_2s_a_and_dpmpp_sde_take_k_diffusions_step_in_lambda():
    """One step from sigma 3 to 1 as k-diffusion writes it in ``t = -log sigma``: a data-prediction step from t to
    t' is ``(sigma(t') / sigma(t)) x - expm1(t - t') x0``; the midpoint is ``t + h / 2``; the noise is the
    generator's next draw(s)."""
    sigmas = torch.tensor([3.0, 1.0], dtype=torch.float64)
    x = start_noise(3.0).double()
    x0 = gaussian_denoiser(x, sigmas[:1])

    def data_step(x, x0, sigma, sigma_to):
        t, t_to = -sigma.log(), -sigma_to.log()
        return torch.exp(t - t_to) * x - torch.expm1(t - t_to) * x0

    def midpoint(sigma, sigma_to):  # exp(-(t + h / 2))
        t, t_next = -sigma.log(), -sigma_to.log()
        return torch.exp(-(t + (t_next - t) / 2))

    def draws(count):
        generator = torch.Generator().manual_seed(4)
        return [torch.randn(x.shape, generator=generator, dtype=torch.float32).double() for _ in range(count)]

    down, up = ancestral_step(sigmas[0], sigmas[1])  # DPM++ 2S a
    sigma_s = midpoint(sigmas[0], down)
    x0_s = gaussian_denoiser(data_step(x, x0, sigmas[0], sigma_s), sigma_s.view(1))
    expected = data_step(x, x0_s, sigmas[0], down) + draws(1)[0] * up
    ours = sample_dpmpp_2s_ancestral(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, expected)

    first, second = draws(2)  # DPM++ SDE: an ancestral step to the midpoint, then one from sigma to sigma'
    sigma_s = midpoint(sigmas[0], sigmas[1])
    down, up = ancestral_step(sigmas[0], sigma_s)
    x0_s = gaussian_denoiser(data_step(x, x0, sigmas[0], down) + first * up, sigma_s.view(1))
    down, up = ancestral_step(sigmas[0], sigmas[1])
    a, b = sigmas[0] - sigma_s, sigmas[0] - sigmas[1]  # the Brownian increments' intervals
    expected = data_step(x, x0_s, sigmas[0], down) + ((a / b).sqrt() * first + (1 - a / b).sqrt() * second) * up
    ours = sample_dpmpp_sde(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, expected)


def test_ddpm_posterior_equals_ddim_eta_one_and_euler_ancestral():
    """Song et al. 2021: DDIM with eta = 1 is the DDPM posterior; in VE variables it is ancestral Euler."""
    schedule = DiscreteSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                             "beta_end": 0.012})
    sigmas = schedule.sigma_list(20, "trailing")
    x = start_noise(float(sigmas[0]))
    runs = [fn(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(9), **kw)
            for fn, kw in ((sample_ddpm, {}), (sample_ddim, {"eta": 1.0}), (sample_euler_ancestral, {}))]
    torch.testing.assert_close(runs[0], runs[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runs[1], runs[2], atol=1e-4, rtol=1e-4)


def gaussian_consistency_function(x, sigma):
    """The consistency function of Gaussian data: the probability-flow ODE's solution from sigma to 0."""
    sigma = sigma.view(-1, 1, 1, 1)
    return MU + (x - MU) * S / (S**2 + sigma**2).sqrt()


def test_lcm_samples_the_data_with_a_consistency_function_but_not_with_a_denoiser():
    """Multistep consistency sampling is exact for an exact consistency function (each x0 is a data sample), in
    any number of steps; the plain optimal denoiser's posterior means shrink the spread (what LCM distillation
    fixes)."""
    sigmas = torch.cat([karras_sigmas(4, 0.5, 40.0), torch.zeros(1)])
    x = start_noise(40.0, shape=(16, 4, 32, 32), seed=1)
    out = sample_lcm(gaussian_consistency_function, x, sigmas, generator=torch.Generator().manual_seed(2))
    assert abs(out.mean().item() - MU) < 0.01 and abs(out.std().item() / S - 1) < 0.02
    assert (out - exact_ode(x, 40.0, 0.0)).abs().mean() > 0.05  # fresh noise entered
    shrunk = sample_lcm(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(2))
    assert shrunk.std().item() / S < 0.9


def test_dpm_2_ancestral_without_noise_is_dpm_2():
    sigmas = torch.cat([karras_sigmas(10, 0.01, 10.0), torch.zeros(1)])
    x = start_noise(10.0)
    torch.testing.assert_close(sample_dpm_2_ancestral(gaussian_denoiser, x, sigmas, eta=0.0),
                               sample_dpm_2(gaussian_denoiser, x, sigmas))


def test_per_element_generators_make_batch_items_independent_of_the_batch():
    sigmas = torch.cat([karras_sigmas(10, 0.01, 10.0), torch.zeros(1)])
    x = start_noise(10.0, shape=(3, 4, 8, 8))
    batch = sample_euler_ancestral(gaussian_denoiser, x, sigmas,
                                   generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    alone = sample_euler_ancestral(gaussian_denoiser, x[1:2], sigmas, generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(batch[1:2], alone)


def test_callback_can_replace_the_state():
    """The per-step callback's return value replaces x (the inpainting hook)."""
    sigmas = torch.cat([karras_sigmas(5, 0.01, 10.0), torch.zeros(1)])
    x = start_noise(10.0)
    seen = []

    def pin_first_channel(i, sigma, x_i, x0):
        seen.append(i)
        x_i = x_i.clone()
        x_i[:, 0] = 1.0
        return x_i

    out = SAMPLERS["euler"].fn(gaussian_denoiser, x, sigmas, callback=pin_first_channel)
    assert seen == [0, 1, 2, 3, 4]
    assert torch.all(out[:, 0] == 1.0) and not torch.all(out[:, 1] == 1.0)


@pytest.mark.parametrize("name", ["unipc", "unipc_bh1", "euler", "heun", "lms", "dpm_2"])
def test_a_soft_blend_every_step_gives_the_same_result_with_every_ode_sampler(name):
    """A callback that pulls one channel halfway to 1 after every step (a soft inpainting mask) defines the same
    discrete dynamics for every ODE sampler: on that channel they agree with DPM-Solver++(2M) to 1e-4 or so.
    UniPC's corrector restarts from the state before the prediction, so it must carry the callback's change over
    (dropping it, as diffusers' UniPC does, leaves the channel 0.07 away here)."""
    sigmas = torch.cat([karras_sigmas(30, 0.01, 10.0), torch.zeros(1)])
    x = start_noise(10.0)

    def pull_first_channel(i, sigma, x_i, x0):
        x_i = x_i.clone()
        x_i[:, 0] = 0.5 * x_i[:, 0] + 0.5
        return x_i

    reference = SAMPLERS["dpmpp_2m"].fn(gaussian_denoiser, x, sigmas, callback=pull_first_channel)
    out = SAMPLERS[name].fn(gaussian_denoiser, x, sigmas, callback=pull_first_channel)
    assert (out[:, 0] - reference[:, 0]).abs().max() < 1e-3


def diffusers_repaint_path(steps, jump_length, jump_n_sample):
    """diffusers' RePaintScheduler timesteps as our path of sigma indices: a timestep below the previous one is a
    denoising step (one index down the sigma list), any other one undoes a step; runs of undos are one jump."""
    from diffusers import RePaintScheduler
    scheduler = RePaintScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps, jump_length, jump_n_sample)
    path, last = [0], int(scheduler.timesteps[0]) + 1
    for t in scheduler.timesteps.tolist():
        index = path[-1] + 1 if t < last else path[-1] - 1
        if t >= last and len(path) > 1 and path[-1] < path[-2]:
            path[-1] = index
        else:
            path.append(index)
        last = t
    return path


@pytest.mark.parametrize("steps, jump_length, jump_n_sample", [(20, 5, 4), (20, 3, 2), (10, 1, 3), (12, 4, 1)])
def test_repaint_path_is_diffusers_repaint_schedule(steps, jump_length, jump_n_sample):
    path = repaint_path(steps, jump_length, jump_n_sample)
    assert path == diffusers_repaint_path(steps, jump_length, jump_n_sample)
    assert path[-1] == steps and sum(b > a for a, b in zip(path, path[1:])) > steps * (jump_n_sample > 1)


def test_renoise_is_the_forward_process_between_two_levels():
    """Data N(MU, S^2) noised to sigma and renoised to sigma_up has the marginal N(MU, S^2 + sigma_up^2), and
    the noise added is independent of x."""
    g = torch.Generator().manual_seed(0)
    x = start_noise(0.4, shape=(200_000,), seed=1)
    up = renoise(x, 0.4, 1.5, g)
    assert up.mean().item() == pytest.approx(MU, abs=0.01)
    assert up.std().item() == pytest.approx(math.sqrt(S**2 + 1.5**2), rel=0.01)
    assert torch.corrcoef(torch.stack([x, up - x]))[0, 1].abs().item() < 0.01
    with pytest.raises(ValueError, match="goes up"):
        renoise(x, 1.5, 0.4, g)


def test_unknown_sampler_lists_known_ones():
    with pytest.raises(ValueError, match="known: ddpm, ddim, dpmpp_2m"):
        get_sampler("dpm_fast")


def a1111_restart_calls(sigmas, restart_steps, restart_times):
    """The sigmas at which the A1111 web UI's restart sampler (modules/sd_samplers_extra.py) calls the network,
    rebuilt from its description: Heun over (sigma, next) pairs of the main list, and after the pair that ends at
    the level nearest 0.1, restart_times copies of the pairs of a Karras list of restart_steps + 1 levels from the
    level nearest 2 down to it; a step to 0 takes one call."""
    low, high = int((sigmas - 0.1).abs().argmin()), int((sigmas - 2.0).abs().argmin())
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((float(sigmas[i]), float(sigmas[i + 1])))
        if i + 1 == low:
            levels = karras_sigmas(restart_steps + 1, float(sigmas[low]), float(sigmas[high]))
            pairs += [(float(a), float(b)) for a, b in zip(levels[:-1], levels[1:])] * restart_times
    return [c for a, b in pairs for c in ((a,) if b == 0 else (a, b))]


@pytest.mark.parametrize("steps", [20, 40])
def test_restart_calls_the_network_where_the_web_ui_does(steps):
    main, restart_steps, restart_times = restart_plan(steps)
    assert main + restart_steps * restart_times == steps
    sigmas = torch.cat([karras_sigmas(main, 0.0292, 14.6), torch.zeros(1)])
    calls = []

    def recording(x, sigma):
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)

    sample_restart(recording, start_noise(14.6), sigmas, torch.Generator().manual_seed(0), None,
                   restart_steps, restart_times)
    assert calls == pytest.approx(a1111_restart_calls(sigmas, restart_steps, restart_times), rel=1e-6)
    assert len(calls) == 2 * steps - 1


def test_restart_without_restarts_is_heun():
    """(Its samples keep the data distribution: test_stochastic_samplers_sample_the_data_distribution.)"""
    sigmas = torch.cat([karras_sigmas(12, 0.002, 20.0), torch.zeros(1)])
    x = start_noise(20.0)
    torch.testing.assert_close(sample_restart(gaussian_denoiser, x, sigmas, restart_times=0),
                               sample_heun(gaussian_denoiser, x, sigmas), rtol=0, atol=0)
