"""Our pipeline equals diffusers' StableDiffusionPipeline on the same tiny weights and initial noise."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler,
                       PNDMScheduler, StableDiffusionPipeline, UniPCMultistepScheduler)

from pipelines.text_to_image import TextToImagePipeline

PROMPT = "a red circle at the top left"
ZERO_SNR_V = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  steps_offset=0)

CASES = [
    # (id, our sampler, diffusers scheduler class, scheduler overrides, extra diffusers config, steps)
    ("ddim-eps-leading", "ddim", DDIMScheduler, {}, {}, 10),
    ("euler-eps-leading", "euler", EulerDiscreteScheduler, {}, {}, 10),
    ("heun-eps-leading", "heun", HeunDiscreteScheduler, {}, {}, 8),
    ("dpmpp_2m-eps-trailing", "dpmpp_2m", DPMSolverMultistepScheduler, {"timestep_spacing": "trailing"},
     {"algorithm_type": "dpmsolver++"}, 10),
    # DPMSolverMultistepScheduler spaces n + 1 points and drops the last for leading / linspace (not Euler's n)
    ("dpmpp_2m-eps-leading", "dpmpp_2m", DPMSolverMultistepScheduler, {}, {"algorithm_type": "dpmsolver++"}, 10),
    ("dpmpp_2m-eps-linspace", "dpmpp_2m", DPMSolverMultistepScheduler, {"timestep_spacing": "linspace"},
     {"algorithm_type": "dpmsolver++"}, 10),
    ("dpmpp_2m-eps-karras", "dpmpp_2m", DPMSolverMultistepScheduler, {"use_karras_sigmas": True},
     {"algorithm_type": "dpmsolver++"}, 12),
    # ending on sigma_min, a run under 15 steps takes its last step at first order (diffusers' lower_order_final)
    ("dpmpp_2m-eps-leading-sigma_min", "dpmpp_2m", DPMSolverMultistepScheduler, {"final_sigmas_type": "sigma_min"},
     {"algorithm_type": "dpmsolver++"}, 10),
    ("ddim-v-leading", "ddim", DDIMScheduler, {"prediction_type": "v_prediction"}, {}, 10),
    ("euler-v-leading", "euler", EulerDiscreteScheduler, {"prediction_type": "v_prediction"}, {}, 10),
    ("ddim-v-zerosnr-trailing", "ddim", DDIMScheduler, ZERO_SNR_V, {}, 10),
    ("euler-v-zerosnr-trailing", "euler", EulerDiscreteScheduler, ZERO_SNR_V, {}, 10),
    ("dpmpp_2m-v-zerosnr-trailing", "dpmpp_2m", DPMSolverMultistepScheduler, ZERO_SNR_V,
     {"algorithm_type": "dpmsolver++"}, 10),
    # diffusers' HeunDiscreteScheduler has no zero-terminal-SNR option, so Heun is compared with v-prediction only.
    ("heun-v-leading", "heun", HeunDiscreteScheduler, {"prediction_type": "v_prediction"}, {}, 6),
    # UniPC: diffusers' default (bh2, order 2, corrector on) and the bh1 variant, on the "dpm" timestep lists
    ("unipc-eps-leading", "unipc", UniPCMultistepScheduler, {}, {}, 10),
    ("unipc-eps-karras", "unipc", UniPCMultistepScheduler, {"use_karras_sigmas": True}, {}, 12),
    ("unipc-v-zerosnr-trailing", "unipc", UniPCMultistepScheduler, ZERO_SNR_V, {}, 10),
    # bh1 ends on sigma_min: diffusers' bh1 step to sigma = 0 multiplies 0 by B(h) = -inf (NaN); ours gives x0.
    # A last step that ends above zero keeps its order in ours; diffusers' lower_order_final would make it first.
    ("unipc_bh1-eps-linspace", "unipc_bh1", UniPCMultistepScheduler,
     {"timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"},
     {"solver_type": "bh1", "lower_order_final": False}, 8),
    # LMS and DPM2 (diffusers has no zero-terminal-SNR option for either; diffusers integrates LMS's Lagrange
    # polynomials by quadrature, we in closed form). Not with Karras sigmas: diffusers' Euler-family schedulers ramp
    # between the ends of the leading / trailing timestep list, ours between the schedule's ends.
    ("lms-eps-leading", "lms", LMSDiscreteScheduler, {}, {}, 10),
    ("lms-v-leading", "lms", LMSDiscreteScheduler, {"prediction_type": "v_prediction"}, {}, 10),
    # PLMS: diffusers' PNDM without its Runge-Kutta warm-up (skip_prk_steps), as Stable Diffusion shipped it. Not on
    # v: diffusers' PNDM combines the raw v outputs of earlier steps and converts the sum to eps at the current
    # one; ours combines the eps of each step (README, "where we differ on purpose").
    ("plms-eps-leading", "plms", PNDMScheduler, {}, {"skip_prk_steps": True}, 10),
    ("plms-eps-leading-set_alpha_to_one", "plms", PNDMScheduler, {"set_alpha_to_one": True},
     {"skip_prk_steps": True}, 10),
    ("dpm_2-eps-leading", "dpm_2", KDPM2DiscreteScheduler, {}, {}, 8),
    ("dpm_2-v-leading", "dpm_2", KDPM2DiscreteScheduler, {"prediction_type": "v_prediction"}, {}, 6),
]


def diffusers_pipeline(folder, scheduler_cls, extra):
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(shape=(1, 4, 8, 8), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_latents_match_diffusers(tiny_model_factory, case):
    _, sampler, scheduler_cls, overrides, extra, steps = case
    folder = tiny_model_factory(**overrides)
    latents = noise()
    ours = TextToImagePipeline.from_pretrained(folder)(
        PROMPT, latents=latents, num_inference_steps=steps, guidance_scale=7.5, sampler=sampler,
        output_type="latent", progress=False).images
    theirs = diffusers_pipeline(folder, scheduler_cls, extra)(
        PROMPT, latents=latents, num_inference_steps=steps, guidance_scale=7.5, output_type="latent").images
    scale = theirs.abs().max()
    assert scale > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(scale)), rtol=0)


THIRD_ORDER_CASES = [
    # (id, scheduler overrides, steps): below 15 steps the last two steps drop to orders 2 and 1 in both
    ("eps-leading-10", {}, 10),
    ("eps-leading-16", {}, 16),
    ("v-zerosnr-trailing-16", ZERO_SNR_V, 16),
]


@pytest.mark.parametrize("case", THIRD_ORDER_CASES, ids=[c[0] for c in THIRD_ORDER_CASES])
def test_dpmpp_3m_matches_diffusers_but_for_the_curvature_weight(tiny_model_factory, monkeypatch, case):
    """With diffusers' weight on the curvature term (``curvature_weight=1``, see ``dpmpp_multistep_update``) our
    ``dpmpp_3m`` equals ``DPMSolverMultistepScheduler(solver_order=3)``; with ours (the exact integral) it differs
    from the third step on."""
    import functools

    from ldm import samplers

    _, overrides, steps = case
    folder = tiny_model_factory(**overrides)
    settings = dict(latents=noise(), num_inference_steps=steps, guidance_scale=7.5, output_type="latent")
    theirs = diffusers_pipeline(folder, DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++",
                                                                     "solver_order": 3})(PROMPT, **settings).images
    pipe = TextToImagePipeline.from_pretrained(folder)
    exact = pipe(PROMPT, sampler="dpmpp_3m", progress=False, **settings).images
    monkeypatch.setattr(samplers, "dpmpp_multistep_update",
                        functools.partial(samplers.dpmpp_multistep_update, curvature_weight=1.0))
    weighted_as_diffusers = pipe(PROMPT, sampler="dpmpp_3m", progress=False, **settings).images
    tolerance = 1e-4 * max(1.0, float(theirs.abs().max()))
    torch.testing.assert_close(weighted_as_diffusers, theirs, atol=tolerance, rtol=0)
    assert (exact - theirs).abs().max() > 10 * tolerance


STOCHASTIC_CASES = [
    # (id, our sampler, diffusers scheduler class, scheduler overrides, steps, CFG)
    ("lcm-eps", "lcm", LCMScheduler, {}, 4, 1.5),
    ("lcm-v-zerosnr", "lcm", LCMScheduler, ZERO_SNR_V, 4, 1.5),
    ("dpmpp_2m_sde-eps-leading", "dpmpp_2m_sde", DPMSolverMultistepScheduler,
     {"algorithm_type": "sde-dpmsolver++"}, 10, 7.5),
    ("dpmpp_2m_sde_heun-eps-leading", "dpmpp_2m_sde_heun", DPMSolverMultistepScheduler,
     {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, 10, 7.5),
    ("dpmpp_2m_sde_heun-v-zerosnr", "dpmpp_2m_sde_heun", DPMSolverMultistepScheduler,
     {**ZERO_SNR_V, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, 10, 7.5),
    ("dpm_2_a-eps-leading", "dpm_2_a", KDPM2AncestralDiscreteScheduler, {}, 6, 7.5),
    ("dpm_2_a-v-leading", "dpm_2_a", KDPM2AncestralDiscreteScheduler, {"prediction_type": "v_prediction"}, 6, 7.5),
]


@pytest.mark.parametrize("case", STOCHASTIC_CASES, ids=[c[0] for c in STOCHASTIC_CASES])
def test_stochastic_samplers_match_diffusers_draw_for_draw(tiny_model_factory, case):
    """Both pipelines take each step's noise from the same generator, in the same order."""
    _, sampler, scheduler_cls, overrides, steps, guidance = case
    folder = tiny_model_factory(**overrides)
    settings = dict(latents=noise(), num_inference_steps=steps, guidance_scale=guidance, output_type="latent")
    ours = TextToImagePipeline.from_pretrained(folder)(PROMPT, sampler=sampler, progress=False,
                                                       generator=torch.Generator().manual_seed(7), **settings).images
    theirs = diffusers_pipeline(folder, scheduler_cls, {})(PROMPT, generator=torch.Generator().manual_seed(7),
                                                           **settings).images
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)


def test_images_match_diffusers_with_negative_prompt_and_batch(tiny_model_factory):
    """Decoded uint8 images agree within 1 level; batch of two prompts with a negative prompt."""
    folder = tiny_model_factory()
    latents = noise((2, 4, 8, 8), seed=3)
    prompts = [PROMPT, "a blue square"]
    ours = TextToImagePipeline.from_pretrained(folder)(
        prompts, negative_prompt="green", latents=latents, num_inference_steps=10, guidance_scale=5.0,
        sampler="euler", output_type="np", progress=False).images
    theirs = diffusers_pipeline(folder, EulerDiscreteScheduler, {})(
        prompts, negative_prompt=["green", "green"], latents=latents, num_inference_steps=10, guidance_scale=5.0,
        output_type="np").images
    ours_u8, theirs_u8 = (np.round(a * 255).astype(int) for a in (ours, theirs))
    assert ours_u8.shape == (2, 16, 16, 3)
    assert np.abs(ours_u8 - theirs_u8).max() <= 1


def test_guidance_rescale_matches_diffusers(tiny_model_factory):
    folder = tiny_model_factory(**ZERO_SNR_V)
    latents = noise(seed=5)
    kwargs = dict(latents=latents, num_inference_steps=10, guidance_scale=7.5, guidance_rescale=0.7,
                  output_type="latent")
    ours = TextToImagePipeline.from_pretrained(folder)(PROMPT, sampler="ddim", progress=False, **kwargs).images
    theirs = diffusers_pipeline(folder, DDIMScheduler, {})(PROMPT, **kwargs).images
    plain = TextToImagePipeline.from_pretrained(folder)(
        PROMPT, sampler="ddim", progress=False, **{**kwargs, "guidance_rescale": 0.0}).images
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)
    assert (ours - plain).abs().max() > 1e-2  # the rescale really acted


def test_guidance_scale_one_is_the_conditional_model(tiny_model_factory):
    """CFG at scale 1 equals the conditional prediction: same as diffusers (which then skips the
    unconditional pass) and independent of the negative prompt."""
    folder = tiny_model_factory()
    pipe = TextToImagePipeline.from_pretrained(folder)
    kwargs = dict(latents=noise(seed=7), num_inference_steps=10, guidance_scale=1.0, sampler="ddim",
                  output_type="latent", progress=False)
    a = pipe(PROMPT, negative_prompt="", **kwargs).images
    b = pipe(PROMPT, negative_prompt="something else entirely", **kwargs).images
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    theirs = diffusers_pipeline(folder, DDIMScheduler, {})(
        PROMPT, latents=kwargs["latents"], num_inference_steps=10, guidance_scale=1.0, output_type="latent").images
    torch.testing.assert_close(a, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_matches_diffusers(tiny_model_factory, clip_skip):
    """``clip_skip`` = diffusers' (an earlier CLIP layer through the final layer norm); it changes the image. As
    A1111 and ComfyUI, and unlike diffusers, it applies to the negative prompt too: diffusers' encoding of the
    negative prompt with the same clip skip is passed to it as ``negative_prompt_embeds``."""
    folder = tiny_model_factory()
    pipe = TextToImagePipeline.from_pretrained(folder)
    settings = dict(latents=noise(), num_inference_steps=6, guidance_scale=6.0, output_type="latent")
    ours = pipe(PROMPT, negative_prompt="blue", sampler="euler", clip_skip=clip_skip, progress=False,
                **settings).images
    default = pipe(PROMPT, negative_prompt="blue", sampler="euler", progress=False, **settings).images
    theirs_pipe = diffusers_pipeline(folder, EulerDiscreteScheduler, {})
    encoder = theirs_pipe.text_encoder
    if not hasattr(encoder, "text_model"):  # transformers 5 dropped the level diffusers' clip_skip reads
        object.__setattr__(encoder, "text_model", SimpleNamespace(final_layer_norm=encoder.final_layer_norm))
    negative = theirs_pipe.encode_prompt("blue", "cpu", 1, False, clip_skip=clip_skip)[0]
    theirs = theirs_pipe(PROMPT, negative_prompt_embeds=negative, clip_skip=clip_skip, **settings).images
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)
    assert (ours - default).abs().max() > 1e-3


def test_freeu_matches_diffusers_enable_freeu(tiny_model_factory):
    folder = tiny_model_factory()
    kwargs = dict(latents=noise(seed=6), num_inference_steps=8, guidance_scale=7.5, output_type="latent")
    pipe = TextToImagePipeline.from_pretrained(folder)
    ours = pipe(PROMPT, sampler="euler", progress=False, freeu=(0.9, 0.2, 1.5, 1.6), **kwargs).images
    plain = pipe(PROMPT, sampler="euler", progress=False, **kwargs).images  # and off again for the next request
    theirs = diffusers_pipeline(folder, EulerDiscreteScheduler, {})
    theirs.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
    theirs = theirs(PROMPT, **kwargs).images
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)
    assert (ours - plain).abs().max() > 1e-2
    fresh = TextToImagePipeline.from_pretrained(folder)(PROMPT, sampler="euler", progress=False, **kwargs).images
    assert torch.equal(plain, fresh)
