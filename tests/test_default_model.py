"""End-to-end checks on the shipped default model (weights/shapes-unet)."""
import numpy as np
import pytest
import torch

from pipelines.text_to_image import DEFAULT_MODEL, TextToImagePipeline
from train.evaluate import score
from train.shapes import parse_prompt


@pytest.fixture(scope="module")
def pipe():
    return TextToImagePipeline.from_pretrained()


def test_the_default_model_is_shipped_within_budget():
    files = [p for p in DEFAULT_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40e6
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]


def test_diffusers_loads_it_offline_and_agrees_with_us(pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, local_files_only=True)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(latents=latents, num_inference_steps=10, guidance_scale=5.0, output_type="latent")
    ours = pipe("a red circle at the top left", sampler="ddim", progress=False, **kwargs).images
    reference = theirs("a red circle at the top left", **kwargs).images
    torch.testing.assert_close(ours, reference, atol=1e-4 * max(1.0, float(reference.abs().max())), rtol=0)


PROMPTS = ["a red circle at the top left", "a blue square on the right", "a green triangle at the bottom",
           "a yellow circle in the center", "an orange square at the top", "a purple circle on the left"]


def test_generated_images_show_the_prompted_colour_and_place(pipe):
    """The evaluator reads colour and position back from images generated at 20 steps. (Shape is what this
    model still gets wrong most of the time: see the README's accuracy table; it is not asserted here.)"""
    images = pipe(PROMPTS, seed=0, num_inference_steps=20, progress=False).images
    results = [score(parse_prompt(p), image) for p, image in zip(PROMPTS, images)]
    correct = [r["color"] and r["position"] for r in results]
    assert np.mean(correct) >= 5 / 6, list(zip(PROMPTS, results))


def test_cli_generates_with_the_shipped_model_by_default(tmp_path):
    from PIL import Image

    from pipelines.cli import main
    from pipelines.metadata import parse_parameters

    out = tmp_path / "out.png"
    assert main(["generate", "a red circle at the top left", "-o", str(out), "--steps", "10", "--seed", "0"]) == 0
    image = Image.open(out)
    assert image.size == (128, 128)
    assert parse_parameters(image.info["parameters"])["model"] == "shapes-unet"
    found = score(parse_prompt("a red circle at the top left"), image.convert("RGB"))
    assert found["color"] and found["position"]


def test_inverting_and_inpainting_a_real_photograph(pipe):
    """scikit-image's astronaut, a real photograph far outside the shapes world: DDIM inversion at guidance 1 samples
    back the VAE's own round trip of it (closely with fixed-point refinement), and inpainting keeps every pixel
    outside the mask."""
    from PIL import Image

    from train.eval_editing import as_array, photograph, psnr

    image, caption = photograph("astronaut", 64), "a photo of an astronaut"
    through_vae = as_array(pipe.img2img(image, caption, strength=0.0, progress=False).images[0])
    errors = {}
    for iterations in (0, 3):
        inversion = pipe.invert(image, caption, 20, fixed_point_iterations=iterations, progress=False)
        errors[iterations] = psnr(through_vae, as_array(pipe.reconstruct(inversion, progress=False).images[0]))
    assert errors[0] > 20 and errors[3] > 28 and errors[3] > errors[0] + 5
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 20:52] = 255
    painted = pipe.inpaint(image, Image.fromarray(mask), "a red circle", seed=0, num_inference_steps=8,
                           progress=False).images[0]
    before, after = np.asarray(image, dtype=int), np.asarray(painted, dtype=int)
    np.testing.assert_array_equal(after[mask == 0], before[mask == 0])
    assert np.abs(after - before)[mask == 255].mean() > 10


INPAINTING = DEFAULT_MODEL.parent / "shapes-unet-inpainting"


def test_the_inpainting_variant_adds_only_its_unet():
    """weights/shapes-unet-inpainting links the default's VAE, text tower, tokenizer and scheduler; its own part,
    the 9-channel UNet, keeps the pair within the 40 MB budget."""
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert (INPAINTING / part).is_symlink() and (INPAINTING / part).resolve() == (DEFAULT_MODEL / part).resolve()
    own = [p for p in (INPAINTING / "unet").rglob("*") if p.is_file()]
    shipped = [p for p in DEFAULT_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in own + shipped) <= 40e6


def test_the_inpainting_variant_repaints_only_inside_the_mask():
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from train.eval_editing import inpaint_mask, single_object_scenes, swapped
    from train.shapes import render, render_masks

    pipe = TextToImagePipeline.from_pretrained(INPAINTING)
    assert pipe.is_inpainting_unet
    theirs = StableDiffusionInpaintPipeline.from_pretrained(INPAINTING, local_files_only=True)
    assert theirs.unet.config.in_channels == 9
    for k, (scene, caption) in enumerate(single_object_scenes(4, 5, 128)):
        target = swapped(caption, "color")[0]
        mask = inpaint_mask(render_masks(scene)[0], "box")
        image = np.asarray(render(scene))
        out = np.asarray(pipe.inpaint(Image.fromarray(image), Image.fromarray(mask.astype(np.uint8) * 255), target,
                                      seed=k, num_inference_steps=20, guidance_scale=3.0, progress=False).images[0])
        assert np.array_equal(out[~mask], image[~mask])
        assert score(parse_prompt(target), Image.fromarray(out))["color"], target
