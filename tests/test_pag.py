"""Perturbed-attention guidance (Ahn et al. 2024) equals diffusers' StableDiffusionPAGPipeline on the same tiny
weights and noise."""
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPAGPipeline

from pipelines.text_to_image import TextToImagePipeline

PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def folder(tiny_model_factory):
    return tiny_model_factory()


def diffusers_pag(folder, layers):
    pipe = StableDiffusionPAGPipeline.from_pretrained(folder, local_files_only=True, pag_applied_layers=layers)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance, rescale, layers", [(7.5, 0.0, ["mid"]), (1.0, 0.0, ["mid"]),
                                                       (5.0, 0.7, ["down_blocks.0", "up"])])
def test_pag_matches_diffusers_pag_pipeline(folder, guidance, rescale, layers):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    settings = dict(latents=latents, num_inference_steps=6, guidance_scale=guidance, guidance_rescale=rescale,
                    output_type="latent")
    pipe = TextToImagePipeline.from_pretrained(folder)
    ours = pipe(PROMPT, sampler="euler", pag_scale=3.0, pag_layers=layers, progress=False, **settings).images
    plain = pipe(PROMPT, sampler="euler", progress=False, **settings).images
    theirs = diffusers_pag(folder, layers)(PROMPT, pag_scale=3.0, **settings).images
    scale = float(theirs.abs().max())
    assert (ours - plain).abs().max() > 1e-3 * scale  # the perturbation changed the result
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, scale), rtol=0)


def test_pag_settings_are_checked_and_written_to_the_png_parameters(folder):
    pipe = TextToImagePipeline.from_pretrained(folder)
    with pytest.raises(ValueError, match="no self-attention layer matches PAG layer 'nowhere'"):
        pipe(PROMPT, pag_scale=2.0, pag_layers=["nowhere"], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="pag_scale must be a finite number >= 0"):
        pipe(PROMPT, pag_scale=float("nan"), num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="pag_layers entry 'down_blocks.\\(' is not a regular expression"):
        pipe(PROMPT, pag_scale=2.0, pag_layers=["down_blocks.("], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="not one composed with AND"):
        pipe("a circle AND a square", emphasis="a1111", pag_scale=2.0, num_inference_steps=2, progress=False)
    out = pipe(PROMPT, pag_scale=2.0, pag_layers="mid down_blocks.0", num_inference_steps=2, seed=1, progress=False)
    assert out.parameters[0]["pag_scale"] == 2.0 and out.parameters[0]["pag_layers"] == "mid down_blocks.0"
    assert "pag_scale" not in pipe(PROMPT, num_inference_steps=2, seed=1, progress=False).parameters[0]


def test_cli_pag_is_written_and_regenerated_from_the_png(folder, tmp_path):
    from PIL import Image

    from pipelines.cli import main
    from pipelines.metadata import parse_parameters

    first, again, plain = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    common = ["--model", str(folder), "--seed", "3", "--steps", "3", "--size", "64"]
    assert main(["generate", "a blue square", "-o", str(first), *common, "--pag-scale", "4",
                 "--pag-layers", "mid", "up_blocks.1"]) == 0
    text = Image.open(first).info["parameters"]
    assert "PAG scale: 4.0" in text and "PAG layers: mid up_blocks.1" in text
    assert parse_parameters(text)["pag_layers"] == "mid up_blocks.1"
    assert main(["generate", "--from", str(first), "-o", str(again)]) == 0
    assert main(["generate", "a blue square", "-o", str(plain), *common]) == 0
    assert Image.open(first).tobytes() == Image.open(again).tobytes()
    assert Image.open(first).tobytes() != Image.open(plain).tobytes()


def test_only_the_perturbed_layers_leave_the_fast_attention_path(folder):
    """PAG's controller names its layers: the others keep scaled_dot_product_attention, and the perturbed ones
    output their values without forming the scores."""
    from ldm.attention import IdentitySelfAttention

    pipe = TextToImagePipeline.from_pretrained(folder)
    places = pipe.pag_places(["mid"])
    assert places and all(p.startswith("mid_block.") and p.endswith("attn1") for p in places)
    formed = []
    perturbation = IdentitySelfAttention(places)
    spy = lambda probs, **where: formed.append(where["place"]) or probs  # noqa: E731
    spy.places = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2"}
    for controller, expected in ((perturbation, []), (spy, sorted(spy.places))):
        formed.clear()
        pipe.attention.controller = controller
        try:
            pipe(PROMPT, num_inference_steps=1, guidance_scale=1.0, progress=False, output_type="latent")
        finally:
            pipe.attention.controller = None
        assert sorted(set(formed)) == expected
