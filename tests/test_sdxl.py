"""SDXL-shaped models (two text towers, pooled embedding, micro-conditioning): our pipeline equals diffusers'
StableDiffusionXLPipeline on the same tiny weights and noise; editing features run on them."""
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

from pipelines.random_models import save_random_sdxl
from pipelines.text_to_image import TextToImagePipeline

PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_random_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


def latents(seed=0):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler,scheduler_cls,negative", [("ddim", DDIMScheduler, None),
                                                             ("euler", EulerDiscreteScheduler, "blurry, dark")])
def test_matches_diffusers_sdxl_pipeline(folder, sampler, scheduler_cls, negative):
    pipe = TextToImagePipeline.from_pretrained(folder)
    assert pipe.is_sdxl and pipe.force_zeros_for_empty_prompt
    settings = dict(latents=latents(), num_inference_steps=5, guidance_scale=6.0, output_type="latent")
    ours = pipe(PROMPT, negative_prompt=negative, sampler=sampler, progress=False, **settings).images
    theirs_pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    theirs_pipe.scheduler = scheduler_cls.from_config(theirs_pipe.scheduler.config)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = theirs_pipe(PROMPT, negative_prompt=negative, **settings).images
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)


def test_clip_skip_matches_diffusers_sdxl_pipeline(folder):
    """SDXL reads the penultimate layer by default; ``clip_skip=1`` one earlier, in both towers, as diffusers
    does for the prompt (and A1111 and ComfyUI for the negative prompt too)."""
    pipe = TextToImagePipeline.from_pretrained(folder)
    settings = dict(latents=latents(1), num_inference_steps=4, guidance_scale=6.0, output_type="latent")
    ours = pipe(PROMPT, negative_prompt="dark", sampler="euler", clip_skip=1, progress=False, **settings).images
    default = pipe(PROMPT, negative_prompt="dark", sampler="euler", progress=False, **settings).images
    theirs_pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    theirs_pipe.scheduler = EulerDiscreteScheduler.from_config(theirs_pipe.scheduler.config)
    theirs_pipe.set_progress_bar_config(disable=True)
    negative, _, negative_pooled, _ = theirs_pipe.encode_prompt("dark", device="cpu", do_classifier_free_guidance=False,
                                                                clip_skip=1)
    theirs = theirs_pipe(PROMPT, negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled,
                         clip_skip=1, **settings).images
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)
    assert (ours - default).abs().max() > 1e-3
    with pytest.raises(ValueError, match="clip_skip must be between 0 and 2 for this model's 3-layer text encoder"):
        pipe(PROMPT, clip_skip=3, progress=False, **settings)


def test_editing_runs_on_sdxl(folder):
    import numpy as np

    pipe = TextToImagePipeline.from_pretrained(folder)
    image = np.full((16, 16, 3), 200, dtype=np.uint8)
    image[4:10, 4:10] = (220, 30, 30)
    inversion = pipe.invert(image, PROMPT, num_inference_steps=50, fixed_point_iterations=20, progress=False)
    back = pipe.reconstruct(inversion, output_type="latent", progress=False).images
    # a random network's plain 5-step round trip is ~5 off; the refined 50-step inversion returns the latents
    assert (back - inversion.trajectory[0]).abs().max() < 0.3
    null = pipe.invert(image, PROMPT, num_inference_steps=4, guidance_scale=5.0, null_text=True, null_text_steps=2,
                       progress=False)
    assert len(null.null_embeddings) == 4 and null.null_embeddings[0].shape[-1] == 64
    source, edited = pipe.prompt_to_prompt([PROMPT, "a blue circle at the top left"], seed=0, num_inference_steps=4,
                                           output_type="np", progress=False).images
    assert source.shape == edited.shape == (16, 16, 3)


def test_base_then_refiner_matches_diffusers_ensemble_of_experts(folder, tmp_path):
    """Base to 80 % of the schedule, then the refiner (second tower only, aesthetic-score time_ids): equal to
    diffusers' StableDiffusionXLPipeline(denoising_end=0.8) followed by StableDiffusionXLImg2ImgPipeline
    (denoising_start=0.8) on the same weights and noise."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from pipelines.random_models import save_random_sdxl_refiner

    refiner_folder = save_random_sdxl_refiner(tmp_path / "refiner")
    base, refiner = TextToImagePipeline.from_pretrained(folder), TextToImagePipeline.from_pretrained(refiner_folder)
    assert refiner.is_sdxl and refiner.text_encoder is None and refiner.requires_aesthetics_score
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(num_inference_steps=10, guidance_scale=5.0, output_type="latent")
    ours = base(PROMPT, latents=latents, sampler="ddim", refiner=refiner, refiner_switch=0.8, progress=False,
                **settings).images
    plain = base(PROMPT, latents=latents, sampler="ddim", progress=False, **settings).images
    assert (ours - plain).abs().max() > 1e-3  # the refiner did the last steps
    their_base = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    their_base.scheduler = DDIMScheduler.from_config(their_base.scheduler.config)
    their_refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder, local_files_only=True)
    their_refiner.scheduler = DDIMScheduler.from_config(their_refiner.scheduler.config)
    for pipe in (their_base, their_refiner):
        pipe.set_progress_bar_config(disable=True)
    halfway = their_base(PROMPT, latents=latents, denoising_end=0.8, **settings).images
    theirs = their_refiner(PROMPT, image=halfway, denoising_start=0.8, **settings).images
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)

    from pipelines.cli import main as ldm
    from pipelines.metadata import read_parameters

    out = tmp_path / "refined.png"
    assert ldm(["generate", PROMPT, "--model", str(folder), "--refiner", str(refiner_folder), "--steps", "4",
                "--seed", "0", "-o", str(out)]) == 0
    assert read_parameters(out)["refiner"] == str(refiner_folder)


def test_align_your_steps_takes_the_sdxl_levels_on_sdxl(folder):
    from ldm.schedules import align_your_steps_sigmas

    pipe = TextToImagePipeline.from_pretrained(folder)
    torch.testing.assert_close(pipe.sigmas(10, "euler", "align_your_steps")[:-1], align_your_steps_sigmas(10, "sdxl"))
    assert not torch.allclose(align_your_steps_sigmas(10, "sdxl"), align_your_steps_sigmas(10, "sd1"))
