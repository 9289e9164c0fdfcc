"""Inpainting-UNet training at smoke scale: the widened UNet starts as the base model, its extra inputs are made as
the pipeline makes them, resume is exact, and the result loads as a 9-channel inpainting model."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from pipelines.images import image_tensor, mask_tensor
from pipelines.text_to_image import TextToImagePipeline
from train.shapes import Scene, make_object, render, render_masks
from train.train_inpainting import MASK_KINDS, draw_mask, inpainting_unet, masked_inputs, run, trainable_unet


def test_widened_unet_predicts_as_the_base_until_trained(tiny_model_factory):
    base = TextToImagePipeline.from_pretrained(tiny_model_factory()).unet
    wide = inpainting_unet(base, 5).eval()
    assert wide.config.in_channels == 9 and not wide.conv_in.weight[:, 4:].any()
    gen = torch.Generator().manual_seed(0)
    x, extra = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 8, 8, generator=gen)
    cond = torch.randn(2, 77, base.config.cross_attention_dim, generator=gen)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        plain = base(x, t, encoder_hidden_states=cond).sample
        widened = wide(torch.cat([x, extra], 1), t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(widened, plain, atol=1e-5, rtol=0)


def test_masks_cover_what_their_kind_says():
    """Whole-image masks, rectangles (boxes around an object or anywhere) and dilated silhouettes, each of which
    covers an object whole; the same generator state draws the same mask."""
    scene = Scene("gray", (make_object("blue", "square", "top left", "large", 64),
                           make_object("red", "circle", "bottom right", "small", 64)), "above", image_size=64)
    objects = render_masks(scene)
    counts = {"full": 0, "rectangle": 0, "silhouette": 0}
    rng = np.random.default_rng(0)
    for _ in range(60):
        mask = draw_mask(rng, scene, 64)
        assert mask.shape == (64, 64) and mask.dtype == bool and mask.any()
        rows, cols = np.nonzero(mask)
        if mask.all():
            counts["full"] += 1
        elif mask.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1):
            counts["rectangle"] += 1
        else:
            counts["silhouette"] += 1
            assert any(not (obj & ~mask).any() for obj in objects)
    assert all(counts.values()), counts
    assert set(MASK_KINDS) == {"box", "object", "rectangle", "full"}
    same = [draw_mask(np.random.default_rng(5), scene, 64) for _ in range(2)]
    assert np.array_equal(*same)


def test_extra_inputs_are_what_the_pipeline_feeds_the_unet(tiny_model_factory):
    pipe = TextToImagePipeline.from_pretrained(tiny_model_factory())
    scene = Scene("white", (make_object("green", "triangle", "center", "large", 16),), image_size=16)
    image = render(scene)
    mask = np.zeros((16, 16), dtype=bool)
    mask[3:11, 5:13] = True
    pixels = image_tensor(image, pipe.vae_scale_factor)  # (1, 3, 16, 16) in [-1, 1]
    latent_mask, latents = masked_inputs(pipe, pixels, torch.from_numpy(mask)[None, None])
    pipeline_mask = mask_tensor(Image.fromarray(mask.astype(np.uint8) * 255), (16, 16))  # (1, 1, 16, 16)
    expected = pipe.encode(pixels * (pipeline_mask < 0.5))
    torch.testing.assert_close(latents[:, 0], expected, atol=1e-6, rtol=0)
    assert torch.equal(latent_mask[:, 0], F.interpolate(pipeline_mask, size=expected.shape[2:]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_factory):
    model = tiny_model_factory()
    tmp = tmp_path_factory.mktemp("inpainting-train")
    args = ["--model", str(model), "--num-images", "6", "--steps", "3", "--batch-size", "2", "--lr", "1e-2",
            "--warmup", "0", "--sample-every", "0", "--validation-count", "1", "--validation-steps", "1",
            "--mixed-precision", "no", "--ema-decay", "0.5"]
    whole = run(args + ["--output-dir", str(tmp / "whole")])
    run(args + ["--output-dir", str(tmp / "parts"), "--stop-after", "1"])
    parts = run(args + ["--output-dir", str(tmp / "parts"), "--resume", "latest"])
    return model, whole["final_dir"], parts["final_dir"]


def test_resumed_training_gives_the_same_weights(trained):
    _, whole, parts = trained
    a = load_file(str(whole / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(parts / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["conv_in.weight"][:, 4:].abs().max() > 0  # the mask and masked-image inputs are read now


def test_trained_folder_is_an_inpainting_model_that_keeps_the_unmasked_pixels(trained):
    _, whole, _ = trained
    pipe = TextToImagePipeline.from_pretrained(whole)
    assert pipe.is_inpainting_unet
    scene = Scene("black", (make_object("red", "circle", "center", "large", 16),), image_size=16)
    image = np.asarray(render(scene))
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    out = np.asarray(pipe.inpaint(Image.fromarray(image), Image.fromarray(mask), "a blue square", seed=0,
                                  num_inference_steps=3, progress=False).images[0])
    assert np.array_equal(out[mask == 0], image[mask == 0]) and not np.array_equal(out, image)


def test_an_inpainting_base_is_fine_tuned_as_it_is(trained, tmp_path):
    """A 9-channel base is not widened again: training starts from its own weights, mask inputs included."""
    from ldm.loading import load_components

    _, whole, _ = trained
    base = load_components(whole).unet
    start = trainable_unet(TextToImagePipeline.from_pretrained(whole))
    assert start.config.in_channels == 9 and start.conv_in.weight.dtype == torch.float32
    assert all(torch.equal(a.float(), b) for a, b in zip(base.state_dict().values(), start.state_dict().values()))
    result = run(["--model", str(whole), "--output-dir", str(tmp_path / "again"), "--steps", "1",
                  "--num-images", "4", "--batch-size", "2", "--sample-every", "0", "--validation-count", "1",
                  "--validation-steps", "1", "--mixed-precision", "no"])
    assert TextToImagePipeline.from_pretrained(result["final_dir"]).unet.config.in_channels == 9


def test_nine_channel_inpainting_matches_diffusers_inpaint_pipeline(tiny_model_factory, tmp_path):
    """Same 9-channel weights (the extra inputs read, not zero), noise, mask and masked-image latents: our final
    latents equal diffusers' ``StableDiffusionInpaintPipeline``'s. diffusers samples the masked image's posterior
    where we take its mean, so its latents are passed in; and given ``latents=`` it starts from pure noise where
    we add the image's latents, which a zero-terminal-SNR DDIM start (alpha_bar = 0) makes the same."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    from ldm.loading import load_components
    from train.train_inpainting import save_model_folder

    base = tiny_model_factory(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                              timestep_spacing="trailing", steps_offset=0)
    unet = inpainting_unet(load_components(base).unet, 5)
    with torch.no_grad():
        unet.conv_in.weight[:, 4:] = 0.1 * torch.randn(unet.conv_in.weight[:, 4:].shape,
                                                       generator=torch.Generator().manual_seed(0))
    save_model_folder(base, unet, tmp_path / "inpainting")
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "inpainting")
    scene = Scene("white", (make_object("red", "circle", "center", "large", 16),), image_size=16)
    image, mask = render(scene), np.zeros((16, 16), dtype=np.uint8)
    mask[2:10, 4:14] = 255
    settings = dict(num_inference_steps=5, guidance_scale=4.0, output_type="latent")
    ours = pipe.inpaint(image, Image.fromarray(mask), "a blue square", sampler="ddim", seed=1, progress=False,
                        **settings).images
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # what seed 1 draws
    theirs_pipe = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "inpainting", local_files_only=True,
                                                                 safety_checker=None, feature_extractor=None)
    theirs_pipe.scheduler = DDIMScheduler.from_config(theirs_pipe.scheduler.config)
    theirs_pipe.set_progress_bar_config(disable=True)
    pixels = image_tensor(image, pipe.vae_scale_factor)
    masked_latents = pipe.encode(pixels * (mask_tensor(Image.fromarray(mask), (16, 16)) < 0.5))
    theirs = theirs_pipe("a blue square", image=image, mask_image=Image.fromarray(mask), latents=noise,
                         masked_image_latents=masked_latents, height=16, width=16, strength=1.0, **settings).images
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, float(theirs.abs().max())), rtol=0)


def test_text_to_image_on_an_inpainting_unet_masks_everything(tiny_model_factory):
    """Outside inpainting a 9-channel UNet sees every pixel masked; the widened, untrained UNet then generates
    what its base generates."""
    from dataclasses import replace

    from ldm.loading import load_components

    components = load_components(tiny_model_factory())
    base = TextToImagePipeline(components)
    wide = TextToImagePipeline(replace(components, unet=inpainting_unet(components.unet, 5)))
    assert wide.is_inpainting_unet
    settings = dict(num_inference_steps=4, seed=3, output_type="latent", progress=False)
    torch.testing.assert_close(wide("a red circle", **settings).images, base("a red circle", **settings).images,
                               atol=1e-5, rtol=0)
    extra = wide.everything_masked((8, 8))
    assert extra.shape == (1, 5, 8, 8) and (extra[:, 0] == 1).all()
    torch.testing.assert_close(extra[:, 1:], wide.encode(torch.zeros(1, 3, 16, 16)))
