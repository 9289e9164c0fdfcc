"""ControlNet at inference: our pipeline equals diffusers' StableDiffusionControlNetPipeline on the same weights,
control image and noise; the control reaches img2img and inpainting; bad input gets clear errors."""
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, UNet2DConditionModel

from pipelines.controlnet import check_controlnet_fits
from pipelines.text_to_image import TextToImagePipeline

PROMPT = "a red circle at the top left"


def control_image(size=16):
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[2:9, 3:12] = 255  # a white box: what a mask control looks like
    return image


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory, tiny_model_factory):
    """A ControlNet made from the tiny UNet's encoder; its zero-initialised outputs are randomised so that it
    changes the result."""
    model = tiny_model_factory()
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))  # VAE factor 2
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if "controlnet_" in name or "conv_out" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    folder = tmp_path_factory.mktemp("controlnet")
    controlnet.save_pretrained(folder)
    return model, folder


def latents():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def test_matches_diffusers_controlnet_pipeline(controlnet_folder):
    model, folder = controlnet_folder
    pipe = TextToImagePipeline.from_pretrained(model)
    settings = dict(latents=latents(), num_inference_steps=5, guidance_scale=6.0, output_type="latent")
    plain = pipe(PROMPT, sampler="ddim", progress=False, **settings).images
    pipe.load_controlnet(folder)
    ours = pipe(PROMPT, sampler="ddim", progress=False, control_image=control_image(),
                controlnet_conditioning_scale=0.8, **settings).images
    theirs_pipe = StableDiffusionControlNetPipeline.from_pretrained(
        model, controlnet=ControlNetModel.from_pretrained(folder), local_files_only=True, safety_checker=None)
    theirs_pipe.scheduler = DDIMScheduler.from_config(theirs_pipe.scheduler.config)
    theirs_pipe.set_progress_bar_config(disable=True)
    from PIL import Image

    theirs = theirs_pipe(PROMPT, image=Image.fromarray(control_image()), controlnet_conditioning_scale=0.8,
                         **settings).images
    assert (ours - plain).abs().max() > 0.05  # the control matters
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    scale0 = pipe(PROMPT, sampler="ddim", progress=False, control_image=control_image(),
                  controlnet_conditioning_scale=0.0, **settings).images
    torch.testing.assert_close(scale0, plain, atol=1e-5, rtol=0)


def test_control_reaches_img2img_and_inpaint(controlnet_folder):
    model, folder = controlnet_folder
    pipe = TextToImagePipeline.from_pretrained(model)
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255
    settings = dict(num_inference_steps=4, seed=0, output_type="np", progress=False)
    without = [pipe.img2img(image, PROMPT, strength=0.8, **settings).images,
               pipe.inpaint(image, mask, PROMPT, **settings).images]
    pipe.load_controlnet(folder)
    with_control = [pipe.img2img(image, PROMPT, strength=0.8, control_image=control_image(), **settings).images,
                    pipe.inpaint(image, mask, PROMPT, control_image=control_image(), **settings).images]
    for a, b in zip(without, with_control):
        assert np.abs(a - b).max() > 0.01
    assert np.abs(with_control[1][0, :, 8:] - 128 / 255).max() < 1e-6  # outside the mask: the input


def test_bad_control_input(controlnet_folder, tiny_model_factory):
    model, folder = controlnet_folder
    pipe = TextToImagePipeline.from_pretrained(model)
    with pytest.raises(ValueError, match="no ControlNet is loaded"):
        pipe(PROMPT, control_image=control_image(), num_inference_steps=2)
    pipe.load_controlnet(folder)
    with pytest.raises(ValueError, match="2 control images for 1 prompts"):
        pipe(PROMPT, control_image=[control_image()] * 2, num_inference_steps=2)
    with pytest.raises(ValueError, match="prompt-to-prompt does not take a control_image"):
        pipe.prompt_to_prompt([PROMPT, PROMPT], control_image=control_image(), num_inference_steps=2)
    with pytest.warns(UserWarning, match="control image size 32x32 differs"):
        pipe(PROMPT, control_image=control_image(32), num_inference_steps=1, progress=False)
    sd_like = dict(ControlNetModel.load_config(folder), cross_attention_dim=768)
    with pytest.raises(ValueError, match="cross_attention_dim is 768, the UNet's is 32"):
        check_controlnet_fits(sd_like, pipe.unet.config, "sd15-canny")


def test_a_hires_fix_repaints_with_the_control_image_resized(controlnet_folder):
    """The hires pass is img2img at twice the size with the control image scaled to it."""
    import torch.nn.functional as F

    model, folder = controlnet_folder
    pipe = TextToImagePipeline.from_pretrained(model)
    pipe.load_controlnet(folder)
    settings = dict(num_inference_steps=4, seed=1, sampler="euler", output_type="latent", progress=False,
                    control_image=control_image())
    hires = pipe(PROMPT, hires_scale=2, hires_strength=0.6, **settings).images
    first = pipe(PROMPT, **settings).images
    control = torch.from_numpy(control_image().astype(np.float32) / 255).permute(2, 0, 1)[None]
    large = (F.interpolate(control, size=(32, 32), mode="bilinear", antialias=True)[0].permute(1, 2, 0) * 255)
    img2img = dict(strength=0.7, **{**settings, "num_inference_steps": 6})  # the last 4 of int(4 / 0.6) = 6 steps
    again = pipe.img2img(F.interpolate(first, scale_factor=2, mode="bilinear"), PROMPT,
                         **{**img2img, "control_image": large.round().byte().numpy()}).images
    assert hires.shape == (1, 4, 16, 16)
    torch.testing.assert_close(hires, again, atol=2e-2, rtol=0)  # the control image went through 8 bits here
    without = pipe.img2img(F.interpolate(first, scale_factor=2, mode="bilinear"), PROMPT,
                           **{**img2img, "control_image": None}).images
    assert (hires - without).abs().max() > 10 * (hires - again).abs().max()
