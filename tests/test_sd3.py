"""SD3-shaped models (MMDiT, two CLIP towers, no T5, rectified flow with shift 3, a VAE with a shift factor): our
pipeline equals diffusers' StableDiffusion3Pipeline on the same tiny weights and noise."""
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from pipelines.random_models import save_random_sd3
from pipelines.text_to_image import TextToImagePipeline

PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_random_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_matches_diffusers_sd3_pipeline(folder, negative):
    pipe = TextToImagePipeline.from_pretrained(folder)
    assert pipe.is_mmdit and pipe.is_flow and not pipe.is_sdxl
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(latents=latents, num_inference_steps=6, guidance_scale=5.0, output_type="latent")
    ours = pipe(PROMPT, negative_prompt=negative, sampler="flow_euler", progress=False, **settings).images
    theirs_pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None,
                                                           tokenizer_3=None, image_encoder=None, feature_extractor=None)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = theirs_pipe(PROMPT, negative_prompt=negative, **settings).images
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)


def test_prompt_to_prompt_on_mmdit_is_refused_clearly(folder):
    pipe = TextToImagePipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="MMDiT joint attention"):
        pipe.prompt_to_prompt(["a red circle", "a blue circle"], seed=0, num_inference_steps=2)
