"""Adaptive projected guidance (Sadat et al. 2024) on x0: diffusers' formula, CFG as its special case, the
projection's geometry, and the pipeline / PNG / command-line plumbing."""
import pytest
import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance
from PIL import Image

from ldm.guidance import ProjectedGuidance
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
    ({"guidance": "cfg++"}, "unknown guidance 'cfg\\+\\+'; known: cfg, apg"),
    ({"apg_eta": 0.5}, "apg_eta, apg_norm_threshold and apg_momentum set up guidance='apg'"),
    ({"guidance": "apg", "apg_momentum": 1.5}, "apg_momentum must be a finite number in"),
    ({"guidance": "apg", "apg_norm_threshold": float("nan")}, "apg_norm_threshold must be a finite number"),
    ({"guidance": "apg", "guidance_rescale": 0.5}, "adaptive projected guidance acts on classifier-free guidance"),
    ({"guidance": "apg", "emphasis": "a1111", "prompt": "a AND b"}, "not with a guidance-distilled UNet, AND"),
])
def test_bad_apg_settings_fail_before_any_work(pipe, kwargs, message):
    prompt = kwargs.pop("prompt", "a red circle")
    with pytest.raises(ValueError, match=message):
        pipe(prompt, num_inference_steps=2, progress=False, **kwargs)


def test_cli_apg_is_written_and_regenerated_from_the_png(folder, tmp_path):
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", "a red circle", "-o", str(first), "--model", str(folder), "--seed", "2", "--steps",
                 "3", "--guidance", "apg", "--apg-norm-threshold", "4", "--apg-momentum", "-0.5"]) == 0
    params = parse_parameters(Image.open(first).info["parameters"])
    assert (params["guidance"], params["apg_norm_threshold"], params["apg_momentum"]) == ("apg", 4.0, -0.5)
    assert main(["generate", "--from", str(first), "-o", str(again)]) == 0
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
