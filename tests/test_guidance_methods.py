"""Guidance methods besides CFG. Adaptive projected guidance (Sadat et al. 2024) on x0: diffusers' formula, CFG as
its special case, the projection's geometry. CFG-Zero* (Fan et al. 2025): diffusers' scale, its closed forms, the
zero-init step. The pipeline / PNG / command-line plumbing of both."""
import pytest
import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale
from PIL import Image

from ldm.guidance import ProjectedGuidance, ZeroStarGuidance
from pipelines.cli import main
from pipelines.metadata import parse_parameters
from pipelines.text_to_image import TextToImagePipeline


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return tiny_model_factory()


@pytest.fixture(scope="module")
def pipe(folder):
    return TextToImagePipeline.from_pretrained(folder)


def x0_pairs(steps=3, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 4, 8, 8, generator=generator), torch.randn(batch, 4, 8, 8, generator=generator))
            for _ in range(steps)]


@pytest.mark.parametrize("eta, threshold, momentum", [(0.0, 0.0, 0.0), (0.3, 2.0, -0.5), (1.0, 6.0, 0.4)])
def test_matches_diffusers_normalized_guidance_in_the_papers_formulation(eta, threshold, momentum):
    """diffusers' ``use_original_formulation=True`` takes the scale w - 1 (0 = the conditional prediction)."""
    scale, ours = 5.0, ProjectedGuidance(eta, threshold, momentum)
    buffer = MomentumBuffer(momentum) if momentum else None
    for sigma, (cond, uncond) in zip([8.0, 3.0, 1.0], x0_pairs()):
        guided = cond + (scale - 1) * ours.update(cond - uncond, cond, sigma)
        theirs = normalized_guidance(cond, uncond, scale - 1, buffer, eta, threshold, use_original_formulation=True)
        torch.testing.assert_close(guided, theirs, atol=1e-6, rtol=1e-6)


def test_without_projection_threshold_or_momentum_it_is_cfg_and_eta_0_is_orthogonal_to_x0():
    (cond, uncond), = x0_pairs(1)
    assert torch.allclose(ProjectedGuidance(eta=1.0).update(cond - uncond, cond, 1.0), cond - uncond, atol=1e-6)
    update = ProjectedGuidance(eta=0.0, norm_threshold=0.5).update(cond - uncond, cond, 1.0)
    assert (update * cond).flatten(1).sum(1).abs().max() < 1e-4  # no component along x0_cond, per image
    assert update.flatten(1).norm(dim=1).max() <= 0.5 + 1e-6


def test_momentum_restarts_when_sigma_rises():
    pairs = x0_pairs(3)
    carried = ProjectedGuidance(momentum=-0.5)
    for sigma, (cond, uncond) in zip([5.0, 2.0], pairs):
        carried.update(cond - uncond, cond, sigma)
    cond, uncond = pairs[2]
    fresh = ProjectedGuidance(momentum=-0.5).update(cond - uncond, cond, 9.0)
    assert torch.equal(carried.update(cond - uncond, cond, 9.0), fresh)
    kept = ProjectedGuidance(momentum=-0.5)
    kept.update(pairs[0][1] - pairs[0][0], pairs[0][1], 5.0)
    assert not torch.allclose(kept.update(cond - uncond, cond, 2.0), fresh)


def test_pipeline_apg_with_eta_1_is_cfg_and_the_default_differs(pipe):
    settings = dict(seed=4, num_inference_steps=4, guidance_scale=6.0, output_type="latent", progress=False)
    cfg = pipe("a red circle", **settings)
    assert "guidance" not in cfg.parameters[0]
    as_cfg = pipe("a red circle", guidance="apg", apg_eta=1.0, **settings).images
    torch.testing.assert_close(as_cfg, cfg.images, atol=1e-4, rtol=1e-4)
    apg = pipe("a red circle", guidance="apg", apg_momentum=-0.5, **settings)
    assert (apg.images - cfg.images).abs().max() > 1e-3
    assert {k: apg.parameters[0][k] for k in ("guidance", "apg_eta", "apg_norm_threshold", "apg_momentum")} == dict(
        guidance="apg", apg_eta=0.0, apg_norm_threshold=0.0, apg_momentum=-0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"guidance": "cfg++"}, "unknown guidance 'cfg\\+\\+'; known: cfg, apg, cfg_zero_star"),
    ({"zero_init_steps": 1}, "zero_init_steps sets up guidance='cfg_zero_star'"),
    ({"guidance": "cfg_zero_star", "zero_init_steps": 2}, "zero_init_steps must be fewer than the 2 steps"),
    ({"guidance": "cfg_zero_star", "pag_scale": 1.0}, "CFG-Zero\\* acts on classifier-free guidance"),
    ({"apg_eta": 0.5}, "apg_eta, apg_norm_threshold and apg_momentum set up guidance='apg'"),
    ({"guidance": "apg", "apg_momentum": 1.5}, "apg_momentum must be a finite number in"),
    ({"guidance": "apg", "apg_norm_threshold": float("nan")}, "apg_norm_threshold must be a finite number"),
    ({"guidance": "apg", "guidance_rescale": 0.5}, "adaptive projected guidance acts on classifier-free guidance"),
    ({"guidance": "apg", "emphasis": "a1111", "prompt": "a AND b"}, "not with a guidance-distilled UNet, AND"),
    ({"guidance": "apg", "emphasis": "a1111", "prompt": "a poster, 16:9"}, "not with a guidance-distilled UNet"),
    ({"guidance": "cfg_zero_star", "emphasis": "a1111", "prompt": "a:2"}, "not with a guidance-distilled UNet"),
])
def test_bad_apg_settings_fail_before_any_work(pipe, kwargs, message):
    prompt = kwargs.pop("prompt", "a red circle")
    with pytest.raises(ValueError, match=message):
        pipe(prompt, num_inference_steps=2, progress=False, **kwargs)


@pytest.mark.parametrize("options, written", [
    (["--guidance", "apg", "--apg-norm-threshold", "4", "--apg-momentum", "-0.5"],
     {"guidance": "apg", "apg_norm_threshold": 4.0, "apg_momentum": -0.5}),
    (["--guidance", "cfg_zero_star", "--zero-init-steps", "2"], {"guidance": "cfg_zero_star", "zero_init_steps": 2}),
])
def test_cli_guidance_methods_are_written_and_regenerated_from_the_png(folder, tmp_path, options, written):
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "a red circle", "-o", str(first), "--model", str(folder), "--seed", "2", "--steps",
                 "3"] + options) == 0
    params = parse_parameters(Image.open(first).info["parameters"])
    assert {key: params[key] for key in written} == written
    assert main(["generate", "--from", str(first), "-o", str(again)]) == 0
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    plain = tmp_path / "c.png"  # switching the method drops the other one's settings read from the PNG
    assert main(["generate", "--from", str(first), "-o", str(plain), "--guidance", "cfg"]) == 0
    assert "guidance" not in parse_parameters(Image.open(plain).info["parameters"])


def test_zero_star_matches_diffusers_scale_and_its_closed_forms():
    (cond, uncond), = x0_pairs(1)
    scale = cfg_zero_star_scale(cond.flatten(1), uncond.flatten(1)).view(-1, 1, 1, 1)
    torch.testing.assert_close(ZeroStarGuidance.combine(uncond, cond, 4.0),
                               scale * uncond + 4.0 * (cond - scale * uncond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ZeroStarGuidance.combine(uncond, -3 * uncond, 7.0), -3 * uncond)  # parallel: c
    other = cond - (cond * uncond).flatten(1).sum(1).view(-1, 1, 1, 1) / uncond.flatten(1).square().sum(1).view(
        -1, 1, 1, 1) * uncond  # orthogonal to uncond: w c
    torch.testing.assert_close(ZeroStarGuidance.combine(uncond, other, 7.0), 7.0 * other, atol=1e-5, rtol=1e-5)


def test_zero_init_steps_precede_any_sampler_which_starts_after_them_without_their_history(pipe):
    """With DPM++ 2M (a multistep sampler), two zero-init steps keep the latent, then the sampler runs from the
    third sigma as if it started there."""
    settings = dict(seed=1, num_inference_steps=6, sampler="dpmpp_2m", guidance_scale=5.0, progress=False,
                    output_type="latent", guidance="cfg_zero_star", zero_init_steps=2)
    out = pipe("a red circle", **settings).images
    request = pipe.prepare("a red circle", **{k: v for k, v in settings.items() if k != "progress"})
    sigmas = pipe.sigmas(6, "dpmpp_2m", request.spacing)
    denoiser = pipe.denoiser("dpmpp_2m", request.spacing)
    start = pipe.initial_noise(request) * denoiser.noise_scale(float(sigmas[0]))  # an ε model: VE x stays
    x = pipe.denoise(request, denoiser, start, sigmas[2:], progress=False, first_step=2)
    torch.testing.assert_close(out, denoiser.to_model_space(x, float(sigmas[-1])), atol=1e-5, rtol=1e-5)


def test_zero_star_zero_init_leaves_the_first_steps_where_they_start(pipe):
    seen = []
    settings = dict(seed=1, num_inference_steps=5, sampler="euler", guidance_scale=5.0, progress=False,
                    output_type="latent", callback=lambda i, sigma, x, x0: seen.append(x.clone()))
    out = pipe("a red circle", guidance="cfg_zero_star", zero_init_steps=2, **settings)
    sigmas = pipe.sigmas(5, "euler", pipe.default_spacing())
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    start = noise * float(1 + sigmas[0] ** 2) ** 0.5  # the VE latent the sampler starts from
    torch.testing.assert_close(seen[0], start)
    torch.testing.assert_close(seen[1], start)
    assert (seen[2] - start).abs().max() > 1e-2
    assert (out.parameters[0]["guidance"], out.parameters[0]["zero_init_steps"]) == ("cfg_zero_star", 2)
    seen.clear()
    none = pipe("a red circle", guidance="cfg_zero_star", zero_init_steps=0, **settings).images
    assert (seen[0] - start).abs().max() > 1e-2
    cfg = pipe("a red circle", **settings).images
    assert (none - cfg).abs().max() > 1e-4  # the fitted unconditional scale
